"""The fused output layer + loss (mile_megatron.loss.linear) against a plain float64 reference and the unfused path.

Two spawned gloo processes (TRITON_INTERPRET=1 in their environment, so the Triton statistics and gradient kernels
run under the interpreter when selected): TP=1 and TP=2, with and without sequence parallelism, fp32 and bf16,
the torch and the Triton path, an odd vocabulary shard (37 columns) and hidden size (13), several chunk sizes.
Per token: loss, CE, entropy and weight; gradients: d sum(u * loss) / d hidden (summed over the TP group, or this
rank's sequence shard with sequence parallelism) and / d weight (this rank's rows). The float64 reference uses
the logits the output layer itself produces (hidden @ weight.T in the inputs' dtype), so bf16 compares like for
like. Also: Megatron's gradient_accumulation_fusion contract (main_grad), a tied embedding / output weight,
linear_mile_loss_terms against mile_loss_terms, and the memory bound (every tensor the forward and backward create,
recorded in the dispatcher, and every tensor saved for backward).
"""

from __future__ import annotations

import pytest
import torch

from distributed import DistributedPool, OpRecorder
from mile_megatron.loss import reference as ref

WORLD = 2
SHAPE = (6, 3)  # [s, b]: 18 tokens
HIDDEN, SHARD = 13, 37  # hidden size, columns per TP rank (V_pad = 37 tp)
GAMMA, SIGMA = 1.5, 0.5


def inputs(tp: int, dtype: torch.dtype, seed: int = 3):
    """Full hidden [s, b, h], full weight [V, h], targets [s, b], upstream [s, b], mask [s, b] (same on all ranks)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*SHAPE, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(SHARD * tp, HIDDEN, generator=generator, dtype=torch.float64) / 2
    target = torch.randint(0, SHARD * tp, SHAPE, generator=generator)
    target.view(-1)[:3] = torch.tensor([0, SHARD - 1, SHARD * tp - 1])  # shard edges
    upstream = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    mask = (torch.rand(SHAPE, generator=generator) > 0.25).double()
    return hidden.to(dtype), weight.to(dtype), target, upstream, mask


def reference(hidden, weight, target, upstream, kind):
    """float64 per-token results and gradients of sum(upstream * loss), from the logits the layer produces."""
    logits = (hidden @ weight.t()).double()  # the output layer's own rounding (bf16 logits for bf16 inputs)
    tokens = ref.token_losses(logits, target, kind=kind, gamma=GAMMA, sigma=SIGMA)
    dlogits = ref.token_losses_grad(tokens, upstream)
    return tokens, dlogits @ weight.double(), dlogits.reshape(-1, dlogits.shape[-1]).t() @ hidden.double().reshape(
        -1, hidden.shape[-1])


def rel(actual, expected) -> float:
    expected = expected.double()
    scale = float(expected.abs().max()) or 1.0
    return float((actual.double() - expected).abs().max()) / scale


def worker_parity(ctx, tp: int, dtype_name: str, backend: str, sequence_parallel: bool, kind: str,
                  chunk_tokens: int | None) -> dict:
    from mile_megatron.loss import linear_vocab_parallel_cross_entropy, settings

    settings.set_loss_backend(backend)
    dtype = getattr(torch, dtype_name)
    groups = ctx.layout(tp, 1)
    hidden, weight, target, upstream, _ = inputs(tp, dtype)
    rank = groups.tp_rank
    rows = slice(rank * SHARD, (rank + 1) * SHARD)
    local_hidden = hidden
    if sequence_parallel:
        per = SHAPE[0] // tp
        local_hidden = hidden[rank * per:(rank + 1) * per]
    x = local_hidden.clone().requires_grad_()
    w = weight[rows].clone().requires_grad_()
    with OpRecorder({"tp": groups.tp_group}) as recorder:
        out = linear_vocab_parallel_cross_entropy(x, w, target, kind=kind, gamma=GAMMA, sigma=SIGMA,
                                                  tp_group=groups.tp_group, sequence_parallel=sequence_parallel,
                                                  chunk_tokens=chunk_tokens)
    forward_collectives = [name for name, _ in recorder.collectives]
    (out.loss * upstream.to(out.loss.dtype)).sum().backward()
    tokens, dhidden, dweight = reference(hidden, weight, target, upstream, kind)
    expected_dhidden = dhidden[rank * (SHAPE[0] // tp):(rank + 1) * (SHAPE[0] // tp)] if sequence_parallel else dhidden
    return {
        "loss": rel(out.loss, tokens.loss), "ce": rel(out.ce, tokens.ce), "entropy": rel(out.entropy, tokens.entropy),
        "weight": rel(out.weight, tokens.weight), "dhidden": rel(x.grad, expected_dhidden),
        "dweight": rel(w.grad, dweight[rows]), "grad_dtypes": (str(x.grad.dtype), str(w.grad.dtype)),
        "forward_collectives": forward_collectives, "triton": settings.use_triton(x),
    }


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(WORLD, layouts=[(1, 1), (2, 1)], env=[{"TRITON_INTERPRET": "1"}] * WORLD) as started:
        yield started


CASES = [
    # tp, dtype, backend, sequence_parallel, kind, chunk_tokens
    (1, "float32", "torch", False, "mile", None),
    (1, "float32", "torch", False, "focal", 4),
    (2, "float32", "torch", False, "mile", 5),
    (2, "float32", "torch", True, "mile", 7),
    (2, "float32", "torch", True, "ce", None),
    (2, "bfloat16", "torch", False, "mile", 8),
    (2, "bfloat16", "torch", True, "focal", 16),
    (1, "float32", "triton", False, "mile", 5),
    (2, "float32", "triton", True, "mile", 4),
    (2, "bfloat16", "triton", False, "mile", 6),
]


@pytest.mark.parametrize("tp,dtype,backend,sequence_parallel,kind,chunk_tokens", CASES,
                         ids=[f"tp{c[0]}-{c[1]}-{c[2]}-{'sp' if c[3] else 'nosp'}-{c[4]}-chunk{c[5]}" for c in CASES])
def test_fused_results_and_gradients_match_float64(pool, tp, dtype, backend, sequence_parallel, kind, chunk_tokens):
    results = [r for r in pool.run(worker_parity, tp, dtype, backend, sequence_parallel, kind, chunk_tokens)]
    for result in results[:tp]:
        values = 1e-6 if dtype == "float32" else 2e-5  # fp32 statistics of the (bf16) logits
        gradient = 2e-6 if dtype == "float32" else 2e-2  # bf16: G rounded once, then a bf16 matmul
        for key in ("loss", "ce", "entropy", "weight"):
            assert result[key] <= values, (key, result)
        assert result["dhidden"] <= gradient and result["dweight"] <= gradient, result
        assert result["grad_dtypes"] == (f"torch.{dtype}", f"torch.{dtype}")
        assert result["triton"] == (backend == "triton")
        gather = ["c10d._allgather_base_.default"] if sequence_parallel and tp > 1 else []
        # forward: at most the hidden-state gather of sequence parallelism and one small statistics all-gather
        assert len(result["forward_collectives"]) <= len(gather) + (1 if tp > 1 else 0), result


def worker_main_grad_and_tied(ctx) -> dict:
    """gradient_accumulation_fusion: dW lands in weight.main_grad (fp32, accumulating over two calls) and the
    autograd gradient is a placeholder; a weight tied to an embedding gets both gradients (vs the unfused graph)."""
    from mile_megatron.loss import linear_vocab_parallel_cross_entropy, vocab_parallel_mile_cross_entropy

    hidden, weight, target, upstream, _ = inputs(1, torch.float32)
    w = weight.clone().requires_grad_()
    w.main_grad = torch.zeros_like(w, dtype=torch.float32)
    w.grad_added_to_main_grad = False
    for _ in range(2):
        out = linear_vocab_parallel_cross_entropy(hidden, w, target, tp_group=None, gradient_accumulation_fusion=True,
                                                  chunk_tokens=4, gamma=GAMMA, sigma=SIGMA)
        (out.loss * upstream.float()).sum().backward()
    _, _, dweight = reference(hidden, weight, target, upstream, "mile")
    main_grad_error = rel(w.main_grad, 2 * dweight)

    ids = torch.randint(0, weight.shape[0], SHAPE)

    def tied_loss(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        table = weight.clone().requires_grad_()
        x = (hidden + table[ids]).contiguous()  # the embedding lookup shares the output weight
        if fused:
            out = linear_vocab_parallel_cross_entropy(x, table, target, chunk_tokens=5, gamma=GAMMA, sigma=SIGMA)
        else:
            out = vocab_parallel_mile_cross_entropy(x @ table.t(), target, gamma=GAMMA, sigma=SIGMA)
        (out.loss * upstream.float()).sum().backward()
        return table.grad

    return {"main_grad": main_grad_error, "flag": w.grad_added_to_main_grad,
            "tied": rel(tied_loss(True), tied_loss(False).double())}


def test_main_grad_contract_and_tied_weights(pool):
    result = pool.run(worker_main_grad_and_tied)[0]
    assert result["main_grad"] <= 2e-6 and result["flag"] is True, result
    assert result["tied"] <= 2e-6, result


def worker_terms(ctx, alpha: str) -> dict:
    from mile_megatron.loss import linear_mile_loss_terms, mile_loss_terms

    groups = ctx.layout(2, 1)
    hidden, weight, target, _, mask = inputs(2, torch.float32)
    rows = slice(groups.tp_rank * SHARD, (groups.tp_rank + 1) * SHARD)
    fused = linear_mile_loss_terms(hidden, weight[rows], target, mask, alpha=alpha, gamma=GAMMA, sigma=SIGMA,
                                   tp_group=groups.tp_group, chunk_tokens=4)
    plain = mile_loss_terms(hidden @ weight[rows].t(), target, mask, alpha=alpha, gamma=GAMMA, sigma=SIGMA,
                            tp_group=groups.tp_group)
    return {field: (float(a), float(b)) for field, a, b in zip(fused._fields, fused, plain)}


@pytest.mark.parametrize("alpha", ["global", "none"])
def test_fused_terms_equal_the_unfused_terms(pool, alpha):
    for result in pool.run(worker_terms, alpha):
        for field, (fused, plain) in result.items():
            assert fused == pytest.approx(plain, rel=1e-6, abs=1e-6), field


def peak_and_saved(fused: bool, tokens: int, hidden_size: int, vocab: int, chunk: int) -> tuple[int, int]:
    """(largest tensor any op creates in forward + backward, total elements saved for backward), in elements."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mile_megatron.loss import linear_vocab_parallel_cross_entropy, vocab_parallel_mile_cross_entropy

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(value, torch.Tensor):
                    Largest.largest = max(Largest.largest, value.numel())
            return out

    saved: dict[int, int] = {}

    def pack(tensor):
        saved[id(tensor)] = tensor.numel()
        return tensor

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden_size, generator=generator).requires_grad_()
    w = torch.randn(vocab, hidden_size, generator=generator).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), Largest():
        if fused:
            out = linear_vocab_parallel_cross_entropy(x, w, target, chunk_tokens=chunk)
        else:
            out = vocab_parallel_mile_cross_entropy(x @ w.t(), target)
        out.loss.sum().backward()
    return Largest.largest, sum(saved.values())


def test_no_tensor_of_tokens_by_vocabulary_exists():
    """Forward and backward create no tensor larger than chunk x V/tp (+ the hidden-sized and weight-sized ones
    the output layer has anyway) and save O(tokens + h x V/tp) elements; the unfused path holds tokens x V/tp."""
    tokens, hidden_size, vocab, chunk = 512, 24, 1000, 32
    largest, saved = peak_and_saved(True, tokens, hidden_size, vocab, chunk)
    assert largest <= max(chunk * vocab, hidden_size * vocab, tokens * hidden_size), largest
    assert saved <= 8 * tokens + tokens * hidden_size + hidden_size * vocab, saved
    unfused_largest, unfused_saved = peak_and_saved(False, tokens, hidden_size, vocab, chunk)
    assert unfused_largest >= tokens * vocab and unfused_saved >= tokens * vocab
    assert largest * 8 <= unfused_largest


def test_bad_inputs_are_refused_by_name():
    from mile_megatron.loss import linear_vocab_parallel_cross_entropy

    x, w, t = torch.randn(4, 3, 8), torch.randn(10, 8), torch.randint(0, 10, (4, 3))
    cases = [
        ((x, torch.randn(10, 7), t), {}, "output-layer shard"),
        ((x.double(), w, t), {}, "one dtype"),
        ((x, w, t[:2]), {}, "target shape"),
        ((x, w, t.float()), {}, "integer token ids"),
        ((x, w, t), {"chunk_tokens": 0}, "chunk_tokens"),
        ((x, w, t), {"kind": "l2"}, "unknown loss kind"),
        ((x, w, t), {"gamma": -1.0}, "gamma must be >= 0"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            linear_vocab_parallel_cross_entropy(*args, **kwargs)
