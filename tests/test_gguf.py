"""`--format gguf` against llama.cpp itself: the converter (`convert_hf_to_gguf.py`) on PEFT's merged folder for
dense types and q8_0, `llama-quantize` on the converter's file for the other presets; byte for byte, per family.

The llama.cpp reference (the llama-cpp-python sdist's vendor/llama.cpp, built with cmake) is made by
`make llama-cpp` into LORASTREAM_CACHE (default ~/.cache/lorastream); `make test` depends on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_case, peft_reference, tiny_gpt2, tiny_llama

import lorastream
from lorastream.errors import InputError

LLAMA_CPP = Path(os.environ.get("LORASTREAM_CACHE") or Path.home() / ".cache" / "lorastream") / "llama.cpp"
CONVERTER = LLAMA_CPP / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
QUANTIZE = LLAMA_CPP / "build" / "bin" / "llama-quantize"
QWEN2_TOKENIZER = LLAMA_CPP / "qwen2-tokenizer"
# Keys that name where a file came from, not what it holds.
PROVENANCE = ("general.name", "general.size_label", "general.basename", "general.finetune", "general.base_model")
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])


def test_llama_cpp_reference_is_built() -> None:
    assert CONVERTER.is_file() and QUANTIZE.is_file(), "run `make llama-cpp` (tools/llama_cpp.sh) first"


@dataclass(frozen=True)
class Family:
    base: Path
    adapter: Path
    merged: Path  # PEFT's merge_and_unload, saved with the base's tokenizer files: the converter's input
    work: Path

    def reference(self, qtype: str) -> Path:
        """llama.cpp's own file for `qtype`: the converter's for f32/f16/bf16/q8_0, llama-quantize's (from the
        converter's bf16 file) for the other presets; each made once per session."""
        out = self.work / f"reference-{qtype}.gguf"
        if out.exists():
            return out
        if qtype in ("f32", "f16", "bf16", "q8_0"):
            subprocess.run([sys.executable, str(CONVERTER), str(self.merged), "--outfile", str(out), "--outtype",
                            qtype], check=True, capture_output=True)
        else:
            env = {**os.environ, "LD_LIBRARY_PATH": str(QUANTIZE.parent)}
            subprocess.run([str(QUANTIZE), str(self.reference("bf16")), str(out), qtype.upper(), "1"], check=True,
                           capture_output=True, env=env)
        return out


def _family(root: Path, name: str) -> Family:
    """Build family `name` in a subprocess (`build_family`), so the test process keeps the small RSS the other
    test modules' in-process budgets assume."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_gguf; "
            f"test_gguf.build_family({str(root)!r}, {name!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return Family(root / "base", root / "adapter", root / "merged", root)


# Tokens a fine-tune adds: plain ones (one with a space) and special ones.
ADDED_TOKENS = ["<tool>", "</tool>", "hello world"]
ADDED_SPECIAL = ["<|im_start|>", "<|im_end|>"]


def build_family(root: str, name: str) -> None:
    """A tiny model of family `name` with a real tokenizer, a PEFT adapter for it, and PEFT's merged folder.

    `<family>_added`: the fine-tune added tokens, saved its tokenizer with the adapter (as `save_pretrained`
    writes it), and trained the new rows: Llama resized its vocabulary and trained the embedding and head
    whole (`modules_to_save`); Qwen2 has room in its vocabulary and trained the new rows only
    (`trainable_token_indices`). The merged folder holds the adapter's tokenizer, as a user saves it there."""
    from transformers import AutoTokenizer

    model, tokenizer = _model(name.removesuffix("_added"))
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if name.startswith("phi3") else LORA["target_modules"]
    lora: dict[str, object] = {**LORA, "target_modules": targets}
    prepare, added = None, None
    if name.endswith("_added"):
        (Path(root) / "tokenizer").mkdir(parents=True)
        for filename, data in tokenizer.items():
            (Path(root) / "tokenizer" / filename).write_bytes(data)
        added = AutoTokenizer.from_pretrained(Path(root) / "tokenizer")
        old = len(added)
        added.add_tokens(ADDED_TOKENS)
        added.add_special_tokens({"additional_special_tokens": ADDED_SPECIAL})
        if name == "llama_added":
            prepare = lambda m: m.resize_token_embeddings(len(added))  # noqa: E731
            lora["modules_to_save"] = ["embed_tokens", "lm_head"]
        else:
            lora["trainable_token_indices"] = list(range(old, len(added)))
    case = build_case(Path(root), model, torch.bfloat16, prepare=prepare, **lora)
    for filename, data in tokenizer.items():
        (case.base / filename).write_bytes(data)
    merged, _ = peft_reference(case, prepare=prepare)
    merged.save_pretrained(Path(root) / "merged")
    if added is not None:
        added.save_pretrained(case.adapter)
        added.save_pretrained(Path(root) / "merged")
        return
    for filename in tokenizer:
        shutil.copy(case.base / filename, Path(root) / "merged" / filename)


def sentencepiece_tokenizer() -> dict[str, bytes]:
    """A small SentencePiece model trained here, with a Llama tokenizer_config and a chat template."""
    import sentencepiece

    model = io.BytesIO()
    lines = [f"The quick brown fox {i} jumps over the lazy dog {i * 7}. Merging adapters, streaming rows."
             for i in range(200)]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=300,
                                             model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                             pad_id=-1, minloglevel=2)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
              "add_eos_token": False,
              "chat_template": "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"}
    return {"tokenizer.model": model.getvalue(), "tokenizer_config.json": json.dumps(config).encode()}


_BUILT: dict[str, Family] = {}


def built(name: str, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Family `name`, built once per session."""
    if name not in _BUILT:
        _BUILT[name] = _family(tmp_path_factory.mktemp(f"gguf-{name}"), name)
    return _BUILT[name]


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Llama with 256-wide rows (whole k-quant blocks), grouped-query attention (q/k permuted differently)."""
    return built("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Qwen2 with the real Qwen2 BPE tokenizer (rebuilt from llama.cpp's vocab file), q/k/v biases, tied
    embeddings (so llama-quantize treats token_embd as the output)."""
    return built("qwen2", tmp_path_factory)


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def _skip_value(data: bytes, at: int, kind: int) -> int:
    """The offset just past a GGUF value of type `kind` starting at `at`."""
    if kind == _STRING:
        return at + 8 + int.from_bytes(data[at:at + 8], "little")
    if kind == _ARRAY:
        item, count = int.from_bytes(data[at:at + 4], "little"), int.from_bytes(data[at + 4:at + 12], "little")
        at += 12
        if item in _SCALARS:
            return at + count * _SCALARS[item]
        for _ in range(count):
            at = _skip_value(data, at, item)
        return at
    return at + _SCALARS[kind]


def sections(path: Path) -> tuple[list[tuple[str, bytes]], bytes, str]:
    """A GGUF cut into its raw bytes: each key-value pair (by key), the tensor infos, and the SHA-256 of the tensor
    data (from the aligned start of the data section; a digest, so a session's references stay small in
    memory). gguf-py's reader takes seconds on a 150k-token vocabulary; this walk, which only skips over
    values, does not."""
    data = path.read_bytes()
    assert data[:4] == b"GGUF"
    n_tensors, n_kv = int.from_bytes(data[8:16], "little"), int.from_bytes(data[16:24], "little")
    at, pairs = 24, []
    for _ in range(n_kv):
        start = at
        key_end = at + 8 + int.from_bytes(data[at:at + 8], "little")
        key = data[at + 8:key_end].decode()
        at = _skip_value(data, key_end + 4, int.from_bytes(data[key_end:key_end + 4], "little"))
        pairs.append((key, data[start:at]))
    infos = at
    for _ in range(n_tensors):
        at += 8 + int.from_bytes(data[at:at + 8], "little")
        at += 4 + 8 * int.from_bytes(data[at:at + 4], "little") + 4 + 8
    start = at + (-at % 32)
    assert data[at:start] == bytes(start - at)
    return ([(k, v) for k, v in pairs if not k.startswith(PROVENANCE)], data[infos:at],
            hashlib.sha256(memoryview(data)[start:]).hexdigest())


def assert_same_gguf(ours: Path, reference: Path) -> None:
    """Byte for byte, but for provenance keys (general.name...): every other key-value pair in the same order,
    the same tensor infos (names, shapes, types, offsets) and the same tensor data."""
    our_pairs, our_infos, our_data = sections(ours)
    ref_pairs, ref_infos, ref_data = _reference_sections(reference)
    assert [k for k, _ in our_pairs] == [k for k, _ in ref_pairs]
    for (key, value), (_, expected) in zip(our_pairs, ref_pairs, strict=True):
        assert value == expected, key
    assert our_infos == ref_infos, "tensor infos differ"
    if our_data != ref_data:
        tensors = {t.name: t for t in gguf.GGUFReader(reference).tensors}
        for tensor in gguf.GGUFReader(ours).tensors:
            assert tensor.data.tobytes() == tensors[tensor.name].data.tobytes(), f"{tensor.name}: bytes differ"
        raise AssertionError("tensor data differs")


_REFERENCES: dict[Path, tuple[list[tuple[str, bytes]], bytes, str]] = {}


def _reference_sections(path: Path) -> tuple[list[tuple[str, bytes]], bytes, str]:
    if path not in _REFERENCES:
        _REFERENCES[path] = sections(path)
    return _REFERENCES[path]


def merge(family: Family, out: Path, **options: object) -> lorastream.pipeline.MergeResult:
    return lorastream.merge(family.base, family.adapter, out, format="gguf", **options)


@pytest.mark.parametrize("qtype", ["bf16", "f16", "q8_0", "q4_0", "q4_k_m", "q6_k"])
def test_llama_equals_llama_cpp(llama: Family, tmp_path: Path, qtype: str) -> None:
    options = {"dtype": "float16"} if qtype == "f16" else {} if qtype == "bf16" else {"quantize": qtype}
    out = tmp_path / "model.gguf"
    merge(llama, out, **options)
    assert_same_gguf(out, llama.reference(qtype))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_gguf_py_quantizers_without_ggml_write_the_same_bytes(llama: Family, tmp_path: Path, qtype: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ggml's library the legacy types are gguf-py's numpy quantizers (the converter's own): same file
    (q4_0 still needs ggml for its Q6_K output tensor, so only its legacy-type tensors take that path)."""
    from lorastream.codecs import gguf_quants

    monkeypatch.setattr(gguf_quants, "ggml_available", lambda: False)
    out = tmp_path / "model.gguf"
    merge(llama, out, quantize=qtype)
    assert_same_gguf(out, llama.reference(qtype))


@pytest.mark.parametrize("qtype", ["bf16", "q5_1", "q4_k_m", "q5_k_m"])
def test_qwen2_equals_llama_cpp(qwen2: Family, tmp_path: Path, qtype: str) -> None:
    out = tmp_path / "model.gguf"
    merge(qwen2, out, **({} if qtype == "bf16" else {"quantize": qtype}))
    assert_same_gguf(out, qwen2.reference(qtype))


def _model(name: str) -> tuple[torch.nn.Module, dict[str, bytes]]:
    """A tiny model of each supported family, with a tokenizer of the kind its converter reads."""
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    small = dict(vocab_size=304, **common)
    qwen = {**common, "vocab_size": 151936, "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": 151645}
    if name in ("qwen2", "qwen3"):
        config = (transformers.Qwen2Config if name == "qwen2" else transformers.Qwen3Config)(**qwen)
        model = (transformers.Qwen2ForCausalLM if name == "qwen2" else transformers.Qwen3ForCausalLM)(config)
        return model, {p.name: p.read_bytes() for p in QWEN2_TOKENIZER.iterdir()}
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    long_rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0 + i / 8 for i in range(32)],
                 "short_factor": [1.0 + i / 64 for i in range(32)]}
    model = {"llama": lambda: tiny_llama(**small),
             "llama31": lambda: tiny_llama(**small, rope_parameters=llama3_rope),
             "phi3_long": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
                 pad_token_id=0, original_max_position_embeddings=64, rope_parameters=long_rope, **small)),
             "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**small)),
             # query_pre_attn_scalar = head_dim, as in Gemma's own sizes (llama.cpp scales by head_dim)
             "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
                 head_dim=64, query_pre_attn_scalar=64, **small)),
             "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
                 head_dim=64, query_pre_attn_scalar=64, **small)),
             "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
                 pad_token_id=0, original_max_position_embeddings=128, **small))}[name]()
    return model, sentencepiece_tokenizer()


@pytest.mark.parametrize(("name", "qtypes"), [("mistral", ["bf16", "q4_k_m"]), ("qwen3", ["bf16"]),
                                              ("gemma2", ["bf16", "q4_k_m"]), ("gemma3", ["bf16", "q6_k"]),
                                              ("phi3", ["bf16", "q4_k_m"]), ("phi3_long", ["bf16", "q8_0", "q4_k_m"])])
def test_other_families_equal_llama_cpp(name: str, qtypes: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mistral (Llama's layout), Qwen3 (q/k norms), Gemma 2/3 (norms stored as 1 + w, no lm_head), Phi-3 (fused
    qkv and gate_up, its own vocabulary rules), Phi-3 with long-context rope (two factor tensors the converter
    computes from config.json, and an attention factor key). llama.cpp runs each bf16 file as transformers runs
    the merged model."""
    family = built(name, tmp_path_factory)
    for qtype in qtypes:
        out = family.work / f"ours-{qtype}.gguf"
        merge(family, out, **({} if qtype == "bf16" else {"quantize": qtype}))
        assert_same_gguf(out, family.reference(qtype))
    assert_runs_as_transformers(family, family.work / "ours-bf16.gguf")


@pytest.mark.parametrize(("name", "qtypes"), [("llama_added", ["bf16", "q4_k_m"]), ("qwen2_added", ["bf16"])])
def test_added_tokens_equal_llama_cpp(name: str, qtypes: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fine-tune that added tokens: the GGUF takes the adapter's tokenizer (its added and special tokens)
    and, for Llama, the resized vocabulary, as the converter does from the merged folder."""
    family = built(name, tmp_path_factory)
    for qtype in qtypes:
        out = family.work / f"ours-{qtype}.gguf"
        merge(family, out, **({} if qtype == "bf16" else {"quantize": qtype}))
        assert_same_gguf(out, family.reference(qtype))
    assert_runs_as_transformers(family, family.work / "ours-bf16.gguf")
    info = lorastream.inspect(out)
    tokens = gguf.GGUFReader(out).fields["tokenizer.ggml.tokens"].contents()
    assert set(ADDED_TOKENS + ADDED_SPECIAL) <= set(tokens)
    if name == "llama_added":
        assert info["tokenizer"]["tokens"] == 305


LOGITS = """
import json, sys
import numpy as np
import llama_cpp

tokens = json.loads(sys.argv[1])
for path in sys.argv[2:]:
    model = llama_cpp.Llama(path, logits_all=True, verbose=False, n_ctx=max(64, len(tokens)), n_threads=1)
    model.eval(tokens)
    np.save(path + ".logits.npy", np.array(model.scores[: len(tokens)], dtype=np.float32))
"""


def llama_cpp_logits(paths: list[Path], tokens: list[int]) -> list[np.ndarray]:
    """Logits for `tokens` from llama.cpp itself (the sdist's llama_cpp bindings on the cached build)."""
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(QUANTIZE.parent),
           "PYTHONPATH": os.pathsep.join([str(LLAMA_CPP / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", LOGITS, json.dumps(tokens), *map(str, paths)], check=True, env=env,
                   capture_output=True)
    return [np.load(f"{path}.logits.npy") for path in paths]


def test_llama_cpp_runs_the_outputs(llama: Family, tmp_path: Path) -> None:
    """llama.cpp loads each output; its logits match transformers' on PEFT's merged model within the type's
    error (relative RMS: bf16 1%, q8_0 3%, q4_k_m 20%), and the q4_k_m file's logits are exactly those of
    llama.cpp's own q4_k_m file."""
    from transformers import AutoModelForCausalLM

    tokens = [1, 17, 42, 99, 7, 250, 3]
    expected = AutoModelForCausalLM.from_pretrained(llama.merged, dtype=torch.float32)(
        torch.tensor([tokens])).logits[0].detach().numpy()
    outputs = {}
    for qtype in ("bf16", "q8_0", "q4_k_m"):
        outputs[qtype] = tmp_path / f"{qtype}.gguf"
        merge(llama, outputs[qtype], **({} if qtype == "bf16" else {"quantize": qtype}))
    logits = llama_cpp_logits([*outputs.values(), llama.reference("q4_k_m")], tokens)
    rms = float(np.sqrt(np.mean(expected ** 2)))
    # relative RMS error each type allows on this random model (random weights are quantization's worst case)
    for (qtype, _), got, tolerance in zip(outputs.items(), logits, (0.01, 0.03, 0.2), strict=False):
        error = float(np.sqrt(np.mean((got - expected) ** 2))) / rms
        assert error <= tolerance, f"{qtype}: relative RMS error {error:.4f}"
    assert np.array_equal(logits[2], logits[3])


# Past Phi-3 long rope's original context (64): transformers (by the sequence's length) and llama.cpp (by its
# context's, which it pads to 256, so it never takes the short factors here) both take the long factors.
LONG_TOKENS = [1, *torch.randint(3, 300, (99,), generator=torch.Generator().manual_seed(0)).tolist()]


def assert_runs_as_transformers(family: Family, path: Path) -> None:
    """llama.cpp loads the bf16 GGUF `path` and its logits are transformers' on PEFT's merged folder, but for bf16
    rounding: llama.cpp rounds activations to bf16 for bf16 weights (2% relative RMS over 100 tokens; a wrong
    rope factor or attention scale is 10-60%)."""
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(family.merged, dtype=torch.float32)(
        torch.tensor([LONG_TOKENS])).logits[0].detach().numpy()
    [got] = llama_cpp_logits([path], LONG_TOKENS)
    error = float(np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2)))
    assert error <= 0.02, f"{path.name}: relative RMS error {error:.4f}"


def test_smallest_row_blocks_write_the_same_file(llama: Family, tmp_path: Path, smallest_blocks: None) -> None:
    """Blocks of a few heads' rows (the q/k permutation stays inside a block) and of a few quantization rows."""
    for qtype in ("bf16", "q4_k_m"):
        out = tmp_path / f"{qtype}.gguf"
        merge(llama, out, **({} if qtype == "bf16" else {"quantize": qtype}))
        assert_same_gguf(out, llama.reference(qtype))


def test_interrupted_merge_leaves_nothing_and_reruns_to_the_same_file(llama: Family, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lorastream.outputs import gguf as gguf_output

    out = tmp_path / "model.gguf"
    original, calls = gguf_output.GGUFSink.write, []

    def interrupted(self: gguf_output.GGUFSink, chunk: memoryview | bytes) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a kill: the staging folder stays for the rerun
        original(self, chunk)

    monkeypatch.setattr(gguf_output.GGUFSink, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(llama, out)
    assert not out.exists() and (tmp_path / ".model.gguf.lorastream-partial").is_dir()
    monkeypatch.setattr(gguf_output.GGUFSink, "write", original)
    merge(llama, out)
    assert_same_gguf(out, llama.reference("bf16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_kill_9_leaves_nothing_under_the_name_and_the_rerun_writes_the_file(qwen2: Family, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    command = [sys.executable, "-m", "lorastream", "merge", str(qwen2.base), str(qwen2.adapter), "-o",
               str(out), "--format", "gguf", "--quantize", "q4_k_m", "--max-memory", "480MiB", "--quiet"]
    partial = tmp_path / ".model.gguf.lorastream-partial" / ".model.gguf.partial"
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 8 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)  # past the 5.7 MiB header: tensor data is being written
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL and not out.exists()
    subprocess.run(command, check=True)
    assert_same_gguf(out, qwen2.reference("q4_k_m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_peak_rss_stays_inside_max_memory(qwen2: Family, tmp_path: Path) -> None:
    """A fresh process (as a user runs it), a budget well below the 78 MB model plus the 150k-token header."""
    out = tmp_path / "model.gguf"
    run = subprocess.run([sys.executable, "-m", "lorastream", "merge", str(qwen2.base), str(qwen2.adapter),
                          "-o", str(out), "--format", "gguf", "--quantize", "q4_k_m", "--max-memory", "480MiB",
                          "--json"], capture_output=True, text=True, check=True)
    result = json.loads(run.stdout)
    result = result[0] if isinstance(result, list) else result
    assert result["peak_rss"] <= result["budget"] == 480 << 20
    assert_same_gguf(out, qwen2.reference("q4_k_m"))


def test_each_writes_one_gguf_per_adapter(llama: Family, tmp_path: Path) -> None:
    other = tmp_path / "inputs" / "second"
    shutil.copytree(llama.adapter, other)
    results = lorastream.merge_each(llama.base, [llama.adapter, other], tmp_path / "out", format="gguf")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["adapter.gguf", "second.gguf"] and len(results) == 2
    for name in names:
        assert_same_gguf(tmp_path / "out" / name, llama.reference("bf16"))


def test_verify_recomputes_a_gguf_and_finds_a_changed_byte(llama: Family, tmp_path: Path) -> None:
    """`verify` on llama.cpp's own q8_0 file (the types from its file type) passes; one byte changed fails."""
    reference = llama.reference("q8_0")
    report = lorastream.verify(llama.base, llama.adapter, reference)
    assert report.ok and len(report.checks) == len(gguf.GGUFReader(reference).tensors)
    changed = tmp_path / "changed.gguf"
    data = bytearray(reference.read_bytes())
    data[-40] ^= 0x10  # inside the last tensor's data
    changed.write_bytes(bytes(data))
    report = lorastream.verify(llama.base, llama.adapter, changed)
    assert not report.ok and [c.name for c in report.checks if not c.ok] == ["output_norm.weight"]


def test_llama31_rope_frequencies_are_written_and_verified(tmp_path_factory: pytest.TempPathFactory,
                                                          tmp_path: Path) -> None:
    """Llama 3.1's rope scaling (rope_type llama3): the converter computes a `rope_freqs` tensor from config.json
    (the first in its file; among the others by name in llama-quantize's); ours is the same, in the same place,
    and `verify` checks it (one byte changed there fails)."""
    family = built("llama31", tmp_path_factory)
    for qtype in ("bf16", "q4_k_m"):
        out = tmp_path / f"{qtype}.gguf"
        merge(family, out, **({} if qtype == "bf16" else {"quantize": qtype}))
        assert_same_gguf(out, family.reference(qtype))
    assert gguf.GGUFReader(family.reference("bf16")).tensors[0].name == "rope_freqs.weight"
    reference = family.reference("q4_k_m")
    [rope] = [t for t in gguf.GGUFReader(reference).tensors if t.name == "rope_freqs.weight"]
    assert lorastream.verify(family.base, family.adapter, reference).ok
    data = bytearray(reference.read_bytes())
    data[rope.data_offset + 4] ^= 0x10
    (tmp_path / "changed.gguf").write_bytes(bytes(data))
    report = lorastream.verify(family.base, family.adapter, tmp_path / "changed.gguf")
    assert [c.name for c in report.checks if not c.ok] == ["rope_freqs.weight"]


def test_inspect_describes_a_gguf(llama: Family) -> None:
    path = llama.reference("q4_k_m")
    info = lorastream.inspect(path)
    tensors = gguf.GGUFReader(path).tensors
    assert info["format"] == "gguf-v3" and info["architecture"] == "llama" and info["tensors"] == len(tensors)
    assert info["types"] == dict(Counter(t.tensor_type.name for t in tensors))
    assert info["tokenizer"]["model"] == "llama" and info["tokenizer"]["tokens"] == 304
    assert info["tokenizer"]["bos_token_id"] == 1 and info["tokenizer"]["chat_template"]
    assert [t["shape"] for t in info["tensor_list"]] == [list(reversed(t.shape.tolist())) for t in tensors]


def test_remote_inputs_and_output(llama: Family, s3_server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A base and adapter in an object store (the tokenizer files are read from a local copy), and a GGUF written
    to one: uploaded into the staging prefix, copied to its key only when complete. An upload that fails midway
    leaves nothing under the key; the rerun writes the file, and `--overwrite` replaces it."""
    from lorastream.outputs import gguf as gguf_output

    fs = s3_server[0]
    fs.mkdir("gguf-inputs")
    fs.put(str(llama.base), "gguf-inputs/base", recursive=True)
    fs.put(str(llama.adapter), "gguf-inputs/adapter", recursive=True)
    out = tmp_path / "base.gguf"
    lorastream.merge("s3://gguf-inputs/base", "s3://gguf-inputs/adapter", out, format="gguf")
    assert_same_gguf(out, llama.reference("bf16"))

    original, calls = gguf_output.GGUFSink.write, []

    def failing(self: gguf_output.GGUFSink, chunk: memoryview | bytes) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise OSError("connection reset")
        original(self, chunk)

    monkeypatch.setattr(gguf_output.GGUFSink, "write", failing)
    with pytest.raises(OSError, match="connection reset"):
        lorastream.merge(llama.base, llama.adapter, "s3://gguf-inputs/out.gguf", format="gguf", quantize="q8_0")
    assert not fs.exists("gguf-inputs/out.gguf") and not fs.exists("gguf-inputs/.out.gguf.lorastream-partial")
    monkeypatch.setattr(gguf_output.GGUFSink, "write", original)
    lorastream.merge(llama.base, llama.adapter, "s3://gguf-inputs/out.gguf", format="gguf", quantize="q8_0")
    fs.get("gguf-inputs/out.gguf", str(tmp_path / "remote.gguf"))
    assert_same_gguf(tmp_path / "remote.gguf", llama.reference("q8_0"))
    assert fs.ls("gguf-inputs", detail=False) == ["gguf-inputs/adapter", "gguf-inputs/base", "gguf-inputs/out.gguf"]
    with pytest.raises(InputError, match="--overwrite"):
        lorastream.merge(llama.base, llama.adapter, "s3://gguf-inputs/out.gguf", format="gguf")
    lorastream.merge(llama.base, llama.adapter, "s3://gguf-inputs/out.gguf", format="gguf", overwrite=True)
    fs.invalidate_cache()
    fs.get("gguf-inputs/out.gguf", str(tmp_path / "remote.gguf"))
    assert_same_gguf(tmp_path / "remote.gguf", llama.reference("bf16"))
    assert lorastream.verify(llama.base, llama.adapter, "s3://gguf-inputs/out.gguf").ok


def test_weights_and_trained_on_go_through_the_same_plan(llama: Family, tmp_path: Path) -> None:
    """`--weights` and `--trained-on nf4` change the merged values, and `verify` recomputes them."""
    for options in ({"weights": [0.5]}, {"trained_on": "nf4"}):
        out = tmp_path / f"{next(iter(options))}.gguf"
        merge(llama, out, quantize="q8_0", **options)
        assert sections(out)[2] != sections(llama.reference("q8_0"))[2]
        assert lorastream.verify(llama.base, llama.adapter, out, **options).ok


def build_nf4(root: str, base: str, adapter: str) -> None:
    """`base` quantized to NF4 (double quant) by transformers + bitsandbytes, as a QLoRA base is saved, and PEFT's
    merge onto bitsandbytes' own dequantization of it, saved with the base's tokenizer: the converter's input."""
    from conftest import Case
    from test_quantized import FOUR_BIT, peft_merge_on_dequantized, quantize
    from transformers import LlamaForCausalLM

    case = Case(Path(base), Path(adapter), torch.bfloat16, LlamaForCausalLM)
    model = quantize(case.base, Path(root) / "base", **FOUR_BIT["nf4-double"])
    merged = LlamaForCausalLM.from_pretrained(case.base, dtype=torch.bfloat16)
    merged.load_state_dict(peft_merge_on_dequantized(case, model, torch.bfloat16))
    merged.save_pretrained(Path(root) / "merged")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(case.base / name, Path(root) / "base" / name)
        shutil.copy(case.base / name, Path(root) / "merged" / name)


def test_nf4_base_equals_llama_cpp_on_peft_merge(llama: Family, tmp_path: Path) -> None:
    """A QLoRA base saved in NF4: the GGUF equals the converter's (and llama-quantize's) on PEFT's merge onto
    bitsandbytes' dequantization of it, and `verify` recomputes it."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_gguf; "
            f"test_gguf.build_nf4({str(tmp_path)!r}, {str(llama.base)!r}, {str(llama.adapter)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    family = Family(tmp_path / "base", llama.adapter, tmp_path / "merged", tmp_path)
    assert "quantization_config" in json.loads((family.base / "config.json").read_text())
    for qtype in ("bf16", "q4_k_m"):
        out = tmp_path / f"ours-{qtype}.gguf"
        merge(family, out, **({} if qtype == "bf16" else {"quantize": qtype}))
        assert_same_gguf(out, family.reference(qtype))
        assert sections(out)[2] != sections(llama.reference(qtype))[2]  # the NF4 rounding is in it
        assert lorastream.verify(family.base, family.adapter, out).ok


def test_unsupported_architecture_is_refused_in_one_line(make_case, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    case = make_case(tiny_gpt2(), target_modules=["c_attn"], r=4)
    run = subprocess.run([sys.executable, "-m", "lorastream", "merge", str(case.base), str(case.adapter), "-o",
                          str(tmp_path / "out.gguf"), "--format", "gguf"], capture_output=True, text=True)
    assert run.returncode == 2 and "GPT2LMHeadModel" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_an_unreadable_tokenizer_is_refused_in_one_line(llama: Family, tmp_path: Path) -> None:
    """A damaged tokenizer.model, or a placeholder tokenizer.json: exit 2, one line naming the base and its
    tokenizer files, nothing written."""
    for name, data in (("tokenizer.model", b"not a sentencepiece model"), ("tokenizer.json", b"{}")):
        base = tmp_path / name / "base"
        shutil.copytree(llama.base, base, ignore=shutil.ignore_patterns("tokenizer.model"))
        (base / name).write_bytes(data)
        run = subprocess.run([sys.executable, "-m", "lorastream", "merge", str(base), str(llama.adapter), "-o",
                              str(tmp_path / name / "out.gguf"), "--format", "gguf"], capture_output=True, text=True)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and f"{base}: its tokenizer ({name}" in run.stderr
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["base"]


def test_bad_combinations_are_refused(llama: Family, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"name it OUT\.gguf"):
        merge(llama, tmp_path / "folder")
    with pytest.raises(InputError, match="expected one of"):
        merge(llama, tmp_path / "m.gguf", quantize="nf4")
    with pytest.raises(InputError, match="--dtype picks"):
        merge(llama, tmp_path / "m.gguf", quantize="q8_0", dtype="float16")
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(InputError, match="--overwrite"):
        merge(llama, tmp_path / "exists.gguf")

