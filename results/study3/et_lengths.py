"""
How far back an entity-tracking item's answer lies: the length in tokens of each item's prefix (the box
descriptions, the operations and the query), with the study's tokenizer, against the SWA branch's window. The
box's contents are stated at the start, so with a window shorter than the prefix only the mLSTM's state can
carry them to the query. A second table gives the lengths by the item's number of operations, and with --runs
the runs' entity-tracking accuracy by that number (seed means, from logs/NAME.eval.json or NAME.rest.json): if a
window helps by reaching the boxes, its gain should grow with the operations, whose prefixes are the longer ones.

    python -m results.study3.et_lengths --data=.bins/strict_small --babylm=<BabyLM 2025 folder> [--windows=128,256,512]
        [--runs=swa256_ep6+swa256_ep6_s2,ep6_do+ep6_do_s2]
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from data import load_tokenizer
from results.study3.table import LOGS, suite


def et_by_ops(run):
    """-> {number of operations: accuracy (%)} of one run: the mean over the task's three files of the per-file
    scores its evaluation JSON keeps by uid (FILE_N_ops)."""
    if not (LOGS / f"{run}.eval.json").exists():
        sys.exit(f"et_lengths.py: no evaluation of run {run!r} in {LOGS}")
    uids = suite(run)["uids"].get("entity_tracking")
    if not uids:
        sys.exit(f"et_lengths.py: no entity-tracking scores for run {run!r} in {LOGS}")
    by_ops = defaultdict(list)
    for uid, score in uids.items():
        by_ops[int(uid.rsplit("_", 2)[1])].append(score)
    return {ops: statistics.mean(scores) for ops, scores in by_ops.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a prepared folder (its tokenizer.tiktoken)")
    ap.add_argument("--babylm", required=True, help="the BabyLM 2025 evaluation folder (its entity_tracking/)")
    ap.add_argument("--windows", default="128,256,512", help="comma-separated SWA windows to compare against")
    ap.add_argument("--runs", default="", help="comma-separated groups of runs in logs/, a group's seeds joined by +")
    a = ap.parse_args(argv)
    files = sorted(Path(a.babylm, "entity_tracking").glob("*.jsonl"))
    if not files:
        sys.exit(f"et_lengths.py: no entity_tracking/*.jsonl under --babylm={a.babylm}")
    try:
        windows = [int(w) for w in a.windows.split(",")]
    except ValueError:
        sys.exit(f"et_lengths.py: --windows={a.windows!r}: expected comma-separated integers such as 128,256")
    groups = [g.split("+") for g in a.runs.split(",") if g]
    accuracy = {"+".join(g): [et_by_ops(run) for run in g] for g in groups}  # before the long part: names checked
    enc = load_tokenizer(a.data)
    by_file, by_ops = {}, defaultdict(list)
    for f in files:
        for line in open(f):
            if line.strip():
                item = json.loads(line)
                length = len(enc.encode(item["input_prefix"]))
                by_file.setdefault(f.name, []).append(length)
                by_ops[item["numops"]].append(length)
    for title, table in (("file", by_file), ("operations", dict(sorted(by_ops.items())))):
        print(f"| {title} | items | median | p10 | p90 | max | " + " | ".join(f"> {w}" for w in windows) + " |")
        print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(windows))
        for key, lengths in table.items():
            lengths, n = sorted(lengths), len(lengths)
            beyond = [f"{100 * sum(x > w for x in lengths) / n:.0f} %" for w in windows]
            print(f"| {key} | {n} | {lengths[n // 2]} | {lengths[n // 10]} | {lengths[9 * n // 10]} | {lengths[-1]} | "
                  + " | ".join(beyond) + " |")
        print()
    if accuracy:
        ops = sorted(by_ops)
        print("| entity tracking (%) by operations | " + " | ".join(str(k) for k in ops) + " |")
        print("|---|" + "---:|" * len(ops))
        for name, runs in accuracy.items():
            print(f"| {name} | " + " | ".join(f"{statistics.mean(r[k] for r in runs):.1f}" for k in ops) + " |")


if __name__ == "__main__":
    main()
