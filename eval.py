"""
Zero-shot evaluation of a checkpoint: the BabyLM 2025 suite, minimal pairs (BLiMP, Zorro, the built-in
pairs), perplexity, and the learning curve of a run's milestone checkpoints.

    python eval.py --ckpt=out/ckpt.pt --babylm=DIR               # the 2025 suite: every task folder in DIR
    python eval.py --run=out --babylm=DIR                        # each ckpt_<N>M_words.pt of a run: curve + plot
    python eval.py --ckpt=out/ckpt.pt --blimp=DIR --zorro=DIR    # accuracy per paradigm and field
    python eval.py --ckpt=out/ckpt.pt --pairs=builtin            # the synthetic pairs of synthetic.py
    python eval.py --ckpt=out/ckpt.pt --text=FILE                # perplexity and bits per byte (.txt, .txt.gz)
    python eval.py --help

The BabyLM 2025 suite (--babylm=DIR: the pipeline's evaluation_data/full_eval or fast_eval folder) holds
one folder per task, JSON Lines inside. An item is a few candidate strings prefix + completion, the
correct one listed first; the model picks the candidate whose completion it finds likeliest:
score = sum of log P(token | everything before it) over the completion's tokens (temperature 1, no length
normalisation). As in the official pipeline the whole candidate string is tokenized at once, end-of-text
prepended, and the scored tokens are those that reach into the completion (a token " the" that starts with
the prefix's last space is scored).

  blimp_filtered, supplement_filtered  whole sentences; UID = the UID field, else the file stem
  ewok_filtered            Context1 + " " + Target1 | Target2, the target scored; UID = Domain
  entity_tracking          input_prefix + option, options[0] correct; UID = <file>_<numops>_ops; the task
                           score is the mean over the files of the mean over their UIDs
  wug_adj_nominalization   two whole sentences: the accuracy of preferring the first (the task score) and
                           the Spearman correlation of log P(first) - log P(second) with the human `ratio`
  reading                  reading/reading_data.csv: each word's surprisal after its context (the word
                           tokenized without its leading space, BOS + context read whole, -ln P summed over
                           the word's tokens) and the previous word's, added to least-squares regressions of
                           each human measure on frequency, length and context length (and their pairwise
                           products); score = 100 (R² with - R² without) / (1 - R² without). Printed: each
                           measure's gain, `reading eye-tracking` (mean over the four eye-tracking measures)
                           and `reading self-paced` (with the previous word's surprisal and length as
                           predictors), the pipeline's two reading scores
Other task scores are the mean over UIDs; the suite's macro-average is the mean of the five accuracy tasks'
scores (reading is reported apart).

Unlike the pipeline (whose argmax counts a tie right) a tie counts as WRONG here, so a model that cannot
tell the candidates apart scores 0, not 100; the same holds for the minimal pairs (log P(good) > log P(bad)
strictly, log P(sentence) = the sum of its tokens' log-probabilities after end-of-text). A model with
learned positions (mixer attn, hedgehog) reads a suite candidate longer than block_size through its last
block_size tokens (the context cut from the left; such items are counted as "cut"); an item whose scored
tokens alone do not fit counts as wrong ("too long"). The mLSTM reads everything. Accuracies are
percentages (0-100); the last line printed is `macro-average: X`.
"""

import copy
import io
import math
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from checkpoint import load_model, milestones
from common import check_writable, parse_args, pick_device, read_text, run_cli, write_atomic, write_json
from reading import EYE_TRACKING, MEASURES, SELF_PACED, score_reading
from tasks import READING, builtin_pairs, load_babylm, load_pairs


@dataclass
class EvalConfig:
    ckpt: str = ""           # checkpoint written by train.py, or its run folder (its ckpt.pt)
    babylm: str = ""         # the BabyLM 2025 suite: a folder holding task folders (full_eval, fast_eval)
    tasks: str = ""          # comma-separated subset of the suite's tasks ("" = every task folder found)
    run: str = ""            # a run folder: evaluate each ckpt_<N>M_words.pt on --babylm, write babylm_curve.json
    plot_out: str = ""       # --run's figure ("" = RUN/babylm_curve.png)
    blimp: str = ""          # a BLiMP .jsonl file or a folder of them
    zorro: str = ""          # a Zorro .txt file or a folder of them
    pairs: str = ""          # "builtin": synthetic.synthetic_minimal_pairs, 200 per phenomenon, seed 1234
    text: str = ""           # a text file (.txt or .txt.gz): perplexity and bits per byte
    max_pairs: int = 0       # use only the first max_pairs items of each paradigm / UID (0 = all)
    batch_size: int = 64     # sequences per forward pass (windows of block_size for --text: batch_size // 8)
    device: str = "auto"     # "auto" = cuda when present, else cpu
    json: str = ""           # also write the results to this file

# -----------------------------------------------------------------------------
# Scoring


class Progress:
    """A line on stderr at most every `every` seconds (none for short work): items done, items/s and the
    time left, estimated from the tokens left (batches are sorted by length, so items get slower)."""

    def __init__(self, label, items, tokens, every=2.0):
        self.label, self.items, self.tokens, self.every = label, items, tokens, every
        self.t0 = self.last = time.time()
        self.items_done = self.tokens_done = 0

    def add(self, items, tokens):
        self.items_done += items
        self.tokens_done += tokens
        now = time.time()
        if now - self.last >= self.every and self.items_done < self.items:
            dt = now - self.t0
            eta = (self.tokens - self.tokens_done) * dt / self.tokens_done
            print(f"  {self.label}: {self.items_done:,}/{self.items:,} sequences, {self.items_done / dt:,.0f}/s, "
                  f"ETA {eta:.0f}s", file=sys.stderr, flush=True)
            self.last = now


def padded_batch(seqs, n_scored):
    """Token-id lists -> (inputs (B, T), targets (B, T), -1 where not scored): list s is read as s[:-1] and
    its last n_scored tokens are scored; padded on the right, where causality keeps the padding from
    touching the real tokens."""
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros((len(seqs), T), dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for r, (s, n) in enumerate(zip(seqs, n_scored)):
        x[r, :len(s) - 1] = torch.tensor(s[:-1])
        y[r, len(s) - 1 - n:len(s) - 1] = torch.tensor(s[len(s) - n:])
    return x, y


def row_sums(logits, y):
    """(B, T, vocab) logits, (B, T) targets (-1 = not scored) -> float64 (B,) sums of the targets' log-probs,
    the log-softmax taken (float32 at least) only where a token is scored."""
    scored = (y >= 0).to(logits.device)
    picked = logits[scored]
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    logp = F.log_softmax(picked, dim=-1).gather(-1, y[y >= 0].to(logits.device).unsqueeze(-1)).squeeze(-1)
    return torch.zeros(len(y), dtype=torch.float64).index_add_(0, (y >= 0).nonzero()[:, 0], logp.cpu().double())


@torch.no_grad()
def sum_logprobs(model, seqs, n_scored, device=None, batch_size=64, max_tokens=None, progress=None):
    """Token-id lists -> float64 tensor: for each list s, the sum of log P(s[t] | s[:t]) over its last
    n_scored tokens (s[0] is context only: end-of-text, or the first token of a cut window). Sorted by
    length so each batch pads little; a batch holds at most batch_size lists and max_tokens input tokens."""
    device = device or next(model.parameters()).device
    out = torch.empty(len(seqs), dtype=torch.float64)
    batches, b = [], []
    for j in sorted(range(len(seqs)), key=lambda j: len(seqs[j])):
        if b and (len(b) == batch_size or max_tokens and (len(b) + 1) * (len(seqs[j]) - 1) > max_tokens):
            batches.append(b)
            b = []
        b.append(j)
    batches += [b] if b else []
    was_training = model.training
    model.eval()  # no dropout; restored below for callers in the middle of training
    try:
        for rows in batches:
            x, y = padded_batch([seqs[j] for j in rows], [n_scored[j] for j in rows])
            out[rows] = row_sums(model(x.to(device))[0], y)
            if progress:
                progress.add(len(rows), x.numel())
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def shared_prefix_logprobs(model, groups, device=None, batch_size=64, progress=None):
    """Like sum_logprobs for items whose K candidates share their first S tokens (none of them scored):
    groups[(S, K)] = list of (seqs, n_scored) of one item. The shared tokens but the last are read once per
    item into a decoding cache; each candidate continues from a copy of it (from the last shared token on).
    -> dict (S, K) -> float64 tensor (items, K)."""
    device = device or next(model.parameters()).device
    out = {}
    was_training = model.training
    model.eval()
    try:
        for (S, K), group in groups.items():
            out[S, K] = torch.empty(len(group), K, dtype=torch.float64)
            for b in range(0, len(group), batch_size):
                rows = group[b:b + batch_size]
                cache = model.new_cache()
                model(torch.tensor([seqs[0][:S - 1] for seqs, _ in rows], device=device), cache=cache)
                for k in range(K):
                    x, y = padded_batch([seqs[k][S - 1:] for seqs, _ in rows], [ns[k] for _, ns in rows])
                    out[S, K][b:b + len(rows), k] = row_sums(model(x.to(device), cache=copy.deepcopy(cache))[0], y)
                if progress:
                    progress.add(K * len(rows), len(rows) * (S - 1) + sum(len(s) - S for seqs, _ in rows for s in seqs))
    finally:
        model.train(was_training)
    return out


def token_logprobs(model, seqs, bos, device=None, batch_size=64, progress=None):
    """Token-id lists -> float64 tensor of sum_t log P(x_t | bos, x_<t), one per list. progress: a label for
    progress lines on stderr (None: quiet)."""
    if progress:
        progress = Progress(progress, len(seqs), sum(len(s) for s in seqs))
    return sum_logprobs(model, [[bos] + s for s in seqs], [len(s) for s in seqs], device, batch_size,
                        progress=progress)


def sentence_logprobs(model, enc, sentences, device=None, batch_size=64, progress=None):
    """log P(sentence) under the model, the end-of-text token prepended -> float64 tensor (N,)."""
    seqs = [enc.encode_ordinary(s) for s in sentences]
    for s, t in zip(sentences, seqs):
        if not t:
            raise ValueError(f"sentence {s!r} has no tokens")
        if getattr(model, "learned_pos", False) and len(t) > model.config.block_size:
            raise ValueError(f"sentence {s!r} is {len(t)} tokens, longer than block_size="
                             f"{model.config.block_size} of this mixer={model.config.mixer!r} model")
    return token_logprobs(model, seqs, enc.eot_token, device, batch_size, progress)


def score_pairs(model, enc, pairs_by_paradigm, device=None, batch_size=64, max_pairs_per_paradigm=None,
                progress=None):
    """-> dict(paradigms={name: accuracy}, fields={field: accuracy over its pairs}, n_pairs={name: n},
    macro_average=mean accuracy over paradigms); accuracies in percent, a tie counts as wrong.
    max_pairs_per_paradigm keeps the first pairs of each paradigm (for quick evaluation during training)."""
    if max_pairs_per_paradigm is not None and max_pairs_per_paradigm < 1:
        raise ValueError(f"max_pairs_per_paradigm={max_pairs_per_paradigm}; expected >= 1 or None")
    empty = [k for k, v in pairs_by_paradigm.items() if not v]
    if not pairs_by_paradigm or empty:
        raise ValueError(f"no minimal pairs to score (paradigms without pairs: {empty})")
    flat = [(k, p) for k, v in pairs_by_paradigm.items() for p in v[:max_pairs_per_paradigm]]
    lp = sentence_logprobs(model, enc, [p.good for _, p in flat] + [p.bad for _, p in flat], device, batch_size,
                           progress)
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


def candidate_tokens(enc, prefix, completion):
    """-> (ids of prefix + completion tokenized as one string, how many trailing ids reach into the
    completion). A token reaches into it when it ends past the prefix's bytes: the pipeline's rule
    `token's character end > len(prefix)` said in bytes, which stays exact when a token ends inside a
    multi-byte character (that character is the completion's, so the token is scored)."""
    ids = enc.encode_ordinary(prefix + completion)
    boundary, end = len(prefix.encode("utf-8")), 0
    for j, t in enumerate(ids):
        end += len(enc.decode_single_token_bytes(t))
        if end > boundary:
            return ids, len(ids) - j
    return ids, 0


def shared_length(seqs, n_scored):
    """How many leading tokens all candidates share before the first scored one."""
    S = min(len(s) - n for s, n in zip(seqs, n_scored))
    while S > 0 and any(s[S - 1] != seqs[0][S - 1] for s in seqs):
        S -= 1
    return S


def score_items(model, enc, items, device=None, batch_size=64, progress=None, min_shared=16):
    """-> (one float64 tensor of candidate scores per item, indices of the items whose context was cut to
    the learned positions, indices of the items whose scored tokens do not fit them: scores NaN).
    Candidates that share a context of 2 tokens or more (EWoK, entity tracking) read it once, where
    min_shared items or more share about as much (shared_prefix_logprobs)."""
    W = model.config.block_size if getattr(model, "learned_pos", False) else None
    scores = [torch.full((len(item.candidates),), math.nan, dtype=torch.float64) for item in items]
    plain, shared, cut, too_long = [], {}, [], []  # plain: (item, candidate, seq, n_scored)
    for i, item in enumerate(items):
        tokens = [candidate_tokens(enc, item.prefix, c) for c in item.candidates]
        seqs, ns = [[enc.eot_token] + ids for ids, _ in tokens], [n for _, n in tokens]
        if W is not None and any(n > W for n in ns):
            too_long.append(i)
        elif W is not None and any(len(s) - 1 > W for s in seqs):
            plain += [(i, k, s[-(W + 1):], n) for k, (s, n) in enumerate(zip(seqs, ns))]  # W inputs, last W scored
            cut.append(i)
        elif (S := shared_length(seqs, ns)) >= 2:
            S = S if S < 16 else S - S % 16  # similar lengths batch together; at most 15 tokens read again
            shared.setdefault((S, len(seqs)), []).append((i, seqs, ns))
        else:
            plain += [(i, k, s, n) for k, (s, n) in enumerate(zip(seqs, ns))]
    for key in [key for key, g in shared.items() if len(g) < min_shared]:  # too few to pay for their forwards
        plain += [(i, k, s, n) for i, seqs, ns in shared.pop(key) for k, (s, n) in enumerate(zip(seqs, ns))]
    if progress:
        n_seqs = len(plain) + sum(len(g) * K for (_, K), g in shared.items())
        n_tokens = sum(len(s) - 1 for _, _, s, _ in plain) + sum(
            S - 1 + sum(len(s) - S for s in seqs) for (S, _), g in shared.items() for _, seqs, _ in g)
        progress = Progress(progress, n_seqs, n_tokens)
    lp = sum_logprobs(model, [s for _, _, s, _ in plain], [n for *_, n in plain], device, batch_size,
                      max_tokens=128 * batch_size, progress=progress)
    for (i, k, _, _), v in zip(plain, lp.tolist()):
        scores[i][k] = v
    done = shared_prefix_logprobs(model, {key: [(seqs, ns) for _, seqs, ns in g] for key, g in shared.items()},
                                  device, batch_size, progress)
    for key, g in shared.items():
        for (i, _, _), row in zip(g, done[key]):
            scores[i] = row
    return scores, cut, too_long


def is_right(scores):
    """The first candidate strictly above every other: a tie is wrong, and so is an unscored (NaN) item."""
    return bool(torch.isfinite(scores).all()) and bool(scores[0] > scores[1:].max())


def average_ranks(v):
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(np.asarray(v, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2)[inverse]


def spearman(x, y):
    """Spearman's rank correlation: Pearson's of the average ranks; None when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else None


def first_per_uid(items, n):
    if n is None:
        return items
    kept, seen = [], Counter()
    for item in items:
        seen[item.uid] += 1
        if seen[item.uid] <= n:
            kept.append(item)
    return kept


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during score_babylm; .result holds the tasks finished before it (the one it stopped
    in is named in result["interrupted"])."""

    def __init__(self, result):
        super().__init__(f"interrupted during task {result['interrupted']}")
        self.result = result


def score_babylm(model, enc, tasks, device=None, batch_size=64, max_items_per_uid=None, progress=False):
    """tasks (load_babylm) -> dict(tasks={task: score}, macro_average=mean of the task scores,
    uids={task: {uid: accuracy}}, n_items={task: {uid: n}}, fields={field: accuracy} (BLiMP, pooled over
    its items), files={file: mean over its UIDs} (entity tracking), wug=dict(accuracy, spearman, n),
    cut={task: items}, too_long={task: items}); percentages, a tie wrong. max_items_per_uid keeps the
    first items of each UID; progress=True prints progress lines to stderr."""
    if max_items_per_uid is not None and max_items_per_uid < 1:
        raise ValueError(f"max_items_per_uid={max_items_per_uid}; expected >= 1 or None")
    if not tasks:
        raise ValueError("no BabyLM tasks to score")
    res = dict(tasks={}, uids={}, n_items={}, fields={}, files={}, wug=None, cut={}, too_long={})
    mean = lambda v: sum(v) / len(v)
    task = None
    try:
        score_tasks(model, enc, tasks, device, batch_size, max_items_per_uid, progress, res, mean)
    except KeyboardInterrupt:  # keep the finished tasks; drop what the unfinished one had filled in
        task = next(t for t in tasks if t not in res["tasks"] and t not in res)
        for key in ("uids", "n_items", "cut", "too_long"):
            res[key].pop(task, None)
        res["interrupted"] = task
    # the mean of the five accuracy tasks; None with reading alone, or when interrupted (not the whole suite)
    res["macro_average"] = mean(list(res["tasks"].values())) if res["tasks"] and task is None else None
    if task is not None:
        raise Interrupted(res)
    return res


def score_tasks(model, enc, tasks, device, batch_size, max_items_per_uid, progress, res, mean):
    """score_babylm's loop: fills res task by task (a task's score is set last, when it is complete)."""
    for task, items in tasks.items():
        t0 = time.time()
        if task == READING:
            reading = score_reading(model, enc, items, device, batch_size)
            reading["seconds"] = time.time() - t0
            res[READING] = reading
            if progress:
                print(f"  {task}: done in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
            continue
        items = first_per_uid(items, max_items_per_uid)
        scores, cut, too_long = score_items(model, enc, items, device, batch_size, progress and task)
        right = [is_right(s) for s in scores]
        by_uid, by_field = {}, {}
        for item, r in zip(items, right):
            by_uid.setdefault(item.uid, []).append(r)
            if item.field is not None:
                by_field.setdefault(item.field, []).append(r)
        uids = res["uids"][task] = {u: 100.0 * mean(rs) for u, rs in by_uid.items()}
        res["n_items"][task] = {u: len(rs) for u, rs in by_uid.items()}
        res["cut"][task], res["too_long"][task] = len(cut), len(too_long)
        if task == "entity_tracking":
            file_of = {item.uid: item.field for item in items}
            files = {f: mean([a for u, a in uids.items() if file_of[u] == f]) for f in by_field}
            res["files"].update(files)
            res["tasks"][task] = mean(list(files.values()))
        elif task == "wug_adj_nominalization":
            ok = [(float(s[0] - s[1]), item.ratio) for s, item in zip(scores, items) if torch.isfinite(s).all()]
            res["wug"] = dict(accuracy=100.0 * mean(right), n=len(items),
                              spearman=spearman(*zip(*ok)) if len(ok) > 1 else None)
            res["tasks"][task] = res["wug"]["accuracy"]
        else:
            if task == "blimp_filtered":
                res["fields"] = {f: 100.0 * mean(rs) for f, rs in sorted(by_field.items())}
            res["tasks"][task] = mean(list(uids.values()))
        if progress:
            print(f"  {task}: done in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

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
# Reports


def fmt_count(n):
    """39_212_345 -> "39.2M", 1e6 -> "1M", 405_186.2 -> "405.2k"; None -> "?"."""
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + unit
    return f"{n:.0f}"


TIE_NOTE = ("a candidate's score is the sum of its completion's token log-probabilities; a tie counts as "
            "WRONG here (the official pipeline's argmax counts a tie right)")


def print_babylm(res, source):
    print(f"BabyLM 2025 suite {source}: {TIE_NOTE}")
    for task, uids in res["uids"].items():
        n = res["n_items"][task]
        print(f"\n{task}: {len(uids)} UIDs, {sum(n.values()):,} items")
        w = max(map(len, uids))
        for uid, a in uids.items():
            print(f"  {uid:<{w}}  {a:6.2f}  ({n[uid]} items)")
        for name, a in (res["fields"] if task == "blimp_filtered" else
                        res["files"] if task == "entity_tracking" else {}).items():
            print(f"  {'field' if task == 'blimp_filtered' else 'file'} {name}: {a:.2f}")
    if res.get("reading"):
        r = res["reading"]
        print(f"\nreading: gain in R² from the model's surprisal, % of the possible gain "
              f"(mean surprisal {r['surprisal']:.2f} nats, {r['seconds']:.1f}s)")
        print(f"  {'measure':<24} {'plain':>7} {'spillover':>10}  rows")
        for m in MEASURES:
            print(f"  {m:<24} {r['measures'][m]:7.2f} {r['measures_spillover'][m]:10.2f}  "
                  f"{r['n_rows'][m]} / {r['n_rows_spillover'][m]}")
    print()
    if res.get("reading"):
        print(f"{'reading eye-tracking':<24} {res['reading']['eye_tracking']:6.2f}  (mean plain gain of "
              f"{', '.join(EYE_TRACKING)})")
        print(f"{'reading self-paced':<24} {res['reading']['self_paced_reading']:6.2f}  (spillover gain of "
              f"{SELF_PACED})")
    for task, score in res["tasks"].items():
        notes = []
        if task == "wug_adj_nominalization":
            rho = res["wug"]["spearman"]
            notes.append("accuracy of preferring the first; Spearman with the human ratio "
                         + ("undefined (constant scores)" if rho is None else f"{rho:.3f}"))
        if res["cut"][task]:
            notes.append(f"{res['cut'][task]} items read through their last block_size tokens")
        if res["too_long"][task]:
            notes.append(f"{res['too_long'][task]} items wrong: their scored tokens exceed block_size")
        print(f"{task:<24} {score:6.2f}" + (f"  ({'; '.join(notes)})" if notes else ""))


def curve_values(res):
    """The numbers of one revision that the learning curve and the summary hold: each accuracy task, the
    macro-average, and the reading task's two scores."""
    values = dict(res["tasks"])
    values["macro_average"] = res["macro_average"]
    if res.get("reading"):
        values["reading_eye_tracking"] = res["reading"]["eye_tracking"]
        values["reading_self_paced"] = res["reading"]["self_paced_reading"]
    return values


def plot_curve(points, path):
    """Each task's score and the macro-average against words seen (log axis); a second panel for the reading
    scores when scored; written atomically."""
    reading = bool(points[0].get("reading"))
    fig = Figure(figsize=(7, 7 if reading else 4.5))
    axes = fig.subplots(2 if reading else 1, 1, squeeze=False)[:, 0]
    x = [p["words_seen"] for p in points]
    ax = axes[0]
    for task in points[0]["tasks"]:
        ax.plot(x, [p["tasks"][task] for p in points], marker="o", ms=3, label=task)
    if points[0]["macro_average"] is not None:
        ax.plot(x, [p["macro_average"] for p in points], "k--", marker="o", ms=3, label="macro-average")
    ax.set_ylabel("score (%; a tie counts as wrong)")
    ax.set_title("BabyLM 2025 zero-shot suite at each milestone")
    if reading:
        for key, label in (("eye_tracking", "reading: eye-tracking"), ("self_paced_reading", "reading: self-paced")):
            axes[1].plot(x, [p["reading"][key] for p in points], marker="o", ms=3, label=label)
        axes[1].set_ylabel("gain in R² (% of possible)")
    for ax in axes:
        ax.set_xscale("log")
        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: fmt_count(v)))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("words seen")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_atomic(path, buf.getvalue())


def evaluate_run(cfg, suite, device, partial=None):
    """--run: the suite at every milestone (the pipeline's revisions chck_<N>M) and on the final checkpoint
    (RUN/ckpt.pt, the main revision, when present) -> RUN/babylm_curve.json and the figure of the milestones;
    returns the result. The JSON holds `summary` = {task: {revision: score}} for every task (the accuracy
    tasks, macro_average, reading_eye_tracking, reading_self_paced), `final` and `points` (every number of
    each revision). partial (a dict) is filled as revisions finish, for an interrupted run."""
    run = Path(cfg.run)
    if not run.is_dir():
        raise FileNotFoundError(f"--run={run} is not a folder")
    revisions = [(f"chck_{n}M", path) for n, path in milestones(run)]
    if (run / "ckpt.pt").is_file():
        revisions.append(("main", run / "ckpt.pt"))
    if not any(name != "main" for name, _ in revisions):
        raise FileNotFoundError(f"--run={run} holds no ckpt_<N>M_words.pt milestone checkpoints")
    curve, figure = run / "babylm_curve.json", cfg.plot_out or str(run / "babylm_curve.png")
    check_writable(str(curve), "--run")
    check_writable(figure, "--plot_out")
    print(f"{run}: {len(revisions)} checkpoints ({', '.join(name for name, _ in revisions)}); {TIE_NOTE}")
    result = partial if partial is not None else {}
    result.update(run=str(run), babylm=cfg.babylm, max_items_per_uid=cfg.max_pairs or None, revisions=[],
                  summary={}, final=None, points=[])
    for name, path in revisions:
        model, enc, ckpt = load_model(str(path), device)
        try:
            res = score_babylm(model, enc, suite, device, cfg.batch_size, cfg.max_pairs or None, progress=True)
        except Interrupted as e:
            result["partial"] = dict(revision=name, ckpt=path.name, **e.result)
            raise
        words = ckpt.get("words_seen") or (int(name[5:-1]) * 1e6 if name != "main" else None)  # else the file name's
        point = dict(revision=name, ckpt=path.name, words_seen=words, iter=ckpt.get("iter"), **res)
        values = curve_values(res)
        print(f"{name} ({path.name}): {fmt_count(words)} words, "
              + ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in values.items()), flush=True)
        result["revisions"].append(name)
        for k, v in values.items():
            result["summary"].setdefault(k, {})[name] = v
        if name == "main":
            result["final"] = point
        else:
            result["points"].append(point)
    write_json(result, curve)
    plot_curve(result["points"], figure)
    print(f"wrote {curve} and {figure}")
    last = result["final"] or result["points"][-1]
    m = last["macro_average"]
    print(f"the macro-average below is {last['revision']}'s ({last['ckpt']})")
    print(f"macro-average: {'n/a' if m is None else f'{m:.2f}'}")
    return result

# -----------------------------------------------------------------------------


def main(argv):
    cfg = parse_args(argv, EvalConfig, doc=__doc__)
    if bool(cfg.ckpt) == bool(cfg.run):
        raise ValueError("give --ckpt=PATH (a checkpoint or a run folder) or --run=RUN_DIR (its milestones), one of them")
    if cfg.pairs not in ("", "builtin"):
        raise ValueError(f"--pairs={cfg.pairs!r}: expected 'builtin'")
    if not (cfg.babylm or cfg.blimp or cfg.zorro or cfg.pairs or cfg.text):
        raise ValueError("nothing to evaluate: give --babylm=DIR, --blimp=DIR, --zorro=DIR, --pairs=builtin "
                         "and/or --text=FILE")
    if cfg.babylm and (cfg.blimp or cfg.zorro or cfg.pairs):
        raise ValueError("give --babylm or --blimp/--zorro/--pairs, not both: each ends with its own macro-average")
    if cfg.run and not cfg.babylm or cfg.run and cfg.text:
        raise ValueError("--run=RUN_DIR evaluates the milestones on --babylm=DIR only")
    if (cfg.tasks or cfg.plot_out) and not cfg.babylm:
        raise ValueError("--tasks and --plot_out go with --babylm=DIR (and --run for --plot_out)")
    if cfg.max_pairs < 0 or cfg.batch_size < 1:
        raise ValueError(f"--max_pairs={cfg.max_pairs} must be >= 0 and --batch_size={cfg.batch_size} >= 1")
    if cfg.json:
        check_writable(cfg.json, "--json")
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or None
    suite = load_babylm(cfg.babylm, tasks) if cfg.babylm else None
    pairs, suite_of = {}, {}
    for kind, src in (("blimp", cfg.blimp), ("zorro", cfg.zorro), ("builtin", cfg.pairs)):
        if not src:
            continue
        for paradigm, ps in (builtin_pairs() if kind == "builtin" else load_pairs(src, kind)).items():
            if paradigm in pairs:
                raise ValueError(f"paradigm {paradigm!r} appears twice (in --{kind} and before)")
            pairs[paradigm], suite_of[paradigm] = ps, kind
    text = read_text(cfg.text) if cfg.text else None
    if text == "":
        raise ValueError(f"--text={cfg.text} is empty")
    device = pick_device(cfg.device)
    results = {}  # filled as the work goes: what an interruption keeps
    try:
        if cfg.run:
            evaluate_run(cfg, suite, device, results)
            if cfg.json:
                write_json(results, cfg.json)
            return results
        return evaluate_checkpoint(cfg, suite, pairs, suite_of, text, device, results)
    except (KeyboardInterrupt, Interrupted) as e:
        stopped(cfg, results, e)


def stopped(cfg, results, e):
    """Ctrl-C or SIGTERM: print and write (--json) the tasks finished before it, say so on stderr, exit 130."""
    partial = e.result if isinstance(e, Interrupted) else None
    if partial is not None and not cfg.run:
        results["babylm"] = partial
        if partial["uids"] or partial.get(READING):
            print_babylm(partial, cfg.babylm)
    elif partial is not None:
        for task, score in partial["tasks"].items():
            print(f"{results['partial']['revision']}: {task:<24} {score:6.2f}")
    results["interrupted"] = True
    where = f" during task {partial['interrupted']}" if partial is not None else ""
    done = (f"{len(results.get('revisions', []))} revisions finished" if cfg.run else
            "finished: " + (", ".join(k for k in ("text", "babylm", "paradigms") if k in results) or "nothing"))
    wrote = f"; wrote them to {cfg.json}" if cfg.json else ""
    if cfg.json:
        write_json(results, cfg.json)
    print(f"interrupted{where}: {done}{wrote}", file=sys.stderr, flush=True)
    sys.exit(130)


def evaluate_checkpoint(cfg, suite, pairs, suite_of, text, device, results):
    """--ckpt: perplexity, the suite, the minimal pairs of one checkpoint -> results (filled as they finish)."""
    model, enc, ckpt = load_model(cfg.ckpt, device)
    print(f"{cfg.ckpt}: iter {ckpt.get('iter')}, {fmt_count(ckpt.get('words_seen'))} words seen, "
          f"mixer={model.config.mixer}")
    results.update(ckpt=cfg.ckpt, iter=ckpt.get("iter"), words_seen=ckpt.get("words_seen"))
    if text is not None:
        r = results["text"] = perplexity(model, enc, text, device, max(1, cfg.batch_size // 8))
        print(f"{cfg.text}: ppl {r['ppl']:.3f}, bits per byte {r['bits_per_byte']:.4f}, {r['tokens']} tokens")
    if suite is not None:
        t0 = time.time()
        res = results["babylm"] = score_babylm(model, enc, suite, device, cfg.batch_size, cfg.max_pairs or None,
                                               progress=True)
        res["seconds"] = time.time() - t0
        print_babylm(res, cfg.babylm)
        results["macro_average"] = res["macro_average"]
    if pairs:
        res = score_pairs(model, enc, pairs, device, cfg.batch_size, cfg.max_pairs or None, progress="minimal pairs")
        w = max(map(len, res["paradigms"]))
        for paradigm, a in res["paradigms"].items():
            print(f"{paradigm:<{w}}  {a:6.2f}  ({res['n_pairs'][paradigm]} pairs)")
        for name, a in res["fields"].items():  # fields of the same name from two suites are pooled
            print(f"field {name}: {a:.2f}")
        res["suites"] = {}
        for kind in dict.fromkeys(suite_of.values()):
            accs = [a for p, a in res["paradigms"].items() if suite_of[p] == kind]
            res["suites"][kind] = sum(accs) / len(accs)
            print(f"{kind} average: {res['suites'][kind]:.2f} over {len(accs)} paradigms")
        results.update(res)
    if cfg.json:
        write_json(results, cfg.json)
    if "macro_average" in results:
        m = results["macro_average"]
        print("macro-average: " + ("n/a (no accuracy task: reading only)" if m is None else f"{m:.2f}"))
    return results


def terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops as Ctrl-C does: what finished is kept (main)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, terminate)
    run_cli(main)
