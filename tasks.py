"""
The evaluation data: minimal-pair files (BLiMP .jsonl, Zorro .txt), the built-in synthetic pairs, and the
BabyLM 2025 suite folder read into lists of items, every line checked before any scoring starts. eval.py
scores what this reads; the reading task's CSV is reading.py's.

    load_pairs(path)        a BLiMP / Zorro file or folder -> {paradigm: [Pair]}
    builtin_pairs()         synthetic.py's pairs, a fixed number per phenomenon and seed
    load_babylm(path)       a suite folder (full_eval, fast_eval) -> {task: [Item]} (reading: reading.ReadingData)
    is_suite(path)          whether a folder holds task folders
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from common import jsonl_records, read_text
from reading import read_reading
from synthetic import synthetic_minimal_pairs

BUILTIN_PAIRS_PER_PHENOMENON = 200  # --pairs=builtin: fixed, so that scores of different runs compare
BUILTIN_SEED = 1234
TASKS = ("blimp_filtered", "supplement_filtered", "ewok_filtered", "entity_tracking", "wug_adj_nominalization")
READING, READING_FILE = "reading", "reading_data.csv"  # the reading task's folder and file (scored by reading.py)
FOLDERS = TASKS + (READING,)  # TASKS are scored by accuracy (their mean is the macro-average); reading apart
FAST_FOLDERS = {"blimp_fast": "blimp_filtered", "supplement_fast": "supplement_filtered",  # fast_eval's names
                "ewok_fast": "ewok_filtered", "entity_tracking_fast": "entity_tracking"}
NOT_SCORED = ("wug_past_tense", "comps", "aoa", "glue_filtered", "vqa_filtered", "winoground_filtered")  # the
# pipeline's other folders: named on stderr, not scored (fine-tuning data, tasks of other tracks or formats)

# -----------------------------------------------------------------------------
# A checked field of a JSON Lines record


def field(record, where, key, kind, nonempty=False):
    """record[key], checked to be of type kind (a non-blank string when nonempty)."""
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) or (nonempty and not value.strip()):
        what = "a JSON object with " if not isinstance(record, dict) else ""
        raise ValueError(f"{where}: expected {what}field {key!r} to be a {'non-empty ' * nonempty}"
                         f"{getattr(kind, '__name__', 'number')}; got {value!r:.80}")
    return value

# -----------------------------------------------------------------------------
# Minimal pairs: dict paradigm -> list of Pair


@dataclass(frozen=True)
class Pair:
    good: str
    bad: str
    field: str | None = None  # BLiMP's `field`, Zorro's phenomenon (file name before the last '-')


def pairs_from_records(records, where, paradigm=None):
    """BLiMP-style dicts (sentence_good, sentence_bad; optional UID, field; anything else ignored)
    -> dict paradigm -> pairs. The paradigm is the record's UID, else `paradigm`; where(n) names record n."""
    out = {}
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("sentence_good", "sentence_bad")):
            raise ValueError(f"{where(n)}: expected a JSON object with string fields sentence_good and sentence_bad")
        if not r["sentence_good"].strip() or not r["sentence_bad"].strip():
            raise ValueError(f"{where(n)}: empty sentence_good or sentence_bad")
        key = r.get("UID") or paradigm
        if key is None:
            raise ValueError(f"{where(n)}: no UID to name its paradigm")
        out.setdefault(key, []).append(Pair(r["sentence_good"], r["sentence_bad"], r.get("field")))
    return out


def read_blimp(path):
    """One BLiMP .jsonl file; paradigm = the UID field, else the file stem."""
    lines, records = [], []
    for n, r in jsonl_records(path):
        lines.append(n)
        records.append(r)
    return pairs_from_records(records, lambda k: f"{path} line {lines[k - 1]}", Path(path).stem)


def read_zorro(path):
    """One Zorro .txt file: line 2j-1 is ungrammatical, line 2j its grammatical twin (1-based)."""
    lines = read_text(path).splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path} line {n}: empty line; Zorro files hold one sentence per line")
    if len(lines) % 2:
        raise ValueError(f"{path} line {len(lines)}: odd number of lines ({len(lines)}); "
                         f"expected pairs of (ungrammatical, grammatical) lines")
    stem = Path(path).stem
    field = stem.rsplit("-", 1)[0]  # "filler-gap-wh_question_object" -> "filler-gap"
    return {stem: [Pair(good, bad, field) for bad, good in zip(lines[0::2], lines[1::2])]}


FORMATS = {".jsonl": "BLiMP .jsonl", ".txt": "Zorro .txt"}


def load_pairs(path, kind=None):
    """A BLiMP .jsonl or Zorro .txt file, or a folder of them -> dict paradigm -> list of Pair; kind "blimp"
    or "zorro" accepts that format only. (A BabyLM 2025 suite folder, is_suite, is load_babylm's.)"""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"minimal pairs {path} do not exist")
    if is_suite(path):
        raise ValueError(f"{path} is a BabyLM 2025 suite folder (it holds task folders): score it with "
                         f"--babylm={path}, not as minimal pairs")
    suffixes = {None: (".jsonl", ".txt"), "blimp": (".jsonl",), "zorro": (".txt",)}[kind]
    flag = f"--{kind}={path}" if kind else str(path)
    wanted = " or ".join(FORMATS[s] for s in suffixes)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in suffixes)
        if not files:
            other = sorted({FORMATS[p.suffix] for p in path.iterdir() if p.suffix in FORMATS})
            raise ValueError(f"{flag} holds no {wanted} files" + (f" but {', '.join(other)} files" if other else ""))
    elif path.suffix not in suffixes:
        raise ValueError(f"{flag}: expected a {wanted} file")
    else:
        files = [path]
    out = {}
    for p in files:
        pairs = read_blimp(p) if p.suffix == ".jsonl" else read_zorro(p)
        if not any(pairs.values()):
            raise ValueError(f"{p} holds no minimal pairs")
        for paradigm, ps in pairs.items():
            out.setdefault(paradigm, []).extend(ps)
    return out


def builtin_pairs():
    records = synthetic_minimal_pairs(BUILTIN_PAIRS_PER_PHENOMENON, BUILTIN_SEED)
    return pairs_from_records(records, lambda n: f"builtin pair {n}", "builtin")

# -----------------------------------------------------------------------------
# The BabyLM 2025 suite: dict task -> list of Item


@dataclass(frozen=True)
class Item:
    """Candidate strings prefix + c for c in candidates, of which only c is scored; candidates[0] is the
    correct one (WUG: the one `ratio` gives the human preference for)."""
    prefix: str
    candidates: tuple
    uid: str
    field: str | None = None    # BLiMP's field; entity tracking's file
    ratio: float | None = None  # WUG


def read_pair_items(path):
    """blimp_filtered, supplement_filtered: a minimal pair is an item of two whole sentences."""
    fields = {"syntax_semantics": "syntax/semantics"}  # the pipeline's spelling
    return [Item("", (p.good, p.bad), uid, fields.get(p.field, p.field))
            for uid, ps in read_blimp(path).items() for p in ps]


def read_ewok(path):
    items = []
    for n, r in jsonl_records(path):
        where = f"{path} line {n}"
        context = field(r, where, "Context1", str)
        targets = tuple(field(r, where, k, str, nonempty=True) for k in ("Target1", "Target2"))
        items.append(Item(context + " ", targets, field(r, where, "Domain", str, nonempty=True)))
    return items


def read_entity_tracking(path):
    items, stem = [], Path(path).stem
    for n, r in jsonl_records(path):
        where = f"{path} line {n}"
        prefix, options = field(r, where, "input_prefix", str), field(r, where, "options", list)
        if len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"{where}: expected 'options' to be a list of 2 or more non-empty strings; got {options!r:.80}")
        items.append(Item(prefix, tuple(options), f"{stem}_{field(r, where, 'numops', int)}_ops", stem))
    return items


def read_wug(path):
    items = []
    for n, r in jsonl_records(path):
        where = f"{path} line {n}"
        sentences = field(r, where, "sentences", str).split("\t")
        if len(sentences) != 2 or not all(s.strip() for s in sentences):
            raise ValueError(f"{where}: expected 'sentences' to be two non-empty sentences separated by one tab")
        ratio = field(r, where, "ratio", (int, float))
        if not 0 <= ratio <= 1:
            raise ValueError(f"{where}: expected 'ratio' (the human preference for the first sentence) "
                             f"in [0, 1]; got {ratio}")
        items.append(Item("", tuple(sentences), Path(path).stem, ratio=float(ratio)))
    return items


READERS = {"blimp_filtered": read_pair_items, "supplement_filtered": read_pair_items, "ewok_filtered": read_ewok,
           "entity_tracking": read_entity_tracking, "wug_adj_nominalization": read_wug}


def is_suite(path):
    return Path(path).is_dir() and any((Path(path) / t).is_dir() for t in (*FOLDERS, *FAST_FOLDERS))


def task_folders(path):
    """-> {task: its folder} of a suite folder (full_eval's names, or fast_eval's); a folder of another name
    is an error that lists the known ones (a misspelt task is not skipped without a word), the pipeline's
    folders that eval.py does not score are named on stderr."""
    folders = {p.name: p for p in Path(path).iterdir() if p.is_dir() and not p.name.startswith(".")}
    unknown = sorted(n for n in folders if n not in (*FOLDERS, *FAST_FOLDERS, *NOT_SCORED))
    if unknown:
        raise ValueError(f"{path}: unknown task folder(s) {', '.join(unknown)}; the known ones are "
                         f"{', '.join(FOLDERS)} (fast_eval: {', '.join(FAST_FOLDERS)}; not scored here: "
                         f"{', '.join(NOT_SCORED)})")
    skipped = sorted(n for n in folders if n in NOT_SCORED)
    if skipped:
        print(f"warning: {path}: not scored by eval.py: {', '.join(skipped)}", file=sys.stderr)
    found = {}
    for name, folder in folders.items():
        task = FAST_FOLDERS.get(name, name)
        if task in found:
            raise ValueError(f"{path} holds two folders for task {task}: {found[task].name} and {name}")
        if task in FOLDERS:
            found[task] = folder
    return {t: found[t] for t in FOLDERS if t in found}


def load_babylm(path, tasks=None):
    """The task folders of a BabyLM 2025 suite folder (all found, or the named ones) -> {task: list of Item}."""
    path = Path(path)
    unknown = [t for t in tasks or () if t not in FOLDERS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(FOLDERS)}")
    if not path.is_dir():
        raise FileNotFoundError(f"BabyLM suite folder {path} does not exist or is not a folder")
    folder = task_folders(path)
    found = list(folder)
    if not found:
        raise ValueError(f"{path} holds none of the task folders {', '.join(FOLDERS)}; expected the 2025 "
                         "pipeline's evaluation_data/full_eval (or fast_eval) folder")
    missing = [t for t in tasks or () if t not in found]
    if missing:
        raise FileNotFoundError(f"{path} has no folder for task(s) {', '.join(missing)}; it holds {', '.join(found)}")
    suite = {}
    for task in [t for t in found if not tasks or t in tasks]:
        if task == READING:
            if not (folder[task] / READING_FILE).is_file():
                raise FileNotFoundError(f"{folder[task]} holds no {READING_FILE}")
            suite[task] = read_reading(folder[task] / READING_FILE)
            continue
        files = sorted(folder[task].glob("*.jsonl"))
        if not files:
            raise ValueError(f"{folder[task]} holds no .jsonl files")
        suite[task] = []
        for f in files:
            items = READERS[task](f)
            if not items:
                raise ValueError(f"{f} holds no items (an empty file); expected JSON Lines of task {task}")
            suite[task] += items
    return suite
