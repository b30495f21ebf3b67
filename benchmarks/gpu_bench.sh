#!/usr/bin/env bash
# The importance benchmark on a GPU machine: VGG16 and ResNet-50 at 224 px, fp32 and bf16
# (each run times the authors' procedure on a few images, the per-image pass and the engine,
# checks that they agree, and compares the bf16 engine's curve with the fp32 one).
#
# Run from anywhere; it works in the repository root. It installs nothing: python3 must
# already import torch, torchvision, numpy, pillow, scikit-learn, pydantic and tqdm (the
# isplit modules it uses import pydantic). Put extra packages on PYTHONPATH beforehand if
# needed; ours (shared/) is added in front of it.
#
# Writes into $OUT (default var/bench): gpu.txt, bench_<arch>_<size>.json and .log per model.
# Knobs (environment): PYTHON, DEVICE (cuda), SIZE (224), IMAGES (512), BATCH (128), REF (8),
# ARCHS ("vgg16 resnet50"), PER_RUN_TIMEOUT (seconds, 240). About 1-2 minutes on an H100.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="shared${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-var/bench}"
DEVICE="${DEVICE:-cuda}"
SIZE="${SIZE:-224}"
IMAGES="${IMAGES:-512}"
BATCH="${BATCH:-128}"
REF="${REF:-8}"
ARCHS="${ARCHS:-vgg16 resnet50}"
PER_RUN_TIMEOUT="${PER_RUN_TIMEOUT:-240}"
mkdir -p "$OUT"

# Fail fast, naming every module that does not import, rather than mid-run with a traceback.
if ! "$PY" - <<'EOF'
import importlib
import sys

needed = ["torch", "torchvision", "numpy", "PIL", "sklearn", "pydantic", "tqdm",
          "isplit.zoo", "isplit.data", "isplit.cuts", "isplit.importance"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
if missing:
    print("gpu_bench.sh: cannot import: " + "; ".join(missing), file=sys.stderr)
    sys.exit(3)
EOF
then
    exit 3
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} | tee "$OUT/gpu.txt"

status=0
for arch in $ARCHS; do
    echo "== $arch at ${SIZE} px, batch $BATCH, $IMAGES images (authors: $REF) =="
    timeout "$PER_RUN_TIMEOUT" "$PY" benchmarks/bench_importance.py \
        --arch "$arch" --input-size "$SIZE" --in-channels 3 --num-classes 10 \
        --images "$IMAGES" --ref-images "$REF" --batch-size "$BATCH" \
        --device "$DEVICE" --amp bf16 --json-out "$OUT/bench_${arch}_${SIZE}.json" \
        2>&1 | tee "$OUT/bench_${arch}_${SIZE}.log"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "gpu_bench.sh: $arch exited with $rc" >&2
        status=1
    fi
done
exit "$status"
