"""``python -m isplit.experiment sweep|report ...``."""

import sys

from isplit.experiment.cli import main

sys.exit(main())
