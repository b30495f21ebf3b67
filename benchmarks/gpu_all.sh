#!/usr/bin/env bash
# Every GPU measurement in one device session (an H100/H200 machine whose python3 has torch and
# torchvision but not pydantic; no internet): the importance benchmark at 224 px, training
# throughput CPU vs GPU, the experiment sweep, and what sharding an analysis costs and saves. Needs var/gpu-wheels (pydantic and its
# dependencies for that Python) and var/gpu-data/fashion-mnist (the IDX files), carried along.
# Results come back as two tarballs in $OUT (bench.tgz, sweep.tgz), written after each stage.
set -u
cd "$(dirname "$0")/.."
DEST=${OUT:?set OUT}
WORK=$(mktemp -d)
mkdir -p "$WORK/bench" "$WORK/sweep" /tmp/site
python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --target /tmp/site \
  var/gpu-wheels/pydantic-*.whl var/gpu-wheels/pydantic_core-*.whl var/gpu-wheels/annotated_types-*.whl \
  var/gpu-wheels/typing_inspection-*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site ISPLIT_FASHION_MNIST_DIR=$PWD/var/gpu-data/fashion-mnist
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$WORK/bench/gpu.txt"

echo "== importance benchmark"
OUT=$WORK/bench timeout 190 bash benchmarks/gpu_bench.sh > "$WORK/bench/gpu_bench.out" 2>&1
echo "gpu_bench exit $?"; tail -5 "$WORK/bench/gpu_bench.out"
tar czf "$DEST/bench.tgz" -C "$WORK" bench

echo "== training throughput"
PYTHONPATH=/tmp/site:shared timeout 100 python3 benchmarks/bench_training.py --arch vgg16 --width 1.0 \
  --input-size 32 --images 4096 --batch-size 128 --devices cuda cpu --json-out "$WORK/bench/training.json" \
  > "$WORK/bench/training.out" 2>&1
echo "bench_training exit $?"; tail -4 "$WORK/bench/training.out"
tar czf "$DEST/bench.tgz" -C "$WORK" bench

echo "== experiment sweep"
OUT=$WORK/sweep GPU_SITE=/tmp/site timeout 300 bash experiments/gpu_sweep.sh > "$WORK/sweep/stdout.txt" 2>&1
echo "gpu_sweep exit $?"; tail -5 "$WORK/sweep/stdout.txt"
tar czf "$DEST/sweep.tgz" -C "$WORK" sweep

echo "== sharded importance (1 and 2 shards, each in its own process, merged)"
# After the sweep: it put matplotlib and tqdm into /tmp/site when missing (isplit.analysis plots).
PYTHONPATH=/tmp/site:shared timeout 150 python3 benchmarks/bench_importance.py --arch vgg16 --input-size 224 \
  --images 2048 --batch-size 128 --device cuda --shards 1 2 --shard-dataset fashion-mnist \
  --json-out "$WORK/bench/shards.json" > "$WORK/bench/shards.out" 2>&1
echo "bench_importance --shards exit $?"; tail -4 "$WORK/bench/shards.out"
tar czf "$DEST/bench.tgz" -C "$WORK" bench
