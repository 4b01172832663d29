"""The loss flags of every command line (mile-pretrain, the Megatron-LM patch, mile-pretrain-ds), declared once.

    --loss {ce,focal,mile}                 the optimised loss (default mile)
    --mile-gamma G, --mile-sigma S         the weight (sigma + H)^gamma (focal: (1 - p_y)^gamma), both >= 0
    --mile-alpha {global,official,none}    the weight normalisation (objective.py)
"""

from __future__ import annotations

import argparse

from .objective import ALPHA_MODES, LOSS_KINDS


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_loss_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the loss flags to `parser` (as an argument group); returns the parser (Megatron's extra_args_provider)."""
    group = parser.add_argument_group("MiLe loss")
    group.add_argument("--loss", choices=LOSS_KINDS, default="mile",
                       help="training loss: MiLe (entropy-weighted CE), focal, or plain CE")
    group.add_argument("--mile-gamma", type=non_negative_float, default=1.0,
                       help="exponent gamma of the loss weight (MiLe: (sigma+H)^gamma; focal: (1-p)^gamma)")
    group.add_argument("--mile-sigma", type=non_negative_float, default=1.0,
                       help="MiLe weight offset sigma in (sigma + H)^gamma")
    group.add_argument("--mile-alpha", choices=ALPHA_MODES, default="global",
                       help="weight normalisation: global (over the whole optimizer step), official (the paper "
                            "code's per-micro-batch rule), none")
    return parser
