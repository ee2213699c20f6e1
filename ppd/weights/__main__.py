"""``python -m ppd.weights``."""

import sys

from ppd.weights.cli import main

sys.exit(main())
