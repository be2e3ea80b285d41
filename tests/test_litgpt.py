"""LitGPT runs merged by lorastream equal `litgpt merge_lora`'s output, tensor by tensor.

The models, LoRA runs and reference merges are made by litgpt itself, in its own environment (.venv-litgpt,
created by `make test`), see litgpt_reference.py. Every comparison is bit-identical: lorastream computes each
LoRA update as LitGPT does (B @ A, then the scaling, then the sum, each rounded to the merged dtype, the base
rounded to it first), and torch's matmul gives the same bits for any row block of 12 rows or more, which the
engine guarantees. Only the logits of transformers' model differ from LitGPT's, by float32 rounding: the two
implementations order attention and RoPE arithmetic differently (tolerance 1e-4 on logits of magnitude ~1).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output

import lorastream.formats.torchzip_writer as torchzip_writer
from lorastream import api
from lorastream.cli import main
from lorastream.errors import InputError
from lorastream.formats.safetensors import TensorSpec
from lorastream.formats.torchzip import read_state_dict

LITGPT_PYTHON = Path(__file__).resolve().parents[1] / ".venv-litgpt" / "bin" / "python"
LLAMA = dict(name="tiny-llama", block_size=64, vocab_size=384, padded_vocab_size=384, n_layer=2, n_head=4,
             n_query_groups=2, n_embd=64, head_size=16, rotary_percentage=1.0, parallel_residual=False, bias=False,
             norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=160)
NEOX = dict(name="tiny-pythia", block_size=64, vocab_size=384, padded_vocab_size=384, n_layer=2, n_head=4, n_embd=64,
            rotary_percentage=0.25, parallel_residual=True, bias=True, norm_class_name="LayerNorm",
            mlp_class_name="GptNeoxMLP", intermediate_size=256)
MOE = {**LLAMA, "mlp_class_name": "LLaMAMoE", "n_expert": 2, "n_expert_per_token": 1, "moe_intermediate_size": 32}
ALL = dict(lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True, lora_head=True)
NONE = dict.fromkeys(ALL, False)
CASES = {
    "gqa_all_bf16": dict(config=LLAMA, lora=dict(lora_r=4, lora_alpha=8, **ALL), base_dtype="bfloat16",
                         lora_dtype="bfloat16", hf=True),
    "gqa_all_fp32": dict(config=LLAMA, lora=dict(lora_r=4, lora_alpha=6, **ALL), base_dtype="float32",
                         lora_dtype="float32", hf=True, logits=True, legacy=True),
    "q_only_mixed": dict(config=LLAMA, lora=dict(lora_r=8, lora_alpha=3, **{**NONE, "lora_query": True,
                                                                          "lora_projection": True}),
                         base_dtype="bfloat16", lora_dtype="float32"),
    "kv_fp32_base_bf16_lora": dict(config=LLAMA, lora=dict(lora_r=4, lora_alpha=16, **{**NONE, "lora_key": True,
                                                                                      "lora_value": True,
                                                                                      "lora_head": True}),
                                   base_dtype="float32", lora_dtype="bfloat16"),
    "neox_fp32": dict(config=NEOX, lora=dict(lora_r=4, lora_alpha=8, **{**ALL, "lora_key": False}),
                      base_dtype="float32", lora_dtype="float32", hf=True, logits=True),
    "wide_bf16": dict(config={**LLAMA, "vocab_size": 64000, "padded_vocab_size": 64000, "n_embd": 1024, "n_layer": 1,
                              "n_head": 8, "n_query_groups": 8, "head_size": 128, "intermediate_size": 256},
                      lora=dict(lora_r=16, lora_alpha=32, **{**NONE, "lora_query": True, "lora_head": True}),
                      base_dtype="bfloat16", lora_dtype="bfloat16"),
    "moe_bf16": dict(config=MOE, lora=dict(lora_r=2, lora_alpha=4, **{**NONE, "lora_query": True, "lora_mlp": True}),
                     base_dtype="bfloat16", lora_dtype="bfloat16"),
}
pytestmark = pytest.mark.usefixtures("smallest_blocks")


@pytest.fixture(scope="session")
def litgpt_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case built and merged by litgpt, in one run of its interpreter (importing litgpt takes seconds)."""
    if not LITGPT_PYTHON.exists():  # a missing reference must not pass silently as skipped
        pytest.fail(f"{LITGPT_PYTHON} is missing; `make test` creates it")
    root = tmp_path_factory.mktemp("litgpt")
    spec = root / "cases.json"
    spec.write_text(json.dumps({"root": str(root), "cases": {k: {**v, "seed": i} for i, (k, v) in
                                                             enumerate(CASES.items())}}))
    script = Path(__file__).with_name("litgpt_reference.py")
    done = subprocess.run([str(LITGPT_PYTHON), str(script), str(spec)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def assert_identical(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), (
            f"{name}: max diff {(tensor.float() - reference[name].float()).abs().max()}")


def assert_changed(ours: dict[str, torch.Tensor], base: Path, names: list[str]) -> None:
    """Guard against a vacuous pass: LoRA really changed these tensors."""
    stored = torch.load(base / "lit_model.pth", weights_only=True)
    for name in names:
        assert not torch.equal(ours[name].float(), stored[name].float()), f"{name} was not changed by the merge"


@pytest.mark.parametrize("case", sorted(set(CASES) - {"wide_bf16"}))
def test_lit_model_pth_equals_litgpt_merge_lora(litgpt_cases: Path, case: str) -> None:
    run = litgpt_cases / case / "run"
    result = api.merge_litgpt(run, max_memory="1GiB")
    assert result.files == ["lit_model.pth"] and not any(p.name.startswith(".") for p in run.iterdir())
    reference = torch.load(litgpt_cases / case / "reference" / "lit_model.pth", weights_only=True)
    ours = torch.load(run / "lit_model.pth", weights_only=True, mmap=True)
    assert_identical(ours, reference)
    lora = CASES[case]["lora"]
    changed = (["transformer.h.0.attn.qkv.weight"] if lora["lora_query"] or lora["lora_value"] else []) + (
        ["lm_head.weight"] if lora["lora_head"] else [])
    assert_changed(ours, litgpt_cases / case / "base", changed)
    with pytest.raises(InputError, match="exists"):
        api.merge_litgpt(run)


def test_peak_rss_stays_within_budget(litgpt_cases: Path, tmp_path: Path) -> None:
    """lm_head and wte (125 MiB each) exceed the working space the budget leaves above the interpreter and
    torch, yet the merge stays within it: tensors pass in row blocks, nothing is loaded whole. The baseline
    varies with the page cache (220-290 MiB), so the budget is set from a measured one."""
    probe = subprocess.run([sys.executable, "-c", "import lorastream.cli, psutil; "
                            "print(psutil.Process().memory_info().rss)"], capture_output=True, text=True, check=True)
    working = 96 << 20
    budget = int(probe.stdout) + working
    run = litgpt_cases / "wide_bf16" / "run"
    assert working < 64000 * 1024 * 2
    done = subprocess.run([sys.executable, "-m", "lorastream", "merge", str(run), "-o", str(tmp_path / "out"),
                           "--max-memory", str(budget), "--json", "-q"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["peak_rss"] <= budget
    reference = torch.load(litgpt_cases / "wide_bf16" / "reference" / "lit_model.pth", weights_only=True, mmap=True)
    assert_identical(torch.load(tmp_path / "out" / "lit_model.pth", weights_only=True, mmap=True), reference)


def test_legacy_interleaved_layout(litgpt_cases: Path, tmp_path: Path) -> None:
    """A litgpt <= 0.5.4 run (attn.attn, q/k/v interleaved per query group) merges into the same values."""
    legacy = litgpt_cases / "gqa_all_fp32" / "legacy_run"
    api.merge_litgpt(legacy, tmp_path / "merged")
    ours = torch.load(tmp_path / "merged" / "lit_model.pth", weights_only=True)
    assert_identical(ours, torch.load(litgpt_cases / "gqa_all_fp32" / "legacy_reference.pth", weights_only=True))
    assert {p.name for p in (tmp_path / "merged").iterdir()} >= {"model_config.yaml", "tokenizer.json"}
    api.merge_litgpt(legacy, tmp_path / "hf", format="hf")
    assert_identical(load_output(tmp_path / "hf"),
                     torch.load(litgpt_cases / "gqa_all_fp32" / "reference_hf" / "model.pth", weights_only=True))


@pytest.mark.parametrize("case", ["gqa_all_bf16", "gqa_all_fp32", "neox_fp32"])
def test_hf_export_equals_litgpt_conversion_and_loads_in_transformers(litgpt_cases: Path, tmp_path: Path,
                                                                      case: str) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    api.merge_litgpt(litgpt_cases / case / "run", out, format="hf", max_shard_size="100KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "tokenizer.json").is_file()
    reference = torch.load(litgpt_cases / case / "reference_hf" / "model.pth", weights_only=True)
    assert_identical(load_output(out), reference)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == next(iter(reference.values())).dtype
    logits = litgpt_cases / case / "logits.pt"
    if logits.exists():
        expected = torch.load(logits, weights_only=True)
        with torch.no_grad():
            got = model(expected["tokens"]).logits
        torch.testing.assert_close(got, expected["logits"], rtol=0, atol=1e-4)


def test_cli_merge_detects_a_litgpt_run(litgpt_cases: Path, tmp_path: Path) -> None:
    run = litgpt_cases / "q_only_mixed" / "run"
    runner = CliRunner()
    first = runner.invoke(main, ["merge", str(run), "-o", str(tmp_path / "out"), "--dtype", "bfloat16", "-q"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "out" / "lit_model.pth").is_file()
    again = runner.invoke(main, ["merge", "--max-memory", "1GiB", str(run), "-o", str(tmp_path / "out")])
    assert again.exit_code == 2 and "not empty" in again.output
    ours = read_state_dict(tmp_path / "out" / "lit_model.pth")
    assert {ref.dtype for ref in ours.values()} == {torch.bfloat16}


def test_wrong_flags_and_destinations_are_refused(litgpt_cases: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(litgpt_cases / "q_only_mixed" / "run", run, ignore=shutil.ignore_patterns("lit_model.pth"))
    runner = CliRunner()
    into_run = runner.invoke(main, ["merge-litgpt", str(run), "-o", str(run), "--format", "hf", "--overwrite"])
    assert into_run.exit_code == 2 and "is the LoRA run" in into_run.output
    text = (run / "hyperparameters.yaml").read_text().replace("lora_key: false", "lora_key: true")
    (run / "hyperparameters.yaml").write_text(text)
    result = runner.invoke(main, ["merge", str(run)])
    assert result.exit_code == 2 and "lora_key" in result.output
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (litgpt_cases / "q_only_mixed" / "run")
                                                           .iterdir() if p.name != "lit_model.pth")


def _round_trip(path: Path) -> dict[str, torch.Tensor]:
    """Write a few tensors of every kind in 5-byte chunks (straddling entries); the writer's size and CRC-32 are
    the file's (the resume manifest records them)."""
    generator = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(3, 4, generator=generator), "empty": torch.empty(0, 3),
             "b": torch.randn(5, generator=generator).bfloat16(), "scalar": torch.tensor(2.5), "i": torch.arange(7),
             "h": torch.randn(2, 3, 4, generator=generator).half(), "mask": torch.tensor([True, False])}
    writer = torchzip_writer.TorchZipWriter(path, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()])
    data = b"".join(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for v in state.values())
    for start in range(0, len(data), 5):
        writer.write(data[start:start + 5])
    writer.commit()
    assert (writer.size, writer.crc32) == (path.stat().st_size, zlib.crc32(path.read_bytes()))
    return state


@pytest.mark.parametrize("zip64_limit", [0xFFFFFFFF, 64])
def test_torch_zip_writer_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip64_limit: int) -> None:
    """torch.load (plain and mmap) and our reader get the tensors back; zip64 fields tested with a lowered limit."""
    monkeypatch.setattr(torchzip_writer, "ZIP64_LIMIT", zip64_limit)
    path = tmp_path / "lit_model.pth"
    state = _round_trip(path)
    for options in ({}, {"mmap": True}):
        loaded = torch.load(path, weights_only=True, **options)
        assert list(loaded) == list(state)
        for name, tensor in state.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert zipfile.ZipFile(path).testzip() is None
    for name, ref in read_state_dict(path).items():
        assert torch.equal(ref.read(), state[name]), name
    if zip64_limit == 0xFFFFFFFF:  # laid out byte for byte as torch.save lays it out, up to its random id record
        (tmp_path / "torch").mkdir()
        torch.save(state, tmp_path / "torch" / "lit_model.pth")
        ours, theirs = path.read_bytes(), (tmp_path / "torch" / "lit_model.pth").read_bytes()
        end = zipfile.ZipFile(path).getinfo("lit_model/version").header_offset
        assert ours[:end] == theirs[:end]
        assert struct.unpack("<H", ours[6:8]) == (0x0808,)


def test_a_sliver_of_a_fused_part_rounds_as_the_whole_part() -> None:
    """A row block that holds only a few rows of q, k or v still gets the bits of LitGPT's whole-part product
    (torch's matmul of fewer than 12 rows takes a kernel that rounds differently)."""
    from lorastream.engine import _LoadedDelta

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 64, generator=generator), torch.randn(96, 8, generator=generator)
    delta = _LoadedDelta(a, b, 0.75, False, row_offset=10)
    work, scratch = torch.zeros(107, 64), torch.empty(107 * 64)
    for start, stop in [(0, 11), (11, 17), (17, 100), (100, 105), (105, 107)]:
        delta.add_rows(work[start:stop], scratch, start, stop)
    assert torch.equal(work[10:106], (b @ a) * 0.75) and not work[:10].any() and not work[106:].any()
