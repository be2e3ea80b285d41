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
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import IN_PROCESS_BUDGET, load_output

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


def run_litgpt_script(root: Path, script: Path, cases: dict[str, dict]) -> Path:
    """Build every case with litgpt, in one run of its interpreter (importing litgpt takes seconds)."""
    if not LITGPT_PYTHON.exists():  # a missing reference must not pass silently as skipped
        pytest.fail(f"{LITGPT_PYTHON} is missing; `make test` creates it")
    spec = root / "cases.json"
    spec.write_text(json.dumps({"root": str(root), "cases": {k: {**v, "seed": i} for i, (k, v) in
                                                             enumerate(cases.items())}}))
    done = subprocess.run([str(LITGPT_PYTHON), str(script), str(spec)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def litgpt_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case built and merged by litgpt."""
    return run_litgpt_script(tmp_path_factory.mktemp("litgpt"), Path(__file__).with_name("litgpt_reference.py"),
                             CASES)


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
    result = api.merge_litgpt(run, max_memory=IN_PROCESS_BUDGET)
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
    again = runner.invoke(main, ["merge", "--max-memory", IN_PROCESS_BUDGET, str(run), "-o", str(tmp_path / "out")])
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
    # the Hugging Face way, base then adapter: the base is named, with the way LitGPT runs are merged
    as_hf = runner.invoke(main, ["merge", str(litgpt_cases / "q_only_mixed" / "base"), str(run), "-o",
                                 str(tmp_path / "out")])
    assert as_hf.exit_code == 2 and "a LitGPT checkpoint (lit_model.pth)" in as_hf.output
    assert "lorastream merge RUN" in as_hf.output and not (tmp_path / "out").exists()


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


def _copy_run(source: Path, target: Path, **hyperparameters: object) -> Path:
    """A copy of a LoRA run without a merged lit_model.pth, with some hyperparameters changed."""
    import shutil

    import yaml

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("lit_model.pth"))
    recorded = yaml.safe_load((target / "hyperparameters.yaml").read_text())
    (target / "hyperparameters.yaml").write_text(yaml.safe_dump({**recorded, **hyperparameters}))
    return target


def test_plan_and_inspect_describe_litgpt_folders(litgpt_cases: Path, tmp_path: Path) -> None:
    case = litgpt_cases / "q_only_mixed"
    run = _copy_run(case / "run", tmp_path / "run")
    runner = CliRunner()
    planned = runner.invoke(main, ["plan", str(run), "--json"])
    assert planned.exit_code == 0, planned.output
    merged = torch.load(case / "reference" / "lit_model.pth", weights_only=True)
    plan = json.loads(planned.output)
    assert [s["file"] for s in plan["shards"]] == ["lit_model.pth"] and plan["fits"]
    assert plan["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    hf = runner.invoke(main, ["plan", "--max-shard-size", "100KB", str(run), "-o", str(tmp_path / "hf"), "--format",
                              "hf"])
    assert hf.exit_code == 0, hf.output
    assert "model-00001-of-" in hf.output and "model.layers.0.self_attn.q_proj.weight" in hf.output
    too_small = runner.invoke(main, ["plan", str(run), "--max-memory", "1MiB"])
    assert too_small.exit_code == 3 and "--max-memory" in too_small.output
    assert not (run / "lit_model.pth").exists() and not (tmp_path / "hf").exists()

    lora = torch.load(run / "lit_model.pth.lora", weights_only=True)["model"]
    info = api.inspect(run)
    assert info["format"] == "litgpt-lora" and (info["lora_r"], info["lora_alpha"]) == (8, 3)
    assert info["enabled"] == ["query", "projection"] and info["quantize"] is None
    assert info["precision"] == "bf16-mixed" and info["checkpoint_dir"] == str(case / "base")
    assert (info["model"], info["hf_architecture"], info["merged"]) == ("tiny-llama", "LlamaForCausalLM", None)
    assert info["tensors"] == len(lora) and info["dtypes"] == {"float32": len(lora)}
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in lora.values())
    base = api.inspect(case / "base")
    assert base["format"] == "litgpt" and base["tensors"] == len(merged) and base["n_query_groups"] == 2
    assert api.inspect(litgpt_cases / "moe_bf16" / "base")["hf_architecture"] == "MixtralForCausalLM"
    shown = runner.invoke(main, ["inspect", str(run)])
    assert shown.exit_code == 0 and "lora_r" in shown.output and "['query', 'projection']" in shown.output


def test_verify_accepts_litgpt_merge_lora_output_and_catches_tampering(litgpt_cases: Path, tmp_path: Path) -> None:
    """`litgpt merge_lora`'s own lit_model.pth verifies exactly; one changed byte fails with exit 4; an exported
    Hugging Face folder verifies too."""
    import shutil

    reference = litgpt_cases / "gqa_all_bf16" / "reference"  # the run folder litgpt merge_lora wrote into
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(reference), str(reference)])
    assert ok.exit_code == 0 and "all tensors match" in ok.output, ok.output
    tampered = tmp_path / "lit_model.pth"
    shutil.copy(reference / "lit_model.pth", tampered)
    name = "transformer.h.1.mlp.proj.weight"
    ref = read_state_dict(tampered)[name]
    with tampered.open("r+b") as f:
        f.seek(ref.offset + ref.nbytes - 1)  # the sign and exponent byte of the last element
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x40]))
    bad = runner.invoke(main, ["verify", str(reference), str(tampered)])
    assert bad.exit_code == 4, bad.output
    assert [line.split()[0] for line in bad.output.splitlines() if "MISMATCH" in line] == [name]
    api.merge_litgpt(reference, tmp_path / "hf", format="hf", max_shard_size="100KB")
    report = api.verify_litgpt(reference, tmp_path / "hf")
    assert report.ok and len(report.checks) == len(load_output(tmp_path / "hf"))
    api.merge_litgpt(reference, tmp_path / "nf4", format="hf", quantize="nf4")  # options recorded, then reused
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    report = api.verify_litgpt(reference, tmp_path / "nf4")
    assert report.ok and any(c.name.endswith(".quant_state.bitsandbytes__nf4") for c in report.checks)


def test_trained_on_merges_into_the_base_bitsandbytes_round_trips(litgpt_cases: Path, tmp_path: Path) -> None:
    """--trained-on: lorastream's merge equals `litgpt merge_lora` into a base whose linear weights (lm_head too,
    as Lightning's BitsandbytesPrecision quantizes every nn.Linear) went through bitsandbytes'
    quantize_4bit/dequantize_4bit; double quantization as the run's `quantize` says."""
    import bitsandbytes as bnb

    case = litgpt_cases / "gqa_all_bf16"
    dense = torch.load(case / "base" / "lit_model.pth", weights_only=True)
    variants = {"nf4": "bnb.nf4-dq", "fp4": "bnb.fp4"}
    for quant_type, quantize in variants.items():
        base = tmp_path / f"{quant_type}-base"
        base.mkdir()
        for path in (case / "base").iterdir():
            if path.name != "lit_model.pth":
                (base / path.name).write_bytes(path.read_bytes())
        seen = {}
        for name, weight in dense.items():
            if weight.ndim == 2 and name != "transformer.wte.weight":
                # flat, as CUDA (where QLoRA trains) blocks any shape; bitsandbytes' CPU kernel blocks a 2-D
                # weight row by row when its width (here mlp.proj's 160) is not a multiple of 64
                packed, state = bnb.functional.quantize_4bit(weight.reshape(-1), blocksize=64, quant_type=quant_type,
                                                             compress_statistics=quantize.endswith("-dq"))
                weight = bnb.functional.dequantize_4bit(packed, state).view(weight.shape)
            seen[name] = weight
        torch.save(seen, base / "lit_model.pth")
        _copy_run(case / "run", tmp_path / f"{quant_type}-run", quantize=quantize)
        _copy_run(case / "run", tmp_path / f"{quant_type}-reference", quantize=quantize, checkpoint_dir=str(base))
    script = ("import sys; from pathlib import Path; from litgpt.scripts.merge_lora import merge_lora\n"
              "for p in sys.argv[1:]: merge_lora(Path(p))")
    done = subprocess.run([str(LITGPT_PYTHON), "-c", script, *(str(tmp_path / f"{q}-reference") for q in variants)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runner = CliRunner()
    for quant_type in variants:
        run = tmp_path / f"{quant_type}-run"
        merged = runner.invoke(main, ["merge", str(run), "--trained-on", quant_type, "-q"])
        assert merged.exit_code == 0, merged.output
        ours = torch.load(run / "lit_model.pth", weights_only=True)
        assert_identical(ours, torch.load(tmp_path / f"{quant_type}-reference" / "lit_model.pth", weights_only=True))
        dense_merge = torch.load(case / "reference" / "lit_model.pth", weights_only=True)
        assert not torch.equal(ours["transformer.h.0.attn.qkv.weight"], dense_merge["transformer.h.0.attn.qkv.weight"])
        assert not torch.equal(ours["transformer.h.0.mlp.fc_1.weight"], dense["transformer.h.0.mlp.fc_1.weight"])
    recorded = api.merge_litgpt(tmp_path / "nf4-run", tmp_path / "nf4-out", trained_on="nf4")
    assert api.verify_litgpt(tmp_path / "nf4-run", recorded.out_dir).ok  # --trained-on taken from lorastream.json
    assert not api.verify_litgpt(tmp_path / "nf4-run", recorded.out_dir, trained_on="fp4").ok
    # --format hf: the fused qkv round-tripped whole, then split; the same as the export of the merge into the
    # round-tripped base (which equals `litgpt convert_from_litgpt`'s, see the export tests)
    for quant_type in variants:
        trained = api.merge_litgpt(tmp_path / f"{quant_type}-run", tmp_path / f"{quant_type}-hf", format="hf",
                                   trained_on=quant_type)
        reference = api.merge_litgpt(tmp_path / f"{quant_type}-run", tmp_path / f"{quant_type}-hf-reference",
                                     base=tmp_path / f"{quant_type}-base", format="hf")
        assert_identical(load_output(trained.out_dir), load_output(reference.out_dir))
        assert api.verify_litgpt(tmp_path / f"{quant_type}-run", trained.out_dir).ok
    with pytest.raises(InputError, match="--format hf"):
        api.plan_litgpt(tmp_path / "nf4-run", quantize="nf4")


def test_checksums_in_parallel_pieces_equal_zlib() -> None:
    import os

    from lorastream.formats.crc32 import PIECE, Checksummer, crc32_combine

    data = memoryview(os.urandom(5 * PIECE + 3))
    checksummer = Checksummer(threads=3)
    assert checksummer.start(data)(7) == zlib.crc32(data, 7)
    checksummer.close()
    for split in (0, 1, PIECE, len(data)):
        assert crc32_combine(zlib.crc32(data[:split]), zlib.crc32(data[split:]), len(data) - split) == zlib.crc32(data)


def test_lit_model_pth_over_4_gib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real zip64 checkpoint: a tensor of 4 GiB + 100 bytes, then one stored past 4 GiB. Its zeros become a
    hole in a sparse file (the writer's os.write seeks over the zero buffer) and their CRC is combined from one
    buffer's, so the test takes seconds and a few MiB of disk; torch.load(mmap=True) and our reader read it."""
    import os
    import types

    from lorastream.formats.crc32 import Checksummer, crc32_combine

    zeros = bytearray(64 << 20)
    zeros_crc = zlib.crc32(zeros)

    def write(fd: int, data: memoryview | bytes) -> int:
        if isinstance(data, memoryview) and data.obj is zeros:
            os.lseek(fd, len(data), os.SEEK_CUR)
            return len(data)
        return os.write(fd, data)

    class KnowsZeros(Checksummer):
        def start(self, view: memoryview) -> Callable[[int], int]:
            if view.obj is zeros:
                return lambda crc: crc32_combine(crc, zeros_crc, len(view))
            return super().start(view)

    monkeypatch.setattr(torchzip_writer, "os", types.SimpleNamespace(write=write))
    monkeypatch.setattr(torchzip_writer, "Checksummer", KnowsZeros)
    end = torch.randint(0, 256, (100,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tail = torch.arange(6, dtype=torch.float32)
    path = tmp_path / "lit_model.pth"
    writer = torchzip_writer.TorchZipWriter(path, [TensorSpec("big", torch.uint8, ((4 << 30) + 100,)),
                                                   TensorSpec("tail", torch.float32, (6,))])
    for _ in range(64):
        writer.write(memoryview(zeros))
    writer.write(end.numpy().tobytes())
    writer.write(tail.numpy().tobytes())
    writer.commit()
    try:
        assert path.stat().st_size > 4 << 30 and path.stat().st_blocks * 512 < 64 << 20
        info = zipfile.ZipFile(path).getinfo("lit_model/data/1")
        assert info.header_offset > 0xFFFFFFFF
        loaded = torch.load(path, weights_only=True, mmap=True)
        assert loaded["big"].shape == ((4 << 30) + 100,)
        assert torch.equal(loaded["big"][-100:], end) and not loaded["big"][-(1 << 20):-100].any()
        assert torch.equal(loaded["tail"], tail)
        refs = read_state_dict(path)
        assert torch.equal(refs["tail"].read(), tail) and refs["big"].nbytes == (4 << 30) + 100
        del loaded
    finally:
        path.unlink()


def test_gguf_equals_llama_cpp_on_the_hf_export(litgpt_cases: Path, tmp_path: Path) -> None:
    """`--format gguf` from a LitGPT run (with a real SentencePiece tokenizer): the same file llama.cpp's converter
    (and llama-quantize) makes from the run's `--format hf` export, which equals `litgpt convert_from_litgpt`'s
    (above); `verify` recomputes it, and the command line routes a run there."""
    import shutil

    from test_gguf import Family, assert_same_gguf, sentencepiece_tokenizer

    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(litgpt_cases / "gqa_all_bf16" / "base", base)
    shutil.copytree(litgpt_cases / "gqa_all_bf16" / "run", run)
    for folder in (base, run):  # the run keeps copies of the checkpoint's tokenizer files, as litgpt's do
        (folder / "tokenizer.json").unlink()
        for name, data in sentencepiece_tokenizer().items():
            (folder / name).write_bytes(data)
    api.merge_litgpt(run, tmp_path / "hf", base=base, format="hf")
    llama_cpp = Family(base, run, tmp_path / "hf", tmp_path)
    for qtype in ("bf16", "q4_k_m"):
        out = tmp_path / f"{qtype}.gguf"
        api.merge_litgpt(run, out, base=base, format="gguf", **({} if qtype == "bf16" else {"quantize": qtype}))
        assert_same_gguf(out, llama_cpp.reference(qtype))
        assert api.verify_litgpt(run, out, base=base).ok
    result = CliRunner().invoke(main, ["merge", str(run), "--base", str(base), "-o", str(tmp_path / "q8.gguf"),
                                       "--format", "gguf", "--quantize", "q8_0", "-q"])
    assert result.exit_code == 0, result.output
    assert_same_gguf(tmp_path / "q8.gguf", llama_cpp.reference("q8_0"))
    with pytest.raises(InputError, match="needs an output file"):
        api.merge_litgpt(run, None, base=base, format="gguf")
    trained = tmp_path / "trained.gguf"
    api.merge_litgpt(run, trained, base=base, format="gguf", trained_on="nf4")
    assert api.verify_litgpt(run, trained, base=base, trained_on="nf4").ok
    assert not api.verify_litgpt(run, trained, base=base).ok  # the dense merge is another file
