"""Tiny real-architecture models and real PEFT adapters, built by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Budget for merges run inside the test process. A merge's baseline is its whole process's RSS, and the test
# process grows with every model earlier tests built (about 1 GiB by the LitGPT tests in a full run), so a tight
# in-process budget fails by test order, not by lorastream. Memory bounds are tested in subprocesses
# (test_memory, test_gguf, test_litgpt's peak RSS tests).
IN_PROCESS_BUDGET = "8GiB"


def tiny_llama(**overrides: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    config.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config))


def tiny_gpt2(**overrides: object) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(vocab_size=384, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    config.update(overrides)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**config))


@dataclass(frozen=True)
class Case:
    """A base model folder, a PEFT adapter folder for it, and how to rebuild the reference."""

    base: Path
    adapter: Path
    dtype: torch.dtype
    model_class: type


def build_case(root: Path, model: torch.nn.Module, dtype: torch.dtype, *, safe_serialization: bool = True,
               prepare: Callable[[torch.nn.Module], None] | None = None, **lora: object) -> Case:
    """Save `model` in `dtype` and a PEFT LoRA adapter with random (non-identity) trained weights; `prepare` changes
    the model between the two, as a training script does (`resize_token_embeddings`)."""
    from peft import LoraConfig, get_peft_model

    base, adapter = root / "base", root / "adapter"
    model = model.to(dtype)
    model.save_pretrained(base)
    if prepare is not None:
        prepare(model)
    if not safe_serialization:  # the legacy layout: pytorch_model.bin written by torch.save
        for path in base.glob("*.safetensors"):
            path.unlink()
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()
                    if k != "lm_head.weight" or not model.config.tie_word_embeddings}, base / "pytorch_model.bin")
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:  # LoRA A/B, DoRA magnitudes, biases, modules_to_save
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    peft_model.save_pretrained(adapter, safe_serialization=safe_serialization)
    return Case(base, adapter, dtype, type(model))


def peft_reference(case: Case, dtype: torch.dtype | None = None,
                   prepare: Callable[[torch.nn.Module], None] | None = None
                   ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """PEFT's own merge: load base and adapter (after `prepare`, as `build_case` had it), `merge_and_unload()`;
    the model and its state dict."""
    from peft import PeftModel

    model = case.model_class.from_pretrained(case.base, dtype=dtype or case.dtype)
    if prepare is not None:
        prepare(model)
    merged = PeftModel.from_pretrained(model, case.adapter).merge_and_unload()
    return merged, merged.state_dict()


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture
def smallest_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the smallest row blocks the engine allows, so every multi-block path is exercised."""
    import lorastream.planner

    monkeypatch.setattr(lorastream.planner, "MAX_BLOCK_ELEMENTS", 1)


CaseFactory = Callable[..., Case]


@pytest.fixture
def make_case(tmp_path: Path) -> CaseFactory:
    def factory(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, **kwargs: object) -> Case:
        return build_case(tmp_path, model, dtype, **kwargs)

    return factory


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The built-in demo model and adapter, built once per test module."""
    from lorastream.demo import build_demo_adapter, build_demo_model

    root = tmp_path_factory.mktemp("demo")
    build_demo_model(root / "base")
    build_demo_adapter(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[tuple[Any, dict[str, str]]]:
    """A moto S3 server on 127.0.0.1 (random port) and the AWS_* variables that lead s3fs to it, as they would
    to any endpoint (set here; subprocesses and Ray workers can be given them)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    variables = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as env:
        for name, value in variables.items():
            env.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems: one may lead to an earlier server
        yield s3fs.S3FileSystem(skip_instance_cache=True), variables
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
