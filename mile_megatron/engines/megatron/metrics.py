"""Throughput figures of mile-pretrain, reported through Megatron's own logging (no Megatron function replaced).

Megatron prints its own throughput (--log-throughput, set by the presets: TFLOP/s per GPU). Next to it the loss
function reports, for the previous training step of this rank (the wall time between two ends of
StepNormalization, i.e. one whole iteration),

    tokens/s = global batch x sequence length / step time
    MFU      = num_floating_point_operations(args, global batch) / (step time x world size x peak)

with megatron.training's own FLOP count, where peak is --peak-tflops-per-device or the known dense bf16 peak of
the GPU (PEAK_BF16_TFLOPS; MFU is left out when neither applies, e.g. on CPU or in fp32). As report entries
[value, 1] they are averaged over micro-batches and data-parallel ranks and printed, logged to TensorBoard and W&B
like the losses.
"""

from __future__ import annotations

import argparse
from typing import Any

# Peak dense bf16 tensor-core TFLOP/s per device, for MFU (matched against the device name, longest key first).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0,
}


def add_metrics_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--peak-tflops-per-device", type=float, default=None,
                        help="peak TFLOP/s of one device for MFU (default: known GPUs in bf16)")
    return parser


def peak_tflops(args: argparse.Namespace) -> float | None:
    """--peak-tflops-per-device, else the known bf16 peak of this GPU (bf16 runs only), else None."""
    import torch

    from mile_megatron.utils import cpu_mode

    if getattr(args, "peak_tflops_per_device", None):
        return args.peak_tflops_per_device
    if cpu_mode.is_active() or not torch.cuda.is_available() or not args.bf16:
        return None
    name = torch.cuda.get_device_name().upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def throughput_report(args: argparse.Namespace, step_seconds: float | None, like: Any) -> dict[str, Any]:
    """Report entries {'tokens/s': [x, 1], 'MFU': [y, 1]} of the last step ({} before the second step)."""
    import torch
    from megatron.training.training import num_floating_point_operations

    if not step_seconds:
        return {}
    one = torch.ones((), dtype=torch.float32, device=like.device)
    report = {"tokens/s": torch.stack([one * (args.global_batch_size * args.seq_length / step_seconds), one])}
    peak = peak_tflops(args)
    if peak:
        flops = num_floating_point_operations(args, args.global_batch_size)
        report["MFU"] = torch.stack([one * (flops / (step_seconds * args.world_size * peak * 1e12)), one])
    return report
