"""Tensor layouts of Megatron's LLaMA-architecture GPTModel and their Hugging Face counterparts.

Canonical names (one transformer layer, Megatron layout at tensor-parallel size 1):
  input_layernorm [h], linear_qkv [(nq + 2 ng) d, h], linear_proj [h, nq d],
  pre_mlp_layernorm [h], linear_fc1 [2 f, h], linear_fc2 [h, f]
and the model-level tensors word_embeddings [V_pad, h], final_layernorm [h], output_layer [V_pad, h].

Invariants (megatron-core 0.19):
- linear_qkv rows are grouped by query group g = 0..ng-1: [q heads of g (nq/ng x d rows); k of g
  (d rows); v of g (d rows)]. Tensor parallelism gives rank r the groups [r ng/tp, (r+1) ng/tp),
  so the TP=1 tensor is the rank shards concatenated on dim 0.
- linear_fc1 with SwiGLU holds [gate; up] on every rank: rank r's shard is [gate_r; up_r], so the
  TP=1 tensor [gate; up] is NOT the plain concatenation of the shards.
- column-parallel tensors (embeddings, output layer, qkv) join on dim 0, row-parallel tensors
  (linear_proj, linear_fc2) on dim 1; norm weights are replicated.
- Pipeline (and virtual pipeline) chunks hold consecutive layers; their global order is virtual
  stage major, pipeline rank minor: chunk (vp, pp) precedes (vp, pp+1) and (vp+1, 0).
- With zero-centred gamma (--apply-layernorm-1p) the stored norm weight is w - 1.
"""

from __future__ import annotations

import torch

from mile_megatron.convert import ConversionError

LAYER_TENSORS: tuple[str, ...] = (
    "input_layernorm", "linear_qkv", "linear_proj", "pre_mlp_layernorm", "linear_fc1", "linear_fc2",
)
MODEL_TENSORS: tuple[str, ...] = ("word_embeddings", "final_layernorm", "output_layer")
NORMS = frozenset({"input_layernorm", "pre_mlp_layernorm", "final_layernorm"})

# How each tensor is split over tensor-parallel ranks.
PARALLEL_MODE: dict[str, str] = {
    "word_embeddings": "column", "output_layer": "column", "linear_qkv": "column",
    "linear_fc1": "swiglu", "linear_proj": "row", "linear_fc2": "row",
    "input_layernorm": "replicated", "pre_mlp_layernorm": "replicated", "final_layernorm": "replicated",
}

# Megatron state-dict names (legacy torch format, local transformer spec) of the canonical tensors.
LEGACY_LAYER_KEYS: dict[str, str] = {
    "input_layernorm": "input_layernorm.weight",
    "linear_qkv": "self_attention.linear_qkv.weight",
    "linear_proj": "self_attention.linear_proj.weight",
    "pre_mlp_layernorm": "pre_mlp_layernorm.weight",
    "linear_fc1": "mlp.linear_fc1.weight",
    "linear_fc2": "mlp.linear_fc2.weight",
}
# TransformerEngine spec names (and the names torch_dist uses for the local spec too): the norms are
# fused into the following linear layer.
TE_LAYER_KEYS: dict[str, str] = {
    **LEGACY_LAYER_KEYS,
    "input_layernorm": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm": "mlp.linear_fc1.layer_norm_weight",
}
MODEL_KEYS: dict[str, str] = {
    "word_embeddings": "embedding.word_embeddings.weight",
    "final_layernorm": "decoder.final_layernorm.weight",
    "output_layer": "output_layer.weight",
}
# Layer-level layer-norm keys the local spec never has a separate norm for (TE spec).
LAYER_PREFIX = "decoder.layers."


def merge_tensor_parallel(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The TP=1 tensor from the rank shards (rank order) of canonical tensor `name`."""
    mode = PARALLEL_MODE[name]
    if len(shards) == 1:
        return shards[0]
    if mode == "replicated":
        first = shards[0]
        for rank, shard in enumerate(shards[1:], start=1):
            if shard.shape != first.shape or not torch.equal(shard, first):
                raise ConversionError(f"{name}: the replicated weight differs between tensor-parallel ranks 0 "
                                      f"and {rank}; the checkpoint is inconsistent")
        return first
    if mode == "column":
        return torch.cat(shards, dim=0)
    if mode == "row":
        return torch.cat(shards, dim=1)
    # swiglu: rank r holds [gate_r; up_r]; TP=1 is [gate_0..gate_{tp-1}; up_0..up_{tp-1}].
    halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
    return torch.cat([half[0] for half in halves] + [half[1] for half in halves], dim=0)


def split_tensor_parallel(name: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Inverse of merge_tensor_parallel: the tp rank shards (contiguous clones) of a TP=1 tensor."""
    mode = PARALLEL_MODE[name]
    if mode == "replicated":
        return [tensor.clone() for _ in range(tp)]
    if mode in ("column", "row"):
        dim = 0 if mode == "column" else 1
        if tensor.shape[dim] % tp:
            raise ConversionError(f"{name}: dimension {dim} of size {tensor.shape[dim]} is not divisible by "
                                  f"--tensor-model-parallel-size {tp}")
        return [part.clone() for part in torch.chunk(tensor, tp, dim=dim)]
    gate, up = torch.chunk(tensor, 2, dim=0)
    if gate.shape[0] % tp:
        raise ConversionError(f"{name}: ffn hidden size {gate.shape[0]} is not divisible by "
                              f"--tensor-model-parallel-size {tp}")
    return [torch.cat([g, u], dim=0) for g, u in zip(torch.chunk(gate, tp, 0), torch.chunk(up, tp, 0))]


def qkv_to_hf(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron fused QKV [(nq + 2 ng) d, h] -> HF q_proj [nq d, h], k_proj [ng d, h], v_proj [ng d, h]."""
    heads_per_group = num_heads // num_groups
    rows = (heads_per_group + 2) * head_dim
    if qkv.shape[0] != num_groups * rows:
        raise ConversionError(f"linear_qkv has {qkv.shape[0]} rows; {num_heads} heads in {num_groups} query groups "
                              f"of size {head_dim} need {num_groups * rows}")
    grouped = qkv.reshape(num_groups, rows, qkv.shape[1])
    q = grouped[:, : heads_per_group * head_dim].reshape(num_heads * head_dim, -1)
    k = grouped[:, heads_per_group * head_dim: (heads_per_group + 1) * head_dim].reshape(num_groups * head_dim, -1)
    v = grouped[:, (heads_per_group + 1) * head_dim:].reshape(num_groups * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def qkv_from_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int,
                head_dim: int) -> torch.Tensor:
    """Inverse of qkv_to_hf."""
    hidden = q.shape[1]
    heads_per_group = num_heads // num_groups
    grouped = torch.cat([q.reshape(num_groups, heads_per_group * head_dim, hidden),
                         k.reshape(num_groups, head_dim, hidden),
                         v.reshape(num_groups, head_dim, hidden)], dim=1)
    return grouped.reshape(-1, hidden).contiguous()


def fc1_to_hf(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TP=1 SwiGLU fc1 [2f, h] -> (gate_proj, up_proj); Megatron computes silu(gate x) * (up x)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def fc1_from_hf(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0).contiguous()


def norm_to_hf(weight: torch.Tensor, zero_centered: bool) -> torch.Tensor:
    """HF RMSNorm multiplies by the weight itself; a zero-centred Megatron norm multiplies by (1 + w)."""
    return weight + 1 if zero_centered else weight


def norm_from_hf(weight: torch.Tensor, zero_centered: bool) -> torch.Tensor:
    return weight - 1 if zero_centered else weight


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's padding: the smallest multiple of divisible_by x TP that is >= vocab_size."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def pad_vocab(tensor: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Rows vocab_size..padded_size-1 are zeros (Megatron trains them; no token ever maps to them)."""
    if tensor.shape[0] > padded_size:
        raise ConversionError(f"vocabulary of {tensor.shape[0]} rows is larger than the padded size {padded_size}")
    if tensor.shape[0] == padded_size:
        return tensor
    padding = torch.zeros(padded_size - tensor.shape[0], *tensor.shape[1:], dtype=tensor.dtype)
    return torch.cat([tensor, padding], dim=0)


def even_pipeline_chunks(num_layers: int, pp: int, vpp: int | None) -> dict[tuple[int, int], range]:
    """Global layer ranges of chunk (pp_rank, vp_stage) for an even split (what the writer produces)."""
    chunks = vpp or 1
    if num_layers % (pp * chunks):
        raise ConversionError(f"{num_layers} layers cannot be split evenly over {pp} pipeline stages x {chunks} "
                              "virtual stages; choose sizes that divide the number of layers")
    per_chunk = num_layers // (pp * chunks)
    return {(rank, stage): range((stage * pp + rank) * per_chunk, (stage * pp + rank + 1) * per_chunk)
            for stage in range(chunks) for rank in range(pp)}


def chunk_offsets(layer_counts: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """First global layer of every (pp_rank, vp_stage) chunk from the chunks' layer counts.

    Works for uneven splits too (--decoder-first/last-pipeline-num-layers, pipeline layouts):
    chunks are consecutive in (vp_stage, pp_rank) order.
    """
    offsets, total = {}, 0
    for rank, stage in sorted(layer_counts, key=lambda key: (key[1], key[0])):
        offsets[(rank, stage)] = total
        total += layer_counts[(rank, stage)]
    return offsets


# ----------------------------------------------------------------------------------------------
# Hugging Face LlamaForCausalLM names.
def hf_layer_names(index: int) -> dict[str, str]:
    prefix = f"model.layers.{index}."
    return {part: prefix + part + ".weight" for part in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"


def layer_to_hf(index: int, tensors: dict[str, torch.Tensor], num_heads: int, num_groups: int, head_dim: int,
                zero_centered_norm: bool) -> dict[str, torch.Tensor]:
    """HF tensors of layer `index` from its canonical TP=1 Megatron tensors."""
    names = hf_layer_names(index)
    q, k, v = qkv_to_hf(tensors["linear_qkv"], num_heads, num_groups, head_dim)
    gate, up = fc1_to_hf(tensors["linear_fc1"])
    return {
        names["input_layernorm"]: norm_to_hf(tensors["input_layernorm"], zero_centered_norm),
        names["self_attn.q_proj"]: q,
        names["self_attn.k_proj"]: k,
        names["self_attn.v_proj"]: v,
        names["self_attn.o_proj"]: tensors["linear_proj"],
        names["post_attention_layernorm"]: norm_to_hf(tensors["pre_mlp_layernorm"], zero_centered_norm),
        names["mlp.gate_proj"]: gate,
        names["mlp.up_proj"]: up,
        names["mlp.down_proj"]: tensors["linear_fc2"],
    }


def layer_from_hf(index: int, tensors: dict[str, torch.Tensor], num_heads: int, num_groups: int,
                  head_dim: int) -> dict[str, torch.Tensor]:
    """Canonical TP=1 Megatron tensors of layer `index` from HF tensors (keyed by full HF names)."""
    names = hf_layer_names(index)
    return {
        "input_layernorm": tensors[names["input_layernorm"]],
        "linear_qkv": qkv_from_hf(tensors[names["self_attn.q_proj"]], tensors[names["self_attn.k_proj"]],
                                  tensors[names["self_attn.v_proj"]], num_heads, num_groups, head_dim),
        "linear_proj": tensors[names["self_attn.o_proj"]],
        "pre_mlp_layernorm": tensors[names["post_attention_layernorm"]],
        "linear_fc1": fc1_from_hf(tensors[names["mlp.gate_proj"]], tensors[names["mlp.up_proj"]]),
        "linear_fc2": tensors[names["mlp.down_proj"]],
    }
