"""lorastream's GGUF against the usual route, per type: wall time, peak RSS and extra disk.

    python benchmarks/gguf_route.py BASE ADAPTER --types bfloat16,q8_0,q4_k_m --work DIR [--max-memory 1GiB]

The route is what people run today: merge to a 16-bit folder (lorastream, the fastest way there; one shard, as
PEFT's `save_pretrained` writes it), then llama.cpp's `convert_hf_to_gguf.py` (straight to q8_0 for q8_0, else
to the 16-bit type), then `llama-quantize` for the other presets. lorastream writes the GGUF in the merge's pass.
Each step runs in a fresh process under `/usr/bin/time -v`, both merges from a warm page cache (wall time, CPU
time: user + system, which a machine shared with other work perturbs less, peak RSS); extra disk is everything a
route leaves on disk at its peak (for the route: the merged folder, the 16-bit GGUF and the quantized GGUF). Both
outputs are compared byte for byte (provenance keys aside) and the table says whether they are the same.

BASE needs a tokenizer llama.cpp's converter reads; one without `tokenizer.model` (the benchmark models of
make_models.py carry a placeholder BPE tokenizer the converter does not recognise) is given a small
SentencePiece tokenizer trained here, in a copy of BASE made of links to its files. llama.cpp's tools come from
`make llama-cpp` (LORASTREAM_CACHE, default ~/.cache/lorastream).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import TIME_BIN, parse_time_report, warm_page_cache

LLAMA_CPP = Path(os.environ.get("LORASTREAM_CACHE") or Path.home() / ".cache" / "lorastream") / "llama.cpp"
CONVERTER = LLAMA_CPP / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
QUANTIZE = LLAMA_CPP / "build" / "bin" / "llama-quantize"
OUTTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def timed(argv: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `argv` under /usr/bin/time -v; its wall time and peak RSS (refuses a failed run)."""
    with open(log, "w") as out:
        done = subprocess.run([str(TIME_BIN), "-v", *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
    report = parse_time_report(log.read_text())
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed (exit {done.returncode}); see {log}")
    return report


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def with_tokenizer(base: Path, work: Path) -> Path:
    """BASE itself when it has a SentencePiece tokenizer, else a copy of links to its files plus one trained here
    (the model's vocab_size pads it with [PADn] tokens, as the converter does)."""
    if (base / "tokenizer.model").is_file():
        return base
    import sentencepiece

    copy = work / "base"
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir(parents=True)
    for path in base.iterdir():
        if path.is_file() and not path.name.startswith("tokenizer"):
            try:  # hard links: lorastream refuses an index naming shards that lead outside the model folder
                (copy / path.name).hardlink_to(path.resolve())
            except OSError:  # another filesystem
                (copy / path.name).symlink_to(path.resolve())
    model = io.BytesIO()
    lines = [f"benchmark sentence {i}: merging adapters into models, streaming row blocks." for i in range(300)]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=300,
                                             model_type="bpe", byte_fallback=True, minloglevel=2)
    (copy / "tokenizer.model").write_bytes(model.getvalue())
    (copy / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                            "bos_token": "<s>", "eos_token": "</s>"}))
    return copy


def lorastream_gguf(base: Path, adapter: Path, kind: str, work: Path, budget: str) -> tuple[dict[str, float], Path]:
    out = work / f"lorastream-{kind}.gguf"
    out.unlink(missing_ok=True)
    option = ["--dtype", kind] if kind in OUTTYPES else ["--quantize", kind]
    warm_page_cache([base, adapter])
    report = timed([sys.executable, "-m", "lorastream", "merge", str(base), str(adapter), "-o", str(out), "--format",
                    "gguf", *option, "--max-memory", budget, "--quiet"], work / f"lorastream-{kind}.log")
    return {**report, "cpu_s": report["user_s"] + report["sys_s"], "disk": out.stat().st_size}, out


def route(base: Path, adapter: Path, kind: str, work: Path, budget: str) -> tuple[dict[str, float], Path]:
    """Merge to a folder, convert, quantize: the steps' wall times summed, the largest peak RSS, the disk."""
    merged = work / "route-merged"
    if merged.exists():
        shutil.rmtree(merged)
    # one shard up to 50GB, as transformers' save_pretrained writes PEFT's merged folder: the converter takes the
    # tensors shard by shard, so the reference order is that of one shard (lorastream's default 5GB would split)
    warm_page_cache([base, adapter])
    steps = [timed([sys.executable, "-m", "lorastream", "merge", str(base), str(adapter), "-o", str(merged),
                    "--max-memory", budget, "--max-shard-size", "50GB", "--quiet"], work / "route-merge.log")]
    for path in base.iterdir():  # the tokenizer the converter reads
        if path.name.startswith("tokenizer") and not (merged / path.name).exists():
            shutil.copy(path, merged / path.name)
    direct = kind in OUTTYPES or kind == "q8_0"
    converted = work / f"route-{'direct' if direct else 'bf16'}.gguf"
    outtype = OUTTYPES.get(kind, kind if direct else "bf16")
    steps.append(timed([sys.executable, str(CONVERTER), str(merged), "--outfile", str(converted), "--outtype", outtype],
                       work / f"route-convert-{kind}.log"))
    out, disk = converted, tree_bytes(merged) + converted.stat().st_size
    if not direct:
        out = work / f"route-{kind}.gguf"
        env = {**os.environ, "LD_LIBRARY_PATH": str(QUANTIZE.parent)}
        steps.append(timed([str(QUANTIZE), str(converted), str(out), kind.upper()], work / f"route-quantize-{kind}.log",
                           env))
        disk += out.stat().st_size
    return {"wall_s": sum(s["wall_s"] for s in steps), "peak_rss_kib": max(s["peak_rss_kib"] for s in steps),
            "cpu_s": sum(s["user_s"] + s["sys_s"] for s in steps), "steps_s": [s["wall_s"] for s in steps],
            "disk": disk}, out


def same_file(ours: Path, theirs: Path) -> bool:
    """Byte for byte but for provenance keys: compared with the test suite's comparison."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_gguf import sections

    return sections(ours) == sections(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--types", default="bfloat16,q8_0,q4_k_m")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--max-memory", default="1GiB")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = with_tokenizer(args.base.resolve(), args.work)
    rows = ["| type | lorastream (s) | route (s): merge + convert [+ quantize] | ratio | CPU s lorastream / route "
            "| peak RSS lorastream / route (MiB) | extra disk lorastream / route (GB) | same bytes |",
            "|---|---:|---|---:|---|---|---|---|"]
    results = {}
    for kind in args.types.split(","):
        ours, our_file = lorastream_gguf(base, args.adapter, kind, args.work, args.max_memory)
        theirs, their_file = route(base, args.adapter, kind, args.work, args.max_memory)
        same = same_file(our_file, their_file)
        results[kind] = {"lorastream": ours, "route": theirs, "same_bytes": same}
        rows.append(f"| {kind} | {ours['wall_s']:.1f} | {theirs['wall_s']:.1f} "
                    f"({' + '.join(f'{s:.1f}' for s in theirs['steps_s'])}) | {ours['wall_s'] / theirs['wall_s']:.2f} "
                    f"| {ours['cpu_s']:.0f} / {theirs['cpu_s']:.0f} "
                    f"| {ours['peak_rss_kib'] / 1024:.0f} / {theirs['peak_rss_kib'] / 1024:.0f} "
                    f"| {ours['disk'] / 1e9:.2f} / {theirs['disk'] / 1e9:.2f} | {'yes' if same else 'NO'} |")
        for path in (our_file, their_file, *args.work.glob("route-*.gguf")):
            path.unlink(missing_ok=True)
    (args.work / "gguf_route.json").write_text(json.dumps(results, indent=2))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
