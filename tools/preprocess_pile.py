#!/usr/bin/env python3
"""Thin wrapper: same as the ``mile-preprocess`` console script (see mile_megatron/data/preprocess.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mile_megatron.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
