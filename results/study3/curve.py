"""A run's BLiMP (22 paradigms) and supplement accuracy against words seen, from its milestone checkpoints
(logs/RUN.curve.log, eval.py --run) and its final checkpoint (logs/RUN.eval.json) -> curve_RUN.png, and the
points printed as a table.

    python -m results.study3.curve              # ep6_do_s3: the preset (6 epochs + dropout 0.1), seed 3
    python -m results.study3.curve base         # the former preset (4 epochs), seed 1337: cut off after 20M words
    python -m results.study3.curve ep8_do_s2    # the preset over 8 epochs, seed 2 (not kept: within the noise)
"""
import json
import re
import sys
from pathlib import Path

from matplotlib.figure import Figure

from common import write_atomic

HERE = Path(__file__).resolve().parent
LINE = re.compile(r"^chck_(\d+)M .*blimp_filtered ([\d.]+), supplement_filtered ([\d.]+)")


def points(run):
    """-> [(words in millions, BLiMP, supplement)] of the milestones and the final checkpoint."""
    rows = [(int(m[1]), float(m[2]), float(m[3]))
            for m in map(LINE.match, open(HERE / "logs" / f"{run}.curve.log")) if m]
    final = json.load(open(HERE / "logs" / f"{run}.eval.json"))
    tasks = final["babylm"]["tasks"]
    rows.append((final["words_seen"] / 1e6, tasks["blimp_filtered"], tasks["supplement_filtered"]))
    return rows


def main(run="ep6_do_s3"):
    rows = points(run)
    print("| words seen (M) | BLiMP 22 | supplement |\n|---:|---:|---:|")
    for w, b, s in rows:
        print(f"| {w:.0f} | {b:.1f} | {s:.1f} |")
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    words = [r[0] for r in rows]
    ax.plot(words, [r[1] for r in rows], "o-", label="BLiMP (22 paradigms)")
    ax.plot(words, [r[2] for r in rows], "s-", label="supplement")
    for y, name in ((72, "target: BLiMP 72 (GPT-BERT 71.7)"), (64, "target: supplement 64 (GPT-BERT 63.2)")):
        ax.axhline(y, color="gray", lw=0.8, ls="--")
        ax.text(words[0], y + 0.3, name, fontsize=7, color="gray")
    ax.set_xscale("log")
    ticks = [t for t in (1, 2, 5, 10, 20, 40, 60, 80) if t <= max(words) * 1.05]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("words seen (millions; 10M = one epoch)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{run} (one seed, one H100)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = HERE / f"curve_{run}.png"
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"wrote {out.relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
