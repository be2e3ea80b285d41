"""lorastream: merge LoRA fine-tuning results into full models in bounded memory."""

from .api import (
    AdapterResult,
    MergeResult,
    extract,
    inspect,
    merge,
    merge_each,
    merge_litgpt,
    plan,
    plan_each,
    plan_litgpt,
    save_lora,
    verify,
    verify_litgpt,
)
from .errors import InputError, LorastreamError, ResourceError
from .version import __version__

__all__ = ["AdapterResult", "InputError", "LorastreamError", "MergeResult", "ResourceError", "__version__",
           "extract", "inspect", "merge", "merge_each", "merge_litgpt", "plan", "plan_each", "plan_litgpt", "save_lora",
           "verify", "verify_litgpt"]
