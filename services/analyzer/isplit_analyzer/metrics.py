"""The analyzer's Prometheus metrics (names fixed in docs/CONTRACTS.md)."""

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter("isplit_analyzer_jobs", "Analysis jobs by status reached", ["status"])
ANALYSIS_SECONDS = Histogram(
    "isplit_analyzer_analysis_seconds",
    "Wall time of one analysis (importance engine), seconds",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
IMAGES_PER_SECOND = Gauge("isplit_analyzer_images_per_second", "Images/s of the last finished analysis")
PUBLISH_ERRORS = Counter("isplit_analyzer_kafka_publish_errors", "Failed candidate publications to Kafka")
HTTP_SECONDS = Histogram(
    "isplit_analyzer_http_request_seconds",
    "HTTP request latency by route template, method and status code, seconds",
    ["route", "method", "code"],
)
IN_PROGRESS = Gauge("isplit_analyzer_jobs_in_progress", "Analyses running now")
RESULTS_CONSUMED = Counter("isplit_analyzer_results_consumed", "Training results attached to candidates")
RESULTS_DUPLICATE = Counter(
    "isplit_analyzer_results_duplicate",
    "Training results ignored: their candidate already holds that result or a newer one (re-delivered, re-published)",
)
TAKEOVERS = Counter(
    "isplit_analyzer_jobs_taken_over", "Running jobs this replica took over from a replica whose lease lapsed"
)

for _status in ("queued", "succeeded", "failed", "cancelled"):
    JOBS.labels(_status)  # export every series from the start
