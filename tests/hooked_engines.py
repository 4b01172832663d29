"""Test-only launchers: mile-pretrain and mile-pretrain-ds with test hooks, injected through the engines' explicit
seams (mile_megatron.engines.megatron.ForwardHooks, mile_megatron.engines.deepspeed.trainer.StepObserver).
Product code reads none of these switches; the tests set them for one launch:

    TEST_NONFINITE_ITERATION=K  mile-pretrain: one logit of every training micro-batch of iteration K is NaN
    TEST_HOLD_ITERATION=K       mile-pretrain: after the first training micro-batch's loss of iteration K, the
                                process waits until it is killed
    TEST_DUMP_DIR=DIR           mile-pretrain: every rank holding logits saves its first training micro-batch to
                                DIR/rank{R}.pt once the backward pass has reached the logits (tokens, labels,
                                loss_mask, this rank's vocab-parallel logits, loss_sum (the numerator), num_tokens,
                                the 'alpha' and 'mile loss' report entries, logits_grad, TP / DP ranks and sizes)
    TEST_PARAMETERS_FILE=PATH   mile-pretrain: rank 0 writes the names of its model's parameters (one per line) at
                                its first loss
    TEST_DS_DUMP_DIR=DIR        mile-pretrain-ds: DIR/step1_rank{R}_micro{K}.pt for the micro-batches of the run's
                                first step (batch, logits, their gradient, the loss terms, N, dp size,
                                accumulation, the backward coefficient) and DIR/final_rank{R}.pt (logits of the
                                trained model on the dataset's first micro-batch)

    torchrun ... tests/hooked_engines.py megatron <mile-pretrain flags>
    torchrun ... tests/hooked_engines.py deepspeed <mile-pretrain-ds flags>
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOOK_VARIABLES = ("TEST_NONFINITE_ITERATION", "TEST_HOLD_ITERATION", "TEST_DUMP_DIR", "TEST_PARAMETERS_FILE",
                  "TEST_DS_DUMP_DIR")


def _training_iteration(model) -> int | None:
    from megatron.training import get_args

    return int(get_args().curr_iteration) + 1 if model.training else None


def megatron_hooks():
    import torch

    from mile_megatron.engines.megatron import ForwardHooks

    nonfinite = os.environ.get("TEST_NONFINITE_ITERATION")
    hold = os.environ.get("TEST_HOLD_ITERATION")
    dump_dir = os.environ.get("TEST_DUMP_DIR")
    parameters_file = os.environ.get("TEST_PARAMETERS_FILE")
    dumped = []

    def logits_hook(logits, model):
        if nonfinite and _training_iteration(model) == int(nonfinite):
            logits = logits.clone()
            logits[(0,) * logits.dim()] = float("nan")
        return logits

    def loss_func_hook(loss_func, batch, model):
        def wrapped(output_tensor):
            result = loss_func(output_tensor)
            iteration = _training_iteration(model)
            if parameters_file and not os.path.exists(parameters_file) and torch.distributed.get_rank() == 0:
                Path(parameters_file).write_text("\n".join(name for name, _ in model.named_parameters()) + "\n")
            if dump_dir and not dumped and iteration is not None:
                dumped.append(True)
                _dump_megatron(dump_dir, batch, output_tensor, result)
            if hold and iteration == int(hold):
                while True:
                    time.sleep(3600)
            return result
        return wrapped

    return ForwardHooks(logits=logits_hook, loss_func=loss_func_hook)


def _dump_megatron(directory, batch, output_tensor, result) -> None:
    import torch
    from megatron.core import parallel_state

    loss_sum, num_tokens, report = result
    record = {
        "tokens": batch["tokens"].detach().cpu(), "labels": batch["labels"].detach().cpu(),
        "loss_mask": batch["loss_mask"].detach().cpu(), "logits": output_tensor.detach().cpu().clone(),
        "loss_sum": loss_sum.detach().cpu().clone(), "num_tokens": num_tokens.detach().cpu(),
        "alpha": report["alpha"].detach().cpu(), "mile_loss": report["mile loss"].detach().cpu(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "dp_size": parallel_state.get_data_parallel_world_size(),
    }

    def save_gradient(grad):
        record["logits_grad"] = grad.detach().cpu().clone()
        os.makedirs(directory, exist_ok=True)
        torch.save(record, os.path.join(directory, f"rank{torch.distributed.get_rank()}.pt"))

    output_tensor.register_hook(save_gradient)


def deepspeed_observer():
    from mile_megatron.engines.deepspeed.trainer import StepObserver

    directory = os.environ.get("TEST_DS_DUMP_DIR")
    if not directory:
        return None

    class DumpObserver(StepObserver):
        def __init__(self) -> None:
            self.first_iteration = None

        def micro_batch(self, *, iteration, micro, batch, logits, terms, **extra):
            import torch
            import torch.distributed as dist

            if self.first_iteration is None:
                self.first_iteration = iteration
            if iteration != self.first_iteration:
                return None
            gradient = []
            logits.register_hook(lambda grad: gradient.append(grad.detach().clone()))

            def write():
                record = {key: value.detach().clone() for key, value in batch.items()}
                record.update(logits=logits.detach().clone(), logits_grad=gradient[0] if gradient else None,
                              **{field: value.detach().clone() for field, value in terms._asdict().items()},
                              **{key: value.detach().clone() if hasattr(value, "detach") else value
                                 for key, value in extra.items()})
                os.makedirs(directory, exist_ok=True)
                torch.save(record, os.path.join(directory, f"step1_rank{dist.get_rank()}_micro{micro}.pt"))

            return write

        def finished(self, *, engine, device, dataset, args):
            import torch
            import torch.distributed as dist

            from mile_megatron.hf import data

            fixed = next(data.micro_batches(dataset, consumed_samples=0, micro_batch_size=args.micro_batch_size))
            engine.eval()
            with torch.no_grad():
                tokens = fixed["tokens"].to(device)
                logits = engine(input_ids=tokens, position_ids=fixed["position_ids"].to(device), use_cache=False).logits
            engine.train()
            os.makedirs(directory, exist_ok=True)
            torch.save({"tokens": tokens.cpu(), "position_ids": fixed["position_ids"], "logits": logits.float().cpu()},
                       os.path.join(directory, f"final_rank{dist.get_rank()}.pt"))

    return DumpObserver()


if __name__ == "__main__":
    engine, argv = sys.argv[1], sys.argv[2:]
    if engine == "megatron":
        from mile_megatron.engines.megatron.cli import main

        main(argv, hooks=megatron_hooks())
    elif engine == "deepspeed":
        from mile_megatron.engines.deepspeed.cli import main

        main(argv, observer=deepspeed_observer())
    else:
        raise SystemExit(f"unknown engine {engine!r}: megatron or deepspeed")
