"""Rebuild Qwen2's BPE tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) from llama.cpp's
vocab file models/ggml-vocab-qwen2.gguf, so tests have a real BPE tokenizer llama.cpp's converter recognises
without downloading one from a model hub.

    python tools/qwen2_tokenizer.py .../models/ggml-vocab-qwen2.gguf OUT_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf

# Qwen2's pre-tokenizer, normalizer and decoders (its published tokenizer.json).
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")
CONTROL, UNUSED = 3, 5


def main(vocab_file: Path, out: Path) -> None:
    reader = gguf.GGUFReader(vocab_file)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    template = reader.fields["tokenizer.chat_template"].contents()
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind == CONTROL]
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Isolated", "invert": False},
            {**level, "trim_offsets": True}]},
        "post_processor": level, "decoder": level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
                            if kind not in (CONTROL, UNUSED)},
                  "merges": [m.split(" ") for m in merges]},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"backend": "tokenizers", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "model_max_length": 32768, "tokenizer_class": "TokenizersBackend"}, indent=2))
    (out / "chat_template.jinja").write_text(template)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
