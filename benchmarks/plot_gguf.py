"""Plot `gguf_route.py` results: wall time (the route's steps stacked) and peak RSS per model and type.

    python benchmarks/plot_gguf.py benchmarks/results-gguf 2gb=/tmp/gg12/gguf_route.json 8gb=/tmp/gg8b/gguf_route.json

writes `results-gguf.png` and `results-gguf.json` (the runs, by label) beside the given stem.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STEPS = ("merge", "convert", "quantize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stem", type=Path, help="output path without suffix")
    parser.add_argument("runs", nargs="+", help="LABEL=gguf_route.json")
    args = parser.parse_args()
    runs = {label: json.loads(Path(path).read_text()) for label, path in (r.split("=", 1) for r in args.runs)}
    args.stem.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(label, kind, result) for label, run in runs.items() for kind, result in run.items()]
    names = [f"{label}\n{kind}" for label, kind, _ in bars]
    figure, (wall, rss) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(bars))
    wall.bar([i - 0.2 for i in x], [r["lorastream"]["wall_s"] for _, _, r in bars], 0.4, label="lorastream")
    bottom = [0.0] * len(bars)
    for step, name in enumerate(STEPS):
        heights = [r["route"]["steps_s"][step] if step < len(r["route"]["steps_s"]) else 0.0 for _, _, r in bars]
        wall.bar([i + 0.2 for i in x], heights, 0.4, bottom=bottom, label=f"route: {name}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, (_, _, r) in enumerate(bars):
        wall.annotate(f"{r['lorastream']['wall_s'] / r['route']['wall_s']:.2f}x", (i - 0.2, r["lorastream"]["wall_s"]),
                      ha="center", va="bottom", fontsize=8)
    wall.set_xticks(list(x), names, fontsize=8)
    wall.set_ylabel("wall time (s)")
    wall.set_title("--format gguf vs merge + convert_hf_to_gguf.py [+ llama-quantize]")
    wall.legend(fontsize=8)
    rss.bar([i - 0.2 for i in x], [r["lorastream"]["peak_rss_kib"] / 1024 for _, _, r in bars], 0.4,
            label="lorastream (--max-memory 1GiB)")
    rss.bar([i + 0.2 for i in x], [r["route"]["peak_rss_kib"] / 1024 for _, _, r in bars], 0.4,
            label="route (largest step)")
    rss.set_xticks(list(x), names, fontsize=8)
    rss.set_ylabel("peak RSS (MiB)")
    rss.set_title("peak RSS")
    rss.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.stem.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
