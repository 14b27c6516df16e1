"""Every 6-epoch run of the study on one picture: BLiMP (22 paradigms) against the supplement, final checkpoints,
with the preset's seed range shaded and GPT-BERT's scores marked -> levers.png, and the points printed.

    python -m results.study3.levers          # from the repository root

A lever whose point sits inside the shaded box did not move the zero-shot scores beyond what the preset's own
seeds span; the target is up and to the right of every run.
"""
from pathlib import Path

from matplotlib.figure import Figure

from common import write_atomic
from results.study3.table import scores

HERE = Path(__file__).resolve().parent

PRESET = ("ep6_do", "ep6_do_s2", "ep6_do_s3")
# (runs, label, marker, colour): the 6-epoch recipe's arms and its one-change levers
GROUPS = [
    (PRESET, "preset (6 epochs + dropout 0.1), 3 seeds", "o", "tab:blue"),
    (("adamw_ep6_do", "adamw_ep6_do_s2"), "BLaLM + AdamW, 2 seeds", "s", "tab:orange"),
    (("softmax_ep6_do", "softmax_ep6_do_s2"), "softmax + AdamW, 2 seeds", "v", "tab:red"),
    (("fmap_hh_ep6", "fmap_hh_ep6_s2"), "+ Hedgehog feature map, 2 seeds", "D", "tab:green"),
    (("cased6", "cased6_s2"), "+ capitalised sentences, 2 seeds", "P", "tab:purple"),
    (("swa256_ep6",), "+ SWA window 256", "h", "tab:olive"),
    (("curric6",), "+ readability curriculum", "X", "tab:brown"),
    (("ep6_do_ctx1024",), "+ context 1024", "^", "tab:gray"),
]
GPT_BERT = (71.66, 63.21)   # baselines.md: BLiMP on all 67 paradigms, supplement


def main():
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    preset = [scores(run) for run in PRESET]
    blimp, supp = [s["BLiMP 22"] for s in preset], [s["supplement"] for s in preset]
    ax.axvspan(min(blimp), max(blimp), color="tab:blue", alpha=0.08, lw=0)
    ax.axhspan(min(supp), max(supp), color="tab:blue", alpha=0.08, lw=0)
    print("| run | BLiMP 22 | supplement |\n|---|---:|---:|")
    for runs, label, marker, colour in GROUPS:
        points = [(s["BLiMP 22"], s["supplement"]) for s in map(scores, runs)]
        for run, (b, s) in zip(runs, points):
            print(f"| {run} | {b:.1f} | {s:.1f} |")
        ax.scatter(*zip(*points), marker=marker, color=colour, label=label, s=36)
    ax.scatter(*GPT_BERT, marker="*", s=160, color="black", label="GPT-BERT (the target; BLiMP on all 67)")
    ax.set_xlabel("BLiMP, 22 shared paradigms (%)")
    ax.set_ylabel("supplement (%)")
    ax.set_title("6-epoch runs, final checkpoints (one H100; shaded: the preset's seed range)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")  # the softmax points lie at the lower left
    fig.tight_layout()
    out = HERE / "levers.png"
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"wrote {out.relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
