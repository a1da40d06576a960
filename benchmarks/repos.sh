#!/usr/bin/env bash
# Repository-level completion benchmark (`starcoder2 eval repo`, docs/repo.md) on pure-Python
# packages the embedded model never saw (its training data is the Python standard library only:
# starcoder2/assets/default_model/data_manifest.json). Fetches pinned sdists from PyPI, makes each a
# git repository (so the index follows git ls-files), runs every context mode and hole kind with the
# repository's own tests, and writes docs/repo_bench.json, docs/repo_bench.md and docs/repo_bench.png.
#
#   nice -n 19 bash benchmarks/repos.sh                      # the embedded model, as in docs/repo.md
#   MODEL=bigcode/starcoder2-3b N=50 BUDGET=4096 bash benchmarks/repos.sh    # a real checkpoint
#
# Results JSONL files stay in $WORK: rerunning continues them. One thread: the model is small and a
# shared machine makes threads wait on each other. Left out: repositories with compiled extensions.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${WORK:-/tmp/starcoder2-repobench}
PACKAGES=${PACKAGES:-"isodate==0.7.2 toolz==1.2.0"}
N=${N:-40}
SEED=${SEED:-0}
BUDGET=${BUDGET:-512}  # the demo model attends 512 tokens per layer (sliding window)
MODEL_ARGS=${MODEL:+--model $MODEL}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$WORK"
reports=()
for spec in $PACKAGES; do
    name=${spec%%==*}
    version=${spec##*==}
    dir="$WORK/$name-$version"
    if [ ! -d "$dir/.git" ]; then
        "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$WORK/sdists" "$spec"
        rm -rf "$dir"
        tar --no-same-owner -xzf "$WORK/sdists/$name-$version.tar.gz" -C "$WORK"
        git -C "$dir" init --quiet
        git -C "$dir" add -A
        git -C "$dir" -c user.name=bench -c user.email=bench@localhost commit --quiet -m "$spec sdist"
    fi
    echo "== $spec" >&2
    "$PY" -m starcoder2.cli eval repo "$dir" $MODEL_ARGS --dtype fp32 --seed "$SEED" --n "$N" --budget "$BUDGET" \
        --results "$WORK/$name.results.jsonl" --output "$WORK/$name.json" --workers 2
    reports+=("$WORK/$name.json")
done

"$PY" - "$ROOT/docs" "${reports[@]}" <<'EOF'
import json, sys
from pathlib import Path

from starcoder2.eval.repobench import markdown_table, plot
from starcoder2.eval.runner import write_json

docs, paths = Path(sys.argv[1]), sys.argv[2:]
reports = [json.loads(Path(p).read_text()) for p in paths]
for r in reports:
    r.pop("repo", None)  # a temporary path; repo_name and files_sha256 identify it
write_json(docs / "repo_bench.json", reports)
(docs / "repo_bench.md").write_text("".join(f"### {r['repo_name']}\n\n{markdown_table(r)}\n\n" for r in reports))
plot(reports, docs / "repo_bench.png")
print(f"wrote {docs}/repo_bench.json, repo_bench.md, repo_bench.png")
EOF
