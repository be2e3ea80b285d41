"""Third-party chatter silenced while a lorastream command runs, so its output is lorastream's own.

Libraries lorastream calls announce things meant for their own users: transformers' "Loading weights" bars
and FutureWarnings (the demo's comparison with PEFT), bitsandbytes' kernel-loading error line (when PEFT
imports it on a machine without its native library), Ray's start-up logging. The command line enters
`third_party_quiet()` for the duration of a command; the library itself (`import lorastream`) changes
nothing, so a program using it keeps its own warning and logging settings.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Loggers whose messages below CRITICAL are not lorastream's business to show.
THIRD_PARTY_LOGGERS = ("bitsandbytes", "transformers", "peft", "huggingface_hub", "accelerate", "torch")


@contextmanager
def third_party_quiet() -> Iterator[None]:
    """Warnings from code outside lorastream, third-party logging below CRITICAL and the Hugging Face
    progress bars are off inside; everything is as it was afterwards."""
    from huggingface_hub import utils as hub_utils

    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    hub_bars = not hub_utils.are_progress_bars_disabled()
    transformers_bars = _transformers_bars(None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(?!lorastream)")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        hub_utils.disable_progress_bars()  # transformers, when imported inside, takes its setting from here
        _transformers_bars(False)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            if hub_bars:
                hub_utils.enable_progress_bars()
            _transformers_bars(transformers_bars if transformers_bars is not None else hub_bars)


def _transformers_bars(enable: bool | None) -> bool | None:
    """Whether transformers (if imported) shows its progress bars; with `enable`, set that first."""
    module = sys.modules.get("transformers.utils.logging")
    if module is None:
        return None
    if enable is not None:
        module.enable_progress_bar() if enable else module.disable_progress_bar()
    return bool(module.is_progress_bar_enabled())
