"""The Triton kernels of the loss (mile_megatron/loss/triton) against the float64 reference and the torch path.

On CPU the kernels run under the Triton interpreter in two spawned gloo processes whose environment has
TRITON_INTERPRET=1 from the start (this pytest process never sets it: the other tests use the torch path), at
small sizes: every token and mile_loss case of tests/loss_cases.py at TP=1 and TP=2 with the default block sizes,
odd widths with 64-column blocks (multi-block loops, partial tails), the torch path on the same inputs, the opt-in
in-place backward, collectives and host synchronisation. With CUDA the same checks run compiled at full size
(skipped otherwise). Error measures and tolerances are those of tests/loss_cases.py (all must be <= 1).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

import loss_cases as lc
import mile_megatron as mm
from distributed import DistributedPool
from mile_megatron.loss import settings
from mile_megatron.loss import reference as ref
from mile_megatron.loss.triton.layout import has_distinct_elements, row_layout

WORLD = 2
LAYOUTS = [(1, 1), (2, 1)]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (compiled Triton kernels)")

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------------------------------------------
# Workers (module level so they pickle); they run inside the interpreter pool
# ----------------------------------------------------------------------------------------------------------------

def _use_triton(blocks: tuple[int, int] | None = None) -> None:
    """Select the Triton path (interpreted) and the block sizes for this task; fail loudly if it is not active."""
    from mile_megatron.loss.triton import function as triton_loss

    assert os.environ.get("TRITON_INTERPRET") == "1" and settings.interpreting(), "worker is not interpreting"
    settings.set_loss_backend("triton")
    settings.set_inplace_backward(False)
    triton_loss.FORWARD_BLOCK, triton_loss.BACKWARD_BLOCK = blocks or (2048, 4096)
    assert settings.use_triton(torch.zeros(2, 8)) and not settings.use_triton(torch.zeros(2, 8, dtype=torch.float64))


def worker_environment(ctx) -> dict:
    return {"setting": settings.loss_backend_setting(), "interpreting": settings.interpreting(),
            "backend_cpu": settings.loss_backend("cpu")}


def worker_cases(ctx, tp: int, token_cases, loss_cases, blocks=None) -> dict:
    _use_triton(blocks)
    par = lc.Parallel.from_layout(ctx.layout(tp, 1))
    return {"token": [lc.run_token_case(case, par) for case in token_cases],
            "loss": [lc.run_loss_case(case, par) for case in loss_cases]}


def _token_run(case: lc.TokenCase, par: lc.Parallel, backend: str):
    """Outputs and gathered gradient of one token case with the given backend (inputs as in run_token_case)."""
    settings.set_loss_backend(backend)
    gen = lc._generator("token", case.seed, par.replica, par.dp_rank)
    full = lc.make_logits(case.logits, case.lead, case.vocab, gen).to(lc.DTYPES[case.dtype])
    target = lc.make_targets(case.targets, case.lead, case.vocab, gen, full)
    upstream = lc.make_upstream(case.upstream, case.lead, gen)
    viewed = lc.ViewedInput(case.view, lc._shard(full, par))
    if case.kind == "mile":
        out = mm.vocab_parallel_mile_cross_entropy(viewed.input(), viewed.per_token(target), gamma=case.gamma,
                                                   sigma=case.sigma, tp_group=par.api_tp)
    else:
        out = mm.vocab_parallel_focal_cross_entropy(viewed.input(), viewed.per_token(target), gamma=case.gamma,
                                                    tp_group=par.api_tp)
    name = type(out.loss.grad_fn).__name__
    out.loss.backward(viewed.per_token(upstream))
    grad = lc._gather_vocab(viewed.view(viewed.leaf.grad), par)
    expected = ref.token_losses(full, target, kind=case.kind, gamma=case.gamma, sigma=case.sigma)
    return [t.detach() for t in out], grad, name, upstream.double() * expected.weight


def worker_compare_backends(ctx, tp: int, cases) -> list[dict]:
    """Triton against the torch path on identical inputs: per-token values and the logits gradient."""
    _use_triton()
    par = lc.Parallel.from_layout(ctx.layout(tp, 1))
    results = []
    for case in cases:
        fast, fast_grad, fast_fn, coefficient = _token_run(case, par, "triton")
        slow, slow_grad, slow_fn, _ = _token_run(case, par, "torch")
        values = max(float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1.0)).max())
                     for a, b in zip(fast, slow))
        results.append({"case": case.name, "functions": (fast_fn, slow_fn), "values": values / lc.RTOL,
                        "grad": lc.grad_error(fast_grad, slow_grad.double(), case.dtype, coefficient)})
    settings.set_loss_backend("triton")
    return results


def worker_inplace(ctx, tp: int) -> dict:
    """Opt-in in-place backward: correct gradient, the logits' memory holds it, other users of the logits fail."""
    _use_triton()
    par = lc.Parallel.from_layout(ctx.layout(tp, 1))
    gen = lc._generator("inplace", par.replica)
    full = (torch.randn(5, 3, 24 * tp, generator=gen, dtype=torch.float64) * 3).to(torch.bfloat16)
    target = torch.randint(0, 24 * tp, (5, 3), generator=gen)
    upstream = lc.make_upstream("random", (5, 3), gen)
    expected = ref.token_losses(full, target, gamma=2.0, sigma=0.5)
    expected_grad = ref.token_losses_grad(expected, upstream.double())
    coefficient = upstream.double() * expected.weight
    report = {}
    settings.set_inplace_backward(True)
    try:
        for view in ("contiguous", "transposed", "row_slice"):
            viewed = lc.ViewedInput(view, lc._shard(full, par))
            x = viewed.view(viewed.leaf * 1)  # a non-leaf holding the logits: the loss may overwrite it
            out = mm.vocab_parallel_mile_cross_entropy(x, viewed.per_token(target), gamma=2.0, sigma=0.5,
                                                       tp_group=par.api_tp)
            pointer = x.data_ptr()
            out.loss.backward(viewed.per_token(upstream))
            grad = lc._gather_vocab(viewed.view(viewed.leaf.grad), par)
            report[view] = {
                "grad": lc.grad_error(grad, expected_grad, "bfloat16", coefficient),
                "loss": lc.value_error(out.loss.detach(), expected.loss),
                "written_in_place": bool(torch.equal(x.detach(), viewed.view(viewed.leaf.grad)))
                and x.data_ptr() == pointer,
            }
        # A leaf (or a view of one) keeps its values: its gradient goes to a new tensor.
        leaf = lc._shard(full, par).clone().requires_grad_(True)
        before = leaf.detach().clone()
        mm.vocab_parallel_mile_cross_entropy(leaf.transpose(0, 1), target.t(), gamma=2.0, sigma=0.5,
                                             tp_group=par.api_tp).loss.backward(upstream.t())
        report["leaf"] = {"unchanged": bool(torch.equal(leaf.detach(), before)),
                          "grad": lc.grad_error(lc._gather_vocab(leaf.grad, par), expected_grad, "bfloat16",
                                                coefficient)}
        # Another autograd node saved the logits (x * x, recorded first so its backward runs after the loss's):
        # the in-place write is detected instead of silently corrupting its gradient.
        leaf = lc._shard(full, par).float().clone().requires_grad_(True)
        x = leaf * 1
        other = (x * x).sum()
        loss = mm.vocab_parallel_mile_cross_entropy(x, target, tp_group=par.api_tp).loss.sum()
        try:
            (loss + other).backward()
            report["shared_logits"] = "no error"
        except RuntimeError as error:
            report["shared_logits"] = str(error)
    finally:
        settings.set_inplace_backward(False)
    return report


def worker_instrumented_triton(ctx, tp: int) -> dict:
    _use_triton()
    return lc.worker_instrumented(ctx, tp, 1)


def _strided_target_inputs(tp: int, gen: torch.Generator) -> dict:
    """(full logits, target) whose target is not contiguous: after target.reshape(-1) it is still strided."""
    vocab, n = 24 * tp, 10
    labels = torch.randint(0, vocab, (2, 2 * n), generator=gen)
    full = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 3).float()
    return {
        "1d-every-second": (full, labels[0, ::2]),  # stride 2
        "batch1-every-second": (full.unsqueeze(0), labels[:1, ::2]),  # [1, n], strides (2n, 2): flat view stride 2
        "expanded": (full, torch.tensor(vocab - 1).expand(n)),  # stride 0
        "transposed": (full.view(5, 2, vocab), labels[:, :5].t()),  # [5, 2] view of [2, 5] (reshape copies)
    }


def worker_strided_targets(ctx, tp: int) -> list[dict]:
    """CE against F.cross_entropy, loss and gradient against the reference, for non-contiguous targets; both paths."""
    _use_triton()
    par = lc.Parallel.from_layout(ctx.layout(tp, 1))
    results = []
    for backend in ("triton", "torch"):
        settings.set_loss_backend(backend)
        for name, (full, target) in _strided_target_inputs(tp, lc._generator("strided-target", par.replica)).items():
            leaf = lc._shard(full, par).clone().requires_grad_(True)
            out = mm.vocab_parallel_mile_cross_entropy(leaf, target, gamma=1.5, sigma=0.5, tp_group=par.api_tp)
            out.loss.backward(torch.ones(target.shape))
            vocab = full.shape[-1]
            expected_ce = torch.nn.functional.cross_entropy(full.double().reshape(-1, vocab), target.reshape(-1),
                                                            reduction="none").view(target.shape)
            tokens = ref.token_losses(full, target, gamma=1.5, sigma=0.5)
            results.append({
                "case": f"{backend}/{name}",
                "ce_vs_cross_entropy": lc.value_error(out.ce, expected_ce),
                "max_ce_difference_nats": float((out.ce.double() - expected_ce).abs().max()),
                "loss": lc.value_error(out.loss.detach(), tokens.loss),
                "grad": lc.grad_error(lc._gather_vocab(leaf.grad, par), ref.token_losses_grad(tokens), "float32",
                                      tokens.weight),
            })
    settings.set_loss_backend("triton")
    return results


def worker_neg_inf(ctx, tp: int) -> dict:
    """lc.run_neg_inf_parity (-inf logits) on the Triton and the torch path, fp32 and bf16."""
    _use_triton()
    par = lc.Parallel.from_layout(ctx.layout(tp, 1))
    report = {}
    for backend in ("triton", "torch"):
        settings.set_loss_backend(backend)
        for dtype in ("float32", "bfloat16"):
            report[f"{backend}/{dtype}"] = lc.run_neg_inf_parity(par, dtype)
        report[f"{backend}/all -inf row"] = lc.run_all_neg_inf_row(par)
    settings.set_loss_backend("triton")
    return report


def worker_weight_parameters_in_float64(ctx, tp: int) -> dict:
    """Uniform logits: m, s, t are exact, so H = log V to fp64 accuracy in the merge and w = (sigma + H)^gamma
    should leave the kernel within one fp32 rounding of the float64 value, for gamma / sigma that are not fp32
    numbers (rounded to fp32, gamma = 50.3 moves w by 1.3e-6, sigma = 1000.1 with gamma = 10 by 2.4e-7).

    Compiled Triton types a Python float argument as an fp32 scalar (triton.runtime.jit.mangle_type); the
    interpreter would hand the kernel the Python float itself. The interpreter is made to type float arguments
    as compiled Triton does while this runs, so the check means the same on CPU as on a GPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import mangle_type

    from mile_megatron.loss.vocab_parallel import weighted_vocab_parallel_cross_entropy

    _use_triton()
    assert mangle_type(50.3) == "fp32"
    par = lc.Parallel.from_layout(ctx.layout(tp, 1))
    vocab = 64
    full = torch.zeros(4, vocab)
    target = torch.tensor([0, 17, 40, 63])
    report = {}
    untyped = interpreter._implicit_cvt

    def typed_like_compiled(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return untyped(arg)

    interpreter._implicit_cvt = typed_like_compiled
    try:
        for gamma, sigma in ((50.3, 1.0), (10.0, 1000.1), (2.0, 0.1)):
            tokens, weight = weighted_vocab_parallel_cross_entropy(lc._shard(full, par), target, "mile", gamma,
                                                                   sigma, par.api_tp)
            expected = ref.token_losses(full, target, gamma=gamma, sigma=sigma)
            report[f"gamma={gamma} sigma={sigma}"] = {
                "weight": float(((weight.double() - expected.weight) / expected.weight).abs().max()),
                "loss": float(((tokens.loss.detach().double() - expected.loss) / expected.loss).abs().max()),
            }
    finally:
        interpreter._implicit_cvt = untyped
    return report


def worker_offsets_beyond_2_31(ctx) -> dict | str | None:
    """Rank 0: logits, statistics and gradient laid out with column / rank strides whose offsets pass 2^31
    elements (int32 offsets would wrap: wrong values or a crash), inside one lazily allocated 4.1 GiB bf16
    buffer. Linux maps its pages on first touch and the interpreter reads CPU tensors in place (its per-launch
    copy-back is a no-op for the same storage), so only the few touched pages (~1 MiB) become resident."""
    import resource

    from mile_megatron.loss.triton import function as triton_loss
    from mile_megatron.loss.vocab_parallel import merge_statistics

    if ctx.rank != 0:
        return None
    _use_triton((2, 2))  # 2-column blocks: the statistics loop and the gradient grid both reach the far column
    try:
        big = torch.empty(2 ** 31 + 2 ** 25 + 2 ** 12, dtype=torch.bfloat16)
    except (MemoryError, RuntimeError) as error:
        return f"skip: cannot reserve 4.1 GiB of address space ({error})"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows, width, col_stride = 4, 3, 2 ** 30 + 2 ** 24  # column 2 of row r sits at element 2^31 + 2^25 + r
    gen = lc._generator("offsets-2^31")
    values = (torch.randn(rows, width, generator=gen) * 3).bfloat16()
    values[0, 2] = 9.0  # the far column holds a row maximum and a target
    target = torch.tensor([2, 0, 2, 1])
    upstream = torch.tensor([1.0, -0.5, 2.0, 0.25])
    report = {}

    logits = big.as_strided((rows, width), (1, col_stride), storage_offset=0)
    assert (width - 1) * col_stride + rows > 2 ** 31 > (width - 1) * col_stride // 2
    logits.copy_(values)
    leaf = logits.requires_grad_(True)
    out = mm.vocab_parallel_mile_cross_entropy(leaf, target, gamma=1.5, sigma=0.5)
    out.loss.backward(upstream)
    tokens = ref.token_losses(values, target, gamma=1.5, sigma=0.5)
    expected_grad = ref.token_losses_grad(tokens, upstream.double())
    coefficient = upstream.double() * tokens.weight
    report["forward"] = max(lc.value_error(out.loss.detach(), tokens.loss), lc.value_error(out.ce, tokens.ce),
                            lc.value_error(out.entropy, tokens.entropy))
    report["backward"] = lc.grad_error(leaf.grad, expected_grad, "bfloat16", coefficient)

    # The gradient written with the logits' far strides (what the in-place backward does), rows 4..7 of the buffer.
    layout = triton_loss.row_layout(logits.detach())
    flat_target = target.reshape(-1)
    stats = triton_loss.row_statistics(layout, flat_target, 0)
    _, saved = triton_loss.merge(stats.unsqueeze(0), rows, "mile", 1.5, 0.5)
    out_view = big.as_strided((rows, width), (1, col_stride), storage_offset=rows)
    triton_loss.gradient(layout, flat_target, saved, upstream, 0, out_view)
    report["gradient_far_strides"] = lc.grad_error(out_view, expected_grad, "bfloat16", coefficient)

    # The merge reads rank r's statistics at r * rank_stride: three "ranks" 2^30 + 2^24 elements apart (bf16 holds
    # these small statistics exactly; the offsets do not depend on the dtype).
    per_rank = torch.tensor([[[0.0, 3.0, -1.5, 0.0]] * rows, [[2.0, 1.0, -0.25, 2.0]] * rows,
                             [[-1.0, 5.0, -4.0, 0.0]] * rows])
    gathered = big.as_strided((3, rows * 4 + 3), (col_stride, 1), storage_offset=2 * rows)
    gathered.zero_()
    gathered[:, :rows * 4].copy_(per_rank.reshape(3, -1))
    (_, ce, entropy, _), _ = triton_loss.merge(gathered, rows, "ce", 1.0, 0.0)
    _, _, expected_ce, expected_entropy = merge_statistics(per_rank.double())
    report["merge"] = max(lc.value_error(ce, expected_ce), lc.value_error(entropy, expected_entropy))
    report["resident_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    del big, logits, leaf, out_view, gathered
    return report


# ----------------------------------------------------------------------------------------------------------------
# The interpreter pool
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    """Two gloo processes spawned with TRITON_INTERPRET=1 and MILE_MEGATRON_LOSS_BACKEND=triton in their
    environment from the start (set here only while they spawn; this process keeps its own)."""
    names = ("TRITON_INTERPRET", "MILE_MEGATRON_LOSS_BACKEND")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(TRITON_INTERPRET="1", MILE_MEGATRON_LOSS_BACKEND="triton")
    try:
        world = DistributedPool(WORLD, layouts=LAYOUTS)
        world.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        yield world
    finally:
        world.close()


def _table(results, keys) -> str:
    return "\n".join(f"{r['case']:<34}" + " ".join(f"{k}={r[k]:.2g}" for k in keys) for r in results)


def _check(per_rank) -> list[str]:
    bad = []
    for rank, results in enumerate(per_rank):
        bad += lc.failures(results["token"], lc.ERROR_KEYS_TOKEN, lc.FLAG_KEYS_TOKEN, where=f"rank {rank}: ")
        bad += lc.failures(results["loss"], lc.ERROR_KEYS_LOSS, lc.FLAG_KEYS_LOSS, where=f"rank {rank}: ")
    return bad


def test_workers_run_the_interpreted_triton_backend(pool):
    for report in pool.run(worker_environment):
        assert report == {"setting": "triton", "interpreting": True, "backend_cpu": "triton"}, report


@pytest.mark.parametrize("tp", [1, 2])
def test_all_loss_cases_match_float64_reference(pool, tp):
    """Every token case (kinds, gamma/sigma, fp32/bf16/fp16, ties and offsets at 1e4, padded vocabulary, shard-edge
    targets, transposed / row-sliced / column-strided views) and every mile_loss case (kinds x alpha x masks)."""
    per_rank = pool.run(worker_cases, tp, lc.token_cases(), lc.loss_cases(), timeout=240)
    bad = _check(per_rank)
    assert not bad, "\n".join(bad[:60]) + "\n\nrank 0 (x tolerance):\n" + _table(per_rank[0]["token"],
                                                                                lc.ERROR_KEYS_TOKEN)


def _odd_width_cases() -> list[lc.TokenCase]:
    """Widths that are not multiples of the (tiny) blocks: 300 columns = 150 per TP rank, 268 = 134 per rank."""
    base = [
        lc.TokenCase("odd-normal", vocab=300, lead=(3, 2)),
        lc.TokenCase("odd-bf16-focal", kind="focal", gamma=2.0, vocab=300, lead=(3, 2), dtype="bfloat16"),
        lc.TokenCase("odd-ties-1e4", logits="ties1e4", targets="edges", vocab=268, lead=(8, 1)),
        lc.TokenCase("odd-spread-1e4", logits="spread1e4", vocab=268, lead=(3, 2)),
        lc.TokenCase("odd-offset+1e4-fp16", logits="offset+1e4", vocab=300, lead=(3, 2), dtype="float16"),
        lc.TokenCase("odd-peaked", logits="peaked", targets="peak", vocab=300, lead=(3, 2), gamma=2.5, sigma=0.3),
        lc.TokenCase("odd-padded", logits="padded", targets="padded", vocab=300, lead=(3, 2)),
        lc.TokenCase("odd-transposed-bf16", view="transposed", vocab=300, lead=(3, 2), dtype="bfloat16"),
        lc.TokenCase("odd-row-slice", view="row_slice", vocab=268, lead=(3, 2)),
        lc.TokenCase("odd-vocab-strided", view="vocab_strided", vocab=268, lead=(3, 2), dtype="float16"),
    ]
    return [replace(case, seed=7000 + i) for i, case in enumerate(base)]


def _odd_loss_cases() -> list[lc.LossCase]:
    base = [lc.LossCase("odd-mile-global", vocab=300, lead=(4, 2), mask="random"),
            lc.LossCase("odd-focal-official-bf16", kind="focal", alpha="official", vocab=268, dtype="bfloat16"),
            lc.LossCase("odd-ce-none-transposed", kind="ce", alpha="none", vocab=300, view="transposed")]
    return [replace(case, seed=7100 + i) for i, case in enumerate(base)]


def test_odd_widths_with_small_blocks(pool):
    """TP=2 with blocks of 64 columns: online merges over several blocks of every row, partial tail blocks."""
    per_rank = pool.run(worker_cases, 2, _odd_width_cases(), _odd_loss_cases(), (64, 64), timeout=240)
    bad = _check(per_rank)
    assert not bad, "\n".join(bad[:60]) + "\n\nrank 0 (x tolerance):\n" + _table(per_rank[0]["token"],
                                                                                lc.ERROR_KEYS_TOKEN)


def test_triton_path_matches_torch_path(pool):
    """Same inputs through both implementations: per-token loss, CE and entropy within 1e-6 of each other
    (relative above one nat: ~17 fp32 ulps; ~4 seen), gradients within the reference tolerance of each other
    (half-precision gradients come out identical: both round the same fp32 formula once)."""
    names = {"mile-g2.5-s3.7-bfloat16", "focal-g0.5-s0.0-float16", "mile-g1.0-s1.0-float32", "peaked",
             "offset+1e4-bf16", "ties-1e4-across-shards", "padded-vocab", "transposed-bf16", "spread-1e4-focal"}
    cases = [case for case in lc.token_cases() if case.name in names] + _odd_width_cases()[:2]
    per_rank = pool.run(worker_compare_backends, 2, cases, timeout=120)
    bad = []
    for rank, results in enumerate(per_rank):
        for res in results:
            if res["functions"] != ("TritonWeightedVocabParallelCrossEntropyBackward",
                                    "_WeightedVocabParallelCrossEntropyBackward"):
                bad.append(f"rank {rank} {res['case']}: wrong implementations {res['functions']}")
            for key in ("values", "grad"):
                if not res[key] <= 1:
                    bad.append(f"rank {rank} {res['case']}: {key} differ by {res[key]:.3g} x tolerance")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("tp", [1, 2])
def test_inplace_backward_opt_in(pool, tp):
    """set_inplace_backward(True): the gradient is right and written into the logits' memory (contiguous,
    transposed and row-sliced non-leaf logits); leaves keep their values; another user of the logits fails."""
    per_rank = pool.run(worker_inplace, tp, timeout=120)
    for rank, report in enumerate(per_rank):
        for view in ("contiguous", "transposed", "row_slice"):
            assert report[view]["grad"] <= 1 and report[view]["loss"] <= 1, (rank, view, report[view])
            assert report[view]["written_in_place"], (rank, view, "gradient not written into the logits")
        assert report["leaf"]["unchanged"] and report["leaf"]["grad"] <= 1, (rank, report["leaf"])
        assert "modified by an inplace operation" in report["shared_logits"], (rank, report["shared_logits"])


def test_one_collective_in_forward_none_in_backward_no_host_sync(pool):
    """The TP=2 Triton path: one TP collective per forward, none in backward, and with input checks off no
    host-synchronising op in forward or backward (the interpreter's own tensor copies are not such ops) except one
    read of the trailer at the first call after set_input_checks (the ranks' settings must agree)."""
    per_rank = pool.run(worker_instrumented_triton, 2, timeout=120)
    bad = []
    for rank, report in enumerate(per_rank):
        for label, counts in report.items():
            where = f"rank {rank} {label}: "
            if counts["forward_tp"] != 1:
                bad.append(where + f"{counts['forward_tp']} TP collectives in forward (expected 1)")
            if counts["backward_collectives"]:
                bad.append(where + f"{counts['backward_collectives']} collectives in backward")
            if "checks=off" in label and (counts["forward_host_syncs"] or counts["backward_host_syncs"]):
                bad.append(where + f"host syncs: {counts['forward_host_syncs']} {counts['backward_host_syncs']}")
            if counts["backward_host_syncs"]:
                bad.append(where + f"host syncs in backward: {counts['backward_host_syncs']}")
        # Checks off: the first call after set_input_checks reads the gathered trailer once (the TP ranks'
        # settings must agree), through the same single collective.
        first = report["mile first call after set_input_checks(False)"]
        if first["forward_host_syncs"] != ["Tensor.tolist"]:
            bad.append(f"rank {rank}: first call with checks off: host syncs {first['forward_host_syncs']}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("tp", [1, 2])
def test_strided_targets(pool, tp):
    """A target that stays strided after reshape(-1) (every second label, an expanded id) or is transposed: CE
    equals F.cross_entropy, loss and gradient equal the reference, on the Triton and the torch path."""
    per_rank = pool.run(worker_strided_targets, tp, timeout=120)
    bad = [f"rank {rank} {res['case']}: {key} {res[key]:.3g} x tolerance (CE off by up to "
           f"{res['max_ce_difference_nats']:.3g} nats)"
           for rank, results in enumerate(per_rank) for res in results
           for key in ("ce_vs_cross_entropy", "loss", "grad") if not res[key] <= 1]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("tp", [1, 2])
def test_neg_inf_logits_match_cross_entropy_and_reference(pool, tp):
    """-inf logits (masked entries; at TP=2 also a rank whose whole shard of a row is -inf, on either side of the
    global maximum): CE as F.cross_entropy (+inf at targets on -inf), exact entropy of the remaining distribution,
    finite gradients equal to the reference; Triton and torch paths, fp32 and bf16."""
    per_rank = pool.run(worker_neg_inf, tp, timeout=120)
    bad = []
    for rank, report in enumerate(per_rank):
        for backend in ("triton", "torch"):  # a row -inf everywhere: uniform, CE = +inf (documented)
            row = report.pop(f"{backend}/all -inf row")
            if not (row.pop("others") <= 1 and all(row.values())):
                bad.append(f"rank {rank} {backend}: row of -inf logits not as documented: {row}")
        for label, res in report.items():
            if not res["ce_is_inf_exactly_where_target_is_inf"]:
                bad.append(f"rank {rank} {label}: CE not +inf exactly at the -inf targets, or non-finite H / grad")
            bad += [f"rank {rank} {label}: {key} {res[key]:.3g} x tolerance" for key in lc.NEG_INF_ERROR_KEYS
                    if not res[key] <= 1]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("tp", [1, 2])
def test_weight_parameters_reach_the_merge_in_float64(pool, tp):
    """gamma and sigma enter the fp64 merge kernel exactly: w within fp32 rounding (1e-7 relative) of float64."""
    per_rank = pool.run(worker_weight_parameters_in_float64, tp, timeout=120)
    bad = [f"rank {rank} {label}: {key} off by {value:.3g} (relative)" for rank, report in enumerate(per_rank)
           for label, res in report.items() for key, value in res.items() if not value <= 1e-7]
    assert not bad, "\n".join(bad)


def test_offsets_beyond_2_31_elements(pool):
    """Column, rank and prefetch offsets past 2^31 elements are computed in int64 (reads, gradient writes, merge)."""
    report = pool.run(worker_offsets_beyond_2_31, timeout=180)[0]
    if isinstance(report, str):
        pytest.skip(report)
    assert report["resident_growth_mib"] < 512, report  # the lazily allocated buffer stays (almost) untouched
    bad = [f"{key}: {value:.3g} x tolerance" for key, value in report.items()
           if key != "resident_growth_mib" and not value <= 1]
    assert not bad, f"{bad}\n{report}"


# ----------------------------------------------------------------------------------------------------------------
# In this process: backend choice and row layouts (no kernel runs here)
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def backend_setting():
    previous = settings.loss_backend_setting()
    yield
    settings.set_loss_backend(previous)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process must not be interpreting")
def test_backend_choice(backend_setting, monkeypatch):
    assert settings.BACKENDS == ("auto", "torch", "triton")
    settings.set_loss_backend("auto")
    assert settings.loss_backend("cpu") == "torch"
    assert settings.loss_backend("cuda") == ("triton" if settings.triton_available() else "torch")
    logits = torch.randn(3, 16, requires_grad=True)
    out = mm.vocab_parallel_mile_cross_entropy(logits, torch.tensor([1, 2, 3]))
    assert type(out.loss.grad_fn).__name__ == "_WeightedVocabParallelCrossEntropyBackward"
    settings.set_loss_backend("torch")
    assert settings.loss_backend("cuda") == "torch"
    settings.set_loss_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        settings.loss_backend("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mm.vocab_parallel_mile_cross_entropy(logits, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="loss backend"):
        settings.set_loss_backend("cuda")
    monkeypatch.setenv("MILE_MEGATRON_LOSS_BACKEND", "Triton ")
    assert settings.env_choice("MILE_MEGATRON_LOSS_BACKEND", settings.BACKENDS, "auto") == "triton"
    monkeypatch.setenv("MILE_MEGATRON_LOSS_BACKEND", "fast")
    with pytest.raises(ValueError, match="MILE_MEGATRON_LOSS_BACKEND"):
        settings.env_choice("MILE_MEGATRON_LOSS_BACKEND", settings.BACKENDS, "auto")


def test_switches_are_exported_from_the_package():
    assert mm.set_loss_backend is settings.set_loss_backend
    assert mm.set_inplace_backward is settings.set_inplace_backward


def _addresses(layout, rows: int) -> torch.Tensor:
    """Element offsets of every (row, column) by the kernels' formula."""
    i = torch.arange(rows).unsqueeze(-1)
    j = torch.arange(layout.width)
    return (i // layout.inner) * layout.stride_outer + (i % layout.inner) * layout.stride_inner + j * layout.stride_col


@pytest.mark.parametrize("how", ["contiguous", "transposed", "row_slice", "column_stride", "batch_of_slices",
                                 "four_groups", "expanded", "no_leading"])
def test_row_layout_reads_views_without_copy(how):
    base = torch.arange(4 * 5 * 6 * 40, dtype=torch.float32).view(4, 5, 6, 40)
    tensor = {"contiguous": base[0], "transposed": base[0].transpose(0, 1), "row_slice": base[0, 1:4],
              "column_stride": base[0, :, :, ::3], "batch_of_slices": base[:, 2, 1:5],
              "four_groups": base[:, ::2, 1:4, :17].transpose(0, 1), "expanded": base[0, 0].expand(3, 6, 40),
              "no_leading": base[1, 2, 3]}[how]
    layout = row_layout(tensor)
    rows = math.prod(tensor.shape[:-1])
    assert layout.copied == (how == "four_groups") and layout.rows == rows and layout.width == tensor.shape[-1]
    if not layout.copied:
        assert layout.tensor is tensor
    # every (row, column) of the kernels' formula holds the value torch's indexing gives
    flat = layout.tensor.as_strided((layout.tensor.untyped_storage().nbytes() // 4,), (1,), 0)
    offsets = _addresses(layout, rows) + layout.tensor.storage_offset()
    assert torch.equal(flat[offsets], tensor.reshape(rows, -1))
    assert has_distinct_elements(layout) == (how != "expanded")


# ----------------------------------------------------------------------------------------------------------------
# GPU: the same checks at full size, compiled (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [((4096, 32000), "bfloat16"), ((1024, 128256), "bfloat16"), ((2048, 4000), "float32"),
              ((2, 1000, 2048), "float16")]


@pytest.fixture
def gpu_triton():
    previous = (settings.loss_backend_setting(), settings.inplace_backward(), mm.input_checks())
    settings.set_loss_backend("auto")
    yield
    settings.set_loss_backend(previous[0])
    settings.set_inplace_backward(previous[1])
    mm.set_input_checks(previous[2])


def _gpu_inputs(shape, dtype: str, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    full = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * 3).to(lc.DTYPES[dtype])
    target = torch.randint(0, shape[-1], shape[:-1], generator=gen, device="cuda")
    upstream = torch.rand(shape[:-1], generator=gen, device="cuda") * 2 - 0.5
    return full, target, upstream


@needs_cuda
@pytest.mark.parametrize("shape,dtype", GPU_SHAPES, ids=[f"{'x'.join(map(str, s))}-{d}" for s, d in GPU_SHAPES])
def test_gpu_full_size_matches_reference_and_torch_path(gpu_triton, shape, dtype):
    full, target, upstream = _gpu_inputs(shape, dtype, seed=sum(shape))
    results = {}
    for backend in ("triton", "torch"):
        settings.set_loss_backend(backend)
        logits = full.clone().requires_grad_(True)
        out = mm.vocab_parallel_mile_cross_entropy(logits, target, gamma=1.5, sigma=0.7)
        out.loss.backward(upstream)
        results[backend] = ([t.detach() for t in out], logits.grad, type(out.loss.grad_fn).__name__)
    assert results["triton"][2] == "TritonWeightedVocabParallelCrossEntropyBackward"
    tokens = ref.token_losses(full, target, gamma=1.5, sigma=0.7)
    (loss, ce, entropy), grad, _ = results["triton"]
    assert lc.value_error(loss, tokens.loss) <= 1 and lc.value_error(ce, tokens.ce) <= 1
    assert lc.value_error(entropy, tokens.entropy) <= 1
    coefficient = upstream.double() * tokens.weight
    expected_grad = ref.token_losses_grad(tokens, upstream.double())
    assert lc.grad_error(grad, expected_grad, dtype, coefficient) <= 1
    del expected_grad, tokens
    for fast, slow in zip(results["triton"][0], results["torch"][0]):
        assert lc.value_error(fast, slow.double()) <= 1
    assert lc.grad_error(grad, results["torch"][1].double(), dtype, coefficient) <= 2


@needs_cuda
def test_gpu_mile_loss_masked_and_inplace(gpu_triton):
    full, target, _ = _gpu_inputs((2048, 2, 4000), "bfloat16", seed=3)
    mask = (torch.rand(target.shape, device="cuda") > 0.3).float()
    expected = ref.mile_loss_reference(ref.RefBatch(full, target, mask), kind="focal", gamma=2.0, alpha="official",
                                       upstream=1.0)[0]
    coefficient = expected.alpha * expected.tokens.weight * mask.double() / float(mask.sum())
    for inplace in (False, True):
        settings.set_inplace_backward(inplace)
        leaf = full.clone().requires_grad_(True)
        logits = leaf * 1
        loss = mm.mile_loss(logits, target, mask, kind="focal", gamma=2.0, alpha="official")
        loss.backward()
        assert lc.value_error(loss.detach(), expected.loss) <= 1, inplace
        assert lc.grad_error(leaf.grad, expected.grad, "bfloat16", coefficient) <= 1, inplace
        assert torch.equal(logits.detach(), leaf.grad) == inplace


@needs_cuda
def test_gpu_no_host_sync_and_cuda_graph_capture(gpu_triton):
    """Input checks off: forward and backward never synchronise, and both can be captured in a CUDA graph."""
    mm.set_input_checks(False)
    full, target, upstream = _gpu_inputs((1024, 32000), "bfloat16", seed=5)
    logits = full.clone().requires_grad_(True)
    mm.mile_loss(full.clone().requires_grad_(True), target).backward()  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mm.vocab_parallel_mile_cross_entropy(logits, target)
        out.loss.backward(upstream)
        value = mm.mile_loss(full.clone().requires_grad_(True), target, alpha="global")
        value.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    eager = (out.loss.detach().clone(), logits.grad.clone())

    static = full.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compilation) outside the capture
        mm.vocab_parallel_mile_cross_entropy(static, target).loss.backward(upstream)
    torch.cuda.current_stream().wait_stream(stream)
    static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mm.vocab_parallel_mile_cross_entropy(static, target).loss
        captured.backward(upstream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.detach(), eager[0]) and torch.equal(static.grad, eager[1])


@needs_cuda
def test_gpu_extra_memory_beyond_gradient(gpu_triton):
    """No logits-sized temporaries: forward + backward peak minus (logits + gradient) stays under 64 MiB."""
    full, target, upstream = _gpu_inputs((8192, 32000), "bfloat16", seed=7)
    logits = full.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = mm.vocab_parallel_mile_cross_entropy(logits, target)
    out.loss.backward(upstream)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start - logits.numel() * logits.element_size()
    assert extra <= 64 * 2 ** 20, f"{extra / 2 ** 20:.1f} MiB beyond the gradient"
