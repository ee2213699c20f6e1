"""``python -m ppd.evaluate``: the evaluation CLI; the harness itself lives in :mod:`ppd.eval`."""

from __future__ import annotations

import sys

from ppd.eval.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
