"""``python -m benchmarks.serving [options]`` (from the repository root)."""

import sys

from .run import main

sys.exit(main())
