"""lorastream: merge LoRA fine-tuning results into full models in bounded memory."""

__version__ = "0.1.0"

from .api import AdapterResult, MergeResult, extract, inspect, merge, merge_each, plan, plan_each, save_lora, verify
from .errors import InputError, LorastreamError, ResourceError

__all__ = ["AdapterResult", "InputError", "LorastreamError", "MergeResult", "ResourceError", "__version__",
           "extract", "inspect", "merge", "merge_each", "plan", "plan_each", "save_lora", "verify"]
