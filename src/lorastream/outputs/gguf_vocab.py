"""The tokenizer of a GGUF, as `convert_hf_to_gguf.py` writes it: SentencePiece vocabularies (tokens, scores,
token types), Llama tokenizer.json vocabularies (gguf-py's `LlamaHfVocab`), BPE vocabularies (tokens, token
types, the pre-tokenizer llama.cpp recognises by hash, merges), then special token ids, add_bos/eos flags and
the chat template through gguf-py's `SpecialVocab`.

The token lists follow the converter's `_create_vocab_sentencepiece` and `get_vocab_base` line by line (the
converter is a script, not a library); the BPE tokenizer is read with `tokenizers`, which transformers'
AutoTokenizer wraps, so no model code is imported.
"""

from __future__ import annotations

import json
from hashlib import sha256
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..codecs.gguf_quants import GGUF_EXTRA, gguf_module
from ..errors import InputError

# SentencePiece's token types, as the converter numbers them (gguf.TokenType has the same values).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _looks_special(token: str) -> bool:
    """The converter's `does_token_look_special`."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))  # deepseek-coder's full-width bars
            or (token.startswith("<unused") and token.endswith(">")))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def sentencepiece_vocab(folder: Path, vocab_size: int | None,
                        phi3: bool = False) -> tuple[list[bytes], list[float], list[int]]:
    """The converter's `_create_vocab_sentencepiece`: tokenizer.model, added_tokens.json, added_tokens_decoder;
    with `phi3`, its Phi-3 variant (`Phi3MiniModel.set_vocab`: special flags only, tokenizer.json's added
    tokens too)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise InputError(f"{folder / 'tokenizer.model'}: reading a SentencePiece tokenizer needs sentencepiece: "
                         f"{GGUF_EXTRA}") from None
    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(folder / "tokenizer.model"))
    size = vocab_size or processor.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [-10000.0] * size
    types = [UNUSED] * size
    for token_id in range(min(processor.vocab_size(), size)):
        kind = NORMAL
        if processor.IsUnknown(token_id):
            kind = UNKNOWN
        elif processor.IsControl(token_id):
            kind = CONTROL
        elif processor.IsUnused(token_id):
            kind = UNUSED
        elif processor.IsByte(token_id):
            kind = BYTE
        tokens[token_id] = processor.IdToPiece(token_id).encode()
        scores[token_id] = processor.GetScore(token_id)
        types[token_id] = kind
    for text, token_id in _read_json(folder / "added_tokens.json").items():
        if token_id < size:
            tokens[token_id], scores[token_id], types[token_id] = text.encode(), -1000.0, USER_DEFINED
    decoder = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
    if phi3:
        added = [(int(k), d) for k, d in decoder.items()]
        added += [(int(d["id"]), d) for d in _read_json(folder / "tokenizer.json").get("added_tokens", [])]
        for token_id, data in added:
            tokens[token_id], scores[token_id] = data["content"].encode(), -1000.0
            types[token_id] = CONTROL if data.get("special") else USER_DEFINED
        return tokens, scores, types
    for key, data in decoder.items():
        token_id, text = int(key), data["content"]
        if token_id >= size:
            continue
        if data.get("special") or _looks_special(text):
            types[token_id] = CONTROL
        else:
            text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces
            types[token_id] = USER_DEFINED
        scores[token_id], tokens[token_id] = -1000.0, text.encode()
    return tokens, scores, types


def _pre_tokenizer(tokenizer: Any, where: Path) -> str:
    """The converter's `get_vocab_base_pre`: the name llama.cpp gives the pre-tokenizer, found by the hash of
    a fixed text's token ids (the table in gguf_pretokenizers.json is generated from the converter)."""
    table = json.loads(files(__package__).joinpath("gguf_pretokenizers.json").read_text(encoding="utf-8"))
    digest = sha256(str(tokenizer.encode(table["check_text"]).ids).encode()).hexdigest()
    if digest not in table["pre_tokenizers"]:
        raise InputError(f"{where}: llama.cpp does not recognise this BPE tokenizer's pre-tokenizer (hash {digest}); "
                         "its converter refuses it too")
    return str(table["pre_tokenizers"][digest])


def bpe_vocab(folder: Path, vocab_size: int | None) -> tuple[list[str], list[int], str]:
    """The converter's `get_vocab_base`: tokens by id ([PADn] for holes), token types, pre-tokenizer name."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError(f"{folder / 'tokenizer.json'}: reading a BPE tokenizer needs tokenizers: "
                         f"{GGUF_EXTRA}") from None
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{folder}: no tokenizer.model or tokenizer.json; a GGUF needs the model's tokenizer")
    tokenizer = Tokenizer.from_file(str(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = vocab_size or len(vocab)
    if max(vocab.values()) >= size:
        raise InputError(f"{path}: token id {max(vocab.values())} is beyond vocab_size {size} of config.json")
    pre = _pre_tokenizer(tokenizer, path)
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids,
                                         skip_special_tokens=False)
            if added[i].special or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types, pre


def _add_sentencepiece(writer: Any, folder: Path, vocab_size: int | None, phi3: bool = False) -> None:
    gguf = gguf_module()
    tokens, scores, types = sentencepiece_vocab(folder, vocab_size, phi3)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _add_llama_hf(writer: Any, folder: Path) -> None:
    gguf = gguf_module()
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _add_bpe(writer: Any, folder: Path, vocab_size: int | None) -> None:
    gguf = gguf_module()
    tokens, types, pre = bpe_vocab(folder, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)


def add_vocab(writer: Any, folder: Path, kind: str, vocab_size: int | None, where: object) -> None:
    """Write the tokenizer keys for a family's `kind` of vocabulary (see `gguf_layout.Family`), read from `folder`
    (the files of `where`). A tokenizer the readers cannot take (a placeholder tokenizer.json, a damaged
    tokenizer.model) is refused in one line: the readers are other libraries, each failing its own way."""
    try:
        _add_vocab(writer, folder, kind, vocab_size)
    except InputError:
        raise
    except Exception as exc:
        files = sorted(p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges")))
        raise InputError(f"{where}: its tokenizer ({', '.join(files) or 'no tokenizer files'}) cannot be read "
                         f"({type(exc).__name__}: {exc}); a GGUF needs the model's own tokenizer files") from None


def _add_vocab(writer: Any, folder: Path, kind: str, vocab_size: int | None) -> None:
    sentencepiece = (folder / "tokenizer.model").is_file()
    if kind == "llama":
        config = _read_json(folder / "tokenizer_config.json")
        if (prefix := config.get("add_prefix_space")) is not None:
            writer.add_add_space_prefix(prefix)
        if sentencepiece:
            _add_sentencepiece(writer, folder, vocab_size)
            return
        try:
            _add_llama_hf(writer, folder)
        except (FileNotFoundError, TypeError):
            _add_bpe(writer, folder, vocab_size)
    elif kind == "gemma2" or (kind == "gemma" and sentencepiece):
        _add_sentencepiece(writer, folder, vocab_size)
        writer.add_add_space_prefix(False)
    elif kind == "phi3":
        if _read_json(folder / "tokenizer_config.json").get("tokenizer_class") == "GPT2Tokenizer":
            _add_bpe(writer, folder, vocab_size)
        else:
            _add_sentencepiece(writer, folder, vocab_size, phi3=True)
    elif sentencepiece and kind == "sentencepiece_or_bpe":
        _add_sentencepiece(writer, folder, vocab_size)
    else:
        _add_bpe(writer, folder, vocab_size)
