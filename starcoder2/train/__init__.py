"""Training: config (config.py), optimiser and schedule (optim.py), atomic resumable checkpoints
(state.py), parallelism applied from outside the model (parallel.py), and the loop (loop.py)."""
