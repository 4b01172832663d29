"""The Pile's 22 domains, the MiLe paper's sampling weights, and filesystem-safe domain names.

Output prefixes are derived from the domain string found in each document
(``meta.pile_set_name`` by default) with :func:`safe_domain_name`:

* every run of characters outside ``[A-Za-z0-9._-]`` becomes one ``_``;
* leading/trailing ``_`` and ``.`` are stripped; the result is cut to 100 characters;
* an empty result becomes ``domain``.

The mapping is a pure function of the domain string, so it is stable across runs and machines:
``"Wikipedia (en)" -> "Wikipedia_en"``, ``"Gutenberg (PG-19)" -> "Gutenberg_PG-19"``,
``"DM Mathematics" -> "DM_Mathematics"``, ``"Pile-CC" -> "Pile-CC"``. Two different domain strings
that map to the same safe name are rejected (:class:`DomainNameCollision`).
"""

from __future__ import annotations

import re

# Raw weights from the paper's data mix (sum ~1.6998); normalise before use.
PILE_DOMAIN_WEIGHTS: dict[str, float] = {
    "ArXiv": 0.1997321993,
    "BookCorpus2": 0.0100424010,
    "Books3": 0.1640258878,
    "DM Mathematics": 0.0502120070,
    "Enron Emails": 0.0029569294,
    "EuroParl": 0.0156215131,
    "FreeLaw": 0.0895447433,
    "Github": 0.0962396786,
    "Gutenberg (PG-19)": 0.0481198393,
    "HackerNews": 0.0117161348,
    "NIH ExPorter": 0.0047422452,
    "OpenSubtitles": 0.0238507017,
    "OpenWebText2": 0.1735103726,
    "PhilPapers": 0.0072528454,
    "Pile-CC": 0.1550993025,
    "PubMed Abstracts": 0.0535594709,
    "PubMed Central": 0.2823030651,
    "StackExchange": 0.1026556566,
    "USPTO Backgrounds": 0.0585806742,
    "Ubuntu IRC": 0.0228743572,
    "Wikipedia (en)": 0.1121401414,
    "YoutubeSubtitles": 0.0150636015,
}
PILE_DOMAINS: tuple[str, ...] = tuple(PILE_DOMAIN_WEIGHTS)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 100


class DomainNameCollision(ValueError):
    """Two different domain strings map to the same filesystem-safe name."""


def safe_domain_name(domain: str) -> str:
    """Filesystem-safe, stable output name for a domain string (see module docstring)."""
    name = _UNSAFE.sub("_", domain).strip("_.")[:_MAX_NAME].strip("_.")
    return name or "domain"


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically ("2" < "10")."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


class SafeNameRegistry:
    """Remembers domain -> safe name and rejects two domains sharing one safe name."""

    def __init__(self) -> None:
        self._by_safe: dict[str, str] = {}

    def add(self, domain: str) -> str:
        safe = safe_domain_name(domain)
        other = self._by_safe.setdefault(safe, domain)
        if other != domain:
            raise DomainNameCollision(
                f"domains {other!r} and {domain!r} both map to the output name {safe!r}; "
                "rename one of them in the input (or preprocess them in separate output dirs)")
        return safe
