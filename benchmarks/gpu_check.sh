#!/usr/bin/env bash
# The GPU check of the step-time issue, for one call of a GPU machine (at most 8 minutes):
#   1. the shared reference-style script (../shared/bench or shared/bench), full-size models,
#   2. the project's benchmark (benchmarks/step_time.py), full size, eager modes, batch 4 and 1,
#      (recompute_layers, which method.md measured already, only for LLaVA at batch 4, in stage 4)
#   3. the tests marked gpu,
#   4. the project's benchmark in the compile modes (LLaVA-Llama-3 only: each compile takes a minute or more).
# Each stage has its own time limit, so a slow one cannot cost the others. Everything lands under
# $OUT (the device tool's folder; ./gpu-check-out elsewhere): see benchmarks/README.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/check.log"; }
stage() {  # stage SECONDS OUTPUT_FILE COMMAND...: run with a time limit, stdout to the file
    local limit=$1 file=$2; shift 2
    log "start (${limit}s limit): $*"
    timeout -k 10 "$limit" "$@" >>"$OUT/$file" 2>>"$OUT/check.log"
    log "end: exit status $? (124 = hit the time limit)"
}

use_tree_without_installing() {  # the packages on PYTHONPATH, the adapters' entry points in a stub dist-info
    local site=/tmp/mimic-tree
    mkdir -p "$site/mimic_tree-0.dist-info"
    ln -sfn "$PWD/plugins" "$site/mimic_plugins"
    printf 'Metadata-Version: 2.1\nName: mimic-tree\nVersion: 0\n' >"$site/mimic_tree-0.dist-info/METADATA"
    { echo "[mimic_toolkit]"; sed -n '/^\[project.entry-points.mimic_toolkit\]/,/^$/{/=/p}' pyproject.toml | tr -d '"'; } \
        >"$site/mimic_tree-0.dist-info/entry_points.txt"
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
log "$(nvidia-smi -L 2>&1 | head -1)"
# the toolkit and its adapters (entry points) from this tree; every dependency is already there
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$OUT/check.log" 2>&1 \
    || { log "pip could not install the toolkit (see above): using the tree without installing"; use_tree_without_installing; }

shared=""
for candidate in ../shared/bench/seed_style_step.py shared/bench/seed_style_step.py; do
    [ -f "$candidate" ] && shared=$candidate && break
done
if [ -n "$shared" ]; then
    stage 90 shared.jsonl python3 "$shared" --models llava_llama3,qwen2_vl,idefics2 --modes seedlike,lean \
        --batches 4,1
else
    log "MISSING: the shared reference script (../shared/bench/seed_style_step.py or shared/bench/); copy it"\
        "into ./shared/bench, which travels with the tree (see benchmarks/README.md)"
fi

stage 105 bench.jsonl python3 benchmarks/step_time.py --size full --models llava-llama3,qwen2-vl,idefics2 \
    --modes reference,lean,recompute_selective --batches 4,1
stage 75 pytest_gpu.txt python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py
stage 130 bench.jsonl python3 benchmarks/step_time.py --size full --models llava-llama3 --modes compile --batches 4,1
stage 80 bench.jsonl python3 benchmarks/step_time.py --size full --models llava-llama3 \
    --modes compile_recompute_selective,recompute_layers --batches 4
log "done"
