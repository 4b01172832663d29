"""The public loss API in one process (no torch.distributed): names, the reference itself, every token and
mile_loss case without parallelism (tp_group=None, dp_group=None), errors, the input-check switch and the
absence of host synchronisation. Multi-process TP/DP runs are in test_loss_distributed.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loss_cases as lc
import mile_megatron as mm
from mile_megatron.loss import reference as ref

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------

def test_public_names_and_result_types():
    assert mm.LOSS_KINDS == ("mile", "focal", "ce")
    assert mm.ALPHA_MODES == ("global", "official", "none")
    assert mm.TokenLosses._fields == ("loss", "ce", "entropy")
    assert mm.MileLossStats._fields == ("loss", "loss_sum", "ce_sum", "entropy_sum", "num_tokens", "alpha")
    for name in ("vocab_parallel_mile_cross_entropy", "vocab_parallel_focal_cross_entropy", "mile_loss",
                 "mile_loss_with_stats", "input_checks", "set_input_checks"):
        assert callable(getattr(mm, name)), name


# ----------------------------------------------------------------------------------------------------------------
# The reference itself (ground truth must be right before anything is compared with it)
# ----------------------------------------------------------------------------------------------------------------

def test_reference_known_values():
    v = 64
    uniform = ref.token_losses(torch.zeros(3, v), torch.tensor([0, 17, 63]))
    assert torch.allclose(uniform.ce, torch.full((3,), math.log(v), dtype=torch.float64), rtol=1e-15)
    assert torch.allclose(uniform.entropy, torch.full((3,), math.log(v), dtype=torch.float64), rtol=1e-15)
    assert torch.allclose(uniform.weight, 1 + uniform.entropy)  # gamma = sigma = 1
    # two maxima 2e4 above the rest, in the first and the last shard: H = log 2 exactly, no overflow
    z = torch.full((2, v), -1e4, dtype=torch.float64)
    z[:, 0] = z[:, -1] = 1e4
    ties = ref.token_losses([z[:, :32], z[:, 32:]], torch.tensor([0, 5]), gamma=2.0, sigma=0.5)
    assert torch.allclose(ties.entropy, torch.full((2,), math.log(2), dtype=torch.float64), rtol=1e-14)
    assert torch.allclose(ties.ce, torch.tensor([math.log(2), 2e4 + math.log(2)], dtype=torch.float64),
                          rtol=1e-14)
    assert torch.allclose(ties.weight, (0.5 + ties.entropy) ** 2)
    focal = ref.token_losses(z, torch.tensor([0, 5]), kind="focal", gamma=3.0)
    assert torch.allclose(focal.weight, torch.tensor([0.5 ** 3, 1.0], dtype=torch.float64))
    ce = ref.token_losses(torch.randn(4, v), torch.tensor([1, 2, 3, 4]), kind="ce")
    assert torch.equal(ce.loss, ce.ce)
    # shards are just the vocabulary cut in rank order
    logits = torch.randn(3, 2, v, dtype=torch.float64)
    target = torch.randint(0, v, (3, 2))
    whole = ref.token_losses(logits, target)
    sharded = ref.token_losses(ref.split_vocab(logits, 4), target)
    assert torch.equal(whole.loss, sharded.loss) and torch.equal(whole.entropy, sharded.entropy)
    # against torch's own cross-entropy in float64
    expected = torch.nn.functional.cross_entropy(logits.view(-1, v), target.view(-1), reduction="none")
    assert torch.allclose(whole.ce.view(-1), expected, rtol=1e-14, atol=0)
    # -inf logits: p = 0 there, H is the entropy of the rest, CE = +inf for a target on -inf, gradient finite
    masked = torch.tensor([[0.0, -math.inf, math.log(3.0)], [-math.inf, -math.inf, 5.0]], dtype=torch.float64)
    tokens = ref.token_losses(masked, torch.tensor([2, 0]), kind="ce")
    assert torch.allclose(tokens.entropy, torch.tensor([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0],
                                                       dtype=torch.float64), rtol=1e-15, atol=0)
    assert math.isclose(tokens.ce[0], -math.log(0.75), rel_tol=1e-15) and tokens.ce[1] == math.inf
    assert torch.equal(tokens.ce, torch.nn.functional.cross_entropy(masked, torch.tensor([2, 0]), reduction="none"))
    assert bool(torch.isfinite(ref.token_losses_grad(tokens)).all())


@pytest.mark.parametrize("kind,gamma,sigma", [("mile", 1.0, 1.0), ("mile", 2.5, 0.3), ("focal", 2.0, 1.0),
                                              ("focal", 0.5, 1.0), ("ce", 1.0, 1.0)])
def test_reference_closed_form_gradients_equal_float64_autograd(kind, gamma, sigma):
    """upstream * w * (p - onehot) and its scalar form are d/dz of the defining expressions (w constant)."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 3, 40, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 40, (5, 3), generator=gen)
    upstream = torch.randn(5, 3, generator=gen, dtype=torch.float64)

    z = logits.clone().requires_grad_(True)
    log_p = torch.log_softmax(z, -1)
    ce = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    weight = ref.weight_rule(kind, ce, entropy, gamma, sigma).detach()
    (weight * ce).backward(upstream, retain_graph=True)
    tokens = ref.token_losses(logits, target, kind=kind, gamma=gamma, sigma=sigma)
    assert torch.allclose(tokens.loss, (weight * ce).detach(), rtol=1e-13)
    assert torch.allclose(ref.token_losses_grad(tokens, upstream), z.grad, rtol=1e-12, atol=1e-15)

    # scalar mile_loss of DP rank 1 of 2 with a mask: alpha (global) constant, mean over counted tokens
    mask = (torch.rand(5, 3, generator=gen) > 0.4).double()
    other = ref.RefBatch(torch.randn(4, 40, generator=gen, dtype=torch.float64),
                         torch.randint(0, 40, (4,), generator=gen), None)
    results = ref.mile_loss_reference([other, ref.RefBatch(logits, target, mask)], kind=kind, gamma=gamma,
                                      sigma=sigma, alpha="global", upstream=0.3)
    w_other = ref.token_losses(other.logits, other.target, kind=kind, gamma=gamma, sigma=sigma).weight
    alpha = (4 + mask.sum()) / (w_other.sum() + (weight * mask).sum())
    assert math.isclose(results[1].alpha, float(alpha), rel_tol=1e-13)
    z.grad = None
    scalar = alpha * (weight * ce * mask).sum() / mask.sum()
    scalar.backward(torch.tensor(0.3, dtype=torch.float64))
    assert math.isclose(results[1].loss, float(scalar.detach()), rel_tol=1e-13)
    assert torch.allclose(results[1].grad, z.grad, rtol=1e-12, atol=1e-15)


def test_reference_alpha_rules():
    """official: mean over ranks of 1/mean(w') with masked positions included (CE := 0 there)."""
    gen = torch.Generator().manual_seed(3)
    batches = [ref.RefBatch(torch.randn(6, 16, generator=gen, dtype=torch.float64) * 2,
                            torch.randint(0, 16, (6,), generator=gen),
                            torch.tensor([1.0, 1, 0, 1, 0, 1])) for _ in range(2)]
    for kind, gamma in (("mile", 1.5), ("focal", 2.0), ("focal", 0.0), ("ce", 1.0)):
        toks = [ref.token_losses(b.logits, b.target, kind=kind, gamma=gamma, sigma=0.7) for b in batches]
        terms = []
        for tok, batch in zip(toks, batches):
            if kind == "mile":
                w_prime = (0.7 + tok.entropy) ** gamma  # independent of CE
            elif kind == "focal":
                w_prime = torch.where(batch.loss_mask > 0, tok.weight, torch.tensor(0.0 ** gamma,
                                                                                    dtype=torch.float64))
            else:
                w_prime = torch.ones(6, dtype=torch.float64)
            terms.append(1 / float(w_prime.mean()))
        official = ref.mile_loss_reference(batches, kind=kind, gamma=gamma, sigma=0.7, alpha="official")
        assert all(math.isclose(r.alpha, sum(terms) / 2, rel_tol=1e-14) for r in official), kind
        glob = ref.mile_loss_reference(batches, kind=kind, gamma=gamma, sigma=0.7, alpha="global")
        expected = 8 / sum(float((t.weight * b.loss_mask).sum()) for t, b in zip(toks, batches))
        assert all(math.isclose(r.alpha, expected, rel_tol=1e-14) for r in glob), kind
        none = ref.mile_loss_reference(batches, kind=kind, gamma=gamma, sigma=0.7, alpha="none")
        assert all(r.alpha == 1.0 for r in none)
        assert all(math.isclose(r.loss, float((t.loss * b.loss_mask).sum()) / 4, rel_tol=1e-14)
                   for r, t, b in zip(none, toks, batches))


# ----------------------------------------------------------------------------------------------------------------
# The implementation without parallelism (tp_group=None, dp_group=None, torch.distributed not initialised)
# ----------------------------------------------------------------------------------------------------------------

def _table(results, keys) -> str:
    return "\n".join(f"{r['case']:<34}" + " ".join(f"{k}={r[k]:.2g}" for k in keys) for r in results)


def test_token_cases_single_process():
    results = [lc.run_token_case(case, lc.Parallel()) for case in lc.token_cases()]
    bad = lc.failures(results, lc.ERROR_KEYS_TOKEN, lc.FLAG_KEYS_TOKEN)
    assert not bad, "\n".join(bad) + "\n\nerrors (x tolerance):\n" + _table(results, lc.ERROR_KEYS_TOKEN)


def test_loss_cases_single_process():
    results = [lc.run_loss_case(case, lc.Parallel()) for case in lc.loss_cases()]
    bad = lc.failures(results, lc.ERROR_KEYS_LOSS, lc.FLAG_KEYS_LOSS)
    assert not bad, "\n".join(bad) + "\n\nerrors (x tolerance):\n" + _table(results, lc.ERROR_KEYS_LOSS)


def test_scalar_token_no_leading_dimensions():
    """Logits [V] with a 0-d target: 'any leading shape' includes none."""
    logits = torch.randn(32, dtype=torch.float32, requires_grad=True)
    out = mm.vocab_parallel_mile_cross_entropy(logits, torch.tensor(7))
    assert out.loss.shape == () and out.ce.shape == () and out.entropy.shape == ()
    out.loss.backward()
    tokens = ref.token_losses(logits, torch.tensor(7))
    assert lc.value_error(out.loss.detach(), tokens.loss) <= 1
    assert lc.grad_error(logits.grad, ref.token_losses_grad(tokens), "float32", tokens.weight) <= 1


def test_gamma_zero_is_cross_entropy():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 2, 48, generator=gen) * 4
    target = torch.randint(0, 48, (6, 2), generator=gen)
    mask = (torch.rand(6, 2, generator=gen) > 0.3).float()
    expected = torch.nn.functional.cross_entropy(logits.double().view(-1, 48), target.view(-1), reduction="none")
    for out in (mm.vocab_parallel_mile_cross_entropy(logits, target, gamma=0.0, sigma=2.0),
                mm.vocab_parallel_focal_cross_entropy(logits, target, gamma=0.0)):
        assert torch.allclose(out.loss, out.ce, rtol=1e-7, atol=0)
        assert lc.value_error(out.ce.view(-1), expected) <= 1
    for alpha in mm.ALPHA_MODES:
        plain = mm.mile_loss(logits, target, mask, kind="ce", alpha=alpha)
        for kind in ("mile", "focal"):
            value = mm.mile_loss(logits, target, mask, kind=kind, gamma=0.0, alpha=alpha)
            assert math.isclose(float(value), float(plain), rel_tol=1e-6), (kind, alpha)
        assert math.isclose(float(plain), float((expected * mask.view(-1)).sum() / mask.sum()), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_neg_inf_logits_match_cross_entropy_and_reference(dtype):
    """Masked vocabulary entries (-inf logits, also whole blocks of a row): CE as F.cross_entropy (+inf where the
    target's logit is -inf), the exact entropy of the remaining distribution, finite gradients equal to the
    reference. Torch path, no parallelism; TP=2/4 and the Triton path: test_loss_distributed, test_kernels."""
    report = lc.run_neg_inf_parity(lc.Parallel(), dtype)
    assert report["ce_is_inf_exactly_where_target_is_inf"], report
    for key in lc.NEG_INF_ERROR_KEYS:
        assert report[key] <= 1, (key, report)


def test_row_with_every_logit_neg_inf_is_uniform_with_infinite_ce():
    report = lc.run_all_neg_inf_row(lc.Parallel())
    assert report.pop("others") <= 1 and all(report.values()), report


@pytest.mark.parametrize("kind", ["mile", "focal"])
def test_masked_positions_with_neg_inf_logits_stay_out_of_the_loss(kind):
    """A masked position's placeholder target (id 0, or -100 mapped to 0) may sit on a -inf logit (CE = inf there):
    the scalar loss, its sums and the gradient stay those of the counted tokens (float64 reference)."""
    logits = torch.randn(3, 4, 16, dtype=torch.float64)
    logits[..., 0] = float("-inf")  # column 0 is masked out of the vocabulary everywhere
    target = torch.randint(1, 16, (3, 4))
    mask = torch.ones(3, 4)
    mask[0, 1] = mask[2, 3] = 0
    target[0, 1], target[2, 3] = -100, 0
    x = logits.float().requires_grad_()
    stats = mm.mile_loss_with_stats(x, target, mask, kind=kind)
    stats.loss.backward()
    counted = torch.where(mask > 0, target, torch.ones_like(target))
    (expected,) = ref.mile_loss_reference(ref.RefBatch(logits, counted, mask), kind=kind)
    for got, want in ((stats.loss, expected.loss), (stats.ce_sum, expected.ce_sum),
                      (stats.entropy_sum, expected.entropy_sum)):
        assert math.isfinite(float(got)) and float(got) == pytest.approx(want, rel=1e-5)
    assert bool(torch.isfinite(x.grad).all())
    torch.testing.assert_close(x.grad.double(), expected.grad, rtol=1e-4, atol=1e-7)
    terms = mm.mile_loss_terms(logits.float(), target, mask, kind=kind)
    assert math.isfinite(float(terms.numerator)) and math.isfinite(float(terms.ce_sum))


def test_forward_without_grad():
    logits = torch.randn(4, 3, 32)
    target = torch.randint(0, 32, (4, 3))
    with torch.no_grad():
        out = mm.vocab_parallel_mile_cross_entropy(logits, target)
        value = mm.mile_loss(logits, target)
    tokens = ref.token_losses(logits, target)
    assert lc.value_error(out.loss, tokens.loss) <= 1 and not out.loss.requires_grad
    assert lc.value_error(value, ref.mile_loss_reference(ref.RefBatch(logits, target))[0].loss) <= 1


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------

def _bad_calls():
    logits = torch.randn(3, 2, 16)
    target = torch.randint(0, 16, (3, 2))
    out_of_range = target.clone()
    out_of_range[2, 1] = 16
    negative = target.clone()
    negative[0, 0] = -1
    vp_mile, vp_focal, loss = (mm.vocab_parallel_mile_cross_entropy, mm.vocab_parallel_focal_cross_entropy,
                               mm.mile_loss)
    return {
        "gamma < 0 (mile)": ("gamma", lambda: vp_mile(logits, target, gamma=-0.5)),
        "sigma < 0 (mile)": ("sigma", lambda: vp_mile(logits, target, sigma=-1.0)),
        "gamma < 0 (focal)": ("gamma", lambda: vp_focal(logits, target, gamma=-1.0)),
        "gamma < 0 (mile_loss)": ("gamma", lambda: loss(logits, target, gamma=-1.0)),
        "sigma < 0 (mile_loss)": ("sigma", lambda: loss(logits, target, sigma=-0.1)),
        "gamma NaN": ("gamma", lambda: vp_mile(logits, target, gamma=math.nan)),
        "target shape (mile)": ("shape", lambda: vp_mile(logits, target[:, :1])),
        "target shape (focal)": ("shape", lambda: vp_focal(logits, target.t())),
        "target shape (mile_loss)": ("shape", lambda: loss(logits, target.view(-1))),
        "mask shape": ("mask", lambda: loss(logits, target, torch.ones(3, 1))),
        "unknown kind": ("kind", lambda: loss(logits, target, kind="Mile")),
        "unknown alpha": ("alpha", lambda: loss(logits, target, alpha="mean")),
        "target == V_pad (mile)": ("target", lambda: vp_mile(logits, out_of_range)),
        "target == -1 (focal)": ("target", lambda: vp_focal(logits, negative)),
        "target == V_pad (mile_loss)": ("target", lambda: loss(logits, out_of_range)),
        "target == -1 (mile_loss, counted)": ("target", lambda: loss(logits, negative, torch.ones(3, 2))),
        "target device (mile)": ("device", lambda: vp_mile(logits, target.to("meta"))),
        "target device (focal)": ("device", lambda: vp_focal(logits, target.to("meta"))),
        "target device (mile_loss)": ("device", lambda: loss(logits, target.to("meta"))),
    }


@pytest.mark.parametrize("label", list(_bad_calls()))
def test_bad_input_raises_value_error_naming_the_problem(label):
    keyword, call = _bad_calls()[label]
    previous = mm.input_checks()
    mm.set_input_checks(True)
    try:
        with pytest.raises(ValueError) as info:
            call()
    finally:
        mm.set_input_checks(previous)
    assert keyword in str(info.value).lower(), f"{label}: message does not name '{keyword}': {info.value}"


@pytest.mark.parametrize("checks", [True, False])
def test_target_on_another_device_is_refused_naming_both_devices(checks):
    """A target on another device than the logits is refused up front (a kernel would read foreign memory)."""
    logits = torch.randn(3, 2, 16)
    target = torch.randint(0, 16, (3, 2), device="meta")
    previous = mm.input_checks()
    mm.set_input_checks(checks)
    try:
        for call in (lambda: mm.vocab_parallel_mile_cross_entropy(logits, target),
                     lambda: mm.vocab_parallel_focal_cross_entropy(logits, target, gamma=2.0),
                     lambda: mm.mile_loss(logits, target, torch.ones(3, 2), kind="focal")):
            with pytest.raises(ValueError) as info:
                call()
            assert "meta" in str(info.value) and "cpu" in str(info.value), str(info.value)
    finally:
        mm.set_input_checks(previous)


# ----------------------------------------------------------------------------------------------------------------
# Input-check switch and host synchronisation
# ----------------------------------------------------------------------------------------------------------------

def _losses_forward_backward(logits, target, mask, upstream):
    """Every public entry point, forward and backward (returns nothing: the recorder watches)."""
    for make in (lambda x: mm.vocab_parallel_mile_cross_entropy(x, target).loss,
                 lambda x: mm.vocab_parallel_focal_cross_entropy(x, target, gamma=2.0).loss):
        x = logits.clone().requires_grad_(True)
        make(x).backward(upstream)
    for kind in mm.LOSS_KINDS:
        for alpha in mm.ALPHA_MODES:
            x = logits.clone().requires_grad_(True)
            stats = mm.mile_loss_with_stats(x, target, mask, kind=kind, alpha=alpha)
            (stats.loss + stats.loss_sum).backward()


def test_input_checks_switch_and_no_host_sync_in_the_math():
    """set_input_checks(False): no host-synchronising op in forward or backward, and the range check is skipped.

    Host syncs are found with a TorchDispatchMode that records every aten op (.item(), bool(), torch.equal,
    nonzero, boolean indexing, ...) plus Tensor.tolist/.numpy; on CUDA these are the ops that block the host.
    """
    from distributed import OpRecorder

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 2, 32, generator=gen)
    target = torch.randint(0, 32, (4, 2), generator=gen)
    mask = (torch.rand(4, 2, generator=gen) > 0.3).float()
    upstream = torch.randn(4, 2, generator=gen)
    previous = mm.input_checks()
    try:
        mm.set_input_checks(False)
        assert mm.input_checks() is False
        with OpRecorder() as recorder:
            _losses_forward_backward(logits, target, mask, upstream)
        assert recorder.host_syncs == [], f"host synchronisation with input checks off: {recorder.host_syncs}"
        bad = target.clone()
        bad[0, 0] = 32
        try:  # the range check is skipped: whatever happens, it is not the ValueError of the check
            mm.vocab_parallel_mile_cross_entropy(logits, bad)
        except ValueError as error:
            pytest.fail(f"range check ran with input checks off: {error}")
        except (RuntimeError, IndexError):
            pass
        mm.set_input_checks(True)
        assert mm.input_checks() is True
        with pytest.raises(ValueError):
            mm.vocab_parallel_mile_cross_entropy(logits, bad)
    finally:
        mm.set_input_checks(previous)


def test_input_checks_default_and_environment_variable():
    """On by default; MILE_MEGATRON_INPUT_CHECKS=0 switches them off at import (checked in a fresh process)."""
    if "MILE_MEGATRON_INPUT_CHECKS" not in os.environ:
        assert mm.input_checks() is True
    env = dict(os.environ, MILE_MEGATRON_INPUT_CHECKS="0")
    code = "import mile_megatron as mm; print('checks', mm.input_checks())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checks False" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_no_host_sync_and_parity(dtype):
    """On a GPU: with input checks off, forward and backward never synchronise (sync debug mode 'error'),
    and the results match the reference as on CPU."""
    gen = torch.Generator().manual_seed(9)
    full = (torch.randn(6, 2, 256, generator=gen) * 3).to(lc.DTYPES[dtype])
    target = torch.randint(0, 256, (6, 2), generator=gen)
    upstream = lc.make_upstream("random", (6, 2), gen)
    mask = (torch.rand(6, 2, generator=gen) > 0.3).float()
    logits = full.cuda().requires_grad_(True)
    logits2 = full.cuda().requires_grad_(True)
    previous = mm.input_checks()
    mm.set_input_checks(False)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        out = mm.vocab_parallel_mile_cross_entropy(logits, target.cuda())
        out.loss.backward(upstream.cuda())
        value = mm.mile_loss(logits2, target.cuda(), mask.cuda(), alpha="official")
        value.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        mm.set_input_checks(previous)
    tokens = ref.token_losses(full, target)
    assert lc.value_error(out.loss.detach().cpu(), tokens.loss) <= 1
    assert lc.value_error(out.entropy.cpu(), tokens.entropy) <= 1
    assert lc.grad_error(logits.grad.cpu(), ref.token_losses_grad(tokens, upstream.double()), dtype,
                         upstream.double() * tokens.weight) <= 1
    expected = ref.mile_loss_reference(ref.RefBatch(full, target, mask), alpha="official")[0]
    assert lc.value_error(value.detach().cpu(), expected.loss) <= 1
    assert lc.grad_error(logits2.grad.cpu(), expected.grad, dtype,
                         expected.alpha * tokens.weight * mask.double() / float(mask.sum())) <= 1
