"""The vocabulary and head as a merge changes them, and the model components a merge reports.

An adapter trained with added tokens carries its resized `embed_tokens` / `lm_head` (`modules_to_save`, or the
saved base layer under an embedding LoRA): the output's config.json must then give the new `vocab_size`, or
`from_pretrained` refuses the checkpoint, and the adapter folder's tokenizer files (its added tokens, its chat
template) replace the base's. A tied head that the merge writes apart from the embedding needs
`tie_word_embeddings: false`, or loading would tie it back to the embedding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .adapters.lora import Adapter
from .errors import InputError
from .formats.hf import HFModel
from .io.locations import Location, location

# The tensors with one row per token: input embeddings and output heads.
_VOCABULARY_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|shared|"
                                r"output|tok_embeddings)\.weight$")
# Files of a tokenizer (transformers' `save_pretrained` of a tokenizer or processor writes these).
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
})
# The tokenizer files that hold a vocabulary: an adapter folder with one of them holds a whole tokenizer.
_VOCABULARY_FILES = frozenset({"tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                               "spiece.model", "sentencepiece.bpe.model"})
# Components the merge summary counts changed tensors in (the first whose pattern matches a tensor's name).
_COMPONENTS = (
    ("experts", re.compile(r"(^|\.)(shared_)?experts\.")),
    ("projector", re.compile(r"(^|\.)(multi_modal_projector|mm_projector|connector|merger|projector)\.")),
    ("vision tower", re.compile(r"(^|\.)(vision_tower|visual|vision_model|vision_encoder|image_encoder|vit)\.")),
    ("audio tower", re.compile(r"(^|\.)(audio_tower|audio_encoder)\.")),
)


def component(name: str) -> str:
    """The part of the model a tensor belongs to: experts, vision tower, projector, audio tower or language model."""
    return next((label for label, pattern in _COMPONENTS if pattern.search(name)), "language model")


def _vocab_configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config objects that give the vocabulary size: the model's, and a vision-language model's text part."""
    found = [c for c in (config, config.get("text_config"), config.get("decoder")) if isinstance(c, dict)]
    return [c for c in found if isinstance(c.get("vocab_size"), int)]


def new_vocab_size(base: HFModel, replaced: Mapping[str, tuple[int, ...]]) -> int | None:
    """The vocabulary size the replaced embedding / head tensors give the output; None when it stays the base's.
    Refused when the vocabulary tensors would disagree (one resized, another not): transformers could not load it."""
    configs = _vocab_configs(base.config)
    if not configs:
        return None
    old = configs[0]["vocab_size"]
    vocabulary = {n: tuple(s.shape) for n, s in base.sources.items() if _VOCABULARY_TENSOR.search(n)}
    sizes = {name: shape[0] for name, shape in replaced.items() if name in vocabulary and len(shape) == 2
             and vocabulary[name][0] == old}
    new = {size for size in sizes.values() if size != old}
    if not new:
        return None
    if len(new) > 1:
        raise InputError(f"{base.path}: the adapter resizes the vocabulary to {sorted(new)} rows at once ({sizes})")
    size = new.pop()
    for name, shape in vocabulary.items():
        if shape[0] == old and sizes.get(name) != size:
            raise InputError(f"{base.path}: the adapter resizes the vocabulary to {size} tokens but leaves {name!r} "
                             f"with {old} rows; transformers could not load the result (save that tensor with the "
                             "adapter too: modules_to_save)")
    return size


def updated_config(config: dict[str, Any], vocab_size: int | None, untie: bool) -> dict[str, Any]:
    """config.json with the merged vocabulary size and, when the head is written apart, untied."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    if vocab_size is not None:
        for part in _vocab_configs(config):
            part["vocab_size"] = vocab_size
    if untie:
        config["tie_word_embeddings"] = False
        text = config.get("text_config")
        if isinstance(text, dict) and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = False
    return config


def output_companions(base_files: Sequence[Location], adapters: Sequence[tuple[Adapter, float]]) -> list[Location]:
    """The files an output carries beside its weights: the base's, with the tokenizer files saved with the
    adapters (the last adapter's, where several have one) in place of the base's of the same name. An adapter
    that saved a whole tokenizer (a vocabulary file, as `tokenizer.save_pretrained` writes after adding tokens)
    replaces the base's tokenizer files altogether: a stale file of the base's (a tokenizer.model without the
    added tokens, which llama.cpp's converter reads first) must not stay beside it."""
    files = {p.name: p for p in base_files}
    for adapter, _ in adapters:
        folder = location(adapter.source)
        own = {p.name: p for p in folder.iterdir() if p.name in TOKENIZER_FILES and p.is_file()}
        if own.keys() & _VOCABULARY_FILES:
            files = {name: p for name, p in files.items() if name not in TOKENIZER_FILES}
        files.update(own)
    return list(files.values())
