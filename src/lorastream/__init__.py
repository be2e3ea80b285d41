"""lorastream: merge LoRA fine-tuning results into full models in bounded memory."""

__version__ = "0.1.0"

from .api import MergeResult, inspect, merge, plan, verify
from .errors import InputError, LorastreamError, ResourceError

__all__ = ["InputError", "LorastreamError", "MergeResult", "ResourceError", "__version__", "inspect", "merge",
           "plan", "verify"]
