#!/usr/bin/env bash
# Create .venv and install starcoder2 with its test dependencies. Idempotent: a second run is quick.
# torch is installed first, pinned, on its own: a plain or unpinned `torch` pulls a multi-GB CUDA
# build on a CPU machine. Elsewhere than our build machines, set TORCH_INDEX_URL (for example
# https://download.pytorch.org/whl/cpu) to choose the CPU or CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (The filter hides this machine's harmless notes about missing local index folders; pip's exit status is kept.)
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
fi
pip_install -e ".[dev]"
# The TGI client for tests/server/test_clients.py: it pins huggingface-hub<1, which would downgrade
# transformers 5, so it goes in without its dependencies (aiohttp and pydantic come with [dev]).
.venv/bin/python -c "import text_generation" 2>/dev/null || pip_install --no-deps text-generation==0.7.0
.venv/bin/python -c "import starcoder2, torch; print(f'starcoder2 {starcoder2.__version__} ready (torch {torch.__version__})')"
