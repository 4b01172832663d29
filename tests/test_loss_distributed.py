"""The vocab-parallel losses under real tensor and data parallelism (gloo, spawned CPU processes).

One world of 4 processes serves the whole module (tests/distributed.py); its layouts are
TP=1, TP=2, TP=4 (DP=1), TP=1 x DP=2 and TP=2 x DP=2, each rank's results compared inside the worker
with the float64 reference (tests/loss_cases.py states the error measures; all must be <= 1).
"""

from __future__ import annotations

import pytest

import loss_cases as lc
from distributed import DistributedPool, WorkerError

WORLD = 4
TOKEN_LAYOUTS = [(1, 1), (2, 1), (4, 1), (2, 2)]
LOSS_LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(WORLD, layouts=LOSS_LAYOUTS) as world:
        yield world


def _table(results: list[dict], keys) -> str:
    lines = []
    for res in results:
        lines.append(f"{res['case']:<34}" + " ".join(f"{k}={res[k]:.2g}" for k in keys))
    return "\n".join(lines)


@pytest.mark.parametrize("tp,dp", TOKEN_LAYOUTS, ids=[f"tp{t}xdp{d}" for t, d in TOKEN_LAYOUTS])
def test_token_losses_match_float64_reference(pool, tp, dp):
    """loss, ce, entropy and the gathered logits gradient for every token case, on every rank."""
    per_rank = pool.run(lc.worker_token_cases, tp, dp, lc.token_cases())
    bad = []
    for rank, results in enumerate(per_rank):
        bad += lc.failures(results, lc.ERROR_KEYS_TOKEN, lc.FLAG_KEYS_TOKEN, where=f"rank {rank}: ")
    assert not bad, "\n".join(bad[:60]) + "\n\nrank 0 errors (x tolerance):\n" + _table(
        per_rank[0], lc.ERROR_KEYS_TOKEN)


@pytest.mark.parametrize("tp,dp", LOSS_LAYOUTS, ids=[f"tp{t}xdp{d}" for t, d in LOSS_LAYOUTS])
def test_mile_loss_matches_float64_reference(pool, tp, dp):
    """mile_loss / mile_loss_with_stats (every kind x alpha mode x mask pattern) and their gradients."""
    per_rank = pool.run(lc.worker_loss_cases, tp, dp, lc.loss_cases())
    bad = []
    for rank, results in enumerate(per_rank):
        bad += lc.failures(results, lc.ERROR_KEYS_LOSS, lc.FLAG_KEYS_LOSS, where=f"rank {rank}: ")
    # Every rank of one DP group uses the same alpha (it is reduced over the group); TP ranks agree on the loss.
    cases = lc.loss_cases()
    for index, case in enumerate(cases):
        for replica_base in range(0, WORLD, tp * dp):
            block = [per_rank[replica_base + local][index] for local in range(tp * dp)]
            alphas = {res["alpha_value"] for res in block}
            if len(alphas) != 1:
                bad.append(f"{case.name}: ranks {replica_base}.. disagree on alpha: {sorted(alphas)}")
            for d in range(dp):
                losses = {block[d * tp + t]["loss_value"] for t in range(tp)}
                if max(losses) - min(losses) > 1e-6 * max(1.0, abs(max(losses))):
                    bad.append(f"{case.name}: TP ranks of dp rank {d} disagree on the loss: {sorted(losses)}")
    assert not bad, "\n".join(bad[:60]) + "\n\nrank 0 errors (x tolerance):\n" + _table(
        per_rank[0], lc.ERROR_KEYS_LOSS)


@pytest.mark.parametrize("tp,dp", [(2, 2), (4, 1)], ids=["tp2xdp2", "tp4xdp1"])
def test_collectives_and_host_syncs(pool, tp, dp):
    """Forward: <= 2 TP collectives, <= 1 DP all-reduce (none for alpha='none'); backward: no collective.

    Counted by a TorchDispatchMode that sees every c10d op with its process group (real collectives, however
    they are issued). With input checks off, forward and backward contain no host-synchronising op.
    """
    per_rank = pool.run(lc.worker_instrumented, tp, dp)
    bad = []
    for rank, report in enumerate(per_rank):
        for label, counts in report.items():
            where = f"rank {rank} {label}: "
            if counts["forward_tp"] > 2:
                bad.append(where + f"{counts['forward_tp']} TP collectives in forward (max 2)")
            if counts["forward_other"]:
                bad.append(where + f"{counts['forward_other']} collectives on groups other than TP/DP")
            if counts["backward_collectives"]:
                bad.append(where + f"{counts['backward_collectives']} collectives in backward (must be 0)")
            needs_alpha_reduction = label.startswith("mile_loss/") and "/none " not in label
            max_dp = 1 if needs_alpha_reduction else 0
            if counts["forward_dp"] > max_dp:
                bad.append(where + f"{counts['forward_dp']} DP collectives in forward (max {max_dp})")
            if "checks=off" in label and (counts["forward_host_syncs"] or counts["backward_host_syncs"]):
                bad.append(where + f"host syncs with input checks off: forward {counts['forward_host_syncs']}, "
                           f"backward {counts['backward_host_syncs']}")
            if counts["backward_host_syncs"]:
                bad.append(where + f"host syncs in backward: {counts['backward_host_syncs']}")
        # The TP collective really happens (the losses are not computed from the local shard alone).
        if report["mile checks=off"]["forward_tp"] < 1:
            bad.append(f"rank {rank}: no TP collective at all in forward")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("tp", [2, 4])
def test_bad_inputs_raise_value_error_on_every_tp_rank(pool, tp):
    """Different shard widths across TP ranks and out-of-range targets: ValueError everywhere, no hang."""
    per_rank = pool.run(lc.worker_distributed_errors, tp, timeout=60)
    bad = []
    for rank, outcome in enumerate(per_rank):
        for label, text in outcome.items():
            if not text.startswith("ValueError"):
                bad.append(f"rank {rank} {label}: expected ValueError, got {text}")
            keyword = "target" if "target" in label else "dimension"
            if keyword not in text.lower():
                bad.append(f"rank {rank} {label}: message does not name the {keyword}: {text}")
    assert not bad, "\n".join(bad)


def test_megatron_parallel_state_groups_are_the_default(pool):
    """With megatron.core.parallel_state initialised (TP=2 x DP=2), tp_group=None / dp_group=None use its groups."""
    token = [c for c in lc.token_cases() if c.name in ("mile-g1.0-s1.0-float32", "targets-shard-edges")]
    loss = [c for c in lc.loss_cases() if c.name in ("mile-global-mask:random", "focal-official-mask:random")]
    per_rank = pool.run(lc.worker_megatron_default_groups, token, loss, timeout=180)
    bad = []
    for rank, results in enumerate(per_rank):
        bad += lc.failures(results["token"], lc.ERROR_KEYS_TOKEN, lc.FLAG_KEYS_TOKEN, where=f"rank {rank}: ")
        bad += lc.failures(results["loss"], lc.ERROR_KEYS_LOSS, lc.FLAG_KEYS_LOSS, where=f"rank {rank}: ")
    assert not bad, "\n".join(bad)


def test_harness_propagates_worker_exceptions_with_traceback(pool):
    """A worker exception reaches the test with its rank and traceback; the world stays usable."""
    with pytest.raises(WorkerError) as info:
        pool.run(lc.worker_fail_on_rank, 2)
    text = str(info.value)
    assert "rank 2" in text and "ArithmeticError: deliberate failure on rank 2" in text
    assert "worker_fail_on_rank" in text  # the traceback, not just the message
    assert pool.run(lc.worker_fail_on_rank, -1) == list(range(WORLD))
