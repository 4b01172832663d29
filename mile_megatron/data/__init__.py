"""Pile preprocessing for mile-megatron: streaming, parallel, resumable, per-domain datasets.

Console scripts: ``mile-preprocess`` (:mod:`.preprocess`) and ``mile-train-tokenizer``
(:mod:`.train_tokenizer`). Test/demo corpora: :func:`.synthetic.write_pile_like_corpus`.
This package imports neither torch nor megatron at import time (workers stay light).
"""

from .domains import PILE_DOMAIN_WEIGHTS, PILE_DOMAINS, safe_domain_name

__all__ = ["PILE_DOMAINS", "PILE_DOMAIN_WEIGHTS", "safe_domain_name"]
