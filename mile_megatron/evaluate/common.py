"""Shared pieces of ``mile-eval``: model-directory checks, provenance (versions, config hash), output.

Nothing here imports torch or transformers at module import time, so ``mile-eval --help`` and the
input checks stay fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Architectures this tool evaluates: what mile-convert-hf writes.
LLAMA_MODEL_TYPE = "llama"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


class EvalError(ValueError):
    """Bad input for mile-eval (missing/invalid model directory, dataset prefix, task, option)."""


@dataclass(frozen=True)
class ModelDir:
    """A checked Hugging Face LLaMA directory."""
    path: Path
    config: dict[str, Any]
    config_sha256: str
    weight_files: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_position_embeddings(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return None if value is None else int(value)

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in every results file."""
        return {
            "path": str(self.path),
            "config_sha256": self.config_sha256,
            "model_type": self.config.get("model_type"),
            "architectures": self.config.get("architectures"),
            "vocab_size": self.vocab_size,
            "hidden_size": self.config.get("hidden_size"),
            "num_hidden_layers": self.config.get("num_hidden_layers"),
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.config.get("torch_dtype", self.config.get("dtype")),
            "weight_files": {name: (self.path / name).stat().st_size for name in self.weight_files},
        }


def inspect_model_dir(path: str | os.PathLike, *, need_tokenizer: bool = False) -> ModelDir:
    """Check that ``path`` is a Hugging Face LlamaForCausalLM directory; raise EvalError otherwise.

    config_sha256 is the SHA-256 of the config.json bytes (identifies the architecture/settings,
    not the weights; the weight file sizes are recorded next to it).
    """
    directory = Path(path).expanduser()
    hint = "pass the output directory of mile-convert-hf"
    if not directory.exists():
        raise EvalError(f"model directory {directory} does not exist; {hint}")
    if not directory.is_dir():
        raise EvalError(f"{directory} is a file, not a model directory; {hint}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise EvalError(f"{directory} is not a Hugging Face model directory (no config.json); {hint}")
    raw = config_path.read_bytes()
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise EvalError(f"{config_path} is not valid JSON ({error}); reconvert the model") from None
    if not isinstance(config, dict):
        raise EvalError(f"{config_path} does not hold a JSON object; reconvert the model")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != LLAMA_MODEL_TYPE or (architectures and LLAMA_ARCHITECTURE not in architectures):
        raise EvalError(
            f"{directory} holds a {model_type!r} model (architectures {architectures}), not LLaMA: "
            f"mile-eval evaluates {LLAMA_ARCHITECTURE} directories written by mile-convert-hf")
    if not isinstance(config.get("vocab_size"), int) or config["vocab_size"] <= 0:
        raise EvalError(f"{config_path} has no valid vocab_size; reconvert the model")
    weights = tuple(name for name in _WEIGHT_FILES if (directory / name).is_file())
    if not weights:
        raise EvalError(f"{directory} has no weights (expected one of {', '.join(_WEIGHT_FILES)}); "
                        "the conversion did not finish — rerun mile-convert-hf")
    for index_name in (w for w in weights if w.endswith(".index.json")):
        try:
            shards = set(json.loads((directory / index_name).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as error:
            raise EvalError(f"{directory / index_name} is not a valid weight index ({error!r}); "
                            "rerun mile-convert-hf") from None
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise EvalError(f"{directory} lacks weight shard(s) {', '.join(missing)} named in "
                            f"{index_name}; the conversion is incomplete — rerun mile-convert-hf")
        weights += tuple(sorted(shards))
    if need_tokenizer and not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise EvalError(f"{directory} has no tokenizer ({' or '.join(_TOKENIZER_FILES)}); "
                        "mile-convert-hf writes one from the SentencePiece model used in training")
    return ModelDir(directory.resolve(), config, hashlib.sha256(raw).hexdigest(), weights)


def package_versions(*extra: str) -> dict[str, str | None]:
    """Installed versions of the packages that determine a result (None = not installed)."""
    names = ("mile-megatron", "torch", "transformers", "megatron-core", "safetensors", *extra)
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["mile-megatron"] is None:  # running from a source tree that is not installed
        from mile_megatron import __version__

        versions["mile-megatron"] = __version__
    return versions


def resolve_device(device: str | None) -> str:
    """``None``/"auto" -> "cuda" when a GPU is visible, else "cpu"; otherwise the given device."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" -> bfloat16 on CUDA (as trained), float32 on CPU; otherwise validated as given."""
    if dtype not in DTYPES:
        raise EvalError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON so that ``path`` holds either nothing/the old file or the complete new one."""
    from mile_megatron.utils.fs import atomic_write_text

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Serialise first: a payload that cannot be written leaves no file behind.
    atomic_write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    return target


def _json_default(value: Any) -> Any:
    """JSON for values lm_eval results may contain (numpy scalars, dtypes, paths, sets)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
