"""Evaluation of converted Hugging Face LLaMA models (``mile-eval``).

* :mod:`.harness` — lm-evaluation-harness (``lm_eval.simple_evaluate``): MMLU 5-shot by default,
  the paper's task suites, explicit BOS handling, results JSON with versions and config hash.
* :mod:`.perplexity` — per-domain perplexity on Megatron indexed datasets (offline), uniform
  average over domains and worst domain.
* :mod:`.cli` — the ``mile-eval`` console script (``harness`` and ``perplexity`` subcommands).

Submodules import torch/transformers/lm_eval only when used.
"""

from .common import EvalError

__all__ = ["EvalError"]
