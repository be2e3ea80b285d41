"""The Hugging Face folder writer (`--format hf`): safetensors shards, then the index, the updated config, the
files that travel with a model (tokenizer, generation config), and the record of what produced it."""

from __future__ import annotations

import json
from typing import Any

from ..codecs import Encoding
from ..codecs.bnb4 import Bnb4Encoding
from ..dtypes import dtype_name
from ..engine import ShardSink
from ..formats.hf import SAFETENSORS_INDEX
from ..formats.safetensors import ShardWriter
from ..io.locations import Location, copy_file
from ..planner import Plan, Shard, skip_modules
from ..vocabulary import output_companions, updated_config
from .base import PROVENANCE_FILE, safetensors_metadata, write_provenance


def write_companions(plan: Plan, folder: Location, record: dict[str, Any]) -> None:
    """Index, config.json (dtype updated), tokenizer and other files of the base, and the provenance record."""
    if len(plan.shards) > 1:
        index = {"metadata": {"total_size": plan.total_size},
                 "weight_map": {spec.name: s.filename for s in plan.shards for t in s.tensors for spec in t.specs}}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = updated_config(plan.base.config, plan.vocab_size, plan.untie)
    config.pop("quantization_config", None)
    if plan.quantize is not None:
        config["quantization_config"] = quantization_config(plan.quantize, skip_modules(plan.base))
    if plan.dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = dtype_name(plan.dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in output_companions(plan.base.companion_files, plan.adapters):  # the adapter's tokenizer wins
        if path.name != PROVENANCE_FILE:
            copy_file(path, folder / path.name)
    write_provenance(folder, record)


def quantization_config(encoding: Encoding, skips: list[str]) -> dict[str, Any]:
    """The `BitsAndBytesConfig` transformers needs to load the output with no extra arguments."""
    four_bit = isinstance(encoding, Bnb4Encoding)
    config: dict[str, Any] = {
        "quant_method": "bitsandbytes", "load_in_4bit": four_bit, "load_in_8bit": not four_bit,
        "_load_in_4bit": four_bit, "_load_in_8bit": not four_bit, "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skips, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32",
    }
    if isinstance(encoding, Bnb4Encoding):
        config.update(bnb_4bit_quant_type=encoding.quant_type, bnb_4bit_use_double_quant=encoding.double_quant,
                      bnb_4bit_compute_dtype=dtype_name(encoding.compute_dtype))
    return config


class HFFolder:
    """`--format hf`: safetensors shards and the files of a Hugging Face model folder."""

    name = "hf"
    last = (SAFETENSORS_INDEX, "config.json")

    def open_shard(self, folder: Location, shard: Shard, record: dict[str, Any]) -> ShardSink:
        return ShardWriter(folder / shard.filename, shard.specs, safetensors_metadata(record))

    def finish(self, plan: Plan, folder: Location, record: dict[str, Any]) -> None:
        write_companions(plan, folder, record)
