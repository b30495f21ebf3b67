"""The trainer's Prometheus metrics (names fixed in docs/CONTRACTS.md), served on :9101."""

from prometheus_client import Counter, Gauge, Histogram

CANDIDATES = Counter("isplit_trainer_candidates", "Candidates handled, by outcome", ["outcome"])
TRAINING_SECONDS = Histogram(
    "isplit_trainer_training_seconds",
    "Wall time to retrain, measure and export one candidate, seconds",
    buckets=(5, 10, 30, 60, 120, 300, 600, 1200, 3600, 7200),
)
EPOCH = Gauge("isplit_trainer_epoch", "Epoch of the candidate being trained")
LOSS = Gauge("isplit_trainer_loss", "Latest training loss of the candidate being trained")
SAMPLES_PER_SECOND = Gauge("isplit_trainer_samples_per_second", "Training throughput, samples/s")
GPU_MEMORY = Gauge("isplit_trainer_gpu_memory_bytes", "CUDA memory allocated by the trainer, bytes")
CONSUMER_LAG = Gauge("isplit_trainer_consumer_lag", "Candidates waiting in the assigned partitions, messages")

for outcome in ("succeeded", "failed", "dead_lettered", "republished"):
    CANDIDATES.labels(outcome)  # export every series from the start
