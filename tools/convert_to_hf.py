#!/usr/bin/env python3
"""Megatron checkpoint -> Hugging Face LLaMA; same as the `mile-convert-hf` console script (see --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mile_megatron.convert.to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
