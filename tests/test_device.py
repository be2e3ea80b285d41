"""`--device` and `--max-gpu-memory`: merging on an accelerator.

There is no GPU in CI, so the accelerator path runs with the CPU standing in for the GPU: the engine's code is
the same on every device, only the `torch.device` differs. The CPU standing in must give the bytes the plain
CPU path gives (same kernels, same order); on a real GPU dense results may differ by the GPU's rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import Case, build_case, tiny_llama
from test_quantized import quantize

import lorastream
import lorastream.device
from lorastream.cli import main
from lorastream.device import NO_CUDA_NOTICE, Accelerator
from lorastream.formats.safetensors import read_header
from lorastream.inputs.hf import identity
from lorastream.options import MergeOptions
from lorastream.outputs.base import PROVENANCE_FILE

MiB = 2**20
FAKE_FREE = 512 * MiB
FAKE_LIBRARIES = MiB  # a stand-in for the cuBLAS workspace a real GPU keeps (32 MiB on an H200)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Inner dimensions that are multiples of 64, so every 4-bit path applies."""
    return build_case(tmp_path_factory.mktemp("device"), tiny_llama(hidden_size=128, intermediate_size=320),
                      torch.bfloat16, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lorastream.device, "cuda_device", lambda: None)


@pytest.fixture
def cpu_as_gpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`--device cuda` finds a "GPU" that is the CPU, with FAKE_FREE bytes free and FAKE_LIBRARIES taken by
    torch's libraries; counts blocks copied back."""
    copies: list[int] = []
    to_host = Accelerator.to_host
    monkeypatch.setattr(lorastream.device, "cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(lorastream.device, "free_memory", lambda _device: FAKE_FREE)
    monkeypatch.setattr(lorastream.device, "library_bytes", lambda _device: FAKE_LIBRARIES)

    def counted(self: Accelerator, result: torch.Tensor, out: torch.Tensor) -> None:
        copies.append(1)
        to_host(self, result, out)

    monkeypatch.setattr(Accelerator, "to_host", counted)
    return copies


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_auto_and_cuda_without_a_gpu_merge_on_the_cpu(case: Case, tmp_path: Path, no_gpu: None) -> None:
    runs = {device: cli("merge", case.base, case.adapter, "-o", tmp_path / device, "--device", device, "-q")
            for device in ("cpu", "auto", "cuda")}
    for device, run in runs.items():
        assert run.exit_code == 0, run.stderr
        assert shard_bytes(tmp_path / device) == shard_bytes(tmp_path / "cpu")
        assert (NO_CUDA_NOTICE in run.stderr) == (device == "cuda"), run.stderr
    assert runs["cuda"].stderr.count(NO_CUDA_NOTICE) == 1


@pytest.mark.parametrize("options", [{}, {"quantize": "nf4"}, {"quantize": "int8"}, {"trained_on": "nf4"}],
                         ids=["dense", "quantize-nf4", "quantize-int8", "trained-on-nf4"])
def test_accelerator_path_gives_the_cpu_bytes(case: Case, tmp_path: Path, smallest_blocks: None,
                                              cpu_as_gpu: list[int], options: dict[str, str]) -> None:
    lorastream.merge(case.base, case.adapter, tmp_path / "cpu", **options)  # type: ignore[arg-type]
    assert not cpu_as_gpu
    lorastream.merge(case.base, case.adapter, tmp_path / "gpu", device="cuda", **options)  # type: ignore[arg-type]
    assert len(cpu_as_gpu) > 10  # every row block went through the device and back
    assert shard_bytes(tmp_path / "gpu") == shard_bytes(tmp_path / "cpu")


@pytest.fixture(scope="module")
def quantized_bases(case: Case, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The case's base saved by transformers + bitsandbytes in NF4 (double-quantized) and in int8."""
    root = tmp_path_factory.mktemp("quantized")
    quantize(case.base, root / "nf4", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantize(case.base, root / "int8", load_in_8bit=True)
    return {"nf4": root / "nf4", "int8": root / "int8"}


@pytest.mark.parametrize(("base", "options"), [("nf4", {}), ("int8", {}), ("nf4", {"quantize": "nf4"})],
                         ids=["nf4-base", "int8-base", "nf4-base-requantized"])
def test_accelerator_decodes_a_quantized_base_as_the_cpu(case: Case, quantized_bases: dict[str, Path],
                                                         tmp_path: Path, smallest_blocks: None,
                                                         cpu_as_gpu: list[int], base: str,
                                                         options: dict[str, str]) -> None:
    lorastream.merge(quantized_bases[base], case.adapter, tmp_path / "cpu", **options)  # type: ignore[arg-type]
    lorastream.merge(quantized_bases[base], case.adapter, tmp_path / "gpu", device="cuda",
                     **options)  # type: ignore[arg-type]
    assert len(cpu_as_gpu) > 10
    assert shard_bytes(tmp_path / "gpu") == shard_bytes(tmp_path / "cpu")


def test_plan_shows_the_gpu_budget_and_sizes_blocks_by_it(case: Case, tmp_path: Path, cpu_as_gpu: list[int]) -> None:
    plain = cli("plan", case.base, case.adapter, "-o", tmp_path / "out")
    assert plain.exit_code == 0, plain.stderr
    assert "gpu " not in plain.stdout
    default = json.loads(cli("plan", case.base, case.adapter, "-o", tmp_path / "out", "--device", "auto",
                             "--json").stdout)
    assert default["gpu"]["budget"] == int(FAKE_FREE * lorastream.device.DEFAULT_GPU_FRACTION)
    shown = cli("plan", case.base, case.adapter, "-o", tmp_path / "out", "--device", "cuda", "--max-gpu-memory",
                "3MiB")
    assert shown.exit_code == 0, shown.stderr
    assert "gpu       budget 3.0 MiB" in shown.stdout
    assert "cuBLAS workspace 1.0 MiB" in shown.stdout
    gpu = json.loads(cli("plan", case.base, case.adapter, "-o", tmp_path / "out", "--device", "cuda",
                         "--max-gpu-memory", "3MiB", "--json").stdout)
    assert gpu["gpu"]["budget"] == 3 * MiB
    assert gpu["gpu"]["libraries"] == FAKE_LIBRARIES  # the workspace a real GPU keeps is in the budget
    assert (gpu["block_elements"] * gpu["gpu"]["bytes_per_element"] + gpu["gpu"]["adapter_peak"]
            + gpu["gpu"]["libraries"] <= 3 * MiB)
    assert gpu["block_elements"] < json.loads(cli("plan", case.base, case.adapter, "-o", tmp_path / "out",
                                                  "--json").stdout)["block_elements"]


def test_too_little_gpu_memory_is_refused_before_writing(case: Case, tmp_path: Path, cpu_as_gpu: list[int]) -> None:
    for command in ("plan", "merge"):
        run = cli(command, case.base, case.adapter, "-o", tmp_path / "out", "--device", "cuda",
                  "--max-gpu-memory", "100KiB")
        assert run.exit_code == 3, run.stderr
        assert "--max-gpu-memory 100.0 KiB is below the" in run.stderr
    assert not (tmp_path / "out").exists()
    garbled = cli("plan", case.base, case.adapter, "-o", tmp_path / "out", "--device", "cuda",
                  "--max-gpu-memory", "lots")
    assert garbled.exit_code == 2
    assert "size 'lots'" in garbled.stderr


def test_a_gpu_merge_is_recorded_and_verified_with_tolerance(case: Case, tmp_path: Path) -> None:
    """A GPU's output may differ from the CPU's by a rounding step: `verify` compares it with tolerance."""
    result = lorastream.merge(case.base, case.adapter, tmp_path / "out")
    shard = next((tmp_path / "out").glob("*.safetensors"))
    ref = read_header(shard).tensors["model.layers.0.self_attn.q_proj.weight"]
    with shard.open("r+b") as f:  # one element one bf16 step off, as a GPU's rounding may leave it
        f.seek(ref.offset)
        value = int.from_bytes(f.read(2), "little")
        f.seek(ref.offset)
        f.write((value ^ 1).to_bytes(2, "little"))
    assert not lorastream.verify(case.base, case.adapter, result.out_dir).ok  # a CPU merge: bit for bit
    record = json.loads((result.out_dir / PROVENANCE_FILE).read_text())
    gpu_record, _ = identity(lorastream.plan(case.base, case.adapter, tmp_path / "other"), MergeOptions(),
                             Accelerator(torch.device("cuda"), MiB))
    record["options"]["device"] = gpu_record["options"]["device"]
    (result.out_dir / PROVENANCE_FILE).write_text(json.dumps(record))
    assert lorastream.verify(case.base, case.adapter, result.out_dir).ok
