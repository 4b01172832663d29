"""Read Megatron GPT checkpoints (torch_dist or legacy torch, any TP / PP / virtual PP) on CPU.

Both readers return tensors in the TP=1 Megatron layout (see layout.py), one transformer layer at a
time, so memory stays bounded by the largest layer (plus the embedding):
- torch_dist: tensors are read region by region through torch.distributed.checkpoint (no process
  group); Megatron stores global tensors, transformer layers stacked on a leading layer axis.
- legacy torch: every rank file ``mp_rank_TT[_PPP]/model_optim_rng.pt`` is memory-mapped
  (torch.load(mmap=True)), so only the pages of the requested tensors are read.

Which iteration: a checkpoint directory's ``latest_checkpointed_iteration.txt`` (an iteration
number or ``release``), or an explicit ``iter_NNNNNNN`` / ``release`` directory, or `iteration`.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mile_megatron.convert import ConversionError
from mile_megatron.convert import layout

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_ITERATION_DIR = re.compile(r"^iter_\d{7}$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


@dataclass(frozen=True)
class CheckpointLocation:
    directory: Path        # the iter_NNNNNNN or release directory
    iteration: int         # 0 for release checkpoints
    release: bool
    format: str            # "torch_dist" or "torch"


def _read_tracker(tracker: Path) -> tuple[int, bool]:
    text = tracker.read_text().strip()
    if text == "release":
        return 0, True
    try:
        value = int(text)
    except ValueError:
        raise ConversionError(f"{tracker} should hold an iteration number or 'release' but holds {text[:80]!r}; "
                              "pass the iter_NNNNNNN directory to convert explicitly") from None
    if value < 0:
        raise ConversionError(f"{tracker} holds a negative iteration {value}")
    return value, False


def _detect_format(directory: Path) -> str:
    if (directory / "metadata.json").is_file():
        if not (directory / ".metadata").is_file():
            raise ConversionError(f"{directory} is an incomplete torch_dist checkpoint: its .metadata file is "
                                  "missing (the save did not finish); convert an earlier iteration")
        return "torch_dist"
    if any(_RANK_DIR.match(entry.name) for entry in directory.iterdir() if entry.is_dir()):
        return "torch"
    if (directory / ".metadata").is_file():
        raise ConversionError(f"{directory} has a .metadata file but no metadata.json: not a Megatron torch_dist "
                              "checkpoint, or the save did not finish")
    raise ConversionError(f"{directory} holds neither a torch_dist checkpoint (metadata.json, .metadata, *.distcp) "
                          f"nor legacy rank directories (mp_rank_XX[_YYY]/{RANK_FILE})")


def locate_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> CheckpointLocation:
    """Find the checkpoint to convert (default: the latest complete one)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"checkpoint directory {path} does not exist")
    if iteration is None and (_ITERATION_DIR.match(path.name) or path.name == "release"):
        number = 0 if path.name == "release" else int(path.name[len("iter_"):])
        return CheckpointLocation(path, number, path.name == "release", _detect_format(path))
    tracker = path / TRACKER_FILE
    if iteration is not None:
        directory, release = path / f"iter_{iteration:07d}", False
    elif tracker.is_file():
        iteration, release = _read_tracker(tracker)
        directory = path / ("release" if release else f"iter_{iteration:07d}")
    else:
        found = sorted(entry.name for entry in path.iterdir() if entry.is_dir()
                       and (_ITERATION_DIR.match(entry.name) or entry.name == "release"))
        if found:
            raise ConversionError(
                f"{tracker} is missing: Megatron writes this marker after a checkpoint is complete, so the "
                f"checkpoints in {path} ({', '.join(found)}) may be incomplete. Pass one iteration directory "
                f"explicitly (e.g. {path / found[-1]}) or --iteration N to convert it anyway")
        raise ConversionError(f"{path} is not a Megatron checkpoint directory: no {TRACKER_FILE} and no "
                              "iter_NNNNNNN directories")
    if not directory.is_dir():
        raise ConversionError(f"checkpoint iteration directory {directory} does not exist"
                              + (f" ({tracker} names it)" if tracker.is_file() else ""))
    return CheckpointLocation(directory, iteration, release, _detect_format(directory))


class MegatronCheckpoint:
    """A Megatron GPT checkpoint; tensors come back in the TP=1 Megatron layout, stored dtype."""

    location: CheckpointLocation
    args: argparse.Namespace

    @property
    def format(self) -> str:
        return self.location.format

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """The six canonical tensors of global transformer layer `index`."""
        raise NotImplementedError

    def model_tensor(self, name: str) -> torch.Tensor:
        """word_embeddings, final_layernorm or output_layer (the embedding when tied)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "MegatronCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> MegatronCheckpoint:
    location = locate_checkpoint(path, iteration)
    if location.format == "torch_dist":
        return TorchDistCheckpoint(location)
    return LegacyTorchCheckpoint(location)


# ----------------------------------------------------------------------------------------------
# torch_dist
def _region_planner(regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> Any:
    """A DCP load planner that reads, for each key, only the region (offsets, sizes) of the global tensor."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionLoadPlanner(DefaultLoadPlanner):
        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, sizes) in regions.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            # The destination is the region itself; read items carry offsets relative to it.
            return self.state_dict[index.fqn]

    return RegionLoadPlanner()


class TorchDistCheckpoint(MegatronCheckpoint):
    def __init__(self, location: CheckpointLocation):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.location = location
        directory = location.directory
        try:
            metadata = FileSystemReader(str(directory)).read_metadata()
        except Exception as error:
            raise ConversionError(f"cannot read {directory / '.metadata'} ({type(error).__name__}: {error}); the "
                                  "torch_dist checkpoint is corrupted or incomplete") from error
        self._check_files(metadata)
        self._metadata = metadata
        self.args = self._load_args()

        class CachedReader(FileSystemReader):  # parse .metadata once, not once per layer
            def read_metadata(self_inner, *args: Any, **kwargs: Any) -> Any:
                return metadata

        self._reader = CachedReader(str(directory))
        self._tensors = {key: value for key, value in metadata.state_dict_metadata.items()
                         if isinstance(value, TensorStorageMetadata)}
        self._num_layers = int(self.args.num_layers)

    def _check_files(self, metadata: Any) -> None:
        """Every data file the metadata points to exists and is long enough (catches truncation)."""
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for name, end in sorted(needed.items()):
            file = self.location.directory / name
            if not file.is_file():
                raise ConversionError(f"{file} is missing: the torch_dist checkpoint is incomplete (its .metadata "
                                      "lists data in that file); copy the whole iteration directory")
            size = file.stat().st_size
            if size < end:
                raise ConversionError(f"{file} is truncated: {size} bytes, but the checkpoint metadata needs "
                                      f"{end}; copy the file again or convert an earlier iteration")

    def _load_args(self) -> argparse.Namespace:
        from megatron.core.dist_checkpointing import load_common_state_dict

        try:
            common = load_common_state_dict(str(self.location.directory))
        except Exception as error:
            raise ConversionError(f"cannot read the common state of {self.location.directory} "
                                  f"({type(error).__name__}: {error}); the checkpoint is corrupted") from error
        args = common.get("args") if isinstance(common, dict) else None
        if args is None:
            raise ConversionError(f"{self.location.directory} holds no saved Megatron arguments ('args'); "
                                  "it was not written by Megatron's training loop")
        return args

    def _read(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        state = {key: torch.empty(sizes, dtype=self._tensors[key].properties.dtype)
                 for key, (_, sizes) in regions.items()}
        try:
            dcp.load(state, storage_reader=self._reader, planner=_region_planner(regions), no_dist=True)
        except Exception as error:
            raise ConversionError(f"cannot read {', '.join(regions)} from {self.location.directory} "
                                  f"({type(error).__name__}: {error}); the checkpoint is corrupted") from error
        return state

    def _whole(self, key: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        size = tuple(self._tensors[key].size)
        return (0,) * len(size), size

    def _layer_key(self, name: str, index: int) -> tuple[str, tuple[tuple[int, ...], tuple[int, ...]], bool]:
        """(key, region, stacked) of canonical layer tensor `name` of layer `index`."""
        for key in dict.fromkeys((layout.TE_LAYER_KEYS[name], layout.LEGACY_LAYER_KEYS[name])):
            stacked = layout.LAYER_PREFIX + key
            if stacked in self._tensors:
                size = tuple(self._tensors[stacked].size)
                if size[0] != self._num_layers:
                    raise ConversionError(f"{stacked} stacks {size[0]} layers but the saved arguments say "
                                          f"--num-layers {self._num_layers}")
                return stacked, ((index,) + (0,) * (len(size) - 1), (1,) + size[1:]), True
            single = f"{layout.LAYER_PREFIX}{index}.{key}"
            if single in self._tensors:
                return single, self._whole(single), False
        raise ConversionError(f"{self.location.directory} has no tensor for {name} of layer {index} "
                              f"(looked for {layout.LAYER_PREFIX}{layout.TE_LAYER_KEYS[name]})")

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        regions, stacked = {}, {}
        names: dict[str, str] = {}
        for name in layout.LAYER_TENSORS:
            if name == "linear_fc1":
                base = layout.LAYER_PREFIX + layout.TE_LAYER_KEYS[name]
                if base + "_w" in self._tensors:  # singleton-local-shards SwiGLU: gate and up saved apart
                    for part in ("_w", "_v"):
                        size = tuple(self._tensors[base + part].size)
                        regions[base + part] = ((index,) + (0,) * (len(size) - 1), (1,) + size[1:])
                        stacked[base + part] = True
                    names[name] = base
                    continue
            key, region, is_stacked = self._layer_key(name, index)
            regions[key], stacked[key], names[name] = region, is_stacked, key
        loaded = {key: (value[0] if stacked[key] else value) for key, value in self._read(regions).items()}
        result = {}
        for name, key in names.items():
            result[name] = (torch.cat([loaded[key + "_w"], loaded[key + "_v"]], dim=0)
                            if key not in loaded else loaded[key])
        return result

    def model_tensor(self, name: str) -> torch.Tensor:
        key = layout.MODEL_KEYS[name]
        if key not in self._tensors:
            if name == "output_layer" and not getattr(self.args, "untie_embeddings_and_output_weights", False):
                key = layout.MODEL_KEYS["word_embeddings"]
            else:
                raise ConversionError(f"{self.location.directory} has no tensor {key}")
        return self._read({key: self._whole(key)})[key]


# ----------------------------------------------------------------------------------------------
# legacy torch
class LegacyTorchCheckpoint(MegatronCheckpoint):
    def __init__(self, location: CheckpointLocation):
        self.location = location
        directory = location.directory
        ranks = {}
        for entry in directory.iterdir():
            match = _RANK_DIR.match(entry.name)
            if match and entry.is_dir():
                if match.group(3) is not None:
                    raise ConversionError(f"{entry} is an expert-parallel rank directory: MoE checkpoints are "
                                          "not supported")
                ranks[(int(match.group(1)), int(match.group(2) or 0))] = entry
        pipelined = any(_RANK_DIR.match(path.name).group(2) is not None for path in ranks.values())
        first = directory / ("mp_rank_00_000" if pipelined else "mp_rank_00") / RANK_FILE
        rank0 = self._load(first)
        if "args" not in rank0 or rank0["args"] is None:
            raise ConversionError(f"{first} holds no saved Megatron arguments ('args')")
        self.args = rank0["args"]
        self.tp = int(self.args.tensor_model_parallel_size)
        self.pp = int(self.args.pipeline_model_parallel_size)
        if pipelined != (self.pp > 1):
            raise ConversionError(f"{directory}: rank directory names do not match the saved pipeline-parallel "
                                  f"size {self.pp}")
        expected = {(t, p): directory / (f"mp_rank_{t:02d}_{p:03d}" if self.pp > 1 else f"mp_rank_{t:02d}") / RANK_FILE
                    for t in range(self.tp) for p in range(self.pp)}
        missing = [str(path) for path in expected.values() if not path.is_file()]
        if missing:
            raise ConversionError(f"the checkpoint is incomplete: {len(missing)} of {len(expected)} rank files "
                                  f"({self.tp} TP x {self.pp} PP) are missing: " + ", ".join(missing))
        self._files: dict[tuple[int, int], dict[str, Any]] = {}
        for key, path in expected.items():
            self._files[key] = rank0 if path == first else self._load(path)
        self._index_layers()

    @staticmethod
    def _load(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise ConversionError(f"rank file {path} is missing; the checkpoint is incomplete")
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as error:
            raise ConversionError(f"cannot read {path} ({type(error).__name__}: {error}); the file is truncated or "
                                  "corrupted — copy it again or convert an earlier iteration") from error
        if not isinstance(state, dict):
            raise ConversionError(f"{path} is not a Megatron rank checkpoint (no state dict)")
        return state

    def _chunk_keys(self, state: dict[str, Any], path: str) -> list[str]:
        if "model" in state:
            return ["model"]
        keys = sorted((key for key in state if re.fullmatch(r"model\d+", key)), key=lambda key: int(key[5:]))
        if not keys:
            raise ConversionError(f"{path} holds no model weights ('model' or 'model0', 'model1', ...)")
        return keys

    def _index_layers(self) -> None:
        """Map every global layer to (tp-independent) (pp rank, chunk key, local index)."""
        counts: dict[tuple[int, int], int] = {}
        self._chunk_key: dict[tuple[int, int], str] = {}
        layer_pattern = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
        known_layer_keys = set(layout.LEGACY_LAYER_KEYS.values()) | set(layout.TE_LAYER_KEYS.values())
        known_model_keys = set(layout.MODEL_KEYS.values())
        for (tp_rank, pp_rank), state in self._files.items():
            keys = self._chunk_keys(state, f"rank file ({tp_rank}, {pp_rank})")
            for stage, chunk in enumerate(keys):
                local = set()
                for key in state[chunk]:
                    if key.endswith("_extra_state"):
                        continue
                    match = layer_pattern.match(key)
                    if match and match.group(2) in known_layer_keys:
                        local.add(int(match.group(1)))
                    elif key not in known_model_keys:
                        raise ConversionError(f"unexpected weight {key!r} in the checkpoint (rank tp={tp_rank} "
                                              f"pp={pp_rank}); only LLaMA-architecture GPT models convert")
                if tp_rank == 0:
                    counts[(pp_rank, stage)] = len(local)
                    self._chunk_key[(pp_rank, stage)] = chunk
                    if local != set(range(len(local))):
                        raise ConversionError(f"layers of rank pp={pp_rank} chunk {chunk} are not numbered 0..n-1")
        offsets = layout.chunk_offsets(counts)
        if sum(counts.values()) != int(self.args.num_layers):
            raise ConversionError(f"the rank files hold {sum(counts.values())} layers, the saved arguments say "
                                  f"--num-layers {self.args.num_layers}")
        self._layer_home: dict[int, tuple[int, int, int]] = {}
        for (pp_rank, stage), count in counts.items():
            for local in range(count):
                self._layer_home[offsets[(pp_rank, stage)] + local] = (pp_rank, stage, local)
        self._chunks = sorted(counts, key=lambda key: (key[1], key[0]))

    def _shards(self, pp_rank: int, stage: int, key: str) -> list[torch.Tensor]:
        chunk = self._chunk_key[(pp_rank, stage)]
        shards = []
        for tp_rank in range(self.tp):
            weights = self._files[(tp_rank, pp_rank)][chunk]
            if key not in weights:
                raise ConversionError(f"{key} is missing from rank tp={tp_rank} pp={pp_rank} ({chunk})")
            shards.append(weights[key])
        return shards

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        pp_rank, stage, local = self._layer_home[index]
        chunk = self._files[(0, pp_rank)][self._chunk_key[(pp_rank, stage)]]
        result = {}
        for name in layout.LAYER_TENSORS:
            for candidate in dict.fromkeys((layout.LEGACY_LAYER_KEYS[name], layout.TE_LAYER_KEYS[name])):
                key = f"{layout.LAYER_PREFIX}{local}.{candidate}"
                if key in chunk:
                    result[name] = layout.merge_tensor_parallel(name, self._shards(pp_rank, stage, key))
                    break
            else:
                raise ConversionError(f"layer {index} has no {name} weight in rank pp={pp_rank}")
        return result

    def model_tensor(self, name: str) -> torch.Tensor:
        key = layout.MODEL_KEYS[name]
        home = self._chunks[0] if name == "word_embeddings" else self._chunks[-1]
        weights = self._files[(0, home[0])][self._chunk_key[home]]
        if key not in weights and name == "output_layer" and not getattr(
                self.args, "untie_embeddings_and_output_weights", False):
            return self.model_tensor("word_embeddings")
        if key not in weights:
            raise ConversionError(f"{key} is missing from the rank files of pipeline stage {home[0]}")
        return layout.merge_tensor_parallel(name, self._shards(home[0], home[1], key))

    def close(self) -> None:
        self._files.clear()
