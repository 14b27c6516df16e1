"""
The fine-tuning task of this folder's runs: acceptability in CoLA's JSON Lines layout ({"sentence", "label"},
label 1 = grammatical), made from the built-in synthetic minimal pairs (synthetic.py), because GLUE's files are
not available here. Each pair gives two examples, its good sentence (1) and its bad one (0); the validation
pairs come from another seed, and no validation sentence occurs in the training file.

    python -m results.pipeline.minimal_pair_task OUT_DIR    # writes OUT_DIR/cola.train.jsonl, cola.valid.jsonl
"""

import json
import random
import sys
from pathlib import Path

from synthetic import synthetic_minimal_pairs


def examples(pairs):
    return [dict(sentence=p[k], label=int(k == "sentence_good")) for p in pairs for k in ("sentence_good", "sentence_bad")]


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = examples(synthetic_minimal_pairs(40, seed=1))
    seen = {e["sentence"] for e in train}
    valid = [e for e in examples(synthetic_minimal_pairs(15, seed=2)) if e["sentence"] not in seen]
    for name, rows in (("cola.train.jsonl", train), ("cola.valid.jsonl", valid)):
        random.Random(0).shuffle(rows)
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} examples, {sum(r['label'] for r in rows)} labelled 1")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__.strip())
    main(sys.argv[1])
