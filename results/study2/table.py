"""Print the study's table (markdown) from the run logs and evaluation JSONs in results/study2/logs/.

    python results/study2/table.py
"""
import json
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "logs"
TASKS = ("blimp_filtered", "supplement_filtered", "entity_tracking", "wug_adj_nominalization")


def row(name):
    log = [json.loads(line) for line in open(RUNS / name / "log.jsonl")]
    evals = [r for r in log if r["kind"] == "eval"]
    suite = json.load(open(RUNS / f"{name}.eval.json"))["babylm"]
    zorro = json.load(open(RUNS / f"{name}.zorro.json"))
    best = min(evals, key=lambda r: r["val_loss"])
    scores = [suite["tasks"][t] for t in TASKS]
    return (f"| {name} | {evals[-1]['words'] / 1e6:.1f}M | {evals[-1]['val_loss']:.3f} | "
            f"{'final' if best is evals[-1] else 'iter %d' % best['iter']} | "
            + " | ".join(f"{s:.1f}" for s in scores) + f" | {suite['wug']['spearman']:.2f} | {zorro['macro_average']:.1f} |")


names = sys.argv[1:] or sorted(p.name for p in RUNS.iterdir() if p.is_dir())
print("| run | words seen | final val loss | lowest val at | BLiMP filtered (12 dev) | supplement | entity tracking "
      "| WUG acc | WUG Spearman | Zorro |")
print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
for name in names:
    print(row(name))
