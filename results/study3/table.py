"""The study's table (markdown) from the logs and evaluation JSONs that gpu_call.sh brought back into logs/.

    python results/study3/table.py                 # every run in logs/
    python results/study3/table.py base ctx1024    # these runs, in this order
    python results/study3/table.py --mean a,b c,d  # mean rows over seeds (comma-joined names), one per group
    python results/study3/table.py --paradigms a,b c,d   # BLiMP 22 by paradigm: a column per group (seed means)
    python results/study3/table.py --supplement a,b c,d  # the supplement by task, likewise
    python results/study3/table.py --spread a,b c,d,e    # the seed-to-seed spread, pooled over groups of seeds

A run whose evaluation was cut off has NAME.rest.json beside NAME.eval.json: the missing tasks, scored later on the
same final checkpoint (eval.py --tasks=...); its scores join the row.
"""
import json
import statistics
import sys
from pathlib import Path

LOGS = Path(__file__).resolve().parent / "logs"
# the 12 hand-picked development paradigms (shared since round one); the 22 are these plus 10 drawn at random
DEV12 = {"anaphor_gender_agreement", "determiner_noun_agreement_1", "determiner_noun_agreement_2",
         "distractor_agreement_relational_noun", "existential_there_quantifiers_1",
         "irregular_past_participle_adjectives", "npi_present_1", "principle_A_c_command",
         "regular_plural_subject_verb_agreement_1", "regular_plural_subject_verb_agreement_2",
         "sentential_negation_npi_licensor_present", "wh_questions_object_gap"}
COLUMNS = ("words seen", "val loss", "BLiMP 22", "BLiMP dev 12", "supplement", "entity tracking", "WUG acc",
           "reading eye / SPR")


def suite(name):
    """-> one run's BabyLM scores (tasks, uids, reading) from NAME.eval.json, joined by NAME.rest.json's where a
    cut-off evaluation had its missing tasks scored later on the same checkpoint."""
    suite = json.load(open(LOGS / f"{name}.eval.json"))["babylm"]
    tasks, uids = dict(suite["tasks"]), dict(suite["uids"])   # a cut-off evaluation: the tasks it finished
    reading = suite.get("reading")
    rest = LOGS / f"{name}.rest.json"
    if rest.exists():
        more = json.load(open(rest))["babylm"]
        clash = set(more["tasks"]) & set(tasks)
        if clash:
            raise SystemExit(f"{rest.name} scores {sorted(clash)} again; {name}.eval.json already has them")
        tasks.update(more["tasks"])
        uids.update(more["uids"])
        reading = reading or more.get("reading")
    return {"tasks": tasks, "uids": uids, "reading": reading}


def scores(name):
    """-> dict of the table's columns for one run (None where the run has no such number)."""
    log = [json.loads(line) for line in open(LOGS / name / "log.jsonl")]
    last_eval = [r for r in log if r["kind"] == "eval"][-1]
    s = suite(name)
    tasks, blimp, reading = s["tasks"], s["uids"]["blimp_filtered"], s["reading"]
    return {"words seen": last_eval["words"] / 1e6, "val loss": last_eval["val_loss"],
            "BLiMP 22": tasks["blimp_filtered"],
            "BLiMP dev 12": statistics.mean(v for k, v in blimp.items() if k in DEV12),
            "supplement": tasks.get("supplement_filtered"), "entity tracking": tasks.get("entity_tracking"),
            "WUG acc": tasks.get("wug_adj_nominalization"),
            "reading eye / SPR": (reading["eye_tracking"], reading["self_paced_reading"]) if reading else None}


def numbers(name):
    """-> scores(name) with the reading pair as two numbers, "eye-tracking" and "self-paced reading"."""
    s = scores(name)
    eye, spr = s.pop("reading eye / SPR") or (None, None)
    return {**s, "eye-tracking": eye, "self-paced reading": spr}


def cell(v):
    if v is None:
        return "—"
    if isinstance(v, tuple):
        return " / ".join(f"{x:.2f}" for x in v)
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def mean_of(rows):
    out = {}
    for c in COLUMNS:
        vals = [r[c] for r in rows]
        if any(v is None for v in vals):
            out[c] = None
        elif isinstance(vals[0], tuple):
            out[c] = tuple(statistics.mean(v[i] for v in vals) for i in range(len(vals[0])))
        else:
            out[c] = statistics.mean(vals)
    return out


def pooled_sd(groups):
    """-> (the pooled within-group standard deviation, its degrees of freedom) of groups of numbers: each group's
    squared deviations from its own mean, summed over the groups, over the sum of (size - 1)."""
    df = sum(len(g) - 1 for g in groups)
    if df < 1:
        raise SystemExit("the spread needs at least one group of two seeds or more")
    ss = 0.0
    for g in groups:
        m = statistics.mean(g)   # once per group, not once per number
        ss += sum((x - m) ** 2 for x in g)
    return (ss / df) ** 0.5, df


def spread(groups):
    """A markdown table of each score's seed-to-seed standard deviation, pooled over groups of runs that differ only
    in the seed (each recipe's mean is taken out, so a lever that moves a score does not count as spread), and the
    difference two recipes' means must exceed to be twice its standard error: SD * sqrt(2 / n) * 2, n seeds each."""
    runs = [[numbers(n) for n in g] for g in groups]
    print("| score | seed SD (pooled) | degrees of freedom | 2 SE of a difference, 2 seeds each | 3 seeds each "
          "| 5 seeds each |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in runs[0][0]:
        if name == "words seen":
            continue
        vals = [[r[name] for r in g] for g in runs]
        if any(v is None for g in vals for v in g):
            raise SystemExit(f"a run of {groups} has no {name}")
        sd, df = pooled_sd(vals)
        cells = [cell(sd), str(df)] + [cell(2 * sd * (2 / n) ** 0.5) for n in (2, 3, 5)]
        print(f"| {name} | " + " | ".join(cells) + " |")


def by_part(groups, task="blimp_filtered"):
    """A markdown table of a task's parts (BLiMP's paradigms, the supplement's tasks), one column per group of runs
    (their mean), the parts ordered by the first group's; the last column is the first group minus the second."""
    by = [[json.load(open(LOGS / f"{n}.eval.json"))["babylm"]["uids"][task] for n in g] for g in groups]
    cols = [{p: statistics.mean(r[p] for r in runs) for p in runs[0]} for runs in by]
    labels = [" + ".join(g) for g in groups]
    head = "paradigm" if task == "blimp_filtered" else "task"
    print(f"| {head} | " + " | ".join(labels) + (" | first − second |" if len(cols) > 1 else " |"))
    print("|---|" + "---:|" * (len(cols) + (len(cols) > 1)))
    for p in sorted(cols[0], key=cols[0].get):
        cells = [f"{c[p]:.1f}" for c in cols] + ([f"{cols[0][p] - cols[1][p]:+.1f}"] if len(cols) > 1 else [])
        print(f"| {p} | " + " | ".join(cells) + " |")


def main(argv):
    if argv[:1] in (["--paradigms"], ["--supplement"]):
        task = "blimp_filtered" if argv[0] == "--paradigms" else "supplement_filtered"
        return by_part([g.split(",") for g in argv[1:]], task)
    if argv[:1] == ["--spread"]:
        return spread([g.split(",") for g in argv[1:]])
    means = argv[:1] == ["--mean"]
    groups = [g.split(",") for g in argv[1:]] if means else [[n] for n in argv]
    if not groups:
        groups = [[p.name[:-len(".eval.json")]] for p in sorted(LOGS.glob("*.eval.json"))]
    print("| run | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for g in groups:
        r = mean_of([scores(n) for n in g])
        label = g[0] if len(g) == 1 else f"{' + '.join(g)} (mean of {len(g)})"
        print(f"| {label} | " + " | ".join(cell(r[c]) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
