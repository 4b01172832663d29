"""Shared loss test cases: generation, per-rank execution and comparison against mile_megatron.loss.reference.

Everything here runs inside a worker (or in the pytest process for TP=1 without torch.distributed) and
returns plain dicts of numbers, so the parent only asserts. Inputs are generated from a seed with a CPU
torch.Generator, identically on every rank: each TP rank slices its own vocabulary shard out of the same
full logits, and each rank regenerates every DP rank's batch to evaluate the float64 reference itself.

Error measures (all must be <= 1, except where a test states otherwise):
- per-token loss / ce / entropy: |a - r| / (RTOL * max(|r|, 1 nat)). The implementation works in fp32 on the
  exact input values (bf16/fp16 values are exact in fp32), so RTOL = 1e-6 applies to every input dtype;
  values below 1 nat are compared absolutely (fp32 cannot resolve e.g. CE = 1e-9 relatively).
- logits gradient, element (i, j) of token i's row r_i = c_i * (p_i - onehot_i), c_i = upstream_i * w_i:
      |a - r| / (RTOL * max_j |r_ij| + 4 * 2^-24 * |c_i| + u * |r_ij| + s/2)
  i.e. an fp32 evaluation of the contract's formula accurate to RTOL of the token's row, allowed the fp32
  roundoff of p itself (p_y - 1 cannot be resolved below 2^-24 when p_y ~ 1), then one correct rounding to
  the logits dtype (u: its unit roundoff, s: its smallest subnormal). Rows whose reference gradient is
  exactly zero (upstream 0, masked tokens) must be exactly zero. `grad_row` (informational) drops the p
  roundoff allowance: the strict per-row relative error.
- scalars (mile_loss, sums, alpha): |a - r| / (RTOL * max(|r|, 1)); num_tokens exact.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from mile_megatron.loss import reference as ref

RTOL = 1e-6
PEAK = 21  # dominant column of the "peaked" logits family
MAX_TP = 4  # vocab sizes are multiples of this; "edges" targets are shard edges for every TP size <= MAX_TP

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float64": 2.0 ** -53}
HALF_MIN_SUBNORMAL = {"float32": 2.0 ** -150, "bfloat16": 2.0 ** -134, "float16": 2.0 ** -25, "float64": 0.0}


# ---------------------------------------------------------------------------------------------------------------
# Case definitions
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenCase:
    """One call of vocab_parallel_{mile,focal}_cross_entropy + backward(upstream)."""

    name: str
    kind: str = "mile"  # mile | focal
    gamma: float = 1.0
    sigma: float = 1.0
    dtype: str = "float32"
    lead: tuple[int, ...] = (3, 2)  # leading shape, Megatron's [s, b]
    vocab: int = 64  # V_pad, a multiple of MAX_TP
    logits: str = "normal"  # see make_logits
    targets: str = "random"  # random | edges | padded | peak | finite | finite+inf (see make_targets)
    view: str = "contiguous"  # contiguous | transposed | vocab_strided | row_slice
    upstream: str = "random"  # ones | random
    seed: int = 0


@dataclass(frozen=True)
class LossCase:
    """One call of mile_loss / mile_loss_with_stats on every DP rank."""

    name: str
    kind: str = "mile"  # mile | focal | ce
    alpha: str = "global"  # global | official | none
    gamma: float = 1.0
    sigma: float = 1.0
    dtype: str = "float32"
    lead: tuple[int, ...] = (4, 2)
    vocab: int = 64
    logits: str = "normal"
    mask: str = "random"  # none | random | all | rank0 (dp rank 0 all masked, others random)
    upstream: float = 0.625
    view: str = "contiguous"
    seed: int = 0


def token_cases() -> list[TokenCase]:
    """Sweep of kinds, parameters, dtypes and every edge case (small: tens of ms per case)."""
    cases = []
    for kind in ("mile", "focal"):
        for gamma, sigma in ((1.0, 1.0), (0.0, 1.0), (0.5, 0.0), (2.5, 3.7)):
            for dtype in ("float32", "bfloat16", "float16"):
                cases.append(TokenCase(f"{kind}-g{gamma}-s{sigma}-{dtype}", kind, gamma, sigma, dtype,
                                       seed=len(cases)))
    edge = [
        TokenCase("float64-input", dtype="float64"),
        TokenCase("upstream-ones", upstream="ones"),
        TokenCase("targets-shard-edges", targets="edges", lead=(8, 2)),
        TokenCase("targets-shard-edges-focal", kind="focal", targets="edges", lead=(8, 2), gamma=2.0),
        TokenCase("padded-vocab", logits="padded", targets="padded", vocab=68),
        TokenCase("padded-vocab-bf16", logits="padded", targets="padded", vocab=68, dtype="bfloat16"),
        TokenCase("uniform", logits="uniform"),
        TokenCase("peaked", logits="peaked", targets="peak"),
        TokenCase("peaked-focal", kind="focal", logits="peaked", targets="peak", gamma=2.0),
        TokenCase("spread-1e4", logits="spread1e4"),
        TokenCase("spread-1e4-focal", kind="focal", logits="spread1e4"),
        TokenCase("offset+1e4", logits="offset+1e4"),
        TokenCase("offset-1e4", logits="offset-1e4"),
        TokenCase("offset+1e4-focal", kind="focal", logits="offset+1e4", gamma=0.5),
        TokenCase("offset+1e4-bf16", logits="offset+1e4", dtype="bfloat16"),
        TokenCase("offset-1e4-fp16", logits="offset-1e4", dtype="float16"),
        TokenCase("ties-1e4-across-shards", logits="ties1e4", targets="edges", lead=(8, 2)),
        TokenCase("ties-1e4-bf16", logits="ties1e4", targets="edges", lead=(8, 2), dtype="bfloat16"),
        TokenCase("transposed-sbv-view", view="transposed"),
        TokenCase("transposed-bf16", view="transposed", dtype="bfloat16", kind="focal"),
        TokenCase("vocab-strided-view", view="vocab_strided"),
        TokenCase("row-slice-view", view="row_slice", dtype="float16"),
        TokenCase("flat-2d", lead=(7,)),
        TokenCase("3d-leading", lead=(2, 3, 2)),
        TokenCase("larger-vocab", vocab=512, lead=(5, 2), logits="spread1e4", targets="edges"),
        TokenCase("larger-vocab-normal", vocab=1024, lead=(4, 2)),
        # -inf logits (masked vocabulary entries, whole TP shards of a row at -inf); some targets on -inf: CE = +inf
        TokenCase("neginf-masked-vocab", logits="neginf", targets="finite+inf", lead=(8, 2)),
        TokenCase("neginf-masked-vocab-bf16-focal", kind="focal", gamma=2.0, logits="neginf",
                  targets="finite+inf", lead=(8, 2), dtype="bfloat16"),
        TokenCase("neginf-masked-vocab-fp16-g0", gamma=0.0, logits="neginf", targets="finite", lead=(8, 2),
                  dtype="float16", view="transposed"),
        TokenCase("neginf-masked-vocab-strided", gamma=2.5, sigma=0.3, logits="neginf", targets="finite",
                  lead=(8, 2), view="vocab_strided"),
    ]
    return cases + [replace(case, seed=1000 + i) for i, case in enumerate(edge)]


def loss_cases() -> list[LossCase]:
    cases = []
    for kind in ("mile", "focal", "ce"):
        for alpha in ("global", "official", "none"):
            for mask in ("random", "none", "rank0"):
                cases.append(LossCase(f"{kind}-{alpha}-mask:{mask}", kind, alpha, mask=mask, seed=len(cases)))
    extra = [
        LossCase("mile-global-all-masked", mask="all"),
        LossCase("mile-official-all-masked", alpha="official", mask="all"),
        LossCase("mile-none-all-masked", alpha="none", mask="all"),
        LossCase("focal-global-all-masked", kind="focal", mask="all"),
        LossCase("ce-global-all-masked", kind="ce", mask="all"),
        LossCase("mile-gamma0", gamma=0.0),
        LossCase("focal-official-gamma0", kind="focal", alpha="official", gamma=0.0),
        LossCase("mile-official-g2.5-s0.3", alpha="official", gamma=2.5, sigma=0.3),
        LossCase("focal-official-g2", kind="focal", alpha="official", gamma=2.0),
        LossCase("mile-bf16", dtype="bfloat16"),
        LossCase("focal-fp16-official", kind="focal", alpha="official", dtype="float16"),
        LossCase("mile-offset+1e4", logits="offset+1e4"),
        LossCase("mile-transposed", view="transposed", alpha="official"),
        LossCase("mile-upstream-neg", upstream=-3.0),
    ]
    return cases + [replace(case, seed=500 + i) for i, case in enumerate(extra)]


# ---------------------------------------------------------------------------------------------------------------
# Input generation
# ---------------------------------------------------------------------------------------------------------------

def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def padded_real_vocab(vocab: int) -> int:
    """For the 'padded' cases: the real vocabulary; columns [real, vocab) are Megatron's padding."""
    return vocab - 13


def make_logits(kind: str, lead: tuple[int, ...], vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Full [*lead, vocab] float64 logits of the named family."""
    shape = (*lead, vocab)
    if kind == "normal":
        return torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if kind == "uniform":  # H = CE = log V exactly
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "peaked":  # column PEAK dominates by ~35: p ~ 1 - 1e-14, CE and H tiny for target PEAK
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        z[..., PEAK] += 35.0
        return z
    if kind == "padded":  # padding columns are large, so leaving them out of the softmax would show
        z = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        z[..., padded_real_vocab(vocab):] += 4.0
        return z
    if kind == "spread1e4":  # magnitudes up to 1e4, near one-hot rows
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4
    if kind == "offset+1e4":  # large common offset, O(1) differences: entropy is far from 0
        return 1e4 - torch.rand(shape, generator=gen, dtype=torch.float64) * 6
    if kind == "offset-1e4":
        return -1e4 + torch.rand(shape, generator=gen, dtype=torch.float64) * 6
    if kind == "ties1e4":  # two equal maxima in the first and last shard, everything else 2e4 below: H = log 2
        z = torch.full(shape, -1e4, dtype=torch.float64)
        z[..., 0] = 1e4
        z[..., -1] = 1e4
        return z
    if kind == "neginf":  # -inf entries (p = 0): ~30% at random, and whole vocabulary blocks in rows 1, 2, 3 (mod 4)
        z = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        z[torch.rand(shape, generator=gen) < 0.3] = -math.inf
        rows = z.view(-1, vocab)
        rows[:, [1, vocab // 2 + 1]] = 0.5  # every row keeps a finite entry
        rows[1::4, vocab // 2:] = -math.inf  # TP=2: rank 1's shard of the row is all -inf (TP=4: ranks 2, 3)
        rows[2::4, :vocab // 2] = -math.inf  # TP=2: rank 0's (the global maximum is on rank 1)
        rows[3::4, :vocab // MAX_TP] = -math.inf  # TP=4: rank 0's
        return z
    raise ValueError(f"unknown logits family {kind!r}")


def make_targets(kind: str, lead: tuple[int, ...], vocab: int, gen: torch.Generator,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
    """Target ids of the named family; "finite" (a random column whose logit is finite) and "finite+inf" (the
    same, but every 3rd token's target on a -inf logit, so CE = +inf) need the full logits."""
    numel = math.prod(lead)
    if kind in ("finite", "finite+inf"):
        finite = torch.isfinite(logits.reshape(numel, vocab).double())
        choose = finite.clone()
        if kind == "finite+inf":
            on_inf = ~finite[::3]
            choose[::3] = torch.where(on_inf.any(-1, keepdim=True), on_inf, finite[::3])
        noise = torch.rand(numel, vocab, generator=gen, dtype=torch.float64)
        return torch.where(choose, noise, -1.0).argmax(-1).view(lead)
    if kind == "random":
        flat = torch.randint(0, vocab, (numel,), generator=gen)
    elif kind == "edges":  # first and last column of every shard for every TP size <= MAX_TP
        width = vocab // MAX_TP
        edges = [c for r in range(MAX_TP) for c in (r * width, (r + 1) * width - 1)]
        flat = torch.tensor([edges[i % len(edges)] for i in range(numel)])
    elif kind == "peak":  # the dominant column of the "peaked" logits for most tokens
        flat = torch.full((numel,), PEAK)
        flat[::3] = torch.randint(0, vocab, (flat[::3].numel(),), generator=gen)
    elif kind == "padded":  # half the targets in the padding columns (allowed: range is [0, V_pad))
        real = padded_real_vocab(vocab)
        flat = torch.randint(0, real, (numel,), generator=gen)
        flat[::2] = torch.randint(real, vocab, (flat[::2].numel(),), generator=gen)
    else:
        raise ValueError(f"unknown target family {kind!r}")
    return flat.view(lead).to(torch.int64)


def make_upstream(kind: str, lead: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Per-token upstream gradients: signs and magnitudes differ token to token, some exactly zero."""
    if kind == "ones":
        return torch.ones(lead, dtype=torch.float32)
    magnitude = 10.0 ** (torch.rand(lead, generator=gen) * 4 - 2)
    sign = torch.where(torch.rand(lead, generator=gen) < 0.3, -1.0, 1.0)
    keep = torch.rand(lead, generator=gen) > 0.15
    return (magnitude * sign * keep).to(torch.float32)


def make_mask(kind: str, lead: tuple[int, ...], dp_rank: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all" or (kind == "rank0" and dp_rank == 0):
        return torch.zeros(lead, dtype=torch.float32)
    mask = (torch.rand(lead, generator=gen) > 0.3).to(torch.float32)
    mask.view(-1)[0] = 1.0  # at least one counted token
    return mask


class ViewedInput:
    """A leaf tensor and the (possibly non-contiguous) view of it that is passed to the loss."""

    def __init__(self, how: str, shard: torch.Tensor) -> None:
        self.how = how
        if how == "contiguous":
            self.leaf = shard.clone()
        elif how == "transposed":  # leaf [b, s, V] -> input [s, b, V] view
            self.leaf = shard.transpose(0, 1).contiguous()
        elif how == "vocab_strided":  # input = leaf[..., ::2]; the other columns are NaN and must not be read
            self.leaf = torch.full((*shard.shape[:-1], 2 * shard.shape[-1]), math.nan, dtype=shard.dtype)
            self.leaf[..., ::2] = shard
        elif how == "row_slice":  # input = leaf[1:-1]; the extra rows are NaN and must not be read
            self.leaf = torch.full((shard.shape[0] + 2, *shard.shape[1:]), math.nan, dtype=shard.dtype)
            self.leaf[1:-1] = shard
        else:
            raise ValueError(f"unknown view {how!r}")
        self.leaf.requires_grad_(True)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """Apply the same view to the leaf (or a like-shaped per-token tensor, without the vocab dim)."""
        if self.how == "transposed":
            return tensor.transpose(0, 1)
        if self.how == "vocab_strided":
            return tensor[..., ::2]
        if self.how == "row_slice":
            return tensor[1:-1]
        return tensor

    def per_token(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-token tensor in the input's logical layout, stored with the same kind of strides."""
        if self.how == "transposed":
            return tensor.transpose(0, 1).contiguous().transpose(0, 1)
        if self.how == "row_slice":
            padded = torch.zeros((tensor.shape[0] + 2, *tensor.shape[1:]), dtype=tensor.dtype)
            padded[1:-1] = tensor
            return padded[1:-1]
        return tensor

    def input(self) -> torch.Tensor:
        return self.view(self.leaf)

    def untouched_grad_is_zero(self) -> bool:
        grad = self.leaf.grad
        if self.how == "vocab_strided":
            return bool((grad[..., 1::2] == 0).all())
        if self.how == "row_slice":
            return bool((grad[0] == 0).all() and (grad[-1] == 0).all())
        return True


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit pattern (so NaN == NaN) for an exact 'unchanged' comparison."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().contiguous().view(ints).clone()


# ---------------------------------------------------------------------------------------------------------------
# Error measures
# ---------------------------------------------------------------------------------------------------------------

def value_error(actual: torch.Tensor | float, expected: torch.Tensor | float) -> float:
    """max |a - r| / (RTOL * max(|r|, 1)); inf on NaN."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    r = torch.as_tensor(expected, dtype=torch.float64)
    if a.shape != r.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    err = (a - r).abs() / (RTOL * r.abs().clamp_min(1.0))
    err = torch.where(a == r, torch.zeros_like(err), err)  # equal infinities (CE = +inf at a -inf target) agree
    return math.inf if bool(torch.isnan(err).any()) else float(err.max())


FP32_P_ROUNDOFF = 4 * 2.0 ** -24


def grad_error(actual: torch.Tensor, expected: torch.Tensor, dtype: str,
               row_coefficient: torch.Tensor | None = None) -> float:
    """max over elements of |a - r| / bound (module docstring); rows with r == 0 must be 0 exactly.

    row_coefficient: |upstream_i * w_i| per token (shape of the target); None: the strict per-row measure.
    """
    a = actual.detach().to(torch.float64)
    r = expected.to(torch.float64)
    if a.shape != r.shape:
        return math.inf
    row_scale = r.abs().amax(dim=-1, keepdim=True)
    bound = RTOL * row_scale + UNIT_ROUNDOFF[dtype] * r.abs() + HALF_MIN_SUBNORMAL[dtype]
    if row_coefficient is not None:
        bound = bound + FP32_P_ROUNDOFF * row_coefficient.to(torch.float64).abs().unsqueeze(-1)
    diff = (a - r).abs()
    if bool(torch.isnan(diff).any()):
        return math.inf
    zero_rows = (row_scale == 0).expand_as(r)
    if bool((diff[zero_rows] != 0).any()):
        return math.inf
    ratio = torch.where(zero_rows, torch.zeros_like(diff), diff / bound)
    return float(ratio.max()) if ratio.numel() else 0.0


def plain_grad_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - r| / max |r| over the whole tensor (for the report table only)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((actual.detach().to(torch.float64) - expected).abs().max()) if expected.numel() else 0.0
    return diff / scale if scale else diff


# ---------------------------------------------------------------------------------------------------------------
# Execution (one rank)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Parallel:
    """Where this rank sits; tp_group/dp_group None means no parallelism (single process)."""

    tp_group: Any = None
    tp_rank: int = 0
    tp_size: int = 1
    dp_group: Any = None
    dp_rank: int = 0
    dp_size: int = 1
    replica: int = 0
    api_groups: bool = True  # False: pass tp_group=None, dp_group=None (Megatron's groups are resolved)

    @property
    def api_tp(self):
        return self.tp_group if self.api_groups else None

    @property
    def api_dp(self):
        return self.dp_group if self.api_groups else None

    @classmethod
    def from_layout(cls, groups, use_dp: bool = True) -> Parallel:
        dp = groups.dp_group if use_dp and groups.dp > 1 else None
        return cls(groups.tp_group, groups.tp_rank, groups.tp, dp, groups.dp_rank if dp else 0,
                   groups.dp if dp else 1, groups.replica)


def _gather_vocab(shard: torch.Tensor, par: Parallel) -> torch.Tensor:
    """The full [..., V_pad] gradient from every TP rank's shard (test instrumentation, after backward)."""
    if par.tp_size == 1:
        return shard
    import torch.distributed as dist

    parts = [torch.empty_like(shard) for _ in range(par.tp_size)]
    dist.all_gather(parts, shard.contiguous(), group=par.tp_group)
    return torch.cat(parts, dim=-1)


def _shard(full: torch.Tensor, par: Parallel) -> torch.Tensor:
    width = full.shape[-1] // par.tp_size
    return full[..., par.tp_rank * width:(par.tp_rank + 1) * width]


def run_token_case(case: TokenCase, par: Parallel) -> dict[str, Any]:
    """Run one TokenCase on this rank; errors against the float64 reference plus contract flags."""
    from mile_megatron import vocab_parallel_focal_cross_entropy, vocab_parallel_mile_cross_entropy

    gen = _generator("token", case.seed, par.replica, par.dp_rank)
    dtype = DTYPES[case.dtype]
    full = make_logits(case.logits, case.lead, case.vocab, gen).to(dtype)  # the exact input values
    target = make_targets(case.targets, case.lead, case.vocab, gen, full)
    upstream = make_upstream(case.upstream, case.lead, gen)

    viewed = ViewedInput(case.view, _shard(full, par))
    before = _bits(viewed.leaf)
    logits = viewed.input()
    target_in, upstream_in = viewed.per_token(target), viewed.per_token(upstream)
    if case.kind == "mile":
        out = vocab_parallel_mile_cross_entropy(logits, target_in, gamma=case.gamma, sigma=case.sigma,
                                                tp_group=par.api_tp)
    else:
        out = vocab_parallel_focal_cross_entropy(logits, target_in, gamma=case.gamma, tp_group=par.api_tp)
    unchanged_after_forward = torch.equal(_bits(viewed.leaf), before)
    out.loss.backward(upstream_in)
    unchanged_after_backward = torch.equal(_bits(viewed.leaf), before)
    grad_full = _gather_vocab(viewed.view(viewed.leaf.grad), par)

    expected = ref.token_losses(full, target, kind=case.kind, gamma=case.gamma, sigma=case.sigma)
    expected_grad = ref.token_losses_grad(expected, upstream.to(torch.float64))
    return {
        "case": case.name,
        "loss": value_error(out.loss.detach(), expected.loss),
        "ce": value_error(out.ce, expected.ce),
        "entropy": value_error(out.entropy, expected.entropy),
        "grad": grad_error(grad_full, expected_grad, case.dtype, upstream.double() * expected.weight),
        "grad_row": grad_error(grad_full, expected_grad, case.dtype),
        "grad_plain": plain_grad_rel_error(grad_full, expected_grad),
        "dtypes_float32": all(t.dtype == torch.float32 for t in out),
        "shapes": all(tuple(t.shape) == case.lead for t in out),
        "detached": (not out.ce.requires_grad) and (not out.entropy.requires_grad) and out.loss.requires_grad,
        "grad_dtype": viewed.leaf.grad.dtype == dtype,
        "untouched_grad_zero": viewed.untouched_grad_is_zero(),
        "input_unchanged": unchanged_after_forward and unchanged_after_backward,
    }


NEG_INF_ERROR_KEYS = ("ce_vs_cross_entropy", "ce", "entropy", "loss", "grad")


def run_neg_inf_parity(par: Parallel, dtype: str) -> dict[str, Any]:
    """-inf logits (the "neginf" family: masked entries, whole shards of a row at -inf), every 3rd target on a -inf
    logit: CE against F.cross_entropy in float64 (+inf at exactly those tokens), CE, entropy, loss and the gathered
    gradient against the float64 reference (error measures of the module docstring)."""
    from mile_megatron import vocab_parallel_mile_cross_entropy

    lead, vocab = (6, 4), 64
    gen = _generator("neginf-parity", par.replica, dtype)
    full = make_logits("neginf", lead, vocab, gen).to(DTYPES[dtype])
    target = make_targets("finite+inf", lead, vocab, gen, full)
    upstream = make_upstream("random", lead, gen)
    leaf = _shard(full, par).clone().requires_grad_(True)
    out = vocab_parallel_mile_cross_entropy(leaf, target, gamma=1.5, sigma=0.5, tp_group=par.api_tp)
    out.loss.backward(upstream)
    grad = _gather_vocab(leaf.grad, par)
    torch_ce = torch.nn.functional.cross_entropy(full.double().view(-1, vocab), target.view(-1),
                                                 reduction="none").view(lead)
    expected = ref.token_losses(full, target, gamma=1.5, sigma=0.5)
    expected_grad = ref.token_losses_grad(expected, upstream.double())
    return {
        "ce_vs_cross_entropy": value_error(out.ce, torch_ce),
        "ce": value_error(out.ce, expected.ce),
        "entropy": value_error(out.entropy, expected.entropy),
        "loss": value_error(out.loss.detach(), expected.loss),
        "grad": grad_error(grad, expected_grad, dtype, upstream.double() * expected.weight),
        "ce_is_inf_exactly_where_target_is_inf": bool(torch.equal(out.ce.isinf(), torch_ce.isinf())
                                                      and torch_ce.isinf().any() and torch_ce.isfinite().any()
                                                      and out.entropy.isfinite().all()
                                                      and grad.isfinite().all()),
    }


def run_all_neg_inf_row(par: Parallel) -> dict[str, Any]:
    """A row that is -inf on every rank (no distribution; F.cross_entropy gives NaN) comes out as documented:
    uniform over V_pad (H = log V_pad), CE = +inf, a finite gradient; the other rows are unaffected."""
    from mile_megatron import vocab_parallel_mile_cross_entropy

    vocab = 16 * MAX_TP
    full = make_logits("normal", (3,), vocab, _generator("all-neginf"))
    full[1] = -math.inf
    target = torch.tensor([3, 5, vocab - 1])
    leaf = _shard(full.float(), par).clone().requires_grad_(True)
    out = vocab_parallel_mile_cross_entropy(leaf, target, tp_group=par.api_tp)
    out.loss.backward(torch.ones(3))
    expected = ref.token_losses(full[[0, 2]], target[[0, 2]])
    return {"entropy_log_v": abs(float(out.entropy[1]) - math.log(vocab)) <= 1e-6 * math.log(vocab),
            "ce_inf": float(out.ce[1]) == math.inf,
            "grad_finite": bool(leaf.grad.isfinite().all()),
            "others": max(value_error(out.ce[[0, 2]], expected.ce), value_error(out.entropy[[0, 2]], expected.entropy))}


def _loss_batch(case: LossCase, par: Parallel, dp_rank: int):
    gen = _generator("loss", case.seed, par.replica, dp_rank)
    full = make_logits(case.logits, case.lead, case.vocab, gen).to(DTYPES[case.dtype])
    target = make_targets("random", case.lead, case.vocab, gen)
    mask = make_mask(case.mask, case.lead, dp_rank, gen)
    return full, target, mask


def run_loss_case(case: LossCase, par: Parallel) -> dict[str, Any]:
    """Run one LossCase (mile_loss, mile_loss_with_stats, loss_sum backward) on this rank."""
    from mile_megatron import mile_loss, mile_loss_with_stats

    batches = [_loss_batch(case, par, d) for d in range(par.dp_size)]
    full, target, mask = batches[par.dp_rank]
    expected_all = ref.mile_loss_reference([ref.RefBatch(*b) for b in batches], kind=case.kind, gamma=case.gamma,
                                           sigma=case.sigma, alpha=case.alpha, upstream=case.upstream)
    expected = expected_all[par.dp_rank]
    kwargs = dict(kind=case.kind, gamma=case.gamma, sigma=case.sigma, alpha=case.alpha,
                  tp_group=par.api_tp, dp_group=par.api_dp)

    viewed = ViewedInput(case.view, _shard(full, par))
    before = _bits(viewed.leaf)
    target_in = viewed.per_token(target)
    mask_in = None if mask is None else viewed.per_token(mask)
    loss = mile_loss(viewed.input(), target_in, mask_in, **kwargs)
    loss.backward(torch.tensor(case.upstream, dtype=loss.dtype))
    grad = _gather_vocab(viewed.view(viewed.leaf.grad), par)
    unchanged = torch.equal(_bits(viewed.leaf), before)

    viewed2 = ViewedInput(case.view, _shard(full, par))
    stats = mile_loss_with_stats(viewed2.input(), target_in, mask_in, **kwargs)
    stats.loss_sum.backward()
    grad_sum = _gather_vocab(viewed2.view(viewed2.leaf.grad), par)

    alpha_defined = math.isfinite(expected.alpha)
    count = expected.num_tokens
    token_mask = torch.ones(case.lead, dtype=torch.float64) if mask is None else mask.double()
    coefficient = (expected.alpha if alpha_defined else 1.0) * expected.tokens.weight * token_mask
    # Where the alpha rule divides by zero (e.g. focal + official with a fully masked DP rank) the contract
    # leaves alpha open: only the alpha-independent sums are compared, and everything must stay finite.
    compare = alpha_defined or count == 0
    result = {
        "case": case.name,
        "loss": value_error(loss.detach(), expected.loss) if compare else 0.0,
        "stats.loss": value_error(stats.loss.detach(), expected.loss) if compare else 0.0,
        "loss_sum": value_error(stats.loss_sum.detach(), expected.loss_sum) if compare else 0.0,
        "ce_sum": value_error(stats.ce_sum, expected.ce_sum),
        "entropy_sum": value_error(stats.entropy_sum, expected.entropy_sum),
        "num_tokens_exact": float(stats.num_tokens) == expected.num_tokens,
        "alpha": value_error(stats.alpha, expected.alpha) if alpha_defined else 0.0,
        "alpha_value": float(stats.alpha),
        "grad": (grad_error(grad, expected.grad, case.dtype, coefficient * (case.upstream / max(count, 1.0)))
                 if compare else 0.0),
        "grad_row": grad_error(grad, expected.grad, case.dtype) if compare else 0.0,
        "grad_plain": plain_grad_rel_error(grad, expected.grad) if compare else 0.0,
        "loss_sum_grad": grad_error(grad_sum, expected.loss_sum_grad, case.dtype, coefficient) if compare else 0.0,
        "scalar_shapes": all(t.shape == () for t in stats) and loss.shape == (),
        "dtypes_float32": all(t.dtype == torch.float32 for t in stats) and loss.dtype == torch.float32,
        "detached": (loss.requires_grad and stats.loss_sum.requires_grad
                     and not any(t.requires_grad for t in (stats.ce_sum, stats.entropy_sum, stats.num_tokens,
                                                           stats.alpha))),
        "finite": (bool(torch.isfinite(loss)) and bool(torch.isfinite(viewed.leaf.grad).all())
                   and all(bool(torch.isfinite(t)) for t in stats)),
        "loss_value": float(loss.detach()),
        "input_unchanged": unchanged,
        "untouched_grad_zero": viewed.untouched_grad_is_zero(),
    }
    if expected.num_tokens == 0:  # all masked: loss exactly 0, gradient exactly 0, no NaN
        result["all_masked_exact_zero"] = (float(loss.detach()) == 0.0 and bool((viewed.leaf.grad == 0).all())
                                           and float(stats.loss_sum.detach()) == 0.0)
    return result


ERROR_KEYS_TOKEN = ("loss", "ce", "entropy", "grad")
FLAG_KEYS_TOKEN = ("dtypes_float32", "shapes", "detached", "grad_dtype", "untouched_grad_zero", "input_unchanged")
ERROR_KEYS_LOSS = ("loss", "stats.loss", "loss_sum", "ce_sum", "entropy_sum", "alpha", "grad", "loss_sum_grad")
FLAG_KEYS_LOSS = ("num_tokens_exact", "scalar_shapes", "dtypes_float32", "detached", "finite", "input_unchanged",
                  "untouched_grad_zero", "all_masked_exact_zero")


def failures(results: list[dict[str, Any]], error_keys, flag_keys, where: str = "") -> list[str]:
    """Human-readable list of every error measure > 1 and every false flag."""
    bad = []
    for res in results:
        for key in error_keys:
            if not res[key] <= 1.0:
                bad.append(f"{where}{res['case']}: {key} error {res[key]:.3g} x tolerance")
        for key in flag_keys:
            if key in res and not res[key]:
                bad.append(f"{where}{res['case']}: {key} is False")
    return bad


def case_dict(case) -> dict[str, Any]:
    return asdict(case)


# ---------------------------------------------------------------------------------------------------------------
# Worker entry points (module-level so they pickle): fn(ctx, ...) -> plain data
# ---------------------------------------------------------------------------------------------------------------

def worker_token_cases(ctx, tp: int, dp: int, cases: list[TokenCase]) -> list[dict[str, Any]]:
    par = Parallel.from_layout(ctx.layout(tp, dp))
    return [run_token_case(case, par) for case in cases]


def worker_loss_cases(ctx, tp: int, dp: int, cases: list[LossCase]) -> list[dict[str, Any]]:
    par = Parallel.from_layout(ctx.layout(tp, dp))
    return [run_loss_case(case, par) for case in cases]


def worker_instrumented(ctx, tp: int, dp: int) -> dict[str, dict[str, Any]]:
    """Collectives (per group) and host-synchronising ops in forward and in backward, checks off and on."""
    import mile_megatron as mm
    from distributed import OpRecorder

    par = Parallel.from_layout(ctx.layout(tp, dp))
    groups = {"tp": par.tp_group, "dp": par.dp_group}
    gen = _generator("instrumented", par.replica, par.dp_rank)
    full = make_logits("normal", (4, 2), 64, gen)
    target = make_targets("random", (4, 2), 64, gen)
    mask = make_mask("random", (4, 2), par.dp_rank, gen)
    upstream = make_upstream("random", (4, 2), gen)
    shard = _shard(full, par).to(torch.float32)
    calls = {
        "mile": lambda x: mm.vocab_parallel_mile_cross_entropy(x, target, tp_group=par.tp_group).loss,
        "focal": lambda x: mm.vocab_parallel_focal_cross_entropy(x, target, gamma=2.0, tp_group=par.tp_group).loss,
    }
    for kind in ("mile", "focal", "ce"):
        for alpha in ("global", "official", "none"):
            calls[f"mile_loss/{kind}/{alpha}"] = (
                lambda x, kind=kind, alpha=alpha: mm.mile_loss(x, target, mask, kind=kind, alpha=alpha,
                                                               tp_group=par.tp_group, dp_group=par.dp_group))
    report = {}
    previous = mm.input_checks()
    try:
        for checks in (False, True):
            mm.set_input_checks(checks)
            # The first call after set_input_checks verifies that every TP rank has the same setting: one host read
            # of the trailer the statistics all-gather carries anyway (no extra collective). Recorded apart.
            with OpRecorder(groups) as first:
                calls["mile"](shard.clone().requires_grad_(True))
            report[f"mile first call after set_input_checks({checks})"] = {
                "forward_tp": first.count("tp"), "forward_dp": first.count("dp"),
                "forward_other": len(first.collectives) - first.count("tp") - first.count("dp"),
                "backward_collectives": 0, "forward_host_syncs": list(first.host_syncs), "backward_host_syncs": []}
            for label, call in calls.items():
                leaf = shard.clone().requires_grad_(True)
                with OpRecorder(groups) as forward:
                    out = call(leaf)
                with OpRecorder(groups) as backward:
                    out.backward(upstream if out.dim() else None)
                report[f"{label} checks={'on' if checks else 'off'}"] = {
                    "forward_tp": forward.count("tp"),
                    "forward_dp": forward.count("dp"),
                    "forward_other": len(forward.collectives) - forward.count("tp") - forward.count("dp"),
                    "backward_collectives": len(backward.collectives),
                    "forward_host_syncs": list(forward.host_syncs),
                    "backward_host_syncs": list(backward.host_syncs),
                }
    finally:
        mm.set_input_checks(previous)
    return report


def worker_distributed_errors(ctx, tp: int) -> dict[str, str]:
    """Bad inputs under real TP: every rank must raise ValueError (same decision everywhere, so no hang)."""
    import mile_megatron as mm

    par = Parallel.from_layout(ctx.layout(tp, 1))
    gen = _generator("errors", par.replica)
    vocab = 16 * tp
    full = make_logits("normal", (3, 2), vocab, gen).to(torch.float32)
    target = make_targets("random", (3, 2), vocab, gen)
    shard = _shard(full, par)
    wider = torch.cat([shard, shard[..., :1]], dim=-1) if par.tp_rank == tp - 1 else shard

    def bad_target(value):
        t = target.clone()
        t[1, 1] = value
        return t

    attempts = {
        "widths differ (mile)": lambda: mm.vocab_parallel_mile_cross_entropy(wider, target, tp_group=par.tp_group),
        "widths differ (focal)": lambda: mm.vocab_parallel_focal_cross_entropy(wider, target, tp_group=par.tp_group),
        "widths differ (mile_loss)": lambda: mm.mile_loss(wider, target, tp_group=par.tp_group),
        "target == V_pad": lambda: mm.vocab_parallel_mile_cross_entropy(shard, bad_target(vocab),
                                                                        tp_group=par.tp_group),
        "target == -1": lambda: mm.vocab_parallel_focal_cross_entropy(shard, bad_target(-1), tp_group=par.tp_group),
        "target == V_pad (mile_loss)": lambda: mm.mile_loss(shard, bad_target(vocab), tp_group=par.tp_group),
        "target == -1 (mile_loss, counted)": lambda: mm.mile_loss(shard, bad_target(-1), torch.ones(3, 2),
                                                                  tp_group=par.tp_group),
    }
    outcome = {}
    previous = mm.input_checks()
    mm.set_input_checks(True)
    try:
        for label, attempt in attempts.items():
            try:
                attempt()
                outcome[label] = "no error"
            except Exception as error:  # noqa: BLE001 - the test inspects type and message
                outcome[label] = f"{type(error).__name__}: {error}"
    finally:
        mm.set_input_checks(previous)
    return outcome


def worker_megatron_default_groups(ctx, token_cases_: list[TokenCase], loss_cases_: list[LossCase]) -> dict:
    """tp_group=None / dp_group=None with megatron.core.parallel_state initialised (TP=2 x DP=2)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        tp_group = parallel_state.get_tensor_model_parallel_group()
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        par = Parallel(tp_group, parallel_state.get_tensor_model_parallel_rank(), 2, dp_group,
                       parallel_state.get_data_parallel_rank(with_context_parallel=True), 2, replica=0,
                       api_groups=False)
        return {"token": [run_token_case(case, par) for case in token_cases_],
                "loss": [run_loss_case(case, par) for case in loss_cases_]}
    finally:
        parallel_state.destroy_model_parallel()


def worker_fail_on_rank(ctx, rank: int) -> int:
    """Harness self-test: raise on one rank (no collective, so the others finish normally)."""
    if ctx.rank == rank:
        raise ArithmeticError(f"deliberate failure on rank {rank}")
    return ctx.rank
