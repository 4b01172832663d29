#!/usr/bin/env python3
"""Thin wrapper: same as the ``mile-eval`` console script (see mile_megatron/evaluate/cli.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mile_megatron.evaluate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
