#!/usr/bin/env bash
# Re-train the embedded default model from scratch: data, tokenizer, training, export.
# Usage: bash recipes/embedded/run.sh          (about 2 hours on 2 CPU cores; re-run to resume)
# Env: OUT (default runs/embedded), STARCODER2 (default: the starcoder2 on PATH or .venv/bin/starcoder2)
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=recipes/embedded
OUT=${OUT:-runs/embedded}
SC2=${STARCODER2:-$(command -v starcoder2 || echo .venv/bin/starcoder2)}
PY=$(dirname "$SC2")/python
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

# 1. The corpus: this interpreter's standard library (PSF-2.0), cleaned by the pipeline; no tokenizer yet.
"$SC2" data prepare "$STDLIB" --out "$OUT/data" --config "$HERE/data.json" --jsonl "$OUT/docs.jsonl"
# 2. An 8k byte-level BPE trained on the kept documents, StarCoder2's 38 special tokens first.
[ -f "$OUT/tokenizer/tokenizer.json" ] || "$SC2" tokenizer train "$OUT/docs.jsonl" --vocab-size 8192 --out "$OUT/tokenizer"
# 3. Token shards (the cleaning stages are reused from step 1's cache).
[ -f "$OUT/data/manifest.json" ] || "$SC2" data prepare "$STDLIB" --out "$OUT/data" --config "$HERE/data.json" --tokenizer "$OUT/tokenizer"
# 4. Training with FIM (resumes from the last checkpoint when re-run).
"$SC2" train --config "$HERE/train.json" --data "$OUT/data" --out "$OUT/train" --resume
# 5. The Hugging Face layout that ships in the package.
"$SC2" export "$OUT/train" --out "$OUT/model"
echo "done: $OUT/model (copy it to starcoder2/assets/default_model to ship it)"
