"""Benchmark split serving (the package ``benchmarks/serving``; this file keeps the old path).

.venv/bin/python benchmarks/bench_serving.py --json-out var/bench-serving.json
.venv/bin/python -m benchmarks.serving --json-out var/bench-serving.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.serving

from benchmarks.serving.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
