"""Data: turn code into StarCoder2 training data (reference: data-pipeline.md).

Stages are pure functions over `Document`s (document.py); pipeline.py chains them, shards.py stores
token ids, fim.py and loader.py feed the trainer.
"""
