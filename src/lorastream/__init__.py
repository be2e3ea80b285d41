"""lorastream: merge LoRA fine-tuning results into full models in bounded memory."""

__version__ = "0.1.0"

from .api import MergeResult, inspect, merge, plan  # noqa: E402
from .errors import InputError, LorastreamError, ResourceError  # noqa: E402

__all__ = ["InputError", "LorastreamError", "MergeResult", "ResourceError", "__version__", "inspect", "merge",
           "plan"]
