#!/usr/bin/env bash
# Re-measure I-SPLIT's claim at GPU scale: a VGG16 and a ResNet-50 variant on Fashion-MNIST
# (up to all 60,000 training images, the full 10,000-image test set, every non-skipped cut).
#
# Run from the repository root on a one-GPU machine whose python3 has torch and torchvision:
#
#     OUT=/some/empty/folder experiments/gpu_sweep.sh
#
# Needs (no internet there):
#   var/gpu-wheels/              wheels (for the GPU machine's Python) of what it lacks among
#                                pydantic (+ pydantic-core, annotated-types, typing-inspection,
#                                typing-extensions), tqdm, matplotlib (+ contourpy, cycler,
#                                fonttools, kiwisolver, pyparsing, python-dateutil, six,
#                                packaging); each is installed only when missing. matplotlib is
#                                optional (no plots without it); without a tqdm wheel a silent
#                                stand-in is written into $GPU_SITE.
#   var/gpu-data/fashion-mnist/  the four Fashion-MNIST IDX .gz files
#
# Writes, flat in $OUT (7 files): vgg16-fmnist-{result.json,report.md,sweep.png},
# resnet50-fmnist-{result.json,report.md,sweep.png}, gpu_sweep.log. Checkpoints go to
# $SAVE_DIR (default var/gpu-runs), not to $OUT.
#
# Time: each sweep has an explicit wall-clock budget (--time-budget, seconds, set below);
# retraining jobs that would overrun it are skipped and listed in the result. With the
# defaults the whole script takes about 9-10 minutes on one H100 (64 px, 3 seeds per cut).
#
# GPU_SWEEP_SMOKE=1 runs the same steps with tiny settings on the CPU (a few minutes), to
# test the script anywhere; PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the output folder}
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-var/gpu-wheels}
SITE=$(realpath -m "${GPU_SITE:-var/gpu-site}")
SAVE_DIR=${SAVE_DIR:-var/gpu-runs}
SMOKE=${GPU_SWEEP_SMOKE:-0}
mkdir -p "$OUT" "$SAVE_DIR"
LOG="$OUT/gpu_sweep.log"
exec > >(tee "$LOG") 2>&1

if [ -z "${ISPLIT_FASHION_MNIST_DIR:-}" ] && [ -d var/gpu-data/fashion-mnist ]; then
  export ISPLIT_FASHION_MNIST_DIR=$PWD/var/gpu-data/fashion-mnist
fi
export PYTHONPATH="$SITE:shared${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}  # few progress lines in the log

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# wheel_of PKG: the wheel for PKG in $WHEELS, if any (wheel names use _ for - and any case).
wheel_of() {
  local stem=${1//-/_}
  find "$WHEELS" -maxdepth 1 -iname "${stem}-*.whl" 2>/dev/null | head -n 1
}

# install PKG...: the packages whose wheels are in $WHEELS, without dependencies (they are
# listed), into the interpreter's environment, or where that is refused (PEP 668, read-only
# site-packages) into $SITE, which is on PYTHONPATH. Returns 1 when a package has no wheel.
install() {
  local pkg missing=0 found=()
  for pkg in "$@"; do
    if [ -n "$(wheel_of "$pkg")" ]; then found+=("$pkg"); else echo "gpu_sweep: no wheel for $pkg in $WHEELS"; missing=1; fi
  done
  [ ${#found[@]} -eq 0 ] && return 1
  local pip=("$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" --no-deps)
  "${pip[@]}" "${found[@]}" 2>/dev/null || {
    echo "gpu_sweep: pip refused the interpreter's environment; installing into $SITE"
    "${pip[@]}" --target "$SITE" "${found[@]}"
  }
  return $missing
}

# The library draws progress bars with tqdm and needs nothing else from it: without a wheel,
# a silent stand-in goes into $SITE.
tqdm_stand_in() {
  mkdir -p "$SITE/tqdm"
  cat >"$SITE/tqdm/__init__.py" <<'PYEOF'
"""A silent stand-in for tqdm, written by experiments/gpu_sweep.sh where no tqdm wheel was at hand."""


class tqdm:  # noqa: N801 - the real class's name
    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def write(text, *args, **kwargs):
        print(text, flush=True)
PYEOF
  echo "from tqdm import tqdm" >"$SITE/tqdm/auto.py"
  echo "gpu_sweep: no tqdm wheel; using a silent stand-in (no progress bars)"
}

if [ "$SMOKE" = 1 ] && [ "${GPU_SWEEP_INSTALL:-0}" != 1 ]; then
  echo "gpu_sweep: smoke run: installing nothing (GPU_SWEEP_INSTALL=1 to test the installation)"
else
  has pydantic || install pydantic pydantic-core annotated-types typing-inspection typing-extensions || true
  has tqdm || install tqdm || true
  has matplotlib || install matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six \
    packaging || echo "gpu_sweep: matplotlib incomplete; the sweeps will skip their plots"
fi
has tqdm || tqdm_stand_in
for mod in torch torchvision numpy PIL pydantic tqdm; do
  has "$mod" || { echo "gpu_sweep: python module $mod is missing (wheels in $WHEELS?)"; exit 1; }
done
has matplotlib || echo "gpu_sweep: no matplotlib: reports without plots"
"$PY" - <<'EOF'
import platform, torch
print(f"gpu_sweep: python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA {torch.cuda.is_available()}: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}")
EOF
"$PY" -c "import isplit.experiment"  # fails fast on a missing dependency

sweep() {  # sweep NAME ARGS...: one sweep, its files flat in $OUT as NAME-*
  local name=$1
  shift
  echo "gpu_sweep: === $name ==="
  local start=$SECONDS
  "$PY" -m isplit.experiment sweep --dataset fashion-mnist --out "$OUT" --prefix "$name-" --name "$name" \
    --save-weights "$SAVE_DIR/$name.pt" --note "run by experiments/gpu_sweep.sh (GPU_SWEEP_SMOKE=$SMOKE)" "$@"
  echo "gpu_sweep: $name took $((SECONDS - start)) s"
}

if [ "$SMOKE" = 1 ]; then
  # Tiny settings: tests the script, the dependencies and the file layout, not the claim.
  sweep vgg16-fmnist --arch vgg16 --width 0.25 --input-size 32 --device cpu \
    --max-train-images 256 --epochs-model 1 --bottleneck-images 128 --epochs-bottleneck 1 \
    --max-test-images 128 --analysis-images 128 --max-cuts 3 --subset-cuts 1 --permutations 100 \
    --time-budget 600
  sweep resnet50-fmnist --arch resnet50 --input-size 16 --device cpu \
    --max-train-images 64 --epochs-model 1 --bottleneck-images 32 --epochs-bottleneck 1 \
    --max-test-images 64 --analysis-images 64 --max-cuts 2 --subset-cuts 1 --permutations 100 \
    --time-budget 600
else
  # VGG16 with BatchNorm at full width, 64 px as the authors' released code resizes its inputs
  # (late layers keep spatial extent): ~15 M parameters, trains in a few epochs. Every cut, 3
  # seeds each, budgeted picks at 10/25/50 % of the FLOPs (the sweep's defaults).
  sweep vgg16-fmnist --arch vgg16_bn --width 1.0 --input-size 64 --device cuda \
    --epochs-model 4 --batch-size-model 128 --lr-model 2e-3 \
    --bottleneck-images 20000 --epochs-bottleneck 1 --batch-size-bottleneck 128 --lr-bottleneck 5e-3 \
    --ratio 4 --max-test-images 10000 --analysis-images 2000 --subset-cuts 4 \
    --time-budget 240
  # ResNet-50 with the small-input stem, 64 px: ~23.5 M parameters; 40,000 training images
  # keep the model's training to about a quarter of the budget.
  sweep resnet50-fmnist --arch resnet50 --input-size 64 --device cuda \
    --max-train-images 40000 --epochs-model 2 --batch-size-model 128 --lr-model 2e-3 \
    --bottleneck-images 20000 --epochs-bottleneck 1 --batch-size-bottleneck 128 --lr-bottleneck 5e-3 \
    --ratio 4 --max-test-images 10000 --analysis-images 2000 --subset-cuts 4 \
    --time-budget 240
fi
echo "gpu_sweep: done in $SECONDS s; files in $OUT:"
ls -l "$OUT"
