"""
Compare eval.py's reading numbers with the official pipeline's on the same model, per word and per measure.

    python -m results.pipeline.compare_reading PIPELINE_READING_DIR CKPT reading_data.csv

PIPELINE_READING_DIR: where evaluation_pipeline.reading.run wrote prediction.jsonl, predictive_power*.jsonl and
report.txt for the export of CKPT (results/<model>/main/zero_shot/causal/reading).
"""

import json
import sys
from pathlib import Path

import numpy as np

import reading
from checkpoint import load_model


def main(pipe, ckpt, csv_path):
    pipe = Path(pipe)
    model, enc, _ = load_model(ckpt, "cpu")
    data = reading.read_reading(csv_path)
    here, prev = reading.reading_surprisals(model, enc, data)
    rows = [json.loads(line) for line in (pipe / "prediction.jsonl").read_text().splitlines()]
    p_here = np.array([r["Logprob"] for r in rows], dtype=float)
    p_prev = np.array([np.nan if r["Prev_Logprob"] is None else r["Prev_Logprob"] for r in rows], dtype=float)
    print(f"words: {len(rows)}; surprisal |eval.py - pipeline| max {np.abs(here - p_here).max():.2e} nats "
          f"(mean surprisal {here.mean():.4f} vs {p_here.mean():.4f})")
    print(f"previous word: the same rows missing: {bool((np.isnan(prev) == np.isnan(p_prev)).all())}; "
          f"max difference {np.nanmax(np.abs(prev - p_prev)):.2e}")
    res = reading.score_reading(model, enc, data)
    for name, key in (("predictive_power.jsonl", "measures"), ("predictive_power_spillover.jsonl", "measures_spillover")):
        print(f"{name}: measure, pipeline gain %, eval.py gain %, difference")
        for line in (pipe / name).read_text().splitlines():
            r = json.loads(line)
            base = r["R2"] - r["Change in R2 from baseline"]
            gain, m = 100 * r["Change in R2 from baseline"] / (1 - base), r["Predicted variable"]
            print(f"  {m:<24} {gain:9.5f} {res[key][m]:9.5f} {gain - res[key][m]:+.1e}")
    print("pipeline's report.txt: " + " | ".join((pipe / "report.txt").read_text().strip().splitlines()))
    print(f"eval.py: eye-tracking {res['eye_tracking']:.5f}, self-paced {res['self_paced_reading']:.5f}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1].startswith("-"):
        sys.exit(__doc__.strip())
    main(*sys.argv[1:])
