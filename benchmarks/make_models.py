"""Build synthetic Llama-style models and LoRA adapters for the lorastream benchmark.

Everything is generated locally with random weights (nothing is downloaded). For one size this writes,
under ``WORKDIR/SIZE/``:

``hf-base/``
    A Hugging Face ``LlamaForCausalLM`` folder: ``config.json``, ``generation_config.json``, bf16
    safetensors shards (plus ``model.safetensors.index.json`` when sharded) and a tiny placeholder tokenizer.
``peft-adapter/``
    A PEFT LoRA adapter (r=16, alpha=32, all seven linear projections of every layer), fp32.
``peft-adapter-2/`` to ``peft-adapter-4/``
    Three more adapters like it, with other random values (for ``lorastream merge BASE --each A1 A2 A3 A4``).
    A build made before they existed gets them added on its next use.
``litgpt-base/``
    The same base weights as a LitGPT checkpoint: ``lit_model.pth``, ``model_config.yaml``, tokenizer files.
``litgpt-lora/``
    The same adapter as a ``litgpt finetune lora`` output folder: ``lit_model.pth.lora``,
    ``hyperparameters.yaml``, ``model_config.yaml``, tokenizer files. ``litgpt merge_lora`` writes its
    merged ``lit_model.pth`` here.
``manifest.json``
    Sizes and parameter counts; written last, so its presence marks a complete build.

With ``--nf4`` (built only on request, after and apart from the above, which it leaves as they are):

``hf-nf4/``
    ``hf-base`` quantized to bitsandbytes NF4 by transformers on the CPU (double quantization, bf16 compute
    dtype; ``lm_head`` and the embeddings stay bf16, as transformers leaves them), saved with
    ``save_pretrained``, plus the tokenizer files of ``hf-base``. This is the checkpoint a QLoRA user has.
``litgpt-qlora/``
    ``litgpt-lora/`` as a QLoRA run: the same adapter (the ``lit_model.pth.lora`` file hard-linked), with
    ``quantize: bnb.nf4`` in ``hyperparameters.yaml`` (``litgpt finetune lora --quantize bnb.nf4``).
    ``litgpt merge_lora`` merges it into the dense base; an NF4 build from before it existed gets it added.
``nf4-manifest.json``
    Its quantization settings and size; written last, so its presence marks a complete NF4 build.

The HF shards are written one shard at a time, each tensor generated just before it is needed, so the whole
model is never in memory. The LitGPT base is read back from those shards (so both formats hold identical
values); ``torch.save`` needs that state dict in memory at once, so building it costs about one model size of
RAM, in this process only.

The LoRA values are drawn in bf16 and stored as fp32 in the PEFT adapter and as bf16 in the LitGPT one (what
``litgpt finetune lora --precision bf16-true`` saves), so the two adapters hold exactly the same numbers.

Quantizing to NF4 loads the bf16 model into transformers, so it also costs about one model size of RAM, in this
process only. The PEFT adapter serves both bases (QLoRA trains on the dequantized NF4 weights, with the same
module names).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

LORA_R = 16
LORA_ALPHA = 32
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_SHARD_BYTES = 2_000_000_000
# Sizes whose HF shards are larger than DEFAULT_SHARD_BYTES: 7b is sharded as save_pretrained does (5 GB).
SHARD_BYTES = {"7b": 5_000_000_000}
# Adapters besides peft-adapter/, for the multi-output case; adapter k is drawn from seed + k * EXTRA_SEED_STEP.
EXTRA_ADAPTERS = 3
EXTRA_SEED_STEP = 1000
DEFAULT_WORKDIR = Path("/tmp/lsbench")
# How hf-nf4/ is quantized (plus bnb_4bit_compute_dtype=bfloat16): QLoRA's usual settings.
NF4_SETTINGS = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one synthetic Llama-style model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Output size of the k and v projections."""
        return self.head_dim * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of each of the seven linear projections of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def merged_bytes(self) -> int:
        """bf16 bytes of the weights the adapters change (the seven projections of every layer)."""
        return 2 * self.layers * sum(o * i for o, i in self.linear_shapes().values())

    def n_params(self) -> int:
        """Number of parameters of the base model (untied embeddings and head)."""
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


SPECS: dict[str, ModelSpec] = {
    # ~21M params, ~42 MB: smoke tests. GQA (kv_heads < heads) so LitGPT's grouped qkv path is exercised.
    "tiny": ModelSpec(hidden=256, intermediate=704, layers=6, heads=4, kv_heads=2),
    # ~0.94B params, ~1.9 GB bf16 (TinyLlama-like widths).
    "2gb": ModelSpec(hidden=2048, intermediate=5632, layers=18, heads=32, kv_heads=8),
    # ~4.0B params, ~8.0 GB bf16 (Llama-2-7B widths, fewer layers).
    "8gb": ModelSpec(hidden=4096, intermediate=11008, layers=21, heads=32, kv_heads=8),
    # ~6.74B params, ~13.5 GB bf16: Llama-2-7B's shapes (multi-head attention, no GQA).
    "7b": ModelSpec(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
}


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from the run seed and the tensor name, so every tensor is reproducible."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _random(shape: tuple[int, ...], std: float, seed: int, name: str) -> torch.Tensor:
    """A bf16 tensor of normal values with the given standard deviation."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    return out.normal_(0.0, std, generator=_generator(seed, name))


def hf_tensor_specs(spec: ModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the HF checkpoint's tensors, in file order."""
    yield "model.embed_tokens.weight", (spec.vocab, spec.hidden)
    for layer in range(spec.layers):
        p = f"model.layers.{layer}"
        yield f"{p}.input_layernorm.weight", (spec.hidden,)
        for module, shape in spec.linear_shapes().items():
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            yield f"{p}.{group}.{module}.weight", shape
        yield f"{p}.post_attention_layernorm.weight", (spec.hidden,)
    yield "model.norm.weight", (spec.hidden,)
    yield "lm_head.weight", (spec.vocab, spec.hidden)


def _make_base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights: around 1
        return _random(shape, 0.05, seed, name).add_(1.0)
    return _random(shape, 0.02, seed, name)


def write_hf_base(folder: Path, spec: ModelSpec, seed: int, shard_bytes: int) -> int:
    """Write the HF safetensors shards, config and generation config; return the total tensor bytes."""
    from transformers import GenerationConfig, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    specs = list(hf_tensor_specs(spec))
    # Plan shards first so file names can carry the final shard count.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    total = 0
    weight_map: dict[str, str] = {}
    count = len(shards)
    for index, shard in enumerate(shards, start=1):
        fname = f"model-{index:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
        tensors = {name: _make_base_tensor(name, shape, seed) for name, shape in shard}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        print(f"  wrote {fname}", flush=True)
    if count > 1:
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")

    config = LlamaConfig(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    return total


def write_tokenizer(folder: Path) -> None:
    """Write a tiny but valid BPE ``tokenizer.json`` plus ``tokenizer_config.json``.

    lorastream and PEFT never read it; ``litgpt merge_lora`` only checks that ``tokenizer.json`` (or
    ``tokenizer.model``) and ``tokenizer_config.json`` exist. Its vocabulary does not match the model's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["lorastream merges LoRA adapters into base models in bounded memory."] * 8
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def lora_pair(spec: ModelSpec, layer: int, module: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 ``(A [r, in], B [out, r])`` pair of one LoRA module; B is non-zero (a trained adapter)."""
    out_features, in_features = spec.linear_shapes()[module]
    name = f"lora.{layer}.{module}"
    a = _random((LORA_R, in_features), in_features**-0.5, seed, name + ".A")
    b = _random((out_features, LORA_R), 0.01, seed, name + ".B")
    return a, b


def write_peft_adapter(folder: Path, spec: ModelSpec, seed: int, base_dir: Path) -> int:
    """Write ``adapter_config.json`` and an fp32 ``adapter_model.safetensors``; return the tensor bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(spec.layers):
        for module in HF_TARGETS:
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            a, b = lora_pair(spec, layer, module, seed)
            tensors[f"{prefix}.lora_A.weight"] = a.float()
            tensors[f"{prefix}.lora_B.weight"] = b.float()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "revision": None,
        "inference_mode": True,
        "r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(HF_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def litgpt_model_config(spec: ModelSpec, name: str) -> dict[str, object]:
    """``model_config.yaml`` contents for LitGPT's ``Config`` matching the HF architecture."""
    return {
        "name": name,
        "hf_config": {"org": "lsbench", "name": name},
        "block_size": 4096,
        "vocab_size": spec.vocab,
        "padding_multiple": 64,
        "padded_vocab_size": spec.vocab,
        "n_layer": spec.layers,
        "n_head": spec.heads,
        "head_size": spec.head_dim,
        "n_embd": spec.hidden,
        "n_query_groups": spec.kv_heads,
        "rotary_percentage": 1.0,
        "rope_base": 10000,
        "parallel_residual": False,
        "shared_attention_norm": False,
        "bias": False,
        "attn_bias": False,
        "lm_head_bias": False,
        "norm_class_name": "RMSNorm",
        "norm_eps": 1e-5,
        "mlp_class_name": "LLaMAMLP",
        "intermediate_size": spec.intermediate,
        "scale_embeddings": False,
    }


def write_litgpt_base(folder: Path, spec: ModelSpec, hf_dir: Path, name: str) -> None:
    """Convert the HF shards to ``lit_model.pth`` the way ``litgpt convert_to_litgpt`` lays out Llama.

    q, k and v are fused as ``attn.qkv.weight = cat(q, k, v)``; gate/up/down become ``mlp.fc_1/fc_2/proj``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(hf_dir.glob("*.safetensors"))
    hf: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                hf[key] = f.get_tensor(key)
    state: dict[str, torch.Tensor] = {"transformer.wte.weight": hf.pop("model.embed_tokens.weight")}
    for layer in range(spec.layers):
        p, q = f"model.layers.{layer}", f"transformer.h.{layer}"
        state[f"{q}.norm_1.weight"] = hf.pop(f"{p}.input_layernorm.weight")
        qkv = [hf.pop(f"{p}.self_attn.{m}.weight") for m in ("q_proj", "k_proj", "v_proj")]
        state[f"{q}.attn.qkv.weight"] = torch.cat(qkv)
        del qkv
        state[f"{q}.attn.proj.weight"] = hf.pop(f"{p}.self_attn.o_proj.weight")
        state[f"{q}.norm_2.weight"] = hf.pop(f"{p}.post_attention_layernorm.weight")
        state[f"{q}.mlp.fc_1.weight"] = hf.pop(f"{p}.mlp.gate_proj.weight")
        state[f"{q}.mlp.fc_2.weight"] = hf.pop(f"{p}.mlp.up_proj.weight")
        state[f"{q}.mlp.proj.weight"] = hf.pop(f"{p}.mlp.down_proj.weight")
    state["transformer.ln_f.weight"] = hf.pop("model.norm.weight")
    state["lm_head.weight"] = hf.pop("lm_head.weight")
    if hf:
        raise RuntimeError(f"unconverted HF tensors: {sorted(hf)[:5]}")
    torch.save(state, folder / "lit_model.pth")
    del state
    config = yaml.safe_dump(litgpt_model_config(spec, name), sort_keys=False)
    (folder / "model_config.yaml").write_text(config)
    write_tokenizer(folder)


def write_litgpt_lora(folder: Path, spec: ModelSpec, seed: int, litgpt_base: Path, name: str) -> None:
    """Write a ``litgpt finetune lora``-style output folder holding the same adapter as the PEFT one.

    LitGPT keys (from ``litgpt/lora.py``): ``transformer.h.{i}.attn.qkv.lora_A`` ``[3r, n_embd]`` and
    ``.lora_B`` ``[q+k+v, r]`` (q, k, v blocks stacked; merged as a grouped product, so this equals the
    three separate PEFT updates), ``attn.proj``, ``mlp.fc_1`` (gate), ``mlp.fc_2`` (up), ``mlp.proj`` (down).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lora: dict[str, torch.Tensor] = {}
    for layer in range(spec.layers):
        q = f"transformer.h.{layer}"
        pairs = {m: lora_pair(spec, layer, m, seed) for m in HF_TARGETS}
        lora[f"{q}.attn.qkv.lora_A"] = torch.cat([pairs[m][0] for m in ("q_proj", "k_proj", "v_proj")])
        lora[f"{q}.attn.qkv.lora_B"] = torch.cat([pairs[m][1] for m in ("q_proj", "k_proj", "v_proj")])
        for hf_name, lit_name in (
            ("o_proj", "attn.proj"),
            ("gate_proj", "mlp.fc_1"),
            ("up_proj", "mlp.fc_2"),
            ("down_proj", "mlp.proj"),
        ):
            lora[f"{q}.{lit_name}.lora_A"], lora[f"{q}.{lit_name}.lora_B"] = pairs[hf_name]
    torch.save({"model": lora}, folder / "lit_model.pth.lora")
    hparams = {
        "checkpoint_dir": str(litgpt_base),
        "out_dir": str(folder.parent),
        "precision": "bf16-true",
        "devices": 1,
        "num_nodes": 1,
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "lora_query": True,
        "lora_key": True,
        "lora_value": True,
        "lora_projection": True,
        "lora_mlp": True,
        "lora_head": False,
        "seed": 1337,
    }
    (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
    shutil.copy2(litgpt_base / "model_config.yaml", folder / "model_config.yaml")
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(litgpt_base / fname, folder / fname)


def model_dirs(workdir: Path, size: str) -> dict[str, Path]:
    """The folders of one size's build (see the module docstring)."""
    root = workdir / size
    return {
        "root": root,
        "hf_base": root / "hf-base",
        "peft_adapter": root / "peft-adapter",
        "litgpt_base": root / "litgpt-base",
        "litgpt_lora": root / "litgpt-lora",
        **{f"peft_adapter_{k}": root / f"peft-adapter-{k}" for k in range(2, EXTRA_ADAPTERS + 2)},
        "manifest": root / "manifest.json",
    }


def extra_adapter_dirs(dirs: dict[str, Path]) -> list[Path]:
    """The extra adapters' folders, in order (``peft-adapter-2/`` first)."""
    return [dirs[f"peft_adapter_{k}"] for k in range(2, EXTRA_ADAPTERS + 2)]


def write_extra_adapters(size: str, workdir: Path, seed: int) -> None:
    """Write the extra PEFT adapters that are missing (``adapter_config.json`` is written last)."""
    dirs = model_dirs(workdir, size)
    for k, folder in enumerate(extra_adapter_dirs(dirs), start=2):
        if not (folder / "adapter_config.json").is_file():
            write_peft_adapter(folder, SPECS[size], seed + (k - 1) * EXTRA_SEED_STEP, dirs["hf_base"])
            print(f"  wrote {folder.name}", flush=True)


def nf4_dirs(workdir: Path, size: str) -> dict[str, Path]:
    """The folders and marker file of one size's NF4 build (see the module docstring)."""
    root = workdir / size
    return {"hf_nf4": root / "hf-nf4", "litgpt_qlora": root / "litgpt-qlora", "manifest": root / "nf4-manifest.json"}


def write_litgpt_qlora(litgpt_lora: Path, folder: Path) -> None:
    """The LitGPT run as QLoRA trains it (``quantize: bnb.nf4``); ``hyperparameters.yaml`` is written last."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in sorted(litgpt_lora.iterdir()):
        if path.name in ("hyperparameters.yaml", "lit_model.pth"):  # lit_model.pth: a merge_lora result
            continue
        try:
            (folder / path.name).hardlink_to(path)
        except OSError:
            shutil.copy2(path, folder / path.name)
    hparams = yaml.safe_load((litgpt_lora / "hyperparameters.yaml").read_text())
    hparams.update(out_dir=str(folder.parent), quantize="bnb.nf4")
    (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))


def write_hf_nf4(hf_base: Path, folder: Path) -> None:
    """Quantize ``hf_base`` to bitsandbytes NF4 with transformers on the CPU and ``save_pretrained`` it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(**NF4_SETTINGS, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(hf_base, quantization_config=quantization, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    for path in sorted(hf_base.glob("tokenizer*")):
        shutil.copy2(path, folder / path.name)


def build_nf4(size: str, workdir: Path, seed: int = 0, shard_bytes: int | None = None,
              force: bool = False) -> dict[str, object]:
    """Build ``hf-nf4/`` of one size (and its base first, if absent) unless already there; return its manifest.

    A complete base build is left as it is; only ``hf-nf4/`` and ``nf4-manifest.json`` are (re)written.
    """
    build(size, workdir, seed, shard_bytes, force)
    dirs = nf4_dirs(workdir, size)
    if dirs["manifest"].is_file() and not force:
        manifest = json.loads(dirs["manifest"].read_text())
        if "litgpt_qlora" not in manifest:  # a build from before the QLoRA run
            write_litgpt_qlora(model_dirs(workdir, size)["litgpt_lora"], dirs["litgpt_qlora"])
            manifest["litgpt_qlora"] = str(dirs["litgpt_qlora"])
            dirs["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest
    dirs["manifest"].unlink(missing_ok=True)
    if dirs["hf_nf4"].exists():
        shutil.rmtree(dirs["hf_nf4"])
    started = time.monotonic()
    print(f"[make_models] {size}: quantizing to NF4 -> {dirs['hf_nf4']}", flush=True)
    write_hf_nf4(model_dirs(workdir, size)["hf_base"], dirs["hf_nf4"])
    write_litgpt_qlora(model_dirs(workdir, size)["litgpt_lora"], dirs["litgpt_qlora"])
    manifest: dict[str, object] = {
        "size": size,
        "quantization": {**NF4_SETTINGS, "bnb_4bit_compute_dtype": "bfloat16"},
        "nf4_bytes": sum(p.stat().st_size for p in dirs["hf_nf4"].glob("*.safetensors")),
        "build_seconds": round(time.monotonic() - started, 1),
        "dir": str(dirs["hf_nf4"]),
        "litgpt_qlora": str(dirs["litgpt_qlora"]),
    }
    dirs["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"[make_models] {size}: NF4 done in {manifest['build_seconds']} s", flush=True)
    return manifest


def build(size: str, workdir: Path, seed: int = 0, shard_bytes: int | None = None,
          force: bool = False) -> dict[str, object]:
    """Build every artefact of one size unless a complete build is already there; return its manifest.

    ``shard_bytes`` defaults to the size's ``SHARD_BYTES`` entry, else ``DEFAULT_SHARD_BYTES``.
    """
    if size not in SPECS:
        raise SystemExit(f"unknown size {size!r}; known: {', '.join(SPECS)}")
    spec = SPECS[size]
    dirs = model_dirs(workdir, size)
    if dirs["manifest"].is_file() and not force:
        manifest = json.loads(dirs["manifest"].read_text())
        write_extra_adapters(size, workdir, manifest.get("seed", seed))
        refreshed = {**manifest, "merged_bytes": spec.merged_bytes(),
                     "dirs": {k: str(v) for k, v in dirs.items() if k not in ("root", "manifest")}}
        if refreshed != manifest:  # a build from before the extra adapters
            manifest = refreshed
            dirs["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest
    if dirs["root"].exists():
        shutil.rmtree(dirs["root"])
    name = f"lsbench-{size}"
    started = time.monotonic()
    print(f"[make_models] {size}: {spec.n_params() / 1e9:.3f}B params -> {dirs['root']}", flush=True)
    base_bytes = write_hf_base(dirs["hf_base"], spec, seed, shard_bytes or SHARD_BYTES.get(size, DEFAULT_SHARD_BYTES))
    write_tokenizer(dirs["hf_base"])
    adapter_bytes = write_peft_adapter(dirs["peft_adapter"], spec, seed, dirs["hf_base"])
    print("  wrote PEFT adapter", flush=True)
    write_extra_adapters(size, workdir, seed)
    write_litgpt_base(dirs["litgpt_base"], spec, dirs["hf_base"], name)
    print("  wrote LitGPT base", flush=True)
    write_litgpt_lora(dirs["litgpt_lora"], spec, seed, dirs["litgpt_base"], name)
    print("  wrote LitGPT LoRA", flush=True)
    manifest: dict[str, object] = {
        "size": size,
        "spec": asdict(spec),
        "n_params": spec.n_params(),
        "base_bytes": base_bytes,
        "merged_bytes": spec.merged_bytes(),
        "adapter_bytes": adapter_bytes,
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "seed": seed,
        "build_seconds": round(time.monotonic() - started, 1),
        "dirs": {k: str(v) for k, v in dirs.items() if k not in ("root", "manifest")},
    }
    dirs["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"[make_models] {size}: done in {manifest['build_seconds']} s", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny", help=f"comma-separated, of: {', '.join(SPECS)}")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-bytes", type=int, default=None,
                        help=f"maximum bytes of one HF safetensors shard (default: {DEFAULT_SHARD_BYTES}, "
                        f"7b: {SHARD_BYTES['7b']})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("--nf4", action="store_true",
                        help="also build hf-nf4/, the base quantized to NF4 by transformers + bitsandbytes, and "
                        "litgpt-qlora/, the LitGPT run as a QLoRA run")
    args = parser.parse_args(argv)
    for size in filter(None, (s.strip() for s in args.sizes.split(","))):
        if args.nf4:
            build_nf4(size, args.workdir.resolve(), args.seed, args.shard_bytes, args.force)
        else:
            build(size, args.workdir.resolve(), args.seed, args.shard_bytes, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
