"""`llama-quantize`'s presets: which type each tensor gets, and in which order the tensors are written.

Followed from llama.cpp's src/llama-quant.cpp (`llama_tensor_get_type_impl`, `tensor_type_fallback`,
`tensor_allows_quantization`) and the model loader's tensor order (`weight_name_comparer`), for the presets
lorastream offers and the dense families it supports (no experts, no importance matrix). It is C++ inside
llama.cpp's library with no entry point that takes a plan, hence these few rules by hand; the tests compare
every choice with llama-quantize's own output.
"""

from __future__ import annotations

import dataclasses
import re

from ..codecs.gguf_quants import fits_blocks
from .gguf_layout import GGUFTensor

# Preset -> (llama_ftype name in gguf.LlamaFileType, the preset's default ggml type)
PRESETS: dict[str, tuple[str, str]] = {
    "q4_0": ("MOSTLY_Q4_0", "Q4_0"), "q4_1": ("MOSTLY_Q4_1", "Q4_1"), "q5_0": ("MOSTLY_Q5_0", "Q5_0"),
    "q5_1": ("MOSTLY_Q5_1", "Q5_1"), "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"), "q5_k_m": ("MOSTLY_Q5_K_M", "Q5_K"),
    "q6_k": ("MOSTLY_Q6_K", "Q6_K"),
}
# tensor_type_fallback: a row that is not a whole number of the type's blocks demotes to these.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}
_LAYER = re.compile(r"blk\.(\d+)\.")


def loader_order(tensors: list[GGUFTensor]) -> list[GGUFTensor]:
    """llama.cpp's model loader order (`weight_name_comparer`): tensors outside a block first, then block by
    block number; by name within each. llama-quantize writes its output in this order."""
    def key(tensor: GGUFTensor) -> tuple[int, str]:
        match = _LAYER.match(tensor.name)
        return (int(match.group(1)) if match else -1, tensor.name)
    return sorted(tensors, key=key)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fallback(qtype: str, row_elements: int) -> str:
    if fits_blocks(qtype, row_elements):
        return qtype
    demoted = _FALLBACK.get(qtype, qtype)
    return demoted if fits_blocks(demoted, row_elements) else "F16"


def preset_types(tensors: list[GGUFTensor], preset: str, n_layer: int) -> list[GGUFTensor]:
    """Every tensor with the type llama-quantize gives it under `preset`, in llama-quantize's order."""
    ftype, default = PRESETS[preset]
    ordered = loader_order(tensors)
    names = {t.name for t in ordered}
    tied = "output.weight" not in names
    n_attention_v = sum("attn_v.weight" in n or "attn_qkv.weight" in n for n in names)
    i_attention_v = i_ffn_down = 0
    chosen = []
    for tensor in ordered:
        name = tensor.name
        if tensor.qtype is not None:  # F32 already (1-D, norms, biases): llama-quantize keeps it
            chosen.append(tensor)
            continue
        qtype = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if not fits_blocks(qtype, tensor.shape[-1]):
                qtype = "Q8_0"
            elif qtype != "Q8_0":
                qtype = "Q6_K"
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name or "attn_qkv.weight" in name:  # llama.cpp's attention-v-like category
            if ftype in ("MOSTLY_Q4_K_M", "MOSTLY_Q5_K_M") and _use_more_bits(i_attention_v, n_attention_v):
                qtype = "Q6_K"
            i_attention_v += 1
        elif "ffn_down" in name:
            if ftype in ("MOSTLY_Q4_K_M", "MOSTLY_Q5_K_M") and _use_more_bits(i_ffn_down, n_layer):
                qtype = "Q6_K"
            i_ffn_down += 1
        chosen.append(dataclasses.replace(tensor, qtype=_fallback(qtype, tensor.shape[-1])))
    return chosen


def preset_file_type(preset: str) -> str:
    return PRESETS[preset][0]
