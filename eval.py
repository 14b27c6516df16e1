"""
Zero-shot evaluation of a checkpoint: minimal pairs (BLiMP, Zorro, the built-in pairs) and perplexity.

    python eval.py --ckpt=out/ckpt.pt --blimp=DIR --zorro=DIR    # accuracy per paradigm and field
    python eval.py --ckpt=out/ckpt.pt --pairs=builtin            # the synthetic pairs of data.py
    python eval.py --ckpt=out/ckpt.pt --text=FILE                # perplexity and bits per byte
    python eval.py --help

A minimal pair is a grammatical and an ungrammatical sentence that differ in one phenomenon. The model
gets it right when log P(good) > log P(bad) strictly: a tie counts as wrong, so a model that cannot tell
the two apart scores 0 on it, not 100. log P(sentence) = sum of its tokens' log-probabilities, with the
end-of-text token prepended so that the first word is scored too. Accuracies are percentages (0-100); the
last line printed is `macro-average: X`, the mean accuracy over all paradigms evaluated.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from train import parse_args, pick_device

BUILTIN_PAIRS_PER_PHENOMENON = 200  # --pairs=builtin: fixed, so that scores of different runs compare
BUILTIN_SEED = 1234


@dataclass
class EvalConfig:
    ckpt: str = ""           # checkpoint written by train.py (required)
    blimp: str = ""          # a BLiMP .jsonl file or a folder of them
    zorro: str = ""          # a Zorro .txt file or a folder of them
    pairs: str = ""          # "builtin": data.synthetic_minimal_pairs, 200 per phenomenon, seed 1234
    text: str = ""           # a text file: perplexity and bits per byte
    max_pairs: int = 0       # use only the first max_pairs pairs of each paradigm (0 = all)
    batch_size: int = 64     # sentences per forward pass (windows of block_size for --text: batch_size // 8)
    device: str = "auto"     # "auto" = cuda when present, else cpu
    json: str = ""           # also write the results to this file


def write_json_atomic(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# Reading minimal pairs: dict paradigm -> list of Pair


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
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    return pairs_from_records(records, lambda n: f"{path} line {n}", Path(path).stem)


def read_zorro(path):
    """One Zorro .txt file: line 2j-1 is ungrammatical, line 2j its grammatical twin (1-based)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path} line {n}: empty line; Zorro files hold one sentence per line")
    if len(lines) % 2:
        raise ValueError(f"{path} line {len(lines)}: odd number of lines ({len(lines)}); "
                         f"expected pairs of (ungrammatical, grammatical) lines")
    stem = Path(path).stem
    field = stem.rsplit("-", 1)[0]  # "filler-gap-wh_question_object" -> "filler-gap"
    return {stem: [Pair(good, bad, field) for bad, good in zip(lines[0::2], lines[1::2])]}


def load_pairs(path):
    """A BLiMP .jsonl or Zorro .txt file, or a folder of them -> dict paradigm -> list of Pair."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"minimal pairs {path} do not exist")
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} holds no .jsonl (BLiMP) or .txt (Zorro) files")
    out = {}
    for p in files:
        if p.suffix not in (".jsonl", ".txt"):
            raise ValueError(f"{p}: expected a BLiMP .jsonl or a Zorro .txt file")
        pairs = read_blimp(p) if p.suffix == ".jsonl" else read_zorro(p)
        if not any(pairs.values()):
            raise ValueError(f"{p} holds no minimal pairs")
        for paradigm, ps in pairs.items():
            out.setdefault(paradigm, []).extend(ps)
    return out


def builtin_pairs():
    from data import synthetic_minimal_pairs
    records = synthetic_minimal_pairs(BUILTIN_PAIRS_PER_PHENOMENON, BUILTIN_SEED)
    return pairs_from_records(records, lambda n: f"builtin pair {n}", "builtin")

# -----------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def token_logprobs(model, seqs, bos, device=None, batch_size=64):
    """Token-id lists -> float64 tensor of sum_t log P(x_t | bos, x_<t), one per list.
    Sorted by length so each batch pads little; padded on the right, where causality keeps it from
    touching the real tokens, and masked out of the sum."""
    device = device or next(model.parameters()).device
    out = torch.empty(len(seqs), dtype=torch.float64)
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
    was_training = model.training
    model.eval()  # no dropout; restored below for callers in the middle of training
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            T = max(len(seqs[j]) for j in rows)
            x = torch.full((len(rows), T), bos, dtype=torch.long)
            y = torch.full((len(rows), T), -1, dtype=torch.long)  # -1 = padding
            for r, j in enumerate(rows):
                s = seqs[j]
                x[r, :len(s)] = torch.tensor([bos] + s[:-1])
                y[r, :len(s)] = torch.tensor(s)
            x, y = x.to(device), y.to(device)
            logits, _ = model(x)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least, float64 kept
            logp = F.log_softmax(logits, dim=-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
            out[rows] = (logp.double() * (y >= 0)).sum(dim=1).cpu()
    finally:
        model.train(was_training)
    return out


def sentence_logprobs(model, enc, sentences, device=None, batch_size=64):
    """log P(sentence) under the model, the end-of-text token prepended -> float64 tensor (N,)."""
    seqs = [enc.encode_ordinary(s) for s in sentences]
    for s, t in zip(sentences, seqs):
        if not t:
            raise ValueError(f"sentence {s!r} has no tokens")
        if getattr(model, "learned_pos", False) and len(t) > model.config.block_size:
            raise ValueError(f"sentence {s!r} is {len(t)} tokens, longer than block_size="
                             f"{model.config.block_size} of this mixer={model.config.mixer!r} model")
    return token_logprobs(model, seqs, enc.eot_token, device, batch_size)


def score_pairs(model, enc, pairs_by_paradigm, device=None, batch_size=64, max_pairs_per_paradigm=None):
    """-> dict(paradigms={name: accuracy}, fields={field: accuracy over its pairs}, n_pairs={name: n},
    macro_average=mean accuracy over paradigms); accuracies in percent, a tie counts as wrong.
    max_pairs_per_paradigm keeps the first pairs of each paradigm (for quick evaluation during training)."""
    if max_pairs_per_paradigm is not None and max_pairs_per_paradigm < 1:
        raise ValueError(f"max_pairs_per_paradigm={max_pairs_per_paradigm}; expected >= 1 or None")
    empty = [k for k, v in pairs_by_paradigm.items() if not v]
    if not pairs_by_paradigm or empty:
        raise ValueError(f"no minimal pairs to score (paradigms without pairs: {empty})")
    flat = [(k, p) for k, v in pairs_by_paradigm.items() for p in v[:max_pairs_per_paradigm]]
    lp = sentence_logprobs(model, enc, [p.good for _, p in flat] + [p.bad for _, p in flat], device, batch_size)
    right = (lp[:len(flat)] > lp[len(flat):]).tolist()  # strictly greater: a tie is wrong
    by_paradigm, by_field = {}, {}
    for (k, p), r in zip(flat, right):
        by_paradigm.setdefault(k, []).append(r)
        if p.field is not None:
            by_field.setdefault(p.field, []).append(r)
    acc = lambda rs: 100.0 * sum(rs) / len(rs)
    paradigms = {k: acc(rs) for k, rs in by_paradigm.items()}
    return dict(paradigms=paradigms, fields={k: acc(rs) for k, rs in sorted(by_field.items())},
                n_pairs={k: len(rs) for k, rs in by_paradigm.items()},
                macro_average=sum(paradigms.values()) / len(paradigms))


def perplexity(model, enc, text, device=None, batch_size=8):
    """Perplexity and bits per byte of a text: non-overlapping windows of block_size tokens, each read
    from a fresh start (end-of-text prepended). ppl = exp(nats / tokens); bpb = nats / ln 2 / utf-8 bytes."""
    tokens = enc.encode_ordinary(text)
    if not tokens:
        raise ValueError("the text has no tokens")
    W = model.config.block_size
    windows = [tokens[s:s + W] for s in range(0, len(tokens), W)]
    nats = -token_logprobs(model, windows, enc.eot_token, device, batch_size).sum().item()
    return dict(ppl=math.exp(nats / len(tokens)), bits_per_byte=nats / math.log(2) / len(text.encode("utf-8")),
                tokens=len(tokens))

# -----------------------------------------------------------------------------


def main(argv):
    cfg = parse_args(argv, EvalConfig, doc=__doc__)
    if not cfg.ckpt:
        raise ValueError("--ckpt=PATH is required (a checkpoint written by train.py)")
    if cfg.pairs not in ("", "builtin"):
        raise ValueError(f"--pairs={cfg.pairs!r}: expected 'builtin'")
    if not (cfg.blimp or cfg.zorro or cfg.pairs or cfg.text):
        raise ValueError("nothing to evaluate: give --blimp=DIR, --zorro=DIR, --pairs=builtin and/or --text=FILE")
    if cfg.max_pairs < 0 or cfg.batch_size < 1:
        raise ValueError(f"--max_pairs={cfg.max_pairs} must be >= 0 and --batch_size={cfg.batch_size} >= 1")
    from train import load_checkpoint
    device = pick_device(cfg.device)
    model, enc, ckpt = load_checkpoint(cfg.ckpt, device)
    print(f"{cfg.ckpt}: iter {ckpt.get('iter')}, {ckpt.get('words_seen')} words seen, mixer={model.config.mixer}")
    results = dict(ckpt=cfg.ckpt, iter=ckpt.get("iter"), words_seen=ckpt.get("words_seen"))
    if cfg.text:
        with open(cfg.text, encoding="utf-8") as f:
            text = f.read()
        if not text:
            raise ValueError(f"--text={cfg.text} is empty")
        r = results["text"] = perplexity(model, enc, text, device, max(1, cfg.batch_size // 8))
        print(f"{cfg.text}: ppl {r['ppl']:.3f}, bits per byte {r['bits_per_byte']:.4f}, {r['tokens']} tokens")
    pairs, suite_of = {}, {}
    for suite, src in (("blimp", cfg.blimp), ("zorro", cfg.zorro), ("builtin", cfg.pairs)):
        if not src:
            continue
        for paradigm, ps in (builtin_pairs() if suite == "builtin" else load_pairs(src)).items():
            if paradigm in pairs:
                raise ValueError(f"paradigm {paradigm!r} appears twice (in --{suite} and before)")
            pairs[paradigm], suite_of[paradigm] = ps, suite
    if pairs:
        res = score_pairs(model, enc, pairs, device, cfg.batch_size, cfg.max_pairs or None)
        w = max(map(len, res["paradigms"]))
        for paradigm, a in res["paradigms"].items():
            print(f"{paradigm:<{w}}  {a:6.2f}  ({res['n_pairs'][paradigm]} pairs)")
        for field, a in res["fields"].items():  # fields of the same name from two suites are pooled
            print(f"field {field}: {a:.2f}")
        res["suites"] = {}
        for suite in dict.fromkeys(suite_of.values()):
            accs = [a for p, a in res["paradigms"].items() if suite_of[p] == suite]
            res["suites"][suite] = sum(accs) / len(accs)
            print(f"{suite} average: {res['suites'][suite]:.2f} over {len(accs)} paradigms")
        results.update(res)
    if cfg.json:
        write_json_atomic(results, cfg.json)
    if pairs:
        print(f"macro-average: {results['macro_average']:.2f}")
    return results


if __name__ == "__main__":
    from train import run_cli
    run_cli(main)
