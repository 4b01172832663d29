"""mile_loss_terms: one micro-batch's share of a step loss, for trainers that accumulate micro-batches.

Four spawned gloo processes (TP=2 x DP=2), two micro-batches per data-parallel rank: back-propagating each
micro-batch's numerator and dividing the summed gradients once by the global sum of denominators must give the
step objective of mile_megatron.loss's docstring and its gradient, against a plain float64 reference over all
tokens of the step. The forward of a micro-batch runs one tensor-parallel all-gather and no data-parallel
collective (only the paper's "official" rule has one); the backward runs none. Mile-pretrain's own Megatron
loss function (real megatron.core parallel state and arguments) is counted the same way.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from distributed import DistributedPool, OpRecorder
from mile_megatron.loss import reference as ref

WORLD = 4
TP, DP, MICRO = 2, 2, 2
SHAPE, VOCAB = (2, 5), 16
GAMMA, SIGMA = 1.5, 0.5


def step_data(seed: int = 7):
    """The step's micro-batches [dp][micro] -> (full logits [2, 5, V] float64, target, mask)."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(DP):
        micro = []
        for _ in range(MICRO):
            logits = torch.randn(*SHAPE, VOCAB, generator=generator, dtype=torch.float64) * 3.0
            target = torch.randint(0, VOCAB, SHAPE, generator=generator)
            mask = (torch.rand(SHAPE, generator=generator) > 0.3).double()
            micro.append((logits, target, mask))
        data.append(micro)
    return data


def worker_step(ctx, kind: str, alpha: str) -> dict:
    import torch.distributed as dist

    from mile_megatron import mile_loss_terms

    groups = ctx.layout(TP, DP)
    shard = VOCAB // TP
    totals = torch.zeros(2, dtype=torch.float64)  # sum of numerators, sum of denominators
    grads, forward_counts, backward_counts = [], [], []
    leaves = []
    for logits, target, mask in step_data()[groups.dp_rank]:
        leaf = logits[..., groups.tp_rank * shard:(groups.tp_rank + 1) * shard].float().requires_grad_()
        with OpRecorder({"tp": groups.tp_group, "dp": groups.dp_group}) as recorder:
            terms = mile_loss_terms(leaf, target, mask, kind=kind, gamma=GAMMA, sigma=SIGMA, alpha=alpha,
                                    tp_group=groups.tp_group, dp_group=groups.dp_group)
        forward_counts.append((recorder.count("tp"), recorder.count("dp")))
        with OpRecorder({"tp": groups.tp_group, "dp": groups.dp_group}) as recorder:
            terms.numerator.backward()
        backward_counts.append(len(recorder.collectives))
        totals += torch.stack([terms.numerator.detach(), terms.denominator.detach()]).double()
        leaves.append(leaf)
    # The trainer's end of step: one all-reduce of the sums, one division of the gradients.
    dist.all_reduce(totals, group=groups.dp_group)
    for leaf in leaves:
        grads.append((leaf.grad.double() / totals[1]))
    return {"loss": float(totals[0] / totals[1]), "grads": grads, "forward": forward_counts,
            "backward": backward_counts, "tp_rank": groups.tp_rank, "dp_rank": groups.dp_rank}


def reference_step(kind: str, alpha: str) -> tuple[float, list[list[torch.Tensor]]]:
    """float64: the step loss and d loss / d logits per [dp][micro] (full vocabulary)."""
    data = step_data()
    tokens = [[ref.token_losses(z, y, kind=kind, gamma=GAMMA, sigma=SIGMA) for z, y, _ in micro] for micro in data]
    masks = [[m for _, _, m in micro] for micro in data]
    total_mask = sum(float(m.sum()) for micro in masks for m in micro)
    # alpha per (dp, micro) applied to the numerator, and the denominator of the step
    if alpha == "global":
        coefficient = [[1.0] * MICRO for _ in range(DP)]
        denominator = sum(float((t.weight * m).sum()) for tr, mr in zip(tokens, masks) for t, m in zip(tr, mr))
    elif alpha == "none":
        coefficient = [[1.0] * MICRO for _ in range(DP)]
        denominator = total_mask
    else:  # the paper's rule, per micro-batch step k: mean over DP ranks of 1 / mean over all positions of w'
        coefficient = []
        for k in range(MICRO):
            reciprocals = []
            for r in range(DP):
                t, m = tokens[r][k], masks[r][k]
                seen = t.weight if kind != "focal" else torch.where(m > 0, t.weight, torch.zeros_like(t.weight) ** GAMMA)
                reciprocals.append(1.0 / float(seen.mean()))
            coefficient.append(sum(reciprocals) / DP)
        coefficient = [[coefficient[k] for k in range(MICRO)] for _ in range(DP)]
        denominator = total_mask
    numerator = sum(coefficient[r][k] * float((tokens[r][k].loss * masks[r][k]).sum())
                    for r in range(DP) for k in range(MICRO))
    grads = [[ref.token_losses_grad(tokens[r][k], coefficient[r][k] * masks[r][k] / denominator)
              for k in range(MICRO)] for r in range(DP)]
    return numerator / denominator, grads


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(WORLD, layouts=[(TP, DP)]) as started:
        yield started


@pytest.mark.parametrize("kind", ["mile", "focal"])
@pytest.mark.parametrize("alpha", ["global", "none", "official"])
def test_accumulated_terms_give_the_step_loss_and_gradient(pool, kind, alpha):
    results = pool.run(worker_step, kind, alpha)
    expected_loss, expected_grads = reference_step(kind, alpha)
    shard = VOCAB // TP
    for result in results:
        assert result["loss"] == pytest.approx(expected_loss, rel=2e-6)
        for micro, grad in enumerate(result["grads"]):
            full = expected_grads[result["dp_rank"]][micro]
            expected = full[..., result["tp_rank"] * shard:(result["tp_rank"] + 1) * shard]
            assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-6 * float(full.abs().max())), (alpha, micro)
        # one TP all-gather per forward; the data-parallel group only for the paper's per-micro-batch alpha
        assert result["forward"] == [(1, 1 if alpha == "official" else 0)] * MICRO
        assert result["backward"] == [0] * MICRO


def worker_megatron_loss_function(ctx, alpha: str) -> dict:
    """mile-pretrain's loss function under megatron.core's parallel state (TP=2 x DP=2) and arguments."""
    from megatron.core import parallel_state
    from megatron.training.global_vars import set_args

    from mile_megatron.engines.megatron import logits_loss_func

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    try:
        set_args(argparse.Namespace(loss="mile", mile_gamma=GAMMA, mile_sigma=SIGMA, mile_alpha=alpha,
                                    mile_loss_log=None, curr_iteration=0, check_for_nan_in_loss_and_grad=True,
                                    check_for_spiky_loss=False, calculate_per_token_loss=True))
        tp_rank, dp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()
        logits, target, mask = step_data()[dp_rank][0]
        shard = VOCAB // TP
        leaf = logits[..., tp_rank * shard:(tp_rank + 1) * shard].float().requires_grad_()
        groups = {"tp": parallel_state.get_tensor_model_parallel_group(),
                  "dp": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        with OpRecorder(groups) as recorder:
            numerator, num_tokens, report = logits_loss_func(target, mask.float(), leaf)
        counts = {"tp": recorder.count("tp"), "dp": recorder.count("dp"), "all": len(recorder.collectives)}
        tokens = ref.token_losses(logits, target, kind="mile", gamma=GAMMA, sigma=SIGMA)
        return {"counts": counts, "numerator": float(numerator), "num_tokens": int(num_tokens),
                "mile_loss": [float(x) for x in report["mile loss"]],
                "expected": float((tokens.loss * mask).sum()), "expected_weight": float((tokens.weight * mask).sum()),
                "expected_tokens": int(mask.sum())}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("alpha", ["global", "none"])
def test_megatron_loss_function_runs_no_data_parallel_collective(pool, alpha):
    for result in pool.run(worker_megatron_loss_function, alpha):
        assert result["counts"] == {"tp": 1, "dp": 0, "all": 1}, result["counts"]
        assert result["numerator"] == pytest.approx(result["expected"], rel=2e-6)
        assert result["num_tokens"] == result["expected_tokens"]
        denominator = result["expected_weight"] if alpha == "global" else result["expected_tokens"]
        assert result["mile_loss"] == pytest.approx([result["expected"], denominator], rel=2e-6)


def worker_result_checks(ctx) -> dict:
    """The rerun-state-machine checks each of mile-pretrain's loss functions runs (the real state machine, its
    validate_result wrapped to record each call's message)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training.global_vars import set_args

    from mile_megatron.engines import megatron as pretrain_gpt

    machine = get_rerun_state_machine()
    messages: list[str] = []
    original = machine.validate_result

    def recording(*args, **kwargs):
        messages.append(kwargs["message"])
        return original(*args, **kwargs)

    machine.validate_result = recording
    logits, target, mask = step_data()[0][0]
    calls = {}
    for nan_checks, spiky in ((True, True), (False, False)):
        set_args(argparse.Namespace(loss="mile", mile_gamma=GAMMA, mile_sigma=SIGMA, mile_alpha="global",
                                    mile_loss_log=None, curr_iteration=0, calculate_per_token_loss=True,
                                    check_for_nan_in_loss_and_grad=nan_checks, check_for_spiky_loss=spiky))
        for name in ("mile_loss_func", "logits_loss_func"):
            messages.clear()
            getattr(pretrain_gpt, name)(target, mask.float(), logits.float(), model=None)
            calls[(name, nan_checks, spiky)] = list(messages)
    return calls


def test_mile_pretrain_runs_megatrons_result_checks_once(pool):
    """logits_loss_func (mile-pretrain) runs Megatron's NaN, Inf and spiky-loss checks, each once and only when
    enabled; mile_loss_func (called by the patched upstream loss_func, which runs the checks itself) runs none."""
    calls = pool.run(worker_result_checks)[0]
    assert calls[("logits_loss_func", True, True)] == ["found NaN in local forward loss calculation",
                                                         "found Inf in local forward loss calculation", "Spiky loss"]
    assert calls[("logits_loss_func", False, False)] == []
    assert calls[("mile_loss_func", True, True)] == calls[("mile_loss_func", False, False)] == []
