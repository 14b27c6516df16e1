"""
How far back an entity-tracking item's answer lies: the length in tokens of each item's prefix (the box
descriptions, the operations and the query), with the study's tokenizer, against the SWA branch's window. The
box's contents are stated at the start, so with a window shorter than the prefix only the mLSTM's state can
carry them to the query.

    python -m results.study3.et_lengths --data=.bins/strict_small --babylm=<BabyLM 2025 folder> [--windows=128,256,512]
"""

import argparse
import json
import sys
from pathlib import Path

from data import load_tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a prepared folder (its tokenizer.tiktoken)")
    ap.add_argument("--babylm", required=True, help="the BabyLM 2025 evaluation folder (its entity_tracking/)")
    ap.add_argument("--windows", default="128,256,512", help="comma-separated SWA windows to compare against")
    a = ap.parse_args(argv)
    files = sorted(Path(a.babylm, "entity_tracking").glob("*.jsonl"))
    if not files:
        sys.exit(f"et_lengths.py: no entity_tracking/*.jsonl under --babylm={a.babylm}")
    try:
        windows = [int(w) for w in a.windows.split(",")]
    except ValueError:
        sys.exit(f"et_lengths.py: --windows={a.windows!r}: expected comma-separated integers such as 128,256")
    enc = load_tokenizer(a.data)
    print("| file | items | median | p10 | p90 | max | " + " | ".join(f"> {w}" for w in windows) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(windows))
    for f in files:
        lengths = sorted(len(enc.encode(json.loads(line)["input_prefix"])) for line in open(f) if line.strip())
        n = len(lengths)
        beyond = [f"{100 * sum(x > w for x in lengths) / n:.0f} %" for w in windows]
        print(f"| {f.name} | {n} | {lengths[n // 2]} | {lengths[n // 10]} | {lengths[9 * n // 10]} | {lengths[-1]} | "
              + " | ".join(beyond) + " |")


if __name__ == "__main__":
    main()
