"""The study's two figures, from the logs in results/study2/logs/:

    python results/study2/plots.py      # -> assets/study2_val_loss.png, assets/study2_blimp_curve.png

study2_val_loss.png: validation loss against words seen for every run (log.jsonl).
study2_blimp_curve.png: BLiMP filtered (12 dev paradigms) and the supplement against words seen for the two
runs with milestone checkpoints (NAME.curve.json: at most 400 items per UID), with the final checkpoint's
score on all items (NAME.eval.json) as the last point.
"""
import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

HERE = Path(__file__).resolve().parent
LOGS, ASSETS = HERE / "logs", HERE.parents[1] / "assets"
CURVES = {"wsd4_wd_ms": "BLaLM + Muon (the preset, seed 3)", "softmax_wsd4_ms": "softmax + AdamW (seed 3)"}
words_axis = FuncFormatter(lambda v, _: f"{v / 1e6:g}M")


def val_loss_figure():
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for run in sorted(p for p in LOGS.iterdir() if p.is_dir()):
        rows = [json.loads(line) for line in open(run / "log.jsonl")]
        evals = [r for r in rows if r["kind"] == "eval" and r["iter"] > 0]  # the init point is 9.8 for all
        style = "--" if run.name.startswith("softmax") else ":" if run.name.startswith("adamw") else "-"
        ax.plot([r["words"] for r in evals], [r["val_loss"] for r in evals], style, label=run.name)
    ax.set_xlabel("words seen")
    ax.set_ylabel("validation loss")
    ax.set_ylim(2.8, 4.0)
    ax.xaxis.set_major_formatter(words_axis)
    ax.set_title("STRICT-SMALL study, round two (one H200)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(ASSETS / "study2_val_loss.png", dpi=120)


def blimp_curve_figure():
    fig = Figure(figsize=(9, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for (name, label), color in zip(CURVES.items(), ("C0", "C3")):
        points = json.load(open(LOGS / f"{name}.curve.json"))["points"]
        final = json.load(open(LOGS / f"{name}.eval.json"))
        for ax, task in zip(axes, ("blimp_filtered", "supplement_filtered")):
            x = [p["words_seen"] for p in points] + [final["words_seen"]]
            y = [p["tasks"][task] for p in points] + [final["babylm"]["tasks"][task]]
            ax.plot(x, y, marker="o", ms=3, color=color, label=label)
    for ax, title in zip(axes, ("BLiMP filtered (12 dev paradigms)", "BLiMP supplement")):
        ax.set_xscale("log")
        ax.set_xticks([m * 1e6 for m in (1, 2, 3, 5, 10, 20, 40)])
        ax.xaxis.set_major_formatter(words_axis)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("words seen (10M-word data; 4 epochs)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("accuracy (%; chance 50)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ASSETS / "study2_blimp_curve.png", dpi=120)


if __name__ == "__main__":
    val_loss_figure()
    blimp_curve_figure()
    print(f"wrote {ASSETS / 'study2_val_loss.png'} and {ASSETS / 'study2_blimp_curve.png'}")
