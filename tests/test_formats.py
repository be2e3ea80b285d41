"""Readers and writers of checkpoint files, sizes, model folders and row blocks, each checked on its own.

Hostile inputs must end in `InputError` naming the file, never in another exception, a wrong value, or
code running: these readers are the first thing an untrusted download reaches.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import struct
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lorastream.adapters.lora import Adapter, LoraModule
from lorastream.codecs.plain import TensorRef
from lorastream.engine import row_blocks
from lorastream.errors import InputError
from lorastream.formats.hf import HFModel, open_hf_model
from lorastream.formats.safetensors import ShardWriter, TensorSpec, encode_header, read_header
from lorastream.formats.torchzip import read_state_dict
from lorastream.memory import format_size, parse_size
from lorastream.planner import MIN_BLOCK_ROWS, make_plan

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaNs, signed zeros and float8 compare exactly)."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    return torch.equal(actual.contiguous().reshape(-1).view(torch.uint8),
                       expected.contiguous().reshape(-1).view(torch.uint8))


def sample_tensors() -> dict[str, torch.Tensor]:
    """One tensor of every dtype and rank the readers must handle, zero-size and scalar included."""
    gen = torch.Generator().manual_seed(0)
    return {
        "f64": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "f32.3d": torch.randn(5, 3, 4, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(6, 5, generator=gen).bfloat16(),
        "i64": torch.arange(-5, 6),
        "i32": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "i8": torch.tensor([[-128, 127]], dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "f8e4m3": torch.randn(4, 2, generator=gen).to(torch.float8_e4m3fn),
        "f8e5m2": torch.randn(3, generator=gen).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty.rows": torch.zeros(0, 3),
        "empty.cols": torch.zeros(4, 0, dtype=torch.bfloat16),
    }


# --- safetensors: reading ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("st") / "sample.safetensors"
    save_file(sample_tensors(), path, metadata={"format": "pt", "note": "x"})
    return path


def test_read_header_names_dtypes_shapes(sample_file: Path) -> None:
    parsed = read_header(sample_file)
    expected = sample_tensors()
    assert set(parsed.tensors) == set(expected)
    for name, tensor in expected.items():
        ref = parsed.tensors[name]
        assert (ref.name, ref.dtype, ref.shape) == (name, tensor.dtype, tuple(tensor.shape))
        assert ref.nbytes == tensor.numel() * tensor.element_size()
    assert parsed.metadata == {"format": "pt", "note": "x"}
    offsets = [ref.offset for ref in parsed.tensors.values()]
    assert offsets == sorted(offsets), "tensors are listed in data order"


def test_read_returns_stored_values(sample_file: Path) -> None:
    parsed = read_header(sample_file)
    for name, tensor in sample_tensors().items():
        assert same(parsed.tensors[name].read(), tensor), name


def test_read_rows_reused_buffer(sample_file: Path) -> None:
    """Row ranges of a 3-D and a 2-D tensor read into one reused buffer as [rows, row_elements]: every dimension
    but the last counts rows (a fused-experts tensor streams in blocks smaller than one expert); a 1-D tensor is
    one row."""
    parsed = read_header(sample_file)
    expected = sample_tensors()
    buffer = memoryview(bytearray(1024))
    cube = parsed.tensors["f32.3d"]
    assert (cube.rows, cube.row_elements) == (15, 4)
    for start, stop in [(0, 2), (2, 15), (4, 9), (3, 3)]:
        rows = expected["f32.3d"].reshape(15, 4)[start:stop]
        assert same(cube.read_rows(start, stop, buffer).clone(), rows)
    bf16 = parsed.tensors["bf16"]
    assert same(bf16.read_rows(4, 6, buffer).clone(), expected["bf16"][4:6].reshape(2, -1))
    vector = parsed.tensors["i64"]
    assert vector.rows == 1
    assert same(vector.read_rows(0, 1, buffer).clone(), expected["i64"].reshape(1, -1))


# --- safetensors: writing ----------------------------------------------------------------------------------------

def write_chunked(writer: ShardWriter, tensors: list[torch.Tensor], chunk: int) -> None:
    """Append each tensor's bytes in pieces of `chunk` bytes, as the engine appends row blocks."""
    for tensor in tensors:
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for start in range(0, len(raw), chunk):
            writer.write(raw[start:start + chunk])


def test_encode_header_layout() -> None:
    specs = [TensorSpec("a", torch.bfloat16, (3, 5)), TensorSpec("b", torch.int64, (2,))]
    raw = encode_header(specs, {"format": "pt"})
    (length,) = struct.unpack("<Q", raw[:8])
    assert length == len(raw) - 8 and len(raw) % 8 == 0, "data starts 8-byte aligned"
    header = json.loads(raw[8:])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, 30]}
    assert header["b"] == {"dtype": "I64", "shape": [2], "data_offsets": [30, 46]}


def test_shard_writer_round_trip(tmp_path: Path) -> None:
    """Chunked writes give a file the reference library and our reader both read back identically."""
    tensors = sample_tensors()
    path = tmp_path / "model-00001-of-00002.safetensors"
    writer = ShardWriter(path, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"k": "v"})
    temp = tmp_path / ".model-00001-of-00002.safetensors.partial"
    assert temp.exists() and not path.exists()
    write_chunked(writer, list(tensors.values()), chunk=7)
    assert not path.exists(), "the final name appears only at commit"
    writer.commit()
    assert path.exists() and not temp.exists()
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name
    parsed = read_header(path)
    assert parsed.metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert same(parsed.tensors[name].read(), tensor), name


@pytest.mark.parametrize("extra", [-1, 1], ids=["missing-byte", "extra-byte"])
def test_shard_writer_commit_refuses_wrong_byte_count(tmp_path: Path, extra: int) -> None:
    tensor = torch.arange(10, dtype=torch.float32)
    path = tmp_path / "x.safetensors"
    writer = ShardWriter(path, [TensorSpec("t", tensor.dtype, (10,))], {})
    raw = tensor.numpy().tobytes()
    writer.write(raw[:extra] if extra < 0 else raw + b"\0" * extra)
    with pytest.raises(AssertionError):
        writer.commit()
    assert not path.exists()
    writer.abort()
    assert not path.exists() and not writer.temp_path.exists()
    assert list(tmp_path.iterdir()) == []


def test_shard_writer_abort_removes_temp(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "y.safetensors", [TensorSpec("t", torch.float16, (4, 4))], {})
    writer.write(b"\0" * 10)
    assert writer.temp_path.exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_shard_writer_copy_from(tmp_path: Path) -> None:
    """Bytes copied inside the kernel from another file land between written chunks, in order."""
    first, second = torch.arange(6, dtype=torch.int64), torch.randn(5, 3)
    source = tmp_path / "source.bin"
    payload = second.numpy().tobytes()
    source.write_bytes(b"JUNK" * 5 + payload + b"TAIL")
    path = tmp_path / "z.safetensors"
    writer = ShardWriter(path, [TensorSpec("a", first.dtype, (6,)), TensorSpec("b", second.dtype, (5, 3))], {})
    writer.write(first.numpy().tobytes())
    fd = os.open(source, os.O_RDONLY)
    try:
        assert writer.copy_from(fd, 20, len(payload)) is True
    finally:
        os.close(fd)
    writer.commit()
    loaded = load_file(path)
    assert same(loaded["a"], first) and same(loaded["b"], second)


def test_shard_writer_copy_from_past_end_of_input(tmp_path: Path) -> None:
    source = tmp_path / "short.bin"
    source.write_bytes(b"\1" * 10)
    writer = ShardWriter(tmp_path / "w.safetensors", [TensorSpec("a", torch.uint8, (20,))], {})
    fd = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(InputError):
            writer.copy_from(fd, 0, 20)
    finally:
        os.close(fd)
        writer.abort()


# --- safetensors: hostile and corrupt files ----------------------------------------------------------------------

def raw_safetensors(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A file from a header (an object to serialize, or raw bytes) and a data buffer."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str, shape: Any, begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def valid_file_bytes() -> bytes:
    return raw_safetensors({"a": entry("F32", [2, 2], 0, 16), "b": entry("I8", [4], 16, 20)}, b"\1" * 20)


HOSTILE_SAFETENSORS: dict[str, bytes] = {
    "zero-length": b"",
    "shorter-than-length-prefix": b"\x10\x00\x00",
    "truncated-data": valid_file_bytes()[:-3],
    "trailing-bytes": valid_file_bytes() + b"\0" * 8,
    "header-length-past-end": raw_safetensors({"a": entry("F32", [1], 0, 4)}, b"\0" * 4, length=10**6),
    "header-length-huge": raw_safetensors({}, b"", length=2**63),
    "header-not-json": raw_safetensors(b"{this is not json}"),
    "header-not-utf8": raw_safetensors(b'{"\xff\xfe": 1}'),
    "header-is-list": raw_safetensors([1, 2, 3]),
    "header-is-string": raw_safetensors("hello"),
    "header-deeply-nested": raw_safetensors(b"[" * 100_000),
    "entry-not-object": raw_safetensors({"a": [1, 2]}),
    "entry-extra-key": raw_safetensors({"a": {**entry("F32", [1], 0, 4), "x": 1}}, b"\0" * 4),
    "entry-missing-key": raw_safetensors({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "unknown-dtype": raw_safetensors({"a": entry("Q4_K", [4], 0, 4)}, b"\0" * 4),
    "dtype-not-string": raw_safetensors({"a": entry(["F32"], [1], 0, 4)}, b"\0" * 4),
    "overlapping-offsets": raw_safetensors({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},
                                           b"\0" * 12),
    "hole-between-tensors": raw_safetensors({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)},
                                            b"\0" * 20),
    "hole-at-start": raw_safetensors({"a": entry("F32", [2], 4, 12)}, b"\0" * 12),
    "offsets-not-shape-times-dtype": raw_safetensors({"a": entry("F32", [3], 0, 8)}, b"\0" * 8),
    "offsets-reversed": raw_safetensors({"a": entry("F32", [0], 8, 0)}, b"\0" * 8),
    "offsets-negative": raw_safetensors({"a": entry("F32", [1], -4, 0)}, b"\0" * 4),
    "offsets-float": raw_safetensors({"a": entry("F32", [1], 0, 4.0)}, b"\0" * 4),
    "offsets-three": raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8),
    "shape-negative": raw_safetensors({"a": entry("F32", [-1, -4], 0, 16)}, b"\0" * 16),
    "shape-float": raw_safetensors({"a": entry("F32", [2.0], 0, 8)}, b"\0" * 8),
    "shape-string": raw_safetensors({"a": entry("F32", ["2"], 0, 8)}, b"\0" * 8),
    "shape-bool": raw_safetensors({"a": entry("F32", [True, 2], 0, 8)}, b"\0" * 8),
    "shape-not-list": raw_safetensors({"a": entry("F32", 2, 0, 8)}, b"\0" * 8),
    # Zero elements, so no bytes, but a dimension no tensor can have (safetensors dims are u64, torch's i64).
    "shape-dimension-beyond-int64": raw_safetensors({"a": entry("F32", [0, 2**70], 0, 0)}),
    "metadata-not-strings": raw_safetensors({"__metadata__": {"format": 1}}),
    "metadata-not-object": raw_safetensors({"__metadata__": ["pt"]}),
}


@pytest.mark.parametrize("content", HOSTILE_SAFETENSORS.values(), ids=HOSTILE_SAFETENSORS.keys())
def test_hostile_safetensors_raise_input_error_naming_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"hostile\.safetensors"):
        read_header(path)


def test_missing_safetensors_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"absent\.safetensors"):
        read_header(tmp_path / "absent.safetensors")


def test_truncated_after_header_check_is_input_error_on_read(tmp_path: Path) -> None:
    """A file cut after its header was read: reading rows reports the file, it does not return garbage."""
    path = tmp_path / "shrinking.safetensors"
    path.write_bytes(valid_file_bytes())
    ref = read_header(path).tensors["b"]
    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(InputError, match=r"shrinking\.safetensors"):
        ref.read()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def small_safetensors() -> bytes:
    from safetensors.torch import save

    tensors = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(3)).bfloat16(),
               "i": torch.arange(5), "b": torch.tensor([True, False, True]), "e": torch.zeros(0, 2)}
    return save(tensors, metadata={"format": "pt"})


Mutation = tuple[list[tuple[int, int]], int | None, bytes]
mutations = st.tuples(st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6),
                      st.one_of(st.none(), st.integers(min_value=0)), st.binary(max_size=16))


def mutate(original: bytes, mutation: Mutation) -> bytes:
    """Overwrite some bytes, maybe cut the file, maybe append bytes."""
    changes, cut, tail = mutation
    data = bytearray(original)
    for position, value in changes:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    return bytes(data) + tail


def check_safetensors_outcome(path: Path) -> None:
    """Either InputError, or every tensor reads back exactly what the reference implementation reads."""
    try:
        parsed = read_header(path)
    except InputError:
        return
    values = {name: ref.read() for name, ref in parsed.tensors.items()}
    for name, ref in parsed.tensors.items():
        assert values[name].dtype == ref.dtype and tuple(values[name].shape) == ref.shape
    try:
        reference = load_file(path)
    except Exception as exc:  # the reference refuses what we accepted
        raise AssertionError(f"lorastream accepted a file safetensors refuses ({exc})") from exc
    assert set(reference) == set(values)
    for name, tensor in reference.items():
        assert same(values[name], tensor), name


@FUZZ
@given(mutation=mutations)
def test_fuzz_mutated_safetensors(fuzz_dir: Path, small_safetensors: bytes, mutation: Mutation) -> None:
    path = fuzz_dir / "mutated.safetensors"
    path.write_bytes(mutate(small_safetensors, mutation))
    check_safetensors_outcome(path)


@FUZZ
@given(garbage=st.binary(max_size=200), framed=st.booleans())
def test_fuzz_garbage_safetensors(fuzz_dir: Path, garbage: bytes, framed: bool) -> None:
    """Random bytes, optionally behind a length prefix that matches them, so the JSON parser is reached."""
    path = fuzz_dir / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", len(garbage)) + garbage if framed else garbage)
    check_safetensors_outcome(path)


@FUZZ
@given(header=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=4),
                           max_leaves=12),
       data=st.binary(max_size=32))
def test_fuzz_json_headers(fuzz_dir: Path, header: Any, data: bytes) -> None:
    """Any JSON value as a header: InputError or a valid file, never another exception."""
    path = fuzz_dir / "json.safetensors"
    path.write_bytes(raw_safetensors(header, data))
    check_safetensors_outcome(path)


# --- torch zip checkpoints ---------------------------------------------------------------------------------------

def read_values(path: Path) -> dict[str, torch.Tensor]:
    return {name: ref.read() for name, ref in read_state_dict(path).items()}


def test_torchzip_plain_dict_all_dtypes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    tensors = {"f32": torch.randn(4, 3, generator=gen), "bf16": torch.randn(5, 2, generator=gen).bfloat16(),
               "f16": torch.randn(3, generator=gen).half(), "f64": torch.randn(2, 2, dtype=torch.float64),
               "i64": torch.arange(-3, 9), "i32": torch.arange(4, dtype=torch.int32),
               "u8": torch.arange(3, dtype=torch.uint8), "bool": torch.tensor([True, False]),
               "scalar": torch.tensor(1.25), "empty": torch.zeros(0, 5), "cube": torch.randn(2, 3, 4, generator=gen)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path)
    got = read_values(path)
    assert list(got) == list(tensors)
    for name, tensor in tensors.items():
        assert same(got[name], tensor), name


def test_torchzip_model_wrapper_and_parameters(tmp_path: Path) -> None:
    """LitGPT's `{"model": state_dict}` and nn.Parameter values, as `torch.save(model.state_dict())` writes."""
    linear = torch.nn.Linear(4, 3)
    weight = torch.nn.Parameter(torch.randn(2, 2))
    path = tmp_path / "lit_model.pth"
    torch.save({"model": {**linear.state_dict(), "param": weight}}, path)
    got = read_values(path)
    assert set(got) == {"weight", "bias", "param"}
    assert same(got["weight"], linear.weight.detach()) and same(got["bias"], linear.bias.detach())
    assert same(got["param"], weight.detach())
    module_path = tmp_path / "module.bin"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)).state_dict(), module_path)  # OrderedDict + _metadata
    assert set(read_values(module_path)) == {"0.weight", "0.bias"}


def test_torchzip_views_sharing_storage(tmp_path: Path) -> None:
    """Slices of one storage (offsets into it) and two names for one tensor (tied weights)."""
    big = torch.arange(120, dtype=torch.float32).reshape(12, 10)
    tensors = {"rows": big[3:7], "flat": big.view(-1)[17:29], "whole": big, "tied": big,
               "last_row": big[11], "bf16_rows": big.bfloat16()[5:9]}
    path = tmp_path / "views.bin"
    torch.save(tensors, path)
    got = read_values(path)
    for name, tensor in tensors.items():
        assert same(got[name], tensor.contiguous()), name


@pytest.mark.parametrize("make", [lambda: torch.randn(3, 4).T, lambda: torch.randn(4, 6)[:, 1:3],
                                  lambda: torch.randn(4, 6)[::2]], ids=["transposed", "column-slice", "strided"])
def test_torchzip_non_contiguous_is_input_error(tmp_path: Path, make: Callable[[], torch.Tensor]) -> None:
    path = tmp_path / "noncontig.bin"
    torch.save({"w": make()}, path)
    with pytest.raises(InputError, match=r"noncontig\.bin.*contiguous"):
        read_state_dict(path)


class _Shell:
    """Pickles as a call to os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


def replace_pickle(source: Path, target: Path, new_pickle: bytes) -> None:
    """Copy a torch zip checkpoint, swapping its data.pkl (as an attacker editing a download would)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, new_pickle if info.filename.endswith("/data.pkl") else zin.read(info))


@pytest.fixture
def pwned() -> Iterator[Path]:
    """A path the malicious pickles try to create; it must never exist."""
    marker = Path(f"/tmp/pwned_{uuid.uuid4().hex}")
    yield marker
    marker.unlink(missing_ok=True)


def test_malicious_reduce_never_runs_torch_save(tmp_path: Path, pwned: Path) -> None:
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": _Shell(f"touch {pwned}")}, path)
    with pytest.raises(InputError, match=r"evil\.bin"):
        read_state_dict(path)
    assert not pwned.exists()


@pytest.mark.parametrize("template", [
    b"cos\nsystem\n(S'touch {marker}'\ntR.",                          # GLOBAL + REDUCE, protocol 0
    b"(S'touch {marker}'\nios\nsystem\n.",                            # INST
    b"\x80\x02cbuiltins\nexec\nX\x00\x00\x00\x00\x85R.",              # builtins.exec (code patched below)
    b"\x80\x04\x8c\x02os\x8c\x06system\x93X\x00\x00\x00\x00\x85R.",   # STACK_GLOBAL, protocol 4
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\ncos\nsystem\nX\x00\x00\x00\x00\x85R\x85R.",  # inside allowed call
], ids=["global", "inst", "exec", "stack-global", "nested"])
def test_malicious_data_pkl_never_runs(tmp_path: Path, pwned: Path, template: bytes) -> None:
    command = f"touch {pwned}"
    if b"exec" in template:
        command = f"import pathlib; pathlib.Path({str(pwned)!r}).touch()"
    raw = template.replace(b"{marker}", str(pwned).encode())
    raw = raw.replace(b"X\x00\x00\x00\x00", b"X" + struct.pack("<I", len(command)) + command.encode())
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(2)}, good)
    evil = tmp_path / "edited.bin"
    replace_pickle(good, evil, raw)
    with pytest.raises(InputError, match=r"edited\.bin"):
        read_state_dict(evil)
    assert not pwned.exists()


def test_torchzip_not_zip_and_legacy_format(tmp_path: Path) -> None:
    text = tmp_path / "notes.bin"
    text.write_text("not a checkpoint at all")
    with pytest.raises(InputError, match=r"notes\.bin"):
        read_state_dict(text)
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"legacy\.bin"):
        read_state_dict(legacy)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.bin"):
        read_state_dict(empty)


def test_torchzip_not_a_dict_of_tensors(tmp_path: Path) -> None:
    for name, obj in {"list.bin": [torch.ones(1)], "mixed.bin": {"w": torch.ones(1), "step": 3}}.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(InputError, match=name):
            read_state_dict(tmp_path / name)


# Hand-built pickles for the tensor-rebuilding calls, with arguments torch.save never writes.
_STORAGE = object()


class _Rebuild:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, optionally + BUILD."""

    def __init__(self, offset: Any, size: Any, stride: Any, state: dict[str, Any] | None = None):
        self.args, self.state = (offset, size, stride), state

    def __reduce__(self) -> tuple[Any, ...]:
        call = (torch._utils._rebuild_tensor_v2, (_STORAGE, *self.args, False, OrderedDict()))
        return call if self.state is None else (*call, self.state)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return ("storage", torch.FloatStorage, "0", "cpu", 10) if obj is _STORAGE else None


def crafted_checkpoint(tmp_path: Path, obj: Any) -> Path:
    """A torch zip file whose one storage holds float32 0..9 and whose pickle is `obj`."""
    good = tmp_path / "ten.bin"
    torch.save({"w": torch.arange(10, dtype=torch.float32)}, good)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    path = tmp_path / "crafted.bin"
    replace_pickle(good, path, buffer.getvalue())
    return path


def test_crafted_rebuild_within_storage_reads_exact(tmp_path: Path) -> None:
    """Control for the hostile variants below: a legitimate offset/size/stride reads the right slice."""
    path = crafted_checkpoint(tmp_path, {"w": _Rebuild(2, (2, 4), (4, 1))})
    assert same(read_values(path)["w"], torch.arange(2, 10, dtype=torch.float32).reshape(2, 4))


@pytest.mark.parametrize("args", [
    (-4, (10,), (1,)),        # starts before its storage: reads zip headers as floats
    (8, (4,), (1,)),          # runs past the end of its storage
    (0, (-2, 5), (5, 1)),     # negative dimension
    (0, (2.5,), (1,)),        # fractional dimension
    (1.5, (2,), (1,)),        # fractional storage offset
    ("0", (2,), (1,)),        # offset of the wrong type
], ids=["negative-offset", "past-storage", "negative-dim", "float-dim", "float-offset", "str-offset"])
def test_crafted_rebuild_outside_storage_is_input_error(tmp_path: Path, args: tuple[Any, ...]) -> None:
    path = crafted_checkpoint(tmp_path, {"w": _Rebuild(*args)})
    with pytest.raises(InputError, match=r"crafted\.bin"):
        read_values(path)


@pytest.mark.parametrize("state", [
    {"path": "SECRET", "offset": 0},
    {"offset": 0},
    {"shape": (1000,)},
    {"dtype": torch.DoubleStorage},
], ids=["other-file", "other-offset", "other-shape", "other-dtype"])
def test_pickle_build_cannot_retarget_a_tensor(tmp_path: Path, state: dict[str, Any]) -> None:
    """A BUILD opcode after the rebuild call must not rewrite where or what the tensor is.

    Without this, a downloaded .bin makes lorastream copy any local file (keys, /etc/...) into the merged
    model it writes, or read outside the archive.
    """
    if state.get("path") == "SECRET":
        secret = tmp_path / "id_ed25519"
        secret.write_bytes(b"PRIVATE KEY DATA" * 4)
        state = {**state, "path": str(secret)}
    path = crafted_checkpoint(tmp_path, {"w": _Rebuild(0, (4,), (1,), state)})
    try:
        values = read_values(path)
    except InputError:
        return
    assert same(values["w"], torch.arange(4, dtype=torch.float32)), f"tensor retargeted by BUILD {state}"


def zip_member_header(raw: bytes, name_suffix: str) -> tuple[int, int]:
    """Offsets of the central-directory entry and the local header of the member ending in `name_suffix`."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(raw)).infolist() if i.filename.endswith(name_suffix))
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(info.filename)] != info.filename.encode():
        central = raw.index(b"PK\x01\x02", central + 4)
    return central, info.header_offset


@pytest.mark.parametrize("field,value", [(10, 99), (10, 12), (8, 1)],
                         ids=["unknown-compression", "bzip2-compression", "encrypted-flag"])
def test_torchzip_data_pkl_zip_flags_are_input_errors(tmp_path: Path, field: int, value: int) -> None:
    """A data.pkl entry the zip module cannot open (compression method, encryption) is a corrupt file."""
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(3)}, good)
    raw = bytearray(good.read_bytes())
    central, _ = zip_member_header(bytes(raw), "/data.pkl")
    raw[central + field:central + field + 2] = struct.pack("<H", value)
    path = tmp_path / "flags.bin"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"flags\.bin"):
        read_state_dict(path)


def test_torchzip_storage_local_header_mismatch(tmp_path: Path) -> None:
    """A storage whose local zip header disagrees with the central directory: InputError or the right bytes."""
    good = tmp_path / "good.bin"
    tensor = torch.arange(16, dtype=torch.float32)
    torch.save({"w": tensor}, good)
    raw = bytearray(good.read_bytes())
    _, local = zip_member_header(bytes(raw), "/data/0")
    name_len = struct.unpack("<H", raw[local + 26:local + 28])[0]
    raw[local + 26:local + 28] = struct.pack("<H", name_len + 4)
    path = tmp_path / "shifted.bin"
    path.write_bytes(bytes(raw))
    try:
        values = read_values(path)
    except InputError:
        return
    assert same(values["w"], tensor), "storage read from the wrong offset without an error"


def test_torchzip_big_endian_byteorder(tmp_path: Path) -> None:
    """A checkpoint recorded as big-endian: read as torch.load reads it (byte-swapped) or refused."""
    good = tmp_path / "good.bin"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, good)
    path = tmp_path / "big.bin"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif info.filename.endswith("/data/0"):
                data = torch.arange(4, dtype=torch.float32).numpy().astype(">f4").tobytes()
            zout.writestr(info, data)
    expected = torch.load(path, weights_only=True)["w"]
    assert same(expected, torch.arange(4, dtype=torch.float32)), "torch.load itself byte-swaps"
    try:
        values = read_values(path)
    except InputError:
        return
    assert same(values["w"], expected), "big-endian storage read as little-endian"


Layout = list[tuple[str, torch.dtype, tuple[int, ...], int, int]]


@pytest.fixture(scope="module")
def small_bin(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Layout]:
    """A small torch.save file and, per tensor, its dtype, shape and the byte range of its data."""
    path = tmp_path_factory.mktemp("bin") / "small.bin"
    gen = torch.Generator().manual_seed(7)
    torch.save({"w": torch.randn(3, 4, generator=gen), "h": torch.randn(5, generator=gen).half(),
                "i": torch.arange(4)}, path)
    layout = [(name, ref.dtype, ref.shape, ref.offset, ref.nbytes) for name, ref in read_state_dict(path).items()]
    return path.read_bytes(), layout


@FUZZ
@given(mutation=mutations)
def test_fuzz_mutated_torchzip(fuzz_dir: Path, small_bin: tuple[bytes, Layout], mutation: Mutation) -> None:
    """InputError, or exactly the tensors the (possibly changed) storage bytes hold: never a wrong layout."""
    original, layout = small_bin
    data = mutate(original, mutation)
    path = fuzz_dir / "mutated.bin"
    path.write_bytes(data)
    try:
        refs = read_state_dict(path)
        values = {name: ref.read() for name, ref in refs.items()}
    except InputError:
        return
    assert [(name, ref.dtype, ref.shape) for name, ref in refs.items()] == [entry[:3] for entry in layout]
    for name, _, _, offset, nbytes in layout:
        assert values[name].reshape(-1).view(torch.uint8).numpy().tobytes() == data[offset:offset + nbytes], name


# --- sizes -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("512MiB", 512 * 2**20), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("1024", 1024),
    ("5 GB", 5 * 10**9), ("1.5GiB", 3 * 2**29), ("64kib", 64 * 2**10), ("7B", 7), ("1TB", 10**12),
    (" 3MiB ", 3 * 2**20), (4096, 4096),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "MiB", "-5MB", "5 XB", "5MiBs", "1e9", "5I", "12 34"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InputError, match="size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1024) == "1.0 KiB"
    assert format_size(512 * 2**20) == "512.0 MiB"
    assert format_size(1.5 * 2**30) == "1.5 GiB"
    assert format_size(2**50) == "1024.0 TiB"


# --- Hugging Face model folders ----------------------------------------------------------------------------------

def hf_folder(root: Path, weight_map: dict[str, str] | None = None) -> Path:
    """A model folder with config.json, one real shard and (if given) an index with `weight_map`."""
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.ones(2, 2)}, folder / "model-00001-of-00001.safetensors")
    if weight_map is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_open_hf_model_index(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, {"a": "model-00001-of-00001.safetensors"})
    (folder / "tokenizer.json").write_text("{}")
    model = open_hf_model(folder)
    assert list(model.tensors) == ["a"] and model.weight_format == "safetensors"
    assert [p.name for p in model.companion_files] == ["tokenizer.json"]


@pytest.mark.parametrize("target", ["missing-00002.safetensors", "../outside.safetensors", "/etc/hostname",
                                    "sub/../../outside.safetensors"],
                         ids=["missing-file", "parent-path", "absolute-path", "dotdot-inside"])
def test_index_naming_bad_file_is_input_error(tmp_path: Path, target: str) -> None:
    save_file({"b": torch.ones(1)}, tmp_path / "outside.safetensors")  # exists, so only confinement refuses it
    folder = hf_folder(tmp_path, {"a": "model-00001-of-00001.safetensors", "b": target})
    with pytest.raises(InputError, match=r"model\.safetensors\.index\.json"):
        open_hf_model(folder)


def test_index_symlink_out_of_folder_is_input_error(tmp_path: Path) -> None:
    save_file({"b": torch.ones(1)}, tmp_path / "outside.safetensors")
    folder = hf_folder(tmp_path, {"a": "model-00001-of-00001.safetensors", "b": "link.safetensors"})
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(InputError, match=r"model\.safetensors\.index\.json"):
        open_hf_model(folder)


@pytest.mark.parametrize("index", [[], {"weight_map": {}}, {"weight_map": {"a": 3}}, "x"],
                         ids=["list", "empty-map", "non-string-file", "string"])
def test_malformed_index_is_input_error(tmp_path: Path, index: Any) -> None:
    folder = hf_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"model\.safetensors\.index\.json"):
        open_hf_model(folder)


def test_folder_without_weights_or_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no model weights"):
        open_hf_model(empty)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    save_file({"a": torch.ones(1)}, no_config / "model.safetensors")
    with pytest.raises(InputError, match=r"config\.json"):
        open_hf_model(no_config)
    with pytest.raises(InputError, match="absent"):
        open_hf_model(tmp_path / "absent")


# --- row blocks --------------------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(rows=st.integers(0, 5000), block_rows=st.integers(1, 3000), align=st.sampled_from([1, 2, 4, 8, 32, 64]))
def test_row_blocks_partition(rows: int, block_rows: int, align: int) -> None:
    """Contiguous blocks covering [0, rows) exactly, aligned, none over the limit, none short unless alone.

    `row_blocks` requires what the planner guarantees: a tensor split into blocks gets at least
    2 * (MIN_BLOCK_ROWS + align) rows per block, so a short tail can borrow from the block before it.
    """
    if rows > block_rows:
        block_rows = max(block_rows, 2 * (MIN_BLOCK_ROWS + align))
    blocks = list(row_blocks(rows, block_rows, align))
    assert blocks, "at least one block, even for zero rows"
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    for (_, stop), (start, _) in itertools.pairwise(blocks):
        assert stop == start
    for start, stop in blocks:
        assert stop - start <= block_rows
        assert start % align == 0
        if len(blocks) > 1:
            assert stop - start >= MIN_BLOCK_ROWS, blocks
    if rows <= block_rows:
        assert blocks == [(0, rows)]


def fake_ref(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> TensorRef:
    return TensorRef(name, dtype, shape, Path("/nonexistent"), 0)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 300)), min_size=1, max_size=5),
       rank=st.integers(1, 8), slack=st.integers(0, 2**22))
def test_planner_blocks_meet_row_blocks_requirement(shapes: list[tuple[int, int]], rank: int, slack: int) -> None:
    """At any budget the plan accepts, every merged tensor is one block or gets >= 2*MIN_BLOCK_ROWS rows."""
    tensors = {f"layer{i}.weight": fake_ref(f"layer{i}.weight", shape) for i, shape in enumerate(shapes)}
    base = HFModel(Path("/base"), {"model_type": "llama"}, tensors, dict(tensors), "safetensors", (), ())
    modules = {f"layer{i}": LoraModule(f"layer{i}", fake_ref("a", (rank, cols), torch.float32),
                                       fake_ref("b", (rows, rank), torch.float32), 2.0)
               for i, (rows, cols) in enumerate(shapes)}
    adapter = Adapter("adapter", modules, {}, {})
    probe = make_plan(base, [(adapter, 1.0)], Path("/out"), budget=2**40, baseline=0, disk_free=2**50,
                      max_shard_size=2**40)
    budget = probe.memory.minimum + slack
    job = make_plan(base, [(adapter, 1.0)], Path("/out"), budget=budget, baseline=0, disk_free=2**50,
                    max_shard_size=2**40)
    assert job.memory.fits
    for rows, cols in shapes:
        block_rows = job.memory.block_elements // cols
        assert rows <= block_rows or block_rows >= 2 * (MIN_BLOCK_ROWS + 1), (rows, cols, block_rows)
        for start, stop in row_blocks(rows, max(1, block_rows)):
            assert (stop - start) * cols <= job.memory.block_elements, "a row block overflows the buffers"
