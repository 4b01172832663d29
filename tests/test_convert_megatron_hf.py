"""Megatron <-> Hugging Face conversion on checkpoints written by the real mile-pretrain entry point.

One session fixture launches the entry point (torchrun, CPU, tiny fp32 LLaMA, one training step) in four
layouts, shared by every test:
  tp1     TP=1            torch_dist  GQA (4 heads, 2 groups), vocabulary 61 padded to 64
  pp2     PP=2            torch_dist  no GQA, vocabulary 64 (no padding)
  tp2pp2  TP=2 x PP=2 x virtual 2 (4 layers)  legacy torch  GQA, vocabulary 61 padded to 64
  from_hf a random HF LLaMA (GQA, vocabulary 61) -> mile-convert-megatron (TP=2 torch_dist release) ->
          mile-pretrain --load at TP=2, one step with lr 0, saved (torch_dist) at TP=2
Logit parity is checked by a separate process that runs Megatron's own GPTModel (torch_dist weights loaded
by Megatron's dist_checkpointing, i.e. independently of this package's reader).
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from megatron_runs import REPO, TINY_FLAGS, launch, launch_env, write_pattern_dataset

from mile_megatron.convert import ConversionError, layout, to_hf, to_megatron
from mile_megatron.convert.checkpoint_reader import open_checkpoint
from mile_megatron.convert.hf_config import unsupported_megatron_settings

TOLERANCE = 1e-4
GQA = ("--group-query-attention", "--num-query-groups", "2")
PADDED_VOCAB = ("--vocab-size", "61")  # 61 -> 64 rows with --make-vocab-size-divisible-by 32 (x TP)
ONE_STEP = ("--save-interval", "1", "--eval-iters", "0", "--lr-warmup-iters", "0")


def _load_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(str(directory / "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def _random_hf_llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=60)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(str(directory))
    return directory


def _run_verify(pairs: list[tuple[Path, Path]]) -> list[dict]:
    command = [sys.executable, "-m", "mile_megatron.convert.verify", "--tolerance", str(TOLERANCE)]
    for checkpoint, hf in pairs:
        command += ["--pair", str(checkpoint), str(hf)]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(pairs), f"verify exited {result.returncode}:\n{result.stdout}\n{result.stderr[-8000:]}"
    return lines


@pytest.fixture(scope="session")
def conversions(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    workdir = tmp_path_factory.mktemp("convert")
    data = write_pattern_dataset(workdir / "pattern")

    def flags(*extra: str) -> list[str]:
        return [*TINY_FLAGS, "--data-path", str(data), "--train-iters", "1", *ONE_STEP, *extra]

    # HF -> Megatron (TP=2 torch_dist release), for the entry point to load at TP=2 (lr 0: weights unchanged).
    source = _random_hf_llama(workdir / "hf_source")
    megatron_from_hf = workdir / "megatron_from_hf"
    assert to_megatron.main([str(source), "--output", str(megatron_from_hf), "--tensor-model-parallel-size", "2",
                             "--make-vocab-size-divisible-by", "32"]) == 0
    specs = {
        "tp1": (1, flags(*GQA, *PADDED_VOCAB)),
        "pp2": (2, flags("--pipeline-model-parallel-size", "2")),
        "tp2pp2": (4, flags("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                            "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1",
                            "--ckpt-format", "torch", *GQA, *PADDED_VOCAB)),
        "from_hf": (2, flags("--tensor-model-parallel-size", "2", *GQA, *PADDED_VOCAB, "--load", str(megatron_from_hf),
                             "--lr", "0", "--min-lr", "0")),
        # The same layouts in the other checkpoint format, GQA and vocabulary padding toggled.
        "tp1_torch": (1, flags("--ckpt-format", "torch")),
        "tp2_torch": (2, flags("--tensor-model-parallel-size", "2", "--ckpt-format", "torch", *GQA, *PADDED_VOCAB)),
        "pp2_torch": (2, flags("--pipeline-model-parallel-size", "2", "--ckpt-format", "torch", *GQA, *PADDED_VOCAB)),
        "tp2pp2_dist": (4, flags("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")),
    }
    # Two launches at a time: one launch's start-up and teardown overlap the other's work.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(launch, workdir, name, nproc, run_flags, save=True)
                   for name, (nproc, run_flags) in specs.items()}
        runs = {name: future.result() for name, future in futures.items()}
    checkpoints = {name: run.save_dir for name, run in runs.items()}
    trained = runs["from_hf"]

    converted, summaries = {}, {}
    for name, checkpoint in checkpoints.items():
        output = workdir / f"hf_{name}"
        options = to_hf.build_parser().parse_args([str(checkpoint), "--output", str(output), "--quiet"])
        summaries[name] = to_hf.convert(options)
        converted[name] = output
    names = [name for name in checkpoints if name != "tp1"]
    results = dict(zip(names, _run_verify([(checkpoints[name], converted[name]) for name in names])))
    return Namespace(workdir=workdir, runs=runs, checkpoints=checkpoints, converted=converted, summaries=summaries,
                     results=results, source=source, trained=trained, megatron_from_hf=megatron_from_hf)


# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fmt, tp, pp, vocab, kv_heads, layers", [
    ("pp2", "torch_dist", 1, 2, 64, 4, 2), ("tp2pp2", "torch", 2, 2, 61, 2, 4), ("from_hf", "torch_dist", 2, 1, 61, 2, 2),
    ("tp1_torch", "torch", 1, 1, 64, 4, 2), ("tp2_torch", "torch", 2, 1, 61, 2, 2), ("pp2_torch", "torch", 1, 2, 61, 2, 2),
    ("tp2pp2_dist", "torch_dist", 2, 2, 64, 4, 2)])
def test_converted_logits_match_megatron(conversions, name, fmt, tp, pp, vocab, kv_heads, layers):
    summary, result = conversions.summaries[name], conversions.results[name]
    assert (summary["format"], summary["tensor_model_parallel_size"], summary["pipeline_model_parallel_size"]) == (
        fmt, tp, pp)
    assert summary["vocab_size"] == vocab and summary["padded_vocab_size"] == 64
    config = json.loads((conversions.converted[name] / "config.json").read_text())
    assert config["vocab_size"] == vocab and config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] == kv_heads
    assert config["num_hidden_layers"] == layers
    print(f"{name}: max |logit difference| {result['max_abs_diff']:.3e} (max |logit| {result['max_abs_logit']:.3f})")
    assert result["ok"] and result["max_abs_diff"] <= TOLERANCE, result
    assert result["max_abs_logit"] > 100 * TOLERANCE  # the comparison is not vacuous


def test_cli_verify_on_tp1_checkpoint(conversions, capsys):
    output = conversions.workdir / "hf_tp1_cli"
    code = to_hf.main([str(conversions.checkpoints["tp1"]), "--output", str(output), "--verify", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "verify OK" in printed and "torch_dist" in printed
    difference = float(printed.split("max |logit difference| = ")[1].split()[0])
    assert difference <= TOLERANCE
    index = json.loads((output / "model.safetensors.index.json").read_text())
    tensors = _load_hf_tensors(output)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (61, 64)
    assert json.loads((output / "generation_config.json").read_text())["eos_token_id"] == 60


def test_megatron_load_of_converted_hf_trains_and_saves_the_same_weights(conversions):
    """mile-convert-megatron output loads at TP=2 and trains; with lr 0 the saved weights equal the HF source."""
    records = [r for r in conversions.trained.records if r["split"] == "train"]
    assert {r["iteration"] for r in records} == {1}
    assert all(math.isfinite(r["ce"]) and 0 < r["ce"] < 20 for r in records)
    assert "loading release" in conversions.trained.output or "release" in conversions.trained.output
    source, round_trip = _load_hf_tensors(conversions.source), _load_hf_tensors(conversions.converted["from_hf"])
    assert set(source) == set(round_trip)
    for key in source:
        assert torch.equal(source[key], round_trip[key]), key


def test_hf_megatron_hf_round_trip_is_exact(conversions, tmp_path):
    source_dir = conversions.converted["tp2pp2"]  # 4 layers, GQA, vocabulary 61
    source = _load_hf_tensors(source_dir)
    layouts = [("torch_dist", ["--tensor-model-parallel-size", "2"]),
               ("torch", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                          "--num-layers-per-virtual-pipeline-stage", "1"]),
               ("torch", ["--pipeline-model-parallel-size", "4"])]
    for index, (fmt, flags) in enumerate(layouts):
        megatron, back = tmp_path / f"megatron{index}", tmp_path / f"hf{index}"
        assert to_megatron.main([str(source_dir), "--output", str(megatron), "--ckpt-format", fmt,
                                 "--make-vocab-size-divisible-by", "32", *flags]) == 0
        assert to_hf.main([str(megatron), "--output", str(back), "--quiet"]) == 0
        tensors = _load_hf_tensors(back)
        assert set(tensors) == set(source)
        for key in source:
            assert torch.equal(tensors[key], source[key]), (fmt, flags, key)
        original = json.loads((source_dir / "config.json").read_text())
        converted = json.loads((back / "config.json").read_text())
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings"):
            assert converted[key] == original[key], key


def test_legacy_writer_produces_the_rank_files_megatron_writes(conversions, tmp_path):
    written = tmp_path / "written"
    assert to_megatron.main([str(conversions.converted["tp2pp2"]), "--output", str(written), "--ckpt-format", "torch",
                             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                             "--num-layers-per-virtual-pipeline-stage", "1", "--make-vocab-size-divisible-by",
                             "32"]) == 0
    real = sorted(p for p in conversions.checkpoints["tp2pp2"].glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    ours = sorted(p for p in written.glob("release/mp_rank_*/model_optim_rng.pt"))
    assert [p.parent.name for p in real] == [p.parent.name for p in ours] and len(ours) == 4
    for real_path, our_path in zip(real, ours):
        real_state = torch.load(real_path, map_location="cpu", weights_only=False)
        our_state = torch.load(our_path, map_location="cpu", weights_only=False)
        chunks = sorted(k for k in real_state if k.startswith("model"))
        assert chunks == sorted(k for k in our_state if k.startswith("model")) == ["model0", "model1"]
        for chunk in chunks:
            expected = {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in real_state[chunk].items()}
            got = {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in our_state[chunk].items()}
            assert got == expected, (our_path, chunk)
            tp_rank = int(our_path.parent.name.split("_")[2])
            for key, value in real_state[chunk].items():  # same weights: the HF model came from these files
                if not torch.is_tensor(value):
                    continue
                ours = our_state[chunk][key]
                if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    # 32 vocabulary rows per TP rank; rows >= 61 are padding (trained by Megatron, zero from HF).
                    real_rows = max(0, min(32, 61 - 32 * tp_rank))
                    assert torch.equal(ours[:real_rows], value[:real_rows]), (our_path, chunk, key)
                    assert not ours[real_rows:].any()
                else:
                    assert torch.equal(ours, value), (our_path, chunk, key)


# -------------------------------------------------------------------------------------------------
def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _convert_error(checkpoint: Path, output: Path, capsys) -> str:
    code = to_hf.main([str(checkpoint), "--output", str(output), "--quiet"])
    message = capsys.readouterr().err
    assert code == 2, message
    assert not output.exists(), "nothing may be left behind"
    assert not list(output.parent.glob(f".{output.name}.partial-*"))
    return message


def test_incomplete_or_corrupted_checkpoints_are_refused_by_name(conversions, tmp_path, capsys):
    legacy = _copy(conversions.checkpoints["tp2pp2"], tmp_path / "legacy")
    iteration = next(legacy.glob("iter_*"))
    rank_file = iteration / "mp_rank_01_001" / "model_optim_rng.pt"
    content = rank_file.read_bytes()

    rank_file.unlink()
    message = _convert_error(legacy, tmp_path / "out", capsys)
    assert str(rank_file) in message and "missing" in message

    rank_file.write_bytes(content[: len(content) // 2])
    message = _convert_error(legacy, tmp_path / "out", capsys)
    assert str(rank_file) in message and "truncated or corrupted" in message

    rank_file.write_bytes(content)
    (legacy / "latest_checkpointed_iteration.txt").unlink()
    message = _convert_error(legacy, tmp_path / "out", capsys)
    assert "latest_checkpointed_iteration.txt is missing" in message and iteration.name in message
    assert to_hf.main([str(iteration), "--output", str(tmp_path / "explicit"), "--quiet"]) == 0  # explicit works

    dist = _copy(conversions.checkpoints["pp2"], tmp_path / "dist")
    data_file = sorted(next(dist.glob("iter_*")).glob("*.distcp"))[-1]
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) // 3])
    message = _convert_error(dist, tmp_path / "out", capsys)
    assert str(data_file) in message and "truncated" in message
    data_file.unlink()
    message = _convert_error(dist, tmp_path / "out", capsys)
    assert str(data_file) in message and "missing" in message

    with pytest.raises(ConversionError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


def test_unrepresentable_architectures_are_refused_with_the_setting_named(conversions, tmp_path, capsys):
    with open_checkpoint(conversions.checkpoints["tp1"]) as checkpoint:
        args = Namespace(**vars(checkpoint.args))
    assert unsupported_megatron_settings(args) == []
    args.add_bias_linear = True
    args.position_embedding_type = "learned_absolute"
    args.num_experts = 8
    args.normalization = "LayerNorm"
    args.qk_layernorm = True
    problems = "\n".join(unsupported_megatron_settings(args))
    for setting in ("--add-bias-linear", "learned_absolute", "--num-experts", "LayerNorm", "--qk-layernorm"):
        assert setting in problems
    config = json.loads((conversions.source / "config.json").read_text())
    biased = _copy(conversions.source, tmp_path / "biased")
    (biased / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    assert to_megatron.main([str(biased), "--output", str(tmp_path / "never")]) == 2
    assert "attention_bias" in capsys.readouterr().err and not (tmp_path / "never").exists()


# -------------------------------------------------------------------------------------------------
def test_layout_transforms_against_an_explicit_reference():
    heads, groups, head_dim, hidden, ffn, tp = 8, 2, 3, 5, 6, 2
    q = torch.randn(heads * head_dim, hidden, dtype=torch.float64)
    k = torch.randn(groups * head_dim, hidden, dtype=torch.float64)
    v = torch.randn(groups * head_dim, hidden, dtype=torch.float64)
    # Megatron's fused rows, written out group by group.
    rows = []
    per_group = heads // groups
    for g in range(groups):
        rows += [q[(g * per_group + h) * head_dim:(g * per_group + h + 1) * head_dim] for h in range(per_group)]
        rows += [k[g * head_dim:(g + 1) * head_dim], v[g * head_dim:(g + 1) * head_dim]]
    fused = torch.cat(rows)
    assert torch.equal(layout.qkv_from_hf(q, k, v, heads, groups, head_dim), fused)
    assert all(torch.equal(a, b) for a, b in zip(layout.qkv_to_hf(fused, heads, groups, head_dim), (q, k, v)))
    # Each TP rank holds whole query groups, so TP shards join on dim 0.
    shards = layout.split_tensor_parallel("linear_qkv", fused, tp)
    assert torch.equal(shards[1], fused[fused.shape[0] // 2:])
    # SwiGLU: rank r holds [gate_r; up_r].
    gate, up = torch.randn(ffn, hidden, dtype=torch.float64), torch.randn(ffn, hidden, dtype=torch.float64)
    ranks = [torch.cat([gate[r * 3:(r + 1) * 3], up[r * 3:(r + 1) * 3]]) for r in range(tp)]
    assert torch.equal(layout.merge_tensor_parallel("linear_fc1", ranks), torch.cat([gate, up]))
    assert all(torch.equal(a, b) for a, b in zip(layout.split_tensor_parallel("linear_fc1", torch.cat([gate, up]), tp),
                                                 ranks))
    proj = torch.randn(hidden, 4, dtype=torch.float64)
    assert torch.equal(layout.merge_tensor_parallel("linear_proj", [proj[:, :2], proj[:, 2:]]), proj)
    assert layout.padded_vocab_size(61, 32, 2) == 64 and layout.padded_vocab_size(32000, 128, 3) == 32256
    # Virtual pipeline: chunk (pp, vp) starts at (vp * PP + pp) * layers_per_chunk.
    chunks = layout.even_pipeline_chunks(8, 2, 2)
    assert chunks[(1, 0)] == range(2, 4) and chunks[(0, 1)] == range(4, 6)
    offsets = layout.chunk_offsets({(0, 0): 3, (1, 0): 1, (0, 1): 2, (1, 1): 2})
    assert offsets == {(0, 0): 0, (1, 0): 3, (0, 1): 4, (1, 1): 6}
    norm = torch.randn(4, dtype=torch.float64)
    assert torch.equal(layout.norm_from_hf(layout.norm_to_hf(norm, True), True), norm)


def test_sentencepiece_tokenizer_files_reproduce_sentencepiece(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    from mile_megatron.convert.hf_tokenizer import SAMPLE_TEXTS, tokenizer_info

    words = ["entropy", "weighted", "loss", "the", "model", "token", "42", "café", "über", "x"]
    sentences = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(10)) for i in range(200)]
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "spm"), vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    args = Namespace(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "spm.model"))
    info = tokenizer_info(args)
    assert (info.vocab_size, info.bos_token_id, info.eos_token_id) == (300, 1, 2)
    out = tmp_path / "hf"
    out.mkdir()
    info.write(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    for text in SAMPLE_TEXTS + ("entropy weighted loss 42",):
        assert tokenizer(text)["input_ids"] == [1] + processor.encode(text)
    assert (out / "tokenizer.model").is_file()
    missing = Namespace(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "gone.model"))
    with pytest.raises(ConversionError, match="--tokenizer-model"):
        tokenizer_info(missing)
