"""CPU mode unit tests: inactive unless requested, device redirection, the CUDA RNG stand-in."""

from __future__ import annotations

import types

import pytest
import torch

from mile_megatron.utils import cpu_mode


@pytest.fixture
def active_cpu_mode(monkeypatch):
    # The unit tests also run on GPU machines; real runs refuse CPU mode there.
    originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state)
    cpu_mode.activate(allow_cuda=True)
    try:
        yield
    finally:
        cpu_mode.deactivate()
        assert (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state) == originals


def test_inactive_unless_requested(monkeypatch):
    monkeypatch.delenv(cpu_mode.CPU_ENV_VAR, raising=False)
    assert not cpu_mode.cpu_mode_requested([])
    assert not cpu_mode.cpu_mode_requested(["--tensor-model-parallel-size", "2"])
    assert cpu_mode.cpu_mode_requested(["--cpu"])
    monkeypatch.setenv(cpu_mode.CPU_ENV_VAR, "1")
    assert cpu_mode.cpu_mode_requested([])
    monkeypatch.setenv(cpu_mode.CPU_ENV_VAR, "0")
    assert not cpu_mode.cpu_mode_requested([])
    # Importing the entry point changes nothing.
    import mile_megatron.engines.megatron.cli  # noqa: F401

    assert not cpu_mode.is_active()
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_refuses_on_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(cpu_mode.CpuModeError, match="CUDA is available"):
        cpu_mode.activate()
    assert not cpu_mode.is_active()


def test_device_redirection(active_cpu_mode):
    assert cpu_mode.is_active()
    created = [
        torch.zeros(3, device="cuda"),
        torch.ones(2, device=torch.device("cuda", 0)),
        torch.tensor([1.0, 2.0], device=torch.cuda.current_device()),
        torch.empty(4, device="cuda:0"),
        torch.arange(5, device="cuda"),
        torch.full((2,), 7.0, device="cuda"),
    ]
    assert all(t.device.type == "cpu" for t in created)
    x = torch.arange(4.0)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu" and x.to(device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.equal(x.to("cuda", dtype=torch.float64), x.double())
    module = torch.nn.Linear(2, 2).cuda(torch.cuda.current_device())
    assert module.weight.device.type == "cpu"
    # Megatron's optimizer and clipping compare against CUDA type names.
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert x.type("torch.cuda.HalfTensor").dtype == torch.float16
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = x * 2
    assert torch.equal(y, torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64).float())
    assert torch.cuda.device_count() == 1 and torch.cuda.memory_allocated() == 0


def test_cuda_rng_stand_in_leaves_default_generator_alone(active_cpu_mode):
    torch.manual_seed(5)
    expected = torch.rand(6)
    torch.manual_seed(5)
    torch.cuda.manual_seed(99)
    drawn_on_cuda = torch.rand(1000, device="cuda")  # e.g. Megatron's JIT warm-up
    torch.randn(10, device="cuda")
    assert torch.equal(torch.rand(6), expected)  # default CPU generator untouched
    # The stand-in behaves like a seeded CPU generator (independent reference).
    reference = torch.rand(1000, generator=torch.Generator().manual_seed(99))
    assert torch.equal(drawn_on_cuda, reference)
    state = torch.cuda.get_rng_state()
    first = torch.rand(3, device="cuda")
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), first)


def test_megatron_rng_tracker_uses_the_stand_in(active_cpu_mode):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(3)
    expected_default = torch.rand(4)
    torch.manual_seed(3)
    tracker.add("mile-test", 1234)
    with tracker.fork("mile-test"):
        inside = torch.rand(5, device="cuda")
    assert torch.equal(inside, torch.rand(5, generator=torch.Generator().manual_seed(1234)))
    assert torch.equal(torch.rand(4), expected_default)
    with tracker.fork("mile-test"):  # the forked state advanced
        again = torch.rand(5, device="cuda")
    reference = torch.Generator().manual_seed(1234)
    torch.rand(5, generator=reference)
    assert torch.equal(again, torch.rand(5, generator=reference))
    tracker.reset()


def test_cpu_flag_checks_name_the_problem():
    base = dict(distributed_backend="gloo", transformer_impl="local", sequence_parallel=False, fp16=False,
                num_experts=None, cuda_graph_impl="none", tp_comm_overlap=False,
                gradient_accumulation_fusion=False, overlap_grad_reduce=False, overlap_param_gather=False)
    cpu_mode.check_megatron_args(types.SimpleNamespace(**base))
    with pytest.raises(cpu_mode.CpuModeError, match="sequence-parallel"):
        cpu_mode.check_megatron_args(types.SimpleNamespace(**{**base, "sequence_parallel": True}))
    with pytest.raises(cpu_mode.CpuModeError, match="nccl: use gloo"):
        cpu_mode.check_megatron_args(types.SimpleNamespace(**{**base, "distributed_backend": "nccl"}))
