"""The paper's recipes (468M / 1.2B / 6.7B LLaMA models on The Pile) and a tiny CPU model, as typed data.

One source for both engines: mile-pretrain turns a Recipe into Megatron flags (Recipe.megatron_flags(), inserted
BEFORE the user's flags, so anything given on the command line wins), mile-pretrain-ds reads its architecture
(mile_megatron.hf.models builds the same LlamaForCausalLM) and its optimiser and training values.

Paper facts (README "Differences from the paper"): LLaMA architecture (RMSNorm eps 1e-5, SwiGLU, RoPE theta
10000, no biases, untied embeddings, no GQA), vocabulary 32000 (LLaMA SentencePiece; give it with
--tokenizer-type/--tokenizer-model), init std 0.01, AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1,
gradient clipping 1.0, cosine decay to 0 after a linear warmup, bf16, seed 111. This module imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

# The LLaMA family's Megatron flags (every mile-pretrain run, and checkpoints converted from Hugging Face).
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
LLAMA_NORM_EPSILON = 1e-5
LLAMA_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class Architecture:
    """A LLaMA model's shape (multi-head attention: as many query groups as heads)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    seq_length: int

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def megatron_flags(self) -> list[str]:
        return [
            "--num-layers", str(self.num_layers),
            "--hidden-size", str(self.hidden_size),
            "--ffn-hidden-size", str(self.ffn_hidden_size),
            "--num-attention-heads", str(self.num_attention_heads),
            "--kv-channels", str(self.kv_channels),
            "--seq-length", str(self.seq_length),
            "--max-position-embeddings", str(self.seq_length),
        ]


@dataclass(frozen=True)
class Optimizer:
    """AdamW (decoupled weight decay on matrices) with linear warmup from 0 and cosine decay to min_lr."""

    lr: float
    min_lr: float
    warmup_iters: int
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float | None = 1e-8  # None: Megatron's default (the tiny recipe)
    weight_decay: float = 0.1
    clip_grad: float = 1.0

    def megatron_flags(self) -> list[str]:
        flags = ["--optimizer", "adam",  # Megatron's adam applies decoupled (AdamW) weight decay
                 "--lr", _number(self.lr), "--min-lr", _number(self.min_lr), "--lr-decay-style", "cosine",
                 "--lr-warmup-iters", str(self.warmup_iters),
                 "--adam-beta1", _number(self.adam_beta1), "--adam-beta2", _number(self.adam_beta2)]
        if self.adam_eps is not None:
            flags += ["--adam-eps", _number(self.adam_eps)]
        return flags + ["--weight-decay", _number(self.weight_decay), "--clip-grad", _number(self.clip_grad)]


@dataclass(frozen=True)
class Training:
    """Batch, length, initialisation, precision and the bookkeeping intervals of a run."""

    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    init_method_std: float
    seed: int = 111
    bf16: bool = True
    recompute: bool = False  # full activation recomputation (gradient checkpointing), one layer at a time
    distributed_optimizer: bool = True  # the paper trains with DeepSpeed ZeRO-2
    eod_mask_loss: bool = True  # documents are [BOS] text [EOD] (mile-preprocess)
    log_interval: int = 10
    save_interval: int | None = 1000
    eval_interval: int = 1000
    eval_iters: int = 20
    data_workers: int | None = None  # Megatron's --num-workers (None: its default)

    def megatron_flags(self) -> list[str]:
        flags = ["--init-method-std", _number(self.init_method_std)]
        if self.bf16:
            flags += ["--bf16"]
        flags += ["--seed", str(self.seed)]
        if self.distributed_optimizer:
            flags += ["--use-distributed-optimizer", "--ckpt-format", "torch_dist"]
        if self.save_interval is not None:
            flags += ["--save-interval", str(self.save_interval)]
        flags += ["--eval-interval", str(self.eval_interval), "--eval-iters", str(self.eval_iters),
                  "--log-interval", str(self.log_interval), "--log-throughput"]
        if self.eod_mask_loss:
            flags += ["--eod-mask-loss"]
        flags += ["--global-batch-size", str(self.global_batch_size), "--micro-batch-size",
                  str(self.micro_batch_size), "--train-iters", str(self.train_iters)]
        if self.recompute:
            flags += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                      "--recompute-num-layers", "1"]
        if self.data_workers is not None:
            flags += ["--num-workers", str(self.data_workers)]
        return flags


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: Architecture
    optimizer: Optimizer
    training: Training

    def megatron_flags(self) -> list[str]:
        """The Megatron flags of this recipe (LLaMA architecture flags not included: see LLAMA_ARCHITECTURE_FLAGS)."""
        return self.architecture.megatron_flags() + self.optimizer.megatron_flags() + self.training.megatron_flags()


def _number(value: float) -> str:
    return f"{value:g}"


_PAPER_OPTIMIZER = Optimizer(lr=3e-4, min_lr=0.0, warmup_iters=2000)

RECIPES: dict[str, Recipe] = {
    # 24 x 1024, FFN 4096, 16 heads of 64; 1024 sequences of 1024 tokens per step; 100k steps.
    "468m": Recipe("468m", Architecture(24, 1024, 4096, 16, 1024), _PAPER_OPTIMIZER,
                   Training(micro_batch_size=8, global_batch_size=1024, train_iters=100000, init_method_std=0.01)),
    # 16 x 2048, FFN 8192, 8 heads of 256; 1024 x 1024 tokens per step; 100k steps.
    "1.2b": Recipe("1.2b", Architecture(16, 2048, 8192, 8, 1024), _PAPER_OPTIMIZER,
                   Training(micro_batch_size=4, global_batch_size=1024, train_iters=100000, init_method_std=0.01)),
    # 32 x 4096, FFN 11008, 32 heads of 128; 2048 sequences of 2048 tokens per step; 25k steps; the paper
    # recomputes activations (gradient checkpointing) here.
    "6.7b": Recipe("6.7b", Architecture(32, 4096, 11008, 32, 2048), _PAPER_OPTIMIZER,
                   Training(micro_batch_size=1, global_batch_size=2048, train_iters=25000, init_method_std=0.01,
                            recompute=True)),
    # A model that trains in seconds on a laptop CPU (2 layers so PP=2 has one layer per stage; widths divisible
    # by TP=2), fp32, no distributed optimizer. Give data and tokenizer flags as usual.
    "tiny": Recipe("tiny", Architecture(2, 64, 176, 4, 64),
                   Optimizer(lr=3e-3, min_lr=3e-4, warmup_iters=2, adam_eps=None),
                   Training(micro_batch_size=4, global_batch_size=8, train_iters=40, init_method_std=0.02,
                            bf16=False, distributed_optimizer=False, eod_mask_loss=False, log_interval=1,
                            save_interval=None, eval_interval=20, eval_iters=2, data_workers=0)),
}

PRESET_NAMES: tuple[str, ...] = tuple(RECIPES)

# Deliberate differences from the paper's reference setup (README "Differences from the paper").
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
    "alpha: --mile-alpha global (default) normalises by the token-weighted mean weight over the "
    "whole optimizer step (every micro-batch, data-parallel rank and counted token); --mile-alpha "
    "official reproduces the reference code (per micro-batch: per-rank 1/mean(w) over all positions, "
    "averaged over ranks), which makes the objective depend on the micro-batch split.",
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


def recipe(name: str) -> Recipe:
    """The recipe `name` (raises ValueError naming the valid ones)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}") from None


def preset_flags(name: str) -> list[str]:
    """The Megatron flags of recipe `name` (raises ValueError naming the valid presets)."""
    return recipe(name).megatron_flags()
