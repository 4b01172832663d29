"""End-to-end tests of `mile_megatron.engines.megatron` with real torchrun, megatron-core and gloo on CPU.

Runs are shared through a session-scoped RunCache; each launch is a few iterations of a tiny model.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import pytest

from megatron_runs import REPO, RunCache, launch, launch_and_kill_one_worker, tiny_flags, write_pattern_dataset

from mile_megatron.recipes import PAPER_DIFFERENCES, RECIPES, preset_flags

TRAIN_ITERS = 8
SAVE_AT = 4
NAN_AT = 5
FP16_ITERS = 40
RECOMPUTE = ("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1")


def run_specs(data: Path) -> dict[str, tuple[int, list[str], dict]]:
    """name -> (processes, flags, launch options) of the launches shared by the tests below."""
    return {
        # The reference TP=2 MiLe run; saves at SAVE_AT (and at the end).
        "tp2": (2, tiny_flags(data, "--tensor-model-parallel-size", "2", "--save-interval", str(SAVE_AT),
                              train_iters=TRAIN_ITERS), {"save": True}),
        "tp2pp2": (4, tiny_flags(data, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                 train_iters=TRAIN_ITERS), {}),
        "pp2": (2, tiny_flags(data, "--pipeline-model-parallel-size", "2", train_iters=TRAIN_ITERS), {}),
        # the unfused output layer (its logits are dumped and checked)
        "dp2_bf16": (2, tiny_flags(data, "--bf16", *RECOMPUTE, "--use-distributed-optimizer",
                                   "--no-mile-fused-output-layer", train_iters=TRAIN_ITERS),
                     {"env": {"TEST_DUMP_DIR": str(data.parent / "dp2_bf16_dump")}}),
        "tp1": (1, tiny_flags(data, train_iters=TRAIN_ITERS), {}),
        # tp2 fuses the output layer into the loss (the default); this one computes the loss from the logits.
        "tp2_unfused": (2, tiny_flags(data, "--tensor-model-parallel-size", "2", "--no-mile-fused-output-layer",
                                      "--save-interval", str(SAVE_AT), train_iters=TRAIN_ITERS), {"save": True}),
        "gamma0": (1, tiny_flags(data, "--loss", "mile", "--mile-gamma", "0", train_iters=NAN_AT + 1), {}),
        # Plain CE; a NaN is injected at iteration NAN_AT, which Megatron's checks must catch.
        "ce_nan": (1, tiny_flags(data, "--loss", "ce", train_iters=NAN_AT + 1),
                   {"env": {"TEST_NONFINITE_ITERATION": str(NAN_AT)}, "expect_success": False}),
        # A layer-spec flag of Megatron's own (QK layer norm) reaches the model through Megatron's GPT builder.
        "qk_layernorm": (1, tiny_flags(data, "--qk-layernorm", train_iters=2),
                         {"env": {"TEST_PARAMETERS_FILE": str(data.parent / "qk_parameters.txt")}}),
        # fp16 with Megatron's dynamic loss scaler (initial scale 2^16, halved at each overflow).
        **{f"fp16_{loss}": (1, tiny_flags(data, "--fp16", "--loss", loss, "--initial-loss-scale", "65536",
                                          train_iters=FP16_ITERS), {})
           for loss in ("ce", "mile", "focal")},
    }


# Launches each test needs (prefetched in the background for the selected tests).
NEEDS = {
    "test_tensor_parallel_run_converges_and_logs_through_megatron": ["tp2"],
    "test_tensor_and_pipeline_parallel_run_converges": ["tp2pp2"],
    "test_pipeline_parallel_run_converges": ["pp2"],
    "test_data_parallel_bf16_recompute_distributed_optimizer_run_converges": ["dp2_bf16"],
    "test_bf16_loss_reads_the_output_layers_logits_without_a_copy": ["dp2_bf16"],
    "test_tp1_and_tp2_give_the_same_losses": ["tp2", "tp1"],
    "test_mile_with_gamma_zero_equals_cross_entropy": ["gamma0", "ce_nan"],
    "test_non_finite_loss_is_caught_by_megatron": ["ce_nan"],
    "test_resume_reproduces_the_uninterrupted_losses": ["tp2", "tp1"],
    "test_killed_rank_and_relaunch_reproduce_the_uninterrupted_losses": ["tp2"],
    "test_fp16_mile_and_focal_train_as_stably_as_cross_entropy": ["fp16_ce", "fp16_mile", "fp16_focal"],
    "test_megatron_layer_spec_flags_reach_the_model": ["qk_layernorm"],
    "test_fused_and_unfused_output_layer_train_identically": ["tp2", "tp2_unfused"],
}


@pytest.fixture(scope="session")
def runs(tmp_path_factory, request) -> RunCache:
    workdir = tmp_path_factory.mktemp("megatron_runs")
    cache = RunCache(workdir, write_pattern_dataset(workdir / "pattern"), run_specs(workdir / "pattern"))
    selected = {item.name for item in request.session.items}
    order = ["tp2pp2", "tp2", "pp2", "dp2_bf16", "tp1", "gamma0", "ce_nan", "fp16_ce", "fp16_mile", "fp16_focal",
             "qk_layernorm", "tp2_unfused"]
    cache.prefetch([name for name in order if any(name in NEEDS.get(test, ()) for test in selected)])
    yield cache
    cache.close()


def assert_converges(run, drop: float = 0.8) -> None:
    ce = run.iteration_ce()
    assert sorted(ce) == list(range(1, TRAIN_ITERS + 1)), run.describe()
    assert all(math.isfinite(value) for value in ce.values())
    assert ce[1] > math.log(61) - 0.3, f"initial CE {ce[1]} should be near ln(V)"
    last = (ce[TRAIN_ITERS] + ce[TRAIN_ITERS - 1]) / 2
    assert last < ce[1] - drop, f"loss did not fall clearly: {ce}"


def assert_same_losses(reference, other, iterations, tolerance: float) -> None:
    expected, actual = reference.train(), other.train()
    keys = sorted(key for key in expected if key[0] in iterations)
    assert keys and {key[0] for key in keys} == set(iterations)
    for key in keys:
        assert key in actual, f"{other.name} has no record {key}"
        for field in ("ce", "loss", "entropy", "alpha"):
            assert abs(actual[key][field] - expected[key][field]) <= tolerance, (
                f"{field} differs at (iteration, dp rank, micro-batch) {key}: "
                f"{reference.name}={expected[key][field]!r} {other.name}={actual[key][field]!r}")
        assert actual[key]["tokens"] == expected[key]["tokens"]


# -------------------------------------------------------------------------------------------------
def test_tensor_parallel_run_converges_and_logs_through_megatron(runs):
    run = runs.get("tp2")
    assert_converges(run)
    # Megatron's own `lm loss` of iteration 1 is the plain CE, averaged over the global batch's tokens.
    line = re.search(r"iteration\s+1/\s*\d+ \|.*", run.output).group(0)
    printed = {key: float(value) for key, value in re.findall(r"(lm loss|mile loss|entropy|alpha): ([-+.\dE]+)", line)}
    assert set(printed) == {"lm loss", "mile loss", "entropy", "alpha"}
    assert printed["lm loss"] == pytest.approx(run.iteration_ce()[1], rel=1e-5)
    first = [r for r in run.records if r["split"] == "train" and r["iteration"] == 1]
    mean_entropy = sum(r["entropy"] * r["tokens"] for r in first) / sum(r["tokens"] for r in first)
    assert printed["entropy"] == pytest.approx(mean_entropy, rel=1e-5)
    assert "tokens/s" in run.output
    # MiLe: the optimised loss differs from CE, alpha normalises the weights (sigma + H)^gamma.
    assert all(abs(r["loss"] - r["ce"]) > 0 for r in first)
    assert all(0 < r["alpha"] < 1 for r in first)


def test_pipeline_parallel_run_converges(runs):
    assert_converges(runs.get("pp2"))


def test_data_parallel_bf16_recompute_distributed_optimizer_run_converges(runs):
    run = runs.get("dp2_bf16")
    assert {r["dp_rank"] for r in run.records} == {0, 1}
    assert_converges(run)


def test_bf16_loss_reads_the_output_layers_logits_without_a_copy(runs):
    """With --bf16 the loss gets the output layer's bf16 [s, b, V] logits as a [b, s, V] view (no fp32 upcast, no
    transposing copy), its gradient is bf16, and the micro-batch's numerator sum(w * CE * mask) and denominator
    sum(w * mask) equal the float64 reference on those logits."""
    import torch

    from mile_megatron.loss import reference as ref

    runs.get("dp2_bf16")
    record = torch.load(runs.workdir / "dp2_bf16_dump" / "rank0.pt")
    logits, labels, mask = record["logits"], record["labels"], record["loss_mask"].double()
    micro_batch, seq, vocab = logits.shape
    assert logits.dtype == torch.bfloat16 and record["logits_grad"].dtype == torch.bfloat16
    assert logits.stride() == (vocab, micro_batch * vocab, 1), logits.stride()  # [s, b, V] memory order
    tokens = ref.token_losses(logits.double(), labels)
    expected = float((tokens.weight * tokens.ce * mask).sum())
    assert math.isclose(float(record["loss_sum"]), expected, rel_tol=1e-5), (float(record["loss_sum"]), expected)
    weight_sum = float((tokens.weight * mask).sum())
    assert record["mile_loss"].tolist() == pytest.approx([expected, weight_sum], rel=1e-5)
    assert record["alpha"].tolist() == pytest.approx([float(mask.sum()), weight_sum], rel=1e-5)  # N / sum(w m)


def test_tensor_and_pipeline_parallel_run_converges(runs):
    run = runs.get("tp2pp2")
    assert_converges(run)


def test_tp1_and_tp2_give_the_same_losses(runs):
    assert_same_losses(runs.get("tp1"), runs.get("tp2"), range(1, TRAIN_ITERS + 1), tolerance=1e-5)


def test_mile_with_gamma_zero_equals_cross_entropy(runs):
    mile, ce = runs.get("gamma0"), runs.get("ce_nan")
    assert_same_losses(ce, mile, range(1, NAN_AT), tolerance=1e-6)
    assert all(r["loss"] == pytest.approx(r["ce"], abs=1e-6) and r["alpha"] == 1.0
               for r in ce.records if r["iteration"] < NAN_AT)


def test_resume_reproduces_the_uninterrupted_losses(runs):
    """Resume the TP=2 checkpoint of step SAVE_AT on one process (torch_dist reshards it)."""
    reference, single = runs.get("tp2"), runs.get("tp1")
    resume_dir = runs.workdir / "resume_from_step_k"
    shutil.rmtree(resume_dir, ignore_errors=True)
    resume_dir.mkdir()
    step_dir = f"iter_{SAVE_AT:07d}"
    shutil.copytree(reference.save_dir / step_dir, resume_dir / step_dir)
    (resume_dir / "latest_checkpointed_iteration.txt").write_text(str(SAVE_AT))
    resumed = launch(runs.workdir, "tp1_resumed", 1, tiny_flags(runs.data_prefix, "--load", str(resume_dir),
                                                               train_iters=TRAIN_ITERS))
    assert min(key[0] for key in resumed.train()) == SAVE_AT + 1
    assert_same_losses(single, resumed, range(SAVE_AT + 1, TRAIN_ITERS + 1), tolerance=1e-5)
    assert_same_losses(reference, resumed, range(SAVE_AT + 1, TRAIN_ITERS + 1), tolerance=1e-5)


def test_killed_rank_and_relaunch_reproduce_the_uninterrupted_losses(runs):
    reference = runs.get("tp2")
    flags = tiny_flags(runs.data_prefix, "--tensor-model-parallel-size", "2", "--save-interval", "3",
                       train_iters=TRAIN_ITERS)
    killed = launch_and_kill_one_worker(runs.workdir, "tp2_killed", 2, flags, hold_iteration=5, checkpoint_iteration=3)
    assert killed.returncode != 0, killed.describe()
    assert max(key[0] for key in killed.train()) == 5
    relaunched = launch(runs.workdir, "tp2_relaunched", 2, flags + ["--load", str(killed.save_dir)])
    assert min(key[0] for key in relaunched.train()) == 4
    # The uninterrupted run's losses, before the kill and after the relaunch (observed bit-identical or
    # within a few float32 ulps: CPU reductions may round differently between processes).
    assert_same_losses(reference, killed, range(1, 5), tolerance=2e-6)
    assert_same_losses(reference, relaunched, range(4, TRAIN_ITERS + 1), tolerance=2e-6)


def test_non_finite_loss_is_caught_by_megatron(runs):
    run = runs.get("ce_nan")
    assert run.returncode != 0, run.describe()
    assert "found NaN in local forward loss calculation" in run.output, run.describe()
    # The run stopped at the bad step: the next step never trained.
    assert max(key[0] for key in run.train()) == NAN_AT, run.describe()


def test_unsupported_combinations_stop_with_a_clear_message(tmp_path, monkeypatch, capsys):
    """Distributed-optimizer reload without TE/apex and sequence parallel without TE/apex are refused
    with a message (exit status 2), before anything is initialised."""
    from mile_megatron.engines.megatron import cli as pretrain_gpt

    if pretrain_gpt._fused_kernels_available():
        pytest.skip("TransformerEngine or apex is installed: these combinations work")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "latest_checkpointed_iteration.txt").write_text("4")
    monkeypatch.setattr(sys, "argv", ["mile-pretrain"])
    monkeypatch.delenv("MILE_MEGATRON_CPU", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    argv = tiny_flags(tmp_path / "data", "--use-distributed-optimizer", "--load", str(checkpoint),
                      "--sequence-parallel", "--tensor-model-parallel-size", "2")
    argv.remove("--cpu")  # the check is the same on GPUs; CPU mode is not needed to reach it
    with pytest.raises(SystemExit) as exit_info:
        pretrain_gpt.main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "mile-pretrain: error: cannot run this configuration" in message and "Traceback" not in message
    assert "reloading the distributed optimizer state" in message and "--no-load-optim" in message
    assert "--sequence-parallel needs TransformerEngine or apex" in message


def test_presets_carry_the_paper_configurations():
    def value(name, flag):
        flags = preset_flags(name)
        return flags[flags.index(flag) + 1]

    expected = {"468m": ("24", "1024", "4096", "16", "1024", "1024", "100000"),
                "1.2b": ("16", "2048", "8192", "8", "1024", "1024", "100000"),
                "6.7b": ("32", "4096", "11008", "32", "2048", "2048", "25000")}
    for name, (layers, hidden, ffn, heads, seq, batch, steps) in expected.items():
        got = tuple(value(name, flag) for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size",
                                                   "--num-attention-heads", "--seq-length",
                                                   "--global-batch-size", "--train-iters"))
        assert got == (layers, hidden, ffn, heads, seq, batch, steps)
        assert int(value(name, "--kv-channels")) * int(heads) == int(hidden)
        for flag, setting in (("--lr", 3e-4), ("--adam-beta2", 0.95), ("--weight-decay", 0.1), ("--clip-grad", 1.0),
                              ("--init-method-std", 0.01), ("--seed", 111), ("--lr-warmup-iters", 2000),
                              ("--adam-eps", 1e-8), ("--min-lr", 0.0)):
            assert float(value(name, flag)) == setting, (name, flag)
        assert value(name, "--lr-decay-style") == "cosine" and "--use-distributed-optimizer" in preset_flags(name)
        assert "--bf16" in preset_flags(name) and RECIPES[name].training.bf16
    assert "--recompute-granularity" in preset_flags("6.7b") and RECIPES["6.7b"].training.recompute
    assert set(RECIPES) == {"tiny", "468m", "1.2b", "6.7b"}
    assert len(PAPER_DIFFERENCES) >= 5
    with pytest.raises(ValueError, match="choose one of"):
        preset_flags("7b")


def test_help_lists_our_flags_and_megatrons(capsys):
    from mile_megatron.engines.megatron.cli import main

    main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--loss", "--mile-gamma", "--mile-sigma", "--mile-alpha", "--mile-loss-log", "--preset", "--cpu",
                 "--tensor-model-parallel-size", "--moe-paged-stash-buffer-size-factor-cuda"):
        assert flag in text, flag


def test_gpu_without_transformer_engine_turns_off_the_fusions_that_need_it(monkeypatch):
    """On a GPU without TransformerEngine/apex, Megatron's default rope, masked-softmax and gradient-accumulation
    fusions need kernels that are missing; the entry point turns them off and Megatron's parser knows the flags."""
    from megatron.training.arguments import parse_args

    from mile_megatron.engines.megatron import cli as pretrain_gpt

    monkeypatch.setattr(pretrain_gpt, "_transformer_engine_available", lambda: False)
    monkeypatch.setattr(pretrain_gpt, "_have_module", lambda name: False)  # no apex / Megatron C++ kernels
    argv = pretrain_gpt.build_megatron_argv(["--micro-batch-size", "2"], "tiny", cpu=False)
    for flag in ("--no-rope-fusion", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion"):
        assert flag in argv, flag
    monkeypatch.setattr(sys, "argv", ["mile-pretrain", *argv])
    args = parse_args(pretrain_gpt.add_arguments)
    assert args.transformer_impl == "local" and not args.apply_rope_fusion
    assert not args.gradient_accumulation_fusion and not args.masked_softmax_fusion


def fp16_steps(run) -> list[dict[str, float]]:
    """Megatron's per-step log: lm loss (absent on skipped steps), loss scale, skipped and NaN iterations."""
    steps = []
    for line in re.findall(r"iteration\s+\d+/\s*\d+ \|.*", run.output):
        values = {key: float(value) for key, value in re.findall(
            r"(lm loss|loss scale|number of skipped iterations|number of nan iterations):\s+([-+.\dE]+)", line)}
        steps.append(values)
    assert len(steps) == FP16_ITERS, run.describe()
    return steps


def test_fp16_mile_and_focal_train_as_stably_as_cross_entropy(runs):
    """--fp16 scales the loss dynamically; MiLe's gradient carries w = (1 + H)^gamma <= 1 + ln 64 ~ 5.2 here, so the
    scaler settles at most ceil(log2(5.2)) + 1 = 4 halvings below cross-entropy's: a few more skipped steps at the
    start, no NaN step, and the same descent of the cross-entropy."""
    results = {}
    for loss in ("ce", "mile", "focal"):
        run = runs.get(f"fp16_{loss}")
        steps = fp16_steps(run)
        trained = [s["lm loss"] for s in steps if "lm loss" in s]
        results[loss] = {"skipped": sum(s["number of skipped iterations"] for s in steps),
                         "nan": sum(s["number of nan iterations"] for s in steps),
                         "scale": steps[-1]["loss scale"], "first": trained[0],
                         "last": sum(trained[-5:]) / 5}
    ce = results["ce"]
    assert ce["last"] < ce["first"] - 2.0, results  # the fp16 cross-entropy run itself trains
    for loss in ("mile", "focal"):
        result = results[loss]
        assert result["nan"] == 0, results
        assert result["skipped"] <= ce["skipped"] + 4, results
        assert result["scale"] >= ce["scale"] / 16, results
        assert result["last"] < ce["last"] + 0.25, results


def test_megatron_layer_spec_flags_reach_the_model(runs):
    """The model comes from Megatron's own GPT builder (gpt_config_from_args): --qk-layernorm adds Megatron's
    query/key layer norms to every attention layer, and the run trains."""
    run = runs.get("qk_layernorm")
    names = (runs.workdir / "qk_parameters.txt").read_text().split()
    assert sum("q_layernorm" in name for name in names) == 2 and sum("k_layernorm" in name for name in names) == 2
    assert run.iteration_ce() and all(math.isfinite(v) for v in run.iteration_ce().values())


def test_fused_and_unfused_output_layer_train_identically(runs):
    """--mile-fused-output-layer (the default: the output layer's matmul inside the chunked loss) and the loss on
    the materialised logits give the same losses at every step and the same parameters after TRAIN_ITERS steps
    (TP=2, fp32, 1e-5 relative)."""
    from mile_megatron.convert.checkpoint_reader import open_checkpoint

    fused, unfused = runs.get("tp2"), runs.get("tp2_unfused")
    assert "--mile-fused-output-layer" not in " ".join(tiny_flags(Path("x")))
    assert_same_losses(unfused, fused, range(1, TRAIN_ITERS + 1), tolerance=1e-5)
    with open_checkpoint(fused.save_dir, TRAIN_ITERS) as a, open_checkpoint(unfused.save_dir, TRAIN_ITERS) as b:
        pairs = [(a.model_tensor(name), b.model_tensor(name))
                 for name in ("word_embeddings", "final_layernorm", "output_layer")]
        for index in range(int(a.args.num_layers)):
            layer_a, layer_b = a.layer(index), b.layer(index)
            pairs += [(layer_a[name], layer_b[name]) for name in layer_a]
    for x, y in pairs:
        assert float((x.float() - y.float()).abs().max()) <= 1e-5 * float(y.float().abs().max())


def test_megatron_assertions_are_reported_by_their_check(capsys, monkeypatch):
    """Megatron's argument asserts often have no message: mile-pretrain names the failing check (exit status 2)."""
    from mile_megatron.engines.megatron.cli import main

    monkeypatch.setattr(sys, "argv", ["mile-pretrain"])
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--mock-data",
              "--save", "/nonexistent/checkpoints"])  # no --cpu: CPU mode would patch this test process
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "mile-pretrain: error: Megatron rejected the arguments: assert args.save_interval is not None" in error


@pytest.mark.parametrize("flags, reason", [
    (["--num-experts", "2"], "MoE (--num-experts) is not supported"),
    (["--mtp-num-layers", "1"], "multi-token prediction (--mtp-num-layers) is not supported"),
    (["--use-mup"], "--use-mup scales the logits"),
])
@pytest.mark.parametrize("cpu", [True, False])
def test_unsupported_configurations_are_refused_once_with_the_reason(monkeypatch, flags, reason, cpu):
    """Each refused setting is named exactly once, in CPU mode and out of it (checked before Megatron validates)."""
    from megatron.training.arguments import parse_args

    from mile_megatron.engines.megatron.cli import add_arguments, build_megatron_argv, check_supported
    from mile_megatron.utils.errors import UsageError

    argv = build_megatron_argv(["--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--mock-data", *flags],
                               "tiny", cpu)
    monkeypatch.setattr(sys, "argv", ["mile-pretrain", *argv])
    with pytest.raises(UsageError) as refused:
        check_supported(parse_args(add_arguments), cpu)
    assert str(refused.value).count(reason) == 1
