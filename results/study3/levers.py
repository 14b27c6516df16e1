"""Every 6-epoch run of the study (and the 8- and 10-epoch ones) on one picture, final checkpoints, in two panels: BLiMP
(22 paradigms) against the supplement, and entity tracking against eye-tracking (% of the possible R² gain), each
with the preset's (window 128) three-seed range shaded and GPT-BERT's scores marked -> levers.png, and the points
printed.

    python -m results.study3.levers          # from the repository root

A lever whose point sits inside the shaded box did not move those scores beyond what the recipe's own seeds span;
the target is up and to the right of every run.
"""
from pathlib import Path

from matplotlib.figure import Figure

from common import write_atomic
from results.study3.table import numbers

HERE = Path(__file__).resolve().parent

# the reference every lever was measured against: the preset, 6 epochs + dropout 0.1, SWA window 128 (session
# seven moved its window to 256, session eight back)
REFERENCE = ("ep6_do", "ep6_do_s2", "ep6_do_s3")
# (runs, label, marker, colour): the 6-epoch recipe's arms and its one-change levers
GROUPS = [
    (REFERENCE, "the preset: 6 epochs + dropout 0.1, window 128, 3 seeds", "o", "tab:blue"),
    (("swa256_ep6", "swa256_ep6_s2", "swa256_ep6_s3"), "SWA window 256, 3 seeds", "h", "tab:olive"),
    (("swa512_ep6", "swa512_ep6_s2"), "SWA window 512, 2 seeds", "p", "tab:cyan"),
    (("deep16_ep6", "deep16_ep6_s2"), "16 layers x 384 (same size), 2 seeds", ">", "black"),
    (("ep8_do", "ep8_do_s2"), "8 epochs (80M words), 2 seeds", "d", "darkgoldenrod"),
    (("chhalf_ep8", "chhalf_ep8_s2"), "CHILDES halved, 8 epochs (61M words), 2 seeds", "8", "teal"),
    (("chhalf_ep10",), "CHILDES halved, 10 epochs (77M words)", "H", "darkslategray"),
    (("wide576_do2",), "width 576 (52M), dropout 0.2", "x", "indigo"),
    (("adamw_ep6_do", "adamw_ep6_do_s2"), "BLaLM + AdamW, 2 seeds", "s", "tab:orange"),
    (("adamw_swa256_ep6", "adamw_swa256_ep6_s2"), "BLaLM + AdamW, window 256, 2 seeds", "<", "tab:pink"),
    (("softmax_ep6_do", "softmax_ep6_do_s2"), "softmax + AdamW, 2 seeds", "v", "tab:red"),
    (("fmap_hh_ep6", "fmap_hh_ep6_s2"), "+ Hedgehog feature map, 2 seeds", "D", "tab:green"),
    (("cased6", "cased6_s2"), "+ capitalised sentences, 2 seeds", "P", "tab:purple"),
    (("curric6",), "+ readability curriculum", "X", "tab:brown"),
    (("ep6_do_ctx1024",), "+ context 1024", "^", "tab:gray"),
]
# baselines.md: BLiMP on all 67 paradigms, supplement, entity tracking, eye-tracking
GPT_BERT = {"BLiMP 22": 71.66, "supplement": 63.21, "entity tracking": 33.96, "eye-tracking": 9.89}
PANELS = [("BLiMP 22", "supplement", "BLiMP, 22 shared paradigms (%)", "supplement (%)"),
          ("entity tracking", "eye-tracking", "entity tracking (%; chance 20)", "eye-tracking (% of the possible R²)")]


def main():
    fig = Figure(figsize=(11, 5.2))
    runs = {run: numbers(run) for group in GROUPS for run in group[0]}
    print("| run | BLiMP 22 | supplement | entity tracking | eye-tracking |\n|---|---:|---:|---:|---:|")
    for run, s in runs.items():
        print(f"| {run} | {s['BLiMP 22']:.1f} | {s['supplement']:.1f} | {s['entity tracking']:.1f} "
              f"| {s['eye-tracking']:.2f} |")
    for i, (x, y, xlabel, ylabel) in enumerate(PANELS):
        ax = fig.add_subplot(1, 2, i + 1)
        ref = [runs[run] for run in REFERENCE]
        ax.axvspan(min(s[x] for s in ref), max(s[x] for s in ref), color="tab:blue", alpha=0.08, lw=0)
        ax.axhspan(min(s[y] for s in ref), max(s[y] for s in ref), color="tab:blue", alpha=0.08, lw=0)
        for group, label, marker, colour in GROUPS:
            ax.scatter([runs[r][x] for r in group], [runs[r][y] for r in group], marker=marker, color=colour,
                       label=label, s=36)
        if i == 0:   # GPT-BERT's eye-tracking (9.89) is far off the second panel's scale: it is named in the title
            ax.scatter(GPT_BERT[x], GPT_BERT[y], marker="*", s=160, color="black",
                       label="GPT-BERT (target; BLiMP on 67)")
            handles, labels = ax.get_legend_handles_labels()
        else:
            ax.set_title(f"GPT-BERT: {GPT_BERT[x]} / {GPT_BERT[y]}, off the scale", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.suptitle("6-epoch runs and the 8- and 10-epoch ones, final checkpoints (one H100; shaded: the preset's seed range)",
                 fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)  # below the panels: it covers no point
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    out = HERE / "levers.png"
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {out.relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
