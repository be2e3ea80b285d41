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
# Qwen2's ChatML template (the vocab file's own adds a default system prompt).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONTROL, USER_DEFINED = 3, 4  # USER_DEFINED: the converter's [PADn] fillers up to vocab_size


def main(vocab_file: Path, out: Path) -> None:
    reader = gguf.GGUFReader(vocab_file)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind == CONTROL]
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    decoding = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Isolated", "invert": False},
            {**level, "trim_offsets": True}]},
        "post_processor": {**decoding, "trim_offsets": False}, "decoder": decoding,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
                            if kind not in (CONTROL, USER_DEFINED)},
                  "merges": [m.split(" ") for m in merges]},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"backend": "tokenizers", "eos_token": "<|im_end|>", "model_max_length": int(1e30),
         "pad_token": "<|endoftext|>", "tokenizer_class": "TokenizersBackend"}, indent=2))
    (out / "chat_template.jinja").write_text(CHATML)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
