"""mile_megatron.hf.loss against the float64 reference (mile_megatron.loss.reference): transformers' label shift,
ignore_index, loss_mask, num_items_in_batch, every loss kind and alpha mode, both transformers hooks on a real
LlamaForCausalLM / Trainer, alpha over a data-parallel group, and the refusal to use Megatron's groups.
"""

from __future__ import annotations

import pytest
import torch

from distributed import DistributedPool
from mile_megatron.loss import reference as ref
from mile_megatron.hf.loss import IGNORE_INDEX, MileCausalLMLoss, causal_lm_loss, use_mile_loss

RTOL = 1e-5  # fp32 logits against float64


def _batch(seed: int, batch: int = 3, seq: int = 9, vocab: int = 17, dtype=torch.float32, ignored: float = 0.25):
    """Random logits (scaled so weights vary), input ids with some positions -100 (transformers' labels)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(batch, seq, vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignored] = IGNORE_INDEX
    return logits, labels


def _reference(logits, labels, *, kind, alpha, gamma=1.0, sigma=1.0, loss_mask=None, dp_batches=None):
    """Reference on the shifted batch: logits[:, :-1] scored against labels[:, 1:], -100 masked."""
    def shifted(z, y, m):
        target = y[:, 1:]
        mask = (target != IGNORE_INDEX).double()
        if m is not None:
            mask = mask * m[:, 1:].double()
        return ref.RefBatch(z[:, :-1], torch.where(target == IGNORE_INDEX, 0, target), mask)

    batches = [shifted(logits, labels, loss_mask)] + [shifted(z, y, None) for z, y in (dp_batches or [])]
    return ref.mile_loss_reference(batches, kind=kind, gamma=gamma, sigma=sigma, alpha=alpha)[0]


def _full_grad(reference_grad: torch.Tensor) -> torch.Tensor:
    """The reference gradient over the shifted logits, with the last position (predicts nothing) zero."""
    return torch.nn.functional.pad(reference_grad, (0, 0, 0, 1))


def _close(actual: float | torch.Tensor, expected: float, what: str) -> None:
    actual = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    assert abs(actual - expected) <= RTOL * max(abs(expected), 1.0), f"{what}: {actual} vs {expected}"


def _grad_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    assert scale > 0, what
    error = float((actual.double() - expected).abs().max())
    assert error <= RTOL * scale, f"{what}: max |grad error| {error:.3e} vs max |grad| {scale:.3e}"
    assert torch.equal(actual[:, -1] == 0, torch.ones_like(actual[:, -1], dtype=torch.bool)), "last position"


@pytest.mark.parametrize("kind", ["mile", "focal", "ce"])
@pytest.mark.parametrize("alpha", ["global", "official", "none"])
def test_shifted_loss_stats_and_gradient_match_reference(kind, alpha):
    logits, labels = _batch(seed=10 * ["mile", "focal", "ce"].index(kind) + ["global", "official", "none"].index(alpha))
    logits.requires_grad_(True)
    gamma, sigma = (2.0, 0.5) if kind != "ce" else (1.0, 1.0)
    stats = causal_lm_loss(logits, labels, kind=kind, gamma=gamma, sigma=sigma, alpha=alpha)
    expected = _reference(logits.detach(), labels, kind=kind, alpha=alpha, gamma=gamma, sigma=sigma)
    for name in ("loss", "loss_sum", "ce_sum", "entropy_sum", "alpha"):
        _close(getattr(stats, name), getattr(expected, name), name)
    assert float(stats.num_tokens) == expected.num_tokens == float((labels[:, 1:] != IGNORE_INDEX).sum())
    stats.loss.backward()
    _grad_close(logits.grad, _full_grad(expected.grad), "d loss / d logits")


def test_num_items_in_batch_divides_the_weighted_sum():
    """transformers' gradient accumulation: loss = loss_sum / num_items_in_batch (int or tensor)."""
    logits, labels = _batch(seed=3)
    expected = _reference(logits, labels, kind="mile", alpha="global")
    for count in (40, torch.tensor(40)):
        z = logits.clone().requires_grad_(True)
        stats = causal_lm_loss(z, labels, num_items_in_batch=count)
        _close(stats.loss, expected.loss_sum / 40, "loss")
        _close(stats.num_tokens, expected.num_tokens, "num_tokens")
        stats.loss.backward()
        _grad_close(z.grad, _full_grad(expected.loss_sum_grad / 40), "gradient")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        causal_lm_loss(logits, labels, num_items_in_batch=-1)


def test_loss_mask_and_pre_shifted_labels():
    """loss_mask zeroes tokens on top of -100; shift=False / shift_labels score logits[t] against labels[t]."""
    logits, labels = _batch(seed=4)
    gen = torch.Generator().manual_seed(5)
    loss_mask = (torch.rand(labels.shape, generator=gen) < 0.7).float()
    expected = _reference(logits, labels, kind="mile", alpha="global", loss_mask=loss_mask)
    stats = causal_lm_loss(logits, labels, loss_mask=loss_mask)
    _close(stats.loss, expected.loss, "loss with loss_mask")

    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    plain = _reference(logits, labels, kind="focal", alpha="official")
    pre_shifted = causal_lm_loss(logits[:, :-1], shifted[:, :-1], kind="focal", alpha="official", shift=False)
    _close(pre_shifted.loss, plain.loss, "shift=False")
    hook = MileCausalLMLoss(kind="focal", alpha="none")
    none = _reference(logits, labels, kind="focal", alpha="none")
    _close(hook(logits=logits, labels=None, vocab_size=17, shift_labels=shifted), none.loss, "shift_labels")
    _close(hook.last_stats.ce_sum, none.ce_sum, "last_stats")


def test_use_mile_loss_on_a_real_llama_model_and_trainer_hook(tmp_path):
    """LlamaForCausalLM(labels=...) returns our loss; Trainer(compute_loss_func=...) computes the same."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, initializer_range=0.2)
    model = LlamaForCausalLM(config).float()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # e.g. a prompt
    logits = model(input_ids=ids).logits.detach()
    expected = _reference(logits, labels, kind="mile", alpha="global", gamma=1.5, sigma=0.5)

    hook = use_mile_loss(model, kind="mile", gamma=1.5, sigma=0.5)
    assert model.loss_function is hook
    out = model(input_ids=ids, labels=labels)
    _close(out.loss, expected.loss, "model(labels=...).loss")
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(30))
    _close(out.loss, expected.loss_sum / 30, "model(num_items_in_batch=...)")

    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=arguments, compute_loss_func=MileCausalLMLoss("mile", 1.5, 0.5))
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels}, num_items_in_batch=torch.tensor(30))
    _close(loss, expected.loss_sum / 30, "Trainer compute_loss_func")


def test_package_exports():
    import mile_megatron.hf as hf
    from mile_megatron.hf import data, models

    assert (hf.causal_lm_loss, hf.MileCausalLMLoss, hf.use_mile_loss) == (causal_lm_loss, MileCausalLMLoss,
                                                                          use_mile_loss)
    assert (hf.llama_config, hf.build_model) == (models.llama_config, models.build_model)
    assert (hf.build_tokenizer, hf.build_datasets, hf.pretraining_loader) == (
        data.build_tokenizer, data.build_datasets, data.pretraining_loader)
    with pytest.raises(AttributeError, match="no attribute"):
        hf.missing  # noqa: B018


def test_bad_inputs_are_refused_with_the_problem_named():
    logits, labels = _batch(seed=6)
    with pytest.raises(ValueError, match="unknown loss kind"):
        causal_lm_loss(logits, labels, kind="dice")
    with pytest.raises(ValueError, match="unknown alpha mode"):
        MileCausalLMLoss(alpha="local")
    with pytest.raises(ValueError, match="labels shape"):
        causal_lm_loss(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="vocab_size is 16"):
        MileCausalLMLoss()(logits, labels, 16)
    with pytest.raises(TypeError, match="loss_function"):
        use_mile_loss(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------------------
# Two processes: alpha over a data-parallel group; Megatron's groups are never used.
def _worker_dp_alpha(ctx, alpha: str) -> dict:
    group = ctx.layout(1, 2).dp_group
    batches = [_batch(seed=20 + rank) for rank in range(2)]
    logits, labels = batches[ctx.rank]
    logits = logits.clone().requires_grad_(True)
    stats = causal_lm_loss(logits, labels, alpha=alpha, dp_group=group)
    stats.loss.backward()
    other = batches[1 - ctx.rank]
    expected = _reference(*batches[ctx.rank], kind="mile", alpha=alpha, dp_batches=[other])
    _close(stats.alpha, expected.alpha, "alpha")
    _close(stats.loss, expected.loss, "loss")
    _grad_close(logits.grad, _full_grad(expected.grad), "gradient")
    return {"alpha": float(stats.alpha)}


def _worker_megatron_groups(ctx) -> dict:
    """Megatron initialised with TP = 2 (and then DP = 2): the loss still sees one process's full logits."""
    from megatron.core import parallel_state

    logits, labels = _batch(seed=30 + ctx.rank)
    local = causal_lm_loss(logits, labels)
    results = {}
    for tp in (2, 1):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        try:
            stats = causal_lm_loss(logits, labels)
        finally:
            parallel_state.destroy_model_parallel()
        results[tp] = all(torch.equal(a, b) for a, b in zip(stats, local))
    return results


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, layouts=[(1, 1), (1, 2)]) as world:
        yield world


@pytest.mark.parametrize("alpha", ["global", "official"])
def test_alpha_over_a_data_parallel_group(pool, alpha):
    results = pool.run(_worker_dp_alpha, alpha)
    assert results[0]["alpha"] == pytest.approx(results[1]["alpha"], rel=1e-6)  # one alpha for the group


def test_megatron_parallel_state_is_never_used(pool):
    assert pool.run(_worker_megatron_groups) == [{2: True, 1: True}] * 2
