"""lorastream's GGUF against the usual route, per type: wall time, peak RSS and extra disk.

    python benchmarks/gguf_route.py BASE ADAPTER --types bfloat16,q8_0,q4_k_m --work DIR [--max-memory 1GiB]
                                    [--repeat 3]

The route is what people run today: merge to a 16-bit folder (lorastream, the fastest way there; one shard, as
PEFT's `save_pretrained` writes it), then llama.cpp's `convert_hf_to_gguf.py` (straight to q8_0 for q8_0, else
to the 16-bit type), then `llama-quantize` for the other presets. lorastream writes the GGUF in the merge's pass.
Each step runs in a fresh process under `/usr/bin/time -v`, both merges from a warm page cache (wall time, CPU
time: user + system, which a machine shared with other work perturbs less, peak RSS); extra disk is everything a
route leaves on disk at its peak (for the route: the merged folder, the 16-bit GGUF and the quantized GGUF). Both
outputs are compared byte for byte (provenance keys aside) and the table says whether they are the same.
With `--repeat N` the two run alternately N times per type; the table shows each side's median run (by wall
time), the ratio of those medians and the range of the N side-by-side ratios: on a 2-core machine one run of
either side varies by 10% from the next.

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
from run import TIME_BIN, parse_time_report, tree_bytes, warm_page_cache

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


def median_run(reports: list[dict[str, float]]) -> dict[str, float]:
    """The run whose wall time is the median (the upper one of an even count): a whole run, steps and all."""
    return sorted(reports, key=lambda report: report["wall_s"])[len(reports) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--types", default="bfloat16,q8_0,q4_k_m")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--max-memory", default="1GiB")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side per type, alternating")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat takes 1 or more")
    args.work.mkdir(parents=True, exist_ok=True)
    base = with_tokenizer(args.base.resolve(), args.work)
    rows = ["| type | lorastream (s) | route (s): merge + convert [+ quantize] | ratio | CPU s lorastream / route "
            "| peak RSS lorastream / route (MiB) | extra disk lorastream / route (GB) | same bytes |",
            "|---|---:|---|---:|---|---|---|---|"]
    results = {}
    for kind in args.types.split(","):
        runs = []
        for attempt in range(args.repeat):
            ours, our_file = lorastream_gguf(base, args.adapter, kind, args.work, args.max_memory)
            theirs, their_file = route(base, args.adapter, kind, args.work, args.max_memory)
            if attempt == 0:  # the bytes do not change from run to run
                same = same_file(our_file, their_file)
            runs.append((ours, theirs))
            for path in (our_file, their_file, *args.work.glob("route-*.gguf")):
                path.unlink(missing_ok=True)
        ours, theirs = (median_run([run[side] for run in runs]) for side in (0, 1))
        ratios = [o["wall_s"] / t["wall_s"] for o, t in runs]
        results[kind] = {"lorastream": ours, "route": theirs, "same_bytes": same, "ratios": ratios}
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        rows.append(f"| {kind} | {ours['wall_s']:.1f} | {theirs['wall_s']:.1f} "
                    f"({' + '.join(f'{s:.1f}' for s in theirs['steps_s'])}) "
                    f"| {ours['wall_s'] / theirs['wall_s']:.2f}{spread} "
                    f"| {ours['cpu_s']:.0f} / {theirs['cpu_s']:.0f} "
                    f"| {ours['peak_rss_kib'] / 1024:.0f} / {theirs['peak_rss_kib'] / 1024:.0f} "
                    f"| {ours['disk'] / 1e9:.2f} / {theirs['disk'] / 1e9:.2f} | {'yes' if same else 'NO'} |")
    (args.work / "gguf_route.json").write_text(json.dumps(results, indent=2))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
