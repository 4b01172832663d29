"""The Megatron engine (mile-pretrain, TP=2) and the Hugging Face engine (transformers + mile_megatron.hf, and
mile-pretrain-ds) compute the same MiLe loss and logits gradient, and checkpoints move between them.

Three launches, in sequence, share one tiny fp32 LLaMA (vocabulary 64, no padding at TP=2) and the pattern
dataset of tests/megatron_runs.py:
  megatron   HF model -> mile-convert-megatron (TP=2) -> mile-pretrain --load, TP=2, 1 step (lr 1e-2), saved;
             TEST_DUMP_DIR dumps the first micro-batch: tokens, labels, loss_mask, both vocabulary
             shards of the logits and of their gradient, loss_sum
  ds         that checkpoint -> mile-convert-hf -> mile-pretrain-ds --hf-init, 1 process, ZeRO-2, 2 steps,
             exported as a Hugging Face model
  back       the export -> mile-convert-megatron (TP=2) -> mile-pretrain --load, TP=2, 1 step (lr 0), dumped
Each engine's numbers are recomputed here by a Hugging Face LlamaForCausalLM loaded from the matching weights
plus mile_megatron.hf.loss.causal_lm_loss, and compared at fp32 tolerance. Launch-free checks: hf.models builds
the Megatron presets' architectures (same flags back through mile_megatron.convert, the paper's sizes).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_runs import TINY_FLAGS, launch, read_records, run_torchrun, write_pattern_dataset

from mile_megatron.convert import to_hf, to_megatron
from mile_megatron.hf import data
from mile_megatron.hf.loss import causal_lm_loss_terms
from mile_megatron.hf.models import build_model, llama_config

RTOL = 1e-5
VOCAB, SEQ = 64, 32
LAUNCH_TIMEOUT_S = 300
MEGATRON_STEP = ("--train-iters", "1", "--eval-iters", "0", "--lr-warmup-iters", "0", "--save-interval", "1",
                 "--tensor-model-parallel-size", "2")


def _hf_source(directory: Path) -> Path:
    """A random tiny LLaMA (hf.models' tiny preset); std 0.1 and uneven norms make the softmax far from uniform."""
    model = build_model(llama_config("tiny", VOCAB, seq_length=SEQ, eos_token_id=VOCAB - 1), seed=5, init_std=0.1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(str(directory))
    return directory


def _to_megatron(source: Path, output: Path) -> Path:
    assert to_megatron.main([str(source), "--output", str(output), "--tensor-model-parallel-size", "2",
                             "--make-vocab-size-divisible-by", "32"]) == 0
    return output


def _megatron(workdir: Path, name: str, data_prefix: Path, load: Path, *extra: str):
    # the logits are compared with the Hugging Face model's: the unfused output layer produces them
    flags = [*TINY_FLAGS, "--data-path", str(data_prefix), *MEGATRON_STEP, "--load", str(load),
             "--no-mile-fused-output-layer", *extra]
    return launch(workdir, name, 2, flags, save=True, timeout=LAUNCH_TIMEOUT_S,
                  env={"TEST_DUMP_DIR": str(workdir / f"{name}_dump")})


def _deepspeed(workdir: Path, data_prefix: Path, hf_init: Path) -> str:
    flags = ["--cpu", "--preset", "tiny", "--hf-init", str(hf_init), "--vocab-size", str(VOCAB), "--no-eod-mask-loss",
             "--data-path", str(data_prefix), "--split", "95,5,0", "--seq-length", str(SEQ), "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3",
             "--lr-warmup-iters", "0", "--seed", "1234", "--zero-stage", "2", "--log-interval", "1",
             "--save", str(workdir / "ds_ckpt"), "--export-hf", str(workdir / "ds_export"),
             "--loss-log", str(workdir / "ds.jsonl"), "--data-cache-path", str(workdir / "ds_cache")]
    returncode, output = run_torchrun("mile-pretrain-ds", 1, flags, engine="deepspeed",
                                      env={"TEST_DS_DUMP_DIR": str(workdir / "ds_dump")},
                                      timeout=LAUNCH_TIMEOUT_S)
    assert returncode == 0, f"mile-pretrain-ds exited {returncode}; output tail:\n{output[-12000:]}"
    return output


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cross_engine")
    prefix = write_pattern_dataset(workdir / "pattern")
    source = _hf_source(workdir / "hf_source")
    megatron = _megatron(workdir, "megatron", prefix, _to_megatron(source, workdir / "megatron_from_hf"))
    from_megatron = workdir / "hf_from_megatron"
    assert to_hf.main([str(megatron.save_dir), "--output", str(from_megatron), "--vocab-size", str(VOCAB),
                       "--quiet"]) == 0
    ds_output = _deepspeed(workdir, prefix, from_megatron)
    back = _megatron(workdir, "back", prefix, _to_megatron(workdir / "ds_export", workdir / "megatron_from_ds"),
                     "--lr", "0", "--min-lr", "0")
    return {"workdir": workdir, "prefix": prefix, "source": source, "megatron": megatron,
            "from_megatron": from_megatron, "ds_output": ds_output, "back": back}


def _megatron_dump(run) -> dict:
    """Both TP ranks' dumps joined: the vocabulary shards of logits and gradient concatenated in rank order."""
    ranks = [torch.load(run.save_dir.parent / f"{run.name}_dump" / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["tp_rank"] for r in ranks] == [0, 1] and all(r["tp_size"] == 2 for r in ranks)
    for key in ("tokens", "labels", "loss_mask", "loss_sum"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    joined = dict(ranks[0])
    joined["logits"] = torch.cat([r["logits"] for r in ranks], dim=-1)
    joined["logits_grad"] = torch.cat([r["logits_grad"] for r in ranks], dim=-1)
    return joined


def _hf_loss(model_dir: Path, batch: dict):
    """HF forward on the batch (fp32) and the micro-batch's loss terms (numerator sum(w * CE * mask), denominator
    sum(w * mask)) with Megatron's pre-shifted labels and loss mask; the numerator back-propagated."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    logits = model(input_ids=batch["tokens"], position_ids=batch.get("position_ids")).logits.detach()
    logits.requires_grad_(True)
    stats = causal_lm_loss_terms(logits, batch["labels"], loss_mask=batch["loss_mask"], shift=False)
    stats.numerator.backward()
    return logits, type(stats)(*(value.detach() for value in stats))


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def test_megatron_tp2_and_hugging_face_give_the_same_loss_and_logits_gradient(engines):
    dump = _megatron_dump(engines["megatron"])
    logits, stats = _hf_loss(engines["source"], dump)
    assert float(stats.num_tokens) == float(dump["num_tokens"]) > 0
    print(f"numerator Megatron {float(dump['loss_sum']):.6f} HF {float(stats.numerator):.6f}; max |logits| "
          f"{float(logits.abs().max()):.3f}, relative logits difference {_relative(logits, dump['logits']):.2e}, "
          f"gradient {_relative(logits.grad, dump['logits_grad']):.2e}")
    assert _relative(logits, dump["logits"]) <= RTOL
    assert float(stats.numerator) == pytest.approx(float(dump["loss_sum"]), rel=RTOL)
    assert dump["mile_loss"].tolist() == pytest.approx([float(stats.numerator), float(stats.denominator)], rel=RTOL)
    # Megatron back-propagates d numerator / d logits (its step normalisation divides afterwards); the same here.
    assert _relative(logits.grad, dump["logits_grad"]) <= RTOL
    alpha = float(stats.num_tokens / stats.weight_sum)
    assert 0.05 < alpha < 0.5  # MiLe weights vary: the comparison is not a plain CE


def test_hugging_face_data_adapter_reads_megatrons_first_micro_batch(engines):
    dump = _megatron_dump(engines["megatron"])
    tokenizer = data.build_tokenizer(vocab_size=VOCAB)
    train = data.build_datasets(tokenizer, data.train_valid_test_num_samples(1, 4), seq_length=SEQ, seed=1234,
                                data_path=[str(engines["prefix"])], split="95,5,0", eod_mask_loss=False,
                                extra_flags=["--data-cache-path", str(engines["workdir"] / "adapter_cache")])[0]
    batch = next(data.micro_batches(train, consumed_samples=0, micro_batch_size=2))
    for key in ("tokens", "labels", "loss_mask"):
        assert torch.equal(batch[key], dump[key].to(batch[key].dtype)), key


def test_megatron_checkpoint_continues_training_in_deepspeed(engines):
    records = read_records(engines["workdir"] / "ds.jsonl")
    assert [r["iteration"] for r in records] == [1, 2], engines["ds_output"][-4000:]
    assert all(math.isfinite(r[key]) for r in records for key in ("ce", "loss", "entropy", "alpha"))
    step = torch.load(engines["workdir"] / "ds_dump" / "step1_rank0_micro0.pt", weights_only=False)
    megatron = _megatron_dump(engines["megatron"])
    assert torch.equal(step["tokens"], megatron["tokens"])  # both engines start at the same sample
    logits, stats = _hf_loss(engines["from_megatron"], step)  # the converted Megatron weights, recomputed here
    assert _relative(step["logits"], logits) <= RTOL
    assert float(step["numerator"]) == pytest.approx(float(stats.numerator), rel=RTOL)
    # Megatron trained one step from the source model: its weights, hence its loss on this batch, moved.
    assert float(stats.numerator) != pytest.approx(float(megatron["loss_sum"]), rel=1e-3)


def test_deepspeed_export_continues_training_in_megatron(engines):
    run = engines["back"]
    records = [r for r in run.records if r["split"] == "train"]
    assert records and all(math.isfinite(r["loss"]) for r in records)
    dump = _megatron_dump(run)
    logits, stats = _hf_loss(engines["workdir"] / "ds_export", dump)
    assert _relative(logits, dump["logits"]) <= RTOL
    assert float(stats.numerator) == pytest.approx(float(dump["loss_sum"]), rel=RTOL)
    assert _relative(logits.grad, dump["logits_grad"]) <= RTOL
    first = records[0]
    assert first["loss"] == pytest.approx(float(stats.numerator) / float(stats.denominator), rel=RTOL)


@pytest.mark.parametrize("preset, parameters",
                         [("468m", 468.1e6), ("1.2b", 1.20e9), ("6.7b", 6.74e9), ("tiny", 108_864)])
def test_llama_configs_are_the_megatron_presets(preset, parameters):
    """hf.models builds the architecture mile-pretrain builds: same Megatron flags back, the paper's sizes."""
    from transformers import LlamaForCausalLM

    from mile_megatron.convert.hf_config import megatron_model_flags, shape_from_hf_config
    from mile_megatron.recipes import LLAMA_ARCHITECTURE_FLAGS, preset_flags

    config = llama_config(preset, 32000 if preset != "tiny" else VOCAB)
    flags = [*LLAMA_ARCHITECTURE_FLAGS, *preset_flags(preset)]
    values = {name: value for name, value in zip(flags, flags[1:]) if name.startswith("--")}
    flags = megatron_model_flags(shape_from_hf_config(config, 1, 1))
    for name, value in zip(flags[::2], flags[1::2]):
        assert float(value) == float(values[name]), (name, value, values[name])
    assert config.tie_word_embeddings is False and config.initializer_range == float(values["--init-method-std"])
    assert config.max_position_embeddings == int(values["--seq-length"])
    with torch.device("meta"):
        count = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert count == pytest.approx(parameters, rel=0.01)


def test_build_model_is_seeded_and_initialised_like_the_paper():
    config = llama_config("tiny", VOCAB, init_std=0.01)
    first, second, other = build_model(config, seed=3), build_model(config, seed=3), build_model(config, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)
    for name, parameter in first.named_parameters():
        if name.endswith("norm.weight"):
            assert bool((parameter == 1).all()), name
        else:
            assert float(parameter.std()) == pytest.approx(0.01, rel=0.1) and abs(float(parameter.mean())) < 2e-3, name
    with pytest.raises(ValueError, match="unknown preset"):
        llama_config("7b", 32000)
