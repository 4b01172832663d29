"""mile-preprocess regressions: domain names that sanitize alike, orphaned worker processes after
``kill -9``, an --output-dir that is (or lies below) a file, and no torch/megatron imports.

Every test drives the real CLI (``main([...])`` in-process or ``python -m
mile_megatron.data.preprocess`` in a subprocess) on small real inputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import sentencepiece

from mile_megatron.data.domains import PILE_DOMAINS, safe_domain_name
from mile_megatron.data.preprocess import main
from mile_megatron.data.synthetic import write_pile_like_corpus
from mile_megatron.data.train_tokenizer import train

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    corpus = write_pile_like_corpus(tmp_path_factory.mktemp("tokcorpus"), train_shards=1,
                                    documents_per_shard=200, valid_documents=22, seed=3)
    prefix = tmp_path_factory.mktemp("tok") / "spm"
    train(corpus.train_files, prefix, 600, threads=1)
    return prefix.with_name("spm.model")


def _write_jsonl(path: Path, docs: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": d}}) + "\n"
                            for d, t in docs))
    return path


def _check_outputs_match_summary(out: Path, model: Path, docs: list[tuple[str, str]]) -> dict:
    """Every input document is in the dataset of its own domain; summary == datasets written."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    summary = json.loads((out / "summary.json").read_text())
    data = summary["splits"]["train"]
    names = {domain: stats["safe_name"] for domain, stats in data["domains"].items()}
    assert len(set(names.values())) == len(names), names
    written = sorted(p.name for p in (out / "datasets" / "train").iterdir())
    assert written == sorted(f"{n}{s}" for n in names.values() for s in (".bin", ".idx"))
    expected: dict[str, list[str]] = {}
    for domain, text in docs:
        expected.setdefault(domain, []).append(text)
    assert set(names) == set(expected)
    total = 0
    for domain, stats in data["domains"].items():
        dataset = IndexedDataset(str(out / "datasets" / "train" / stats["safe_name"]))
        texts = [processor.decode(dataset[i].tolist()[1:-1]) for i in range(len(dataset))]
        assert texts == expected[domain], domain
        assert stats["documents"] == len(dataset)
        assert stats["tokens"] == int(dataset.index.sequence_lengths.sum())
        total += len(dataset)
    assert total == data["documents"] == len(docs)
    return names


def test_domains_sharing_a_sanitized_name_keep_every_document(model, tmp_path):
    shard_a = [("Foo Bar", "first document of Foo Bar"), ("Wikipedia (en)", "an encyclopedia"),
               ("Foo Bar", "second document of Foo Bar")]
    shard_b = [("Foo_Bar", "the only Foo_Bar document"), ("Wikipedia_en", "a literal Wikipedia_en")]
    shard_c = [("Foo  (Bar)", "yet another spelling")]
    a = _write_jsonl(tmp_path / "in" / "a" / "00.jsonl", shard_a)
    b = _write_jsonl(tmp_path / "in" / "b" / "01.jsonl", shard_b)
    c = _write_jsonl(tmp_path / "in" / "c" / "02.jsonl", shard_c)
    docs = shard_a + shard_b + shard_c
    both = _write_jsonl(tmp_path / "in" / "all.jsonl", docs)
    common = ["--tokenizer-model", model, "--workers", "0"]

    separate = tmp_path / "separate"  # the colliding names arrive in different shards
    code, stdout, stderr = run_cli("run", "--train", a, b, c, "--output-dir", separate, *common)
    assert code == 0, stdout + stderr
    names = _check_outputs_match_summary(separate, model, docs)
    assert names["Wikipedia (en)"] == "Wikipedia_en" and names["Foo_Bar"] == "Foo_Bar"
    assert len({names["Foo Bar"], names["Foo_Bar"], names["Foo  (Bar)"]}) == 3

    single = tmp_path / "single"  # ... and in one shard
    code, stdout, stderr = run_cli("run", "--train", both, "--output-dir", single, *common)
    assert code == 0, stdout + stderr
    assert _check_outputs_match_summary(single, model, docs) == names

    machines = []  # several machines: the same names, the same bytes
    for path in (a, b, c):
        machine = tmp_path / f"machine-{path.stem}"
        code, stdout, stderr = run_cli("run", "--train", path, "--output-dir", machine,
                                       "--no-merge", *common)
        assert code == 0, stdout + stderr
        machines.append(machine)
    final = tmp_path / "final"
    code, stdout, stderr = run_cli("merge", *machines, "--output-dir", final)
    assert code == 0, stdout + stderr
    assert _check_outputs_match_summary(final, model, docs) == names
    for path in (separate / "datasets" / "train").iterdir():
        assert (final / "datasets" / "train" / path.name).read_bytes() == path.read_bytes()


def test_output_names_of_the_pile_are_unchanged_and_the_mapping_is_injective():
    legacy = {"Pile-CC": "Pile-CC", "PubMed Central": "PubMed_Central", "Books3": "Books3",
              "OpenWebText2": "OpenWebText2", "ArXiv": "ArXiv", "Github": "Github",
              "FreeLaw": "FreeLaw", "StackExchange": "StackExchange",
              "USPTO Backgrounds": "USPTO_Backgrounds", "PubMed Abstracts": "PubMed_Abstracts",
              "Gutenberg (PG-19)": "Gutenberg_PG-19", "OpenSubtitles": "OpenSubtitles",
              "Wikipedia (en)": "Wikipedia_en", "DM Mathematics": "DM_Mathematics",
              "Ubuntu IRC": "Ubuntu_IRC", "BookCorpus2": "BookCorpus2", "EuroParl": "EuroParl",
              "HackerNews": "HackerNews", "YoutubeSubtitles": "YoutubeSubtitles",
              "PhilPapers": "PhilPapers", "NIH ExPorter": "NIH_ExPorter",
              "Enron Emails": "Enron_Emails"}
    assert set(legacy) == set(PILE_DOMAINS)
    assert {d: safe_domain_name(d) for d in PILE_DOMAINS} == legacy
    tricky = [*legacy.values(), "Foo Bar", "Foo_Bar", "Foo__Bar", "Foo (Bar)", "_Foo_Bar_", "x" * 100,
              "x" * 101, "x" * 100 + "y", "domain", "()", "\u00e9t\u00e9", "\ud800",
              safe_domain_name("Foo Bar"), safe_domain_name("Foo Bar") + "x", "a" * 86 + "--0"]
    domains = list(dict.fromkeys([*PILE_DOMAINS, *tricky]))  # distinct strings
    names = [safe_domain_name(d) for d in domains]
    assert len(set(names)) == len(names), "two domains share an output name"
    for name in names:
        assert 0 < len(name) <= 100
        assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name), name
        assert name[0] not in "._" and name[-1] not in "._"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_kill_9_of_the_main_process_leaves_no_worker_or_tracker_behind(model, tmp_path):
    line = json.dumps({"text": "words and more words " * 200, "meta": {"pile_set_name": "ArXiv"}})
    big = tmp_path / "train" / "00.jsonl"
    big.parent.mkdir()
    big.write_text((line + "\n") * 12000)  # ~48 MB: many seconds of work for 2 workers
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mile_megatron.data.preprocess", "run", "--train", str(big),
               "--tokenizer-model", str(model), "--output-dir", str(out), "--workers", "2",
               "--chunk-bytes", "65536"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            children = _descendants(process.pid)
            partial = list((out / "shards" / "train").glob(".00.partial-*/*.bin"))
            if len(children) >= 3 and partial and partial[0].stat().st_size > 0:
                break  # 2 workers + multiprocessing's resource tracker, tokens being written
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        children = _descendants(process.pid)
        assert len(children) >= 3, [c.cmdline() for c in children]
        os.kill(process.pid, signal.SIGKILL)  # the main process only
        process.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, "still running after the main process was killed: " + "; ".join(
            " ".join(p.cmdline()[-3:]) for p in alive if p.is_running())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for child in children:  # clean up what this test started, by pid
            with contextlib.suppress(psutil.Error):
                child.kill()


@pytest.mark.parametrize("command", ["run", "merge"])
def test_output_dir_that_is_or_lies_below_a_file_is_a_clear_usage_error(model, tmp_path, command):
    source = _write_jsonl(tmp_path / "in" / "00.jsonl", [("ArXiv", "a small document")])
    blocker = tmp_path / "existing_file"
    blocker.write_text("keep me\n")
    machine = tmp_path / "machine"
    if command == "merge":
        code, stdout, stderr = run_cli("run", "--train", source, "--tokenizer-model", model,
                                       "--output-dir", machine, "--workers", "0", "--no-merge")
        assert code == 0, stdout + stderr
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for target in (blocker, blocker / "sub", blocker / "sub" / "deeper"):
        if command == "run":
            args = ["run", "--train", source, "--tokenizer-model", model, "--workers", "0"]
        else:
            args = ["merge", machine]
        code, stdout, stderr = run_cli(*args, "--output-dir", target)
        assert code == 2, stdout + stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mile-preprocess: error: --output-dir"), stderr
        assert str(target) in lines[0] and "file" in lines[0] and "Traceback" not in stderr
    assert blocker.read_text() == "keep me\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cli_imports_neither_torch_nor_megatron(model, tmp_path):
    corpus = write_pile_like_corpus(tmp_path / "corpus", train_shards=2, documents_per_shard=44,
                                    valid_documents=22, seed=4)
    out = tmp_path / "out"
    probe = ("import sys, runpy\n"
             "sys.argv = ['mile-preprocess', *sys.argv[1:]]\n"
             "try:\n"
             "    runpy.run_module('mile_megatron.data.preprocess', run_name='__main__')\n"
             "except SystemExit as exit:\n"
             "    code = exit.code\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'))\n"
             "print('HEAVY-MODULES', heavy, 'EXIT', code, flush=True)\n")
    result = subprocess.run(
        [sys.executable, "-c", probe, "run", "--train", *map(str, corpus.train_files), "--valid",
         str(corpus.val_file), "--tokenizer-model", str(model), "--output-dir", str(out),
         "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONPROFILEIMPORTTIME="1"))
    assert "HEAVY-MODULES [] EXIT 0" in result.stdout, result.stdout + result.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line]
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "megatron")]
    assert not heavy, f"imported by the main process or a worker: {heavy[:10]}"
    # the workers' imports are in the log too: sentencepiece once per process (main + 2 workers)
    assert imported.count("sentencepiece") >= 3, result.stderr[-3000:]
    assert (out / "datasets" / "train").is_dir() and (out / "summary.json").is_file()


def test_merge_refuses_shards_whose_output_names_collide(model, tmp_path):
    """Shards written under the old naming rule (``Foo Bar`` and ``Foo_Bar`` both -> ``Foo_Bar``)
    must not be merged into one file: a clear error, and the previous merge result stays."""
    a = _write_jsonl(tmp_path / "in" / "a" / "00.jsonl", [("Foo Bar", "spelled with a space")])
    b = _write_jsonl(tmp_path / "in" / "b" / "01.jsonl", [("Foo_Bar", "spelled with an underscore")])
    machines = []
    for path in (a, b):
        machine = tmp_path / f"machine-{path.stem}"
        code, stdout, stderr = run_cli("run", "--train", path, "--tokenizer-model", model,
                                       "--output-dir", machine, "--workers", "0", "--no-merge")
        assert code == 0, stdout + stderr
        machines.append(machine)
    final = tmp_path / "final"
    code, stdout, stderr = run_cli("merge", *machines, "--output-dir", final)
    assert code == 0, stdout + stderr
    before = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    shard = machines[0] / "shards" / "train" / "00"  # rewrite machine A as the old rule named it
    record = json.loads((shard / "shard.json").read_text())
    old_name = record["domains"]["Foo Bar"]["safe_name"]
    record["domains"]["Foo Bar"]["safe_name"] = "Foo_Bar"
    (shard / "shard.json").write_text(json.dumps(record))
    for suffix in (".bin", ".idx"):
        (shard / f"{old_name}{suffix}").rename(shard / f"Foo_Bar{suffix}")
    code, stdout, stderr = run_cli("merge", *machines, "--output-dir", final)
    assert code == 2, stdout + stderr
    assert "'Foo Bar'" in stderr and "'Foo_Bar'" in stderr and "share the output name" in stderr
    assert len(stderr.strip().splitlines()) == 1
    after = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert after == before
