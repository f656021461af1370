#!/usr/bin/env python
"""The TREC DL reproduction, now ``python -m labeler_utils reproduce`` (labeler_utils/experiments); same options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labeler_utils.experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
