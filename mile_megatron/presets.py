"""Megatron flag presets: the MiLe paper's 468M / 1.2B / 6.7B recipes and a tiny CPU model.

A preset is a list of ordinary Megatron flags. ``mile-pretrain --preset NAME`` inserts them BEFORE
the user's flags, so anything given on the command line wins (argparse keeps the last value).

Paper facts (see README "Differences from the paper"): LLaMA architecture (RMSNorm eps 1e-5,
SwiGLU, RoPE theta 10000, no biases, untied embeddings, no GQA), vocabulary 32000 (LLaMA
SentencePiece; give it with --tokenizer-type/--tokenizer-model), init std 0.01, AdamW lr 3e-4,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1, gradient clipping 1.0, cosine decay to 0 after a
linear warmup, bf16, seed 111.
"""

from __future__ import annotations

# Architecture every mile-pretrain run uses (LLaMA); presets and user flags come after it.
LLAMA_ARCHITECTURE_FLAGS: tuple[str, ...] = (
    "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-5",
    "--swiglu",
    "--position-embedding-type", "rope",
    "--rotary-base", "10000",
    "--untie-embeddings-and-output-weights",
    "--disable-bias-linear",
    "--attention-dropout", "0.0",
    "--hidden-dropout", "0.0",
)

_PAPER_OPTIMISER: tuple[str, ...] = (
    "--optimizer", "adam",           # Megatron's adam applies decoupled (AdamW) weight decay
    "--lr", "3e-4",
    "--min-lr", "0.0",
    "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "2000",
    "--adam-beta1", "0.9",
    "--adam-beta2", "0.95",
    "--adam-eps", "1e-8",
    "--weight-decay", "0.1",
    "--clip-grad", "1.0",
    "--init-method-std", "0.01",
    "--bf16",
    "--seed", "111",
    "--use-distributed-optimizer",   # the paper trains with DeepSpeed ZeRO-2
    "--ckpt-format", "torch_dist",
    "--save-interval", "1000",
    "--eval-interval", "1000",
    "--eval-iters", "20",
    "--log-interval", "10",
    "--log-throughput",
    "--eod-mask-loss",               # documents are [BOS] text [EOD] (mile-preprocess)
)


def _model(layers: int, hidden: int, ffn: int, heads: int, seq: int) -> tuple[str, ...]:
    return (
        "--num-layers", str(layers),
        "--hidden-size", str(hidden),
        "--ffn-hidden-size", str(ffn),
        "--num-attention-heads", str(heads),
        "--kv-channels", str(hidden // heads),
        "--seq-length", str(seq),
        "--max-position-embeddings", str(seq),
    )


PRESETS: dict[str, tuple[str, ...]] = {
    # 24 x 1024, FFN 4096, 16 heads of 64; 1024 sequences of 1024 tokens per step; 100k steps.
    "468m": _model(24, 1024, 4096, 16, 1024) + _PAPER_OPTIMISER + (
        "--global-batch-size", "1024",
        "--micro-batch-size", "8",
        "--train-iters", "100000",
    ),
    # 16 x 2048, FFN 8192, 8 heads of 256; 1024 x 1024 tokens per step; 100k steps.
    "1.2b": _model(16, 2048, 8192, 8, 1024) + _PAPER_OPTIMISER + (
        "--global-batch-size", "1024",
        "--micro-batch-size", "4",
        "--train-iters", "100000",
    ),
    # 32 x 4096, FFN 11008, 32 heads of 128; 2048 sequences of 2048 tokens per step; 25k steps;
    # the paper uses gradient checkpointing here.
    "6.7b": _model(32, 4096, 11008, 32, 2048) + _PAPER_OPTIMISER + (
        "--global-batch-size", "2048",
        "--micro-batch-size", "1",
        "--train-iters", "25000",
        "--recompute-granularity", "full",
        "--recompute-method", "uniform",
        "--recompute-num-layers", "1",
    ),
    # A model that trains in seconds on a laptop CPU (2 layers so PP=2 has one layer per stage;
    # widths divisible by TP=2). Give data and tokenizer flags as usual.
    "tiny": _model(2, 64, 176, 4, 64) + (
        "--init-method-std", "0.02",
        "--optimizer", "adam",
        "--lr", "3e-3",
        "--min-lr", "3e-4",
        "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "2",
        "--adam-beta1", "0.9",
        "--adam-beta2", "0.95",
        "--weight-decay", "0.1",
        "--clip-grad", "1.0",
        "--micro-batch-size", "4",
        "--global-batch-size", "8",
        "--train-iters", "40",
        "--seed", "111",
        "--log-interval", "1",
        "--eval-interval", "20",
        "--eval-iters", "2",
        "--log-throughput",
        "--num-workers", "0",
    ),
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)

# Deliberate differences from the paper's reference setup (copied into README).
PAPER_DIFFERENCES: tuple[str, ...] = (
    "Initialisation: Megatron draws every weight from N(0, 0.01) like the paper, except the "
    "attention output projection and the second MLP projection, which Megatron scales to "
    "N(0, 0.01 / sqrt(2 x num_layers)) (GPT-2 style); norm weights start at 1.",
    "Weight decay 0.1 is applied to all matrices; Megatron exempts biases (there are none) and "
    "1-D parameters (RMSNorm weights) from weight decay.",
    "Warmup: 2000 optimizer steps of linear warmup from lr 0, then cosine decay to 0 at the last "
    "step (the reference code rescales its warmup by num_processes / grad_accum, so its effective "
    "warmup is uncertain).",
    "Seeds: --seed 111 with Megatron's policy (same seed on every data-parallel rank, +100 per "
    "pipeline stage, data order from the dataset seed) instead of the reference code's 111 + rank.",
    "Documents and boundaries: mile-preprocess writes each document as [BOS] text [EOD] (EOD = the "
    "tokenizer's EOS) and Megatron packs them into fixed-length sequences; the paper presets set "
    "--eod-mask-loss, so the position holding EOD (which would predict the next document's BOS) "
    "carries no loss while predicting EOD itself is trained. The reference code prefixes each "
    "document with id 0, appends no EOS and masks labels equal to 0.",
    "Entropy is exact (no clamp of probabilities to [1e-8, 1]; the clamp biases H upward by at "
    "most V x 1.84e-7 nats).",
    "alpha: --mile-alpha global (default) normalises by the token-weighted mean weight over all "
    "data-parallel ranks and counted tokens only; --mile-alpha official reproduces the reference "
    "code (per-rank 1/mean(w) over all positions, averaged over ranks).",
    "Optimizer: Megatron's Adam with decoupled weight decay (AdamW) and its distributed optimizer "
    "(ZeRO-1-style sharding) instead of DeepSpeed ZeRO-2 FusedAdam; gradient clipping 1.0 on the "
    "global norm as in the paper.",
    "Precision: bf16 parameters and activations with fp32 master weights and fp32 gradient "
    "reduction (Megatron's default); the loss upcasts bf16 logits to fp32 internally, whereas the "
    "reference code computes the loss on bf16 logits.",
    "Vocabulary padding: Megatron pads the 32000-entry vocabulary to a multiple of "
    "128 x tensor-parallel size (no padding for TP <= 2); padded logits take part in the softmax "
    "and entropy but are never targets.",
    "Micro-batch sizes (8 / 4 / 1 sequences) are choices for 80 GB GPUs; the global batch sizes, "
    "sequence lengths and step counts are the paper's.",
    "Validation: every --eval-interval 1000 steps on --eval-iters 20 batches per domain (with "
    "--multiple-validation-sets); the paper's evaluation schedule is not specified.",
)


def preset_flags(name: str) -> list[str]:
    """The Megatron flags of preset `name` (raises ValueError naming the valid presets)."""
    try:
        return list(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}") from None
