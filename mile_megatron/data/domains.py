"""The Pile's 22 domains, the MiLe paper's sampling weights, and filesystem-safe domain names.

Output prefixes (``datasets/<split>/<name>.bin|.idx``, blend files, validation set names) come
from the domain string found in each document (``meta.pile_set_name`` by default) through
:func:`safe_domain_name`, a pure, injective function of that string, so every shard, run and
machine names a domain alike and two different domains never share an output (nothing is
merged or overwritten, whichever shards they appear in):

* the Pile's 22 domains keep their historical names: every run of characters outside
  ``[A-Za-z0-9._-]`` becomes ``_``, leading/trailing ``_``/``.`` are dropped
  (``"Wikipedia (en)" -> "Wikipedia_en"``, ``"Gutenberg (PG-19)" -> "Gutenberg_PG-19"``,
  ``"DM Mathematics" -> "DM_Mathematics"``, ``"Pile-CC" -> "Pile-CC"``);
* any other domain that is already such a name (at most 100 characters of ``[A-Za-z0-9._-]``,
  not starting or ending with ``_``/``.``) is used as it is, unless it is one of those 22 output
  names or ends like a hashed name (``--`` + 12 hex digits);
* every other domain gets that sanitised name, cut to 86 characters, plus ``--`` and the first
  12 hex digits of the BLAKE2b hash of its UTF-8 bytes: ``"Foo Bar" -> "Foo_Bar--<hash>"``,
  while ``"Foo_Bar" -> "Foo_Bar"``.

The three groups cannot produce the same name, and hashed names differ unless two domains'
48-bit hashes collide; that (astronomically unlikely) case is still detected
(:class:`DomainNameCollision`) and fails the shard or the merge instead of losing data.
"""

from __future__ import annotations

import hashlib
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
_HASH_DIGITS = 12
_HASHED = re.compile(r"--[0-9a-f]{%d}$" % _HASH_DIGITS)


class DomainNameCollision(ValueError):
    """Two different domain strings map to the same output name (a 48-bit hash collision)."""


def sanitize_domain_name(domain: str, limit: int = _MAX_NAME) -> str:
    """Runs of characters outside ``[A-Za-z0-9._-]`` -> ``_``, edges stripped, at most ``limit``."""
    name = _UNSAFE.sub("_", domain).strip("_.")[:limit].strip("_.")
    return name or "domain"


_PILE_NAMES: dict[str, str] = {domain: sanitize_domain_name(domain) for domain in PILE_DOMAINS}
_RESERVED = frozenset(_PILE_NAMES.values())


def safe_domain_name(domain: str) -> str:
    """Filesystem-safe, stable, injective output name of a domain string (module docstring)."""
    name = _PILE_NAMES.get(domain)
    if name is not None:
        return name
    if (sanitize_domain_name(domain) == domain and domain not in _RESERVED
            and not _HASHED.search(domain)):
        return domain
    digest = hashlib.blake2b(domain.encode("utf-8", "surrogatepass"),
                             digest_size=_HASH_DIGITS // 2).hexdigest()
    return f"{sanitize_domain_name(domain, _MAX_NAME - 2 - _HASH_DIGITS)}--{digest}"


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically ("2" < "10")."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


class SafeNameRegistry:
    """Remembers domain -> output name and rejects two domains sharing one (hash collision)."""

    def __init__(self) -> None:
        self._by_safe: dict[str, str] = {}

    def add(self, domain: str) -> str:
        safe = safe_domain_name(domain)
        other = self._by_safe.setdefault(safe, domain)
        if other != domain:
            raise DomainNameCollision(
                f"domains {other!r} and {domain!r} both map to the output name {safe!r} (a hash "
                "collision); rename one of them in the input (or preprocess them in separate "
                "output dirs)")
        return safe
