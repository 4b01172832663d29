"""CPU mode: run megatron-core's own training loop on CPU with gloo.

megatron-core 0.19 hard-codes CUDA in many places (``torch.cuda.current_device()`` used as a
device, ``device="cuda"`` factories, ``Tensor.cuda()``, ``torch.cuda.synchronize()``, CUDA
streams, the CUDA RNG tracker, ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks, the
``make`` step that compiles dataset helpers). This module is the ONE place that redirects those
assumptions to the CPU. It is active only after :func:`activate`, which refuses to run when
CUDA is available; nothing here is imported for effect.

Invariants
- Numerics are unchanged: every redirected operation is the same operation on CPU tensors.
- Random draws Megatron meant for "the CUDA generator" (the JIT warm-up, the model-parallel RNG
  tracker, checkpointed ``cuda_rng_state``) use a separate CPU generator standing in for it, so
  they never consume the CPU default generator. Weight initialisation with
  ``--use-cpu-initialization`` draws only from the default generator, seeded identically on every
  tensor-parallel rank, hence TP=1 and TP=2 start from the same full weights.
- Dropout on CPU always draws from the default CPU generator; the tracker's fork does not apply
  (use dropout 0, as the LLaMA presets do, for TP-independent results).

activate(allow_cuda=True) runs even where CUDA is available (the unit tests do, to test the redirection on GPU
machines too); the command lines never pass it.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from mile_megatron.loss.settings import env_flag
from mile_megatron.utils.errors import UsageError

CPU_ENV_VAR = "MILE_MEGATRON_CPU"

# Megatron flags a CPU run needs (inserted before the user's flags by the entry point).
CPU_MEGATRON_FLAGS: tuple[str, ...] = (
    "--distributed-backend", "gloo",
    "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion",
    "--use-cpu-initialization",
)


class CpuModeError(UsageError):
    """CPU mode was requested in a setting where it cannot work."""


def cpu_mode_requested(argv: Sequence[str] | None = None) -> bool:
    """True when ``--cpu`` is among argv or ``MILE_MEGATRON_CPU`` is set to a true value."""
    if argv is not None and "--cpu" in argv:
        return True
    return env_flag(CPU_ENV_VAR, False)


# ----------------------------------------------------------------------------------------------
# The stand-in for the CUDA default generator.
_standin_generator: torch.Generator | None = None


def cuda_standin_generator() -> torch.Generator:
    """The CPU generator that plays the role of the CUDA default generator in CPU mode."""
    global _standin_generator
    if _standin_generator is None:
        _standin_generator = torch.Generator(device="cpu")
        _standin_generator.manual_seed(0)
    return _standin_generator


def _is_cuda_device(device: Any) -> bool:
    """Whether a device argument means a CUDA device (an int index means CUDA in torch)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


# Factories whose draws come from a generator: redirected ones use the stand-in generator.
_RANDOM_FACTORIES = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli,
    torch.multinomial, torch.rand_like, torch.randn_like, torch.randint_like,
}
# In-place random fills on a tensor that Megatron created "on CUDA".
_TENSOR_METHODS_TO_IDENTITY = {torch.Tensor.cuda}
_TO_METHODS = {torch.Tensor.to}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and ``.cuda()`` to a no-op.

    Tensor.type() reports CPU tensors under their CUDA type names ('torch.cuda.FloatTensor'),
    which is what Megatron's optimizer and gradient clipping compare against.
    """

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _TENSOR_METHODS_TO_IDENTITY:
            return args[0]
        if func is torch.Tensor.type:
            return _tensor_type(func, args, kwargs)
        if func in _TO_METHODS:
            args = tuple(torch.device("cpu") if _is_cuda_device(a) else a for a in args)
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = torch.device("cpu")
            return func(*args, **kwargs)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
            if func in _RANDOM_FACTORIES and kwargs.get("generator") is None:
                kwargs["generator"] = cuda_standin_generator()
        return func(*args, **kwargs)


def _tensor_type(func: Callable, args: tuple, kwargs: dict) -> Any:
    tensor = args[0]
    target = args[1] if len(args) > 1 else kwargs.get("dtype")
    if target is None:
        name = func(tensor)
        if tensor.device.type == "cpu" and name.startswith("torch.") and name.count(".") == 1:
            return "torch.cuda." + name[len("torch."):]
        return name
    if isinstance(target, str) and target.startswith("torch.cuda."):
        target = "torch." + target[len("torch.cuda."):]
    return func(tensor, target, *args[2:], **{k: v for k, v in kwargs.items() if k != "dtype"})


# ----------------------------------------------------------------------------------------------
# torch.cuda stand-ins.
class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is synchronous, waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> "_NullStream":
        return _NullStream()

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, *args: Any) -> None:
        pass

    def elapsed_time(self, *args: Any) -> float:
        return 0.0


def _constant(value: Any) -> Callable[..., Any]:
    """A new function returning `value` (torch._dynamo requires distinct objects per name)."""

    def constant(*args: Any, **kwargs: Any) -> Any:
        return value

    return constant


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return cuda_standin_generator().get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda", *args: Any, **kwargs: Any) -> None:
    cuda_standin_generator().set_state(new_state.clone())


def _manual_seed(seed: int) -> None:
    cuda_standin_generator().manual_seed(int(seed))


def _device_properties(device: Any = None) -> Any:
    return types.SimpleNamespace(
        name="cpu (mile_megatron CPU mode)", major=0, minor=0, total_memory=0,
        multi_processor_count=os.cpu_count() or 1,
    )


def _torch_cuda_replacements() -> dict[str, Any]:
    return {
        "current_device": _constant(0),
        "device_count": _constant(1),
        "set_device": _constant(None),
        "synchronize": _constant(None),
        "empty_cache": _constant(None),
        "ipc_collect": _constant(None),
        "memory_allocated": _constant(0),
        "max_memory_allocated": _constant(0),
        "memory_reserved": _constant(0),
        "max_memory_reserved": _constant(0),
        "reset_peak_memory_stats": _constant(None),
        "reset_max_memory_allocated": _constant(None),
        "memory_stats": lambda *a, **k: {},
        "get_device_properties": _device_properties,
        "get_device_capability": lambda *a, **k: (0, 0),
        "get_device_name": lambda *a, **k: "cpu (mile_megatron CPU mode)",
        "Stream": _NullStream,
        "Event": _NullStream,
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_stream": _constant(None),
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "get_rng_state_all": lambda: [_get_rng_state()],
        "set_rng_state_all": lambda states: _set_rng_state(states[0]),
        "manual_seed": _manual_seed,
        "manual_seed_all": lambda seed: _manual_seed(seed),
    }


# ----------------------------------------------------------------------------------------------
# Activation.
_patches: list[tuple[Any, str, Any]] = []
_mode: _CudaToCpuMode | None = None


def is_active() -> bool:
    return _mode is not None


def _patch(owner: Any, name: str, value: Any) -> None:
    _patches.append((owner, name, getattr(owner, name, None)))
    setattr(owner, name, value)


def activate(*, allow_cuda: bool = False) -> None:
    """Redirect Megatron's CUDA assumptions to CPU for this process (idempotent).

    Call before importing megatron.training / megatron.core modules, so that fused functions are
    defined without torch.compile (not useful on CPU, and slow to compile). Refuses (CpuModeError) where CUDA is
    available unless allow_cuda.
    """
    global _mode
    if _mode is not None:
        return
    # A parent process that imported DeepSpeed may have exported PYTORCH_NVML_BASED_CUDA_CHECK=1; NVML's
    # answer can claim a GPU that cannot be used. Ask the CUDA driver itself.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    if torch.cuda.is_available() and not allow_cuda:
        raise CpuModeError(
            "CPU mode (--cpu / MILE_MEGATRON_CPU=1) was requested but CUDA is available on this "
            "machine. CPU mode is only for machines without GPUs: drop --cpu (and unset "
            "MILE_MEGATRON_CPU) to train on the GPUs."
        )
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    for name, value in _torch_cuda_replacements().items():
        _patch(torch.cuda, name, value)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all",
                 "get_rng_state_all", "set_rng_state_all"):
        _patch(torch.cuda.random, name, getattr(torch.cuda, name))

    # torch.compile-based fusions: plain eager functions on CPU.
    import megatron.core.jit as megatron_jit

    megatron_jit.disable_jit_fuser()

    # Model-parallel RNG tracker: CUDA state get/set go to the stand-in generator.
    from megatron.core.tensor_parallel import random as tp_random

    _patch(tp_random, "_get_cuda_rng_state", lambda *a, **k: cuda_standin_generator().get_state())
    _patch(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: _set_rng_state(state))

    # Dataset helpers: the wheel ships the compiled extension but no Makefile; skip `make`.
    import megatron.core.datasets.utils as dataset_utils

    _patch(dataset_utils, "compile_helpers", _check_prebuilt_helpers)

    # pretrain() asserts CUDA unless initialize_megatron gets allow_no_cuda=True.
    import megatron.training.initialize as megatron_initialize
    import megatron.training.training as megatron_training

    original_initialize = megatron_initialize.initialize_megatron

    def initialize_megatron_on_cpu(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return original_initialize(*args, **kwargs)

    _patch(megatron_training, "initialize_megatron", initialize_megatron_on_cpu)

    _mode = _CudaToCpuMode()
    _mode.__enter__()


def deactivate() -> None:
    """Undo :func:`activate` (used by tests; a training process never needs it)."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    while _patches:
        owner, name, original = _patches.pop()
        setattr(owner, name, original)
    import megatron.core.jit as megatron_jit

    megatron_jit.enable_jit_fuser()


def _check_prebuilt_helpers() -> None:
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the installed wheel
        raise CpuModeError(
            "megatron-core's prebuilt dataset helpers (megatron.core.datasets.helpers_cpp) do not "
            f"import ({error}); reinstall megatron-core from its wheel."
        ) from error


def check_megatron_args(args: Any) -> None:
    """Refuse Megatron settings that cannot work in CPU mode, naming the fix."""
    problems: list[str] = []
    if args.distributed_backend != "gloo":
        problems.append(f"--distributed-backend {args.distributed_backend}: use gloo on CPU")
    if args.transformer_impl != "local":
        problems.append(f"--transformer-impl {args.transformer_impl}: use local on CPU")
    if getattr(args, "sequence_parallel", False):
        problems.append("--sequence-parallel needs TransformerEngine or apex norms (GPU only)")
    if getattr(args, "cuda_graph_impl", "none") != "none":
        problems.append("--cuda-graph-impl needs CUDA")
    if getattr(args, "tp_comm_overlap", False):
        problems.append("--tp-comm-overlap needs CUDA and TransformerEngine")
    if getattr(args, "gradient_accumulation_fusion", False):
        problems.append("gradient accumulation fusion needs CUDA: add --no-gradient-accumulation-fusion")
    if getattr(args, "overlap_grad_reduce", False) or getattr(args, "overlap_param_gather", False):
        problems.append("--overlap-grad-reduce / --overlap-param-gather need CUDA streams")
    if problems:
        raise CpuModeError("CPU mode cannot run this configuration:\n  - " + "\n  - ".join(problems))
