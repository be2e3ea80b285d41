"""Where lorastream keeps what it can always recompute: llama.cpp's build, transformers' checkpoint layouts.

`LORASTREAM_CACHE`, else `~/.cache/lorastream`. Deleting it costs time, never correctness.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LORASTREAM_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorastream")
