"""Test-only launcher: mile-preprocess with a hold injected through its observer seam (product code reads no
test switch). With TEST_HOLD_AFTER_SHARDS=N, once N shards are committed and a chunk of the next shard has been
written to its partial directory (or the run drained), it prints HOLD_MARKER on stdout and blocks until killed.

    python tests/hooked_preprocess.py run ...   (mile-preprocess's arguments)
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOLD_MARKER = "mile-preprocess: holding for test"


def hold_observer(after_shards: int):
    def observe(event: str, committed: int) -> None:
        if committed == after_shards and event in ("chunk", "drained"):
            print(HOLD_MARKER, flush=True)
            threading.Event().wait()

    return observe


if __name__ == "__main__":
    from mile_megatron.data.preprocess import main

    hold = int(os.environ.get("TEST_HOLD_AFTER_SHARDS", "0") or 0)
    sys.exit(main(sys.argv[1:], observer=hold_observer(hold) if hold else None))
