"""
The BabyLM 2025 reading task (reading/reading_data.csv, De Varda et al. 2023), scored as the 2025 pipeline's
evaluation_pipeline/reading/ scores it: the surprisal of each word after its context, and how much it (and the
previous word's) adds to ordinary least-squares regressions of eye-tracking, self-paced reading and EEG measures
on word length and frequency; the score is that gain in R² as a percentage of what is possible.

    data = read_reading("reading_data.csv")         # ReadingData
    res = score_reading(model, enc, data)           # dict(eye_tracking, self_paced_reading, measures, ...)

eval.py --babylm scores it when the suite folder holds reading/. numpy and torch only (no statsmodels: the
pipeline's regressions are plain least squares).
"""

import csv
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common import read_text

# -----------------------------------------------------------------------------
# The file: one row per word of 205 sentences with the context before it (`item`), the previous word and its
# context, baseline predictors and human measures

EYE_TRACKING = ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound")
SELF_PACED = "self_paced_reading_time"
EEG = ("ELAN", "LAN", "N400", "P600", "EPNP", "PNP")
MEASURES = EYE_TRACKING + (SELF_PACED,) + EEG
READING_NUMBERS = ("Subtlex_log10", "length", "context_length", "prev_length") + MEASURES
# The strings pandas.read_csv reads as missing by default: the pipeline reads the file with it, so a context
# spelled "None" is missing there too (the one empty `item` becomes the string "None" again, as it does there).
NA_STRINGS = frozenset(("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                        "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"))


@dataclass
class ReadingData:
    """The rows of reading_data.csv: item / word (context and word), prev_item / prev_word (None where the
    word is a sentence's first) and float64 columns (NaN where missing) of READING_NUMBERS."""
    item: list
    word: list
    prev_item: list
    prev_word: list
    numbers: dict

    def __len__(self):
        return len(self.item)


def read_reading(path):
    """reading_data.csv -> ReadingData. A missing column, a missing word or a value that is not a number
    names the file, line and column."""
    rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    if not rows:
        raise ValueError(f"{path} is empty; expected the reading task's CSV with a header line")
    header, rows = rows[0], rows[1:]
    missing = [c for c in ("item", "word", "prev_item", "prev_word") + READING_NUMBERS if c not in header]
    if missing:
        raise ValueError(f"{path}: expected columns {', '.join(missing)} in the header line")
    if not rows:
        raise ValueError(f"{path} holds no rows")
    col = {c: header.index(c) for c in header}
    na = lambda v: v.strip() in NA_STRINGS
    data = ReadingData([], [], [], [], {c: np.full(len(rows), np.nan) for c in READING_NUMBERS})
    for r, row in enumerate(rows):
        where = f"{path} line {r + 2}"  # a quoted field with a newline would shift this; the file has none
        if len(row) != len(header):
            raise ValueError(f"{where}: expected {len(header)} fields; got {len(row)}")
        get = lambda c: row[col[c]]
        if na(get("word")):
            raise ValueError(f"{where}: expected a word in column 'word'; got {get('word')!r}")
        data.item.append("None" if na(get("item")) else get("item"))  # the pipeline's fillna("None")
        data.word.append(get("word"))
        prev = not na(get("prev_item"))
        if prev and na(get("prev_word")):
            raise ValueError(f"{where}: 'prev_item' is given but 'prev_word' is missing")
        data.prev_item.append(get("prev_item") if prev else None)
        data.prev_word.append(get("prev_word") if prev else None)
        for c in READING_NUMBERS:
            if not na(get(c)):
                try:
                    data.numbers[c][r] = float(get(c))
                except ValueError:
                    raise ValueError(f"{where}: expected a number in column {c!r}; got {get(c)!r:.40}") from None
    return data

# -----------------------------------------------------------------------------
# Surprisal of each word after its context, and the regressions


def word_queries(enc, context, word):
    """The pipeline's surprisal of `word` after `context` as next-token queries -> list of (context string,
    token id); the word's log-probability is the sum of theirs. The word is tokenized on its own, WITHOUT
    the space that separates it from the context ("the", not " the"), and its first token is predicted
    after the context; each later token t is predicted after the context with the decoded tokens before it
    glued on, as the first token of decode(t) tokenized again. Every context string is tokenized whole with
    end-of-text (the exported tokenizer's BOS) prepended."""
    ids = enc.encode_ordinary(word)
    if not ids:
        raise ValueError(f"reading: word {word!r} has no tokens")
    queries, text = [(context, ids[0])], context
    for prev, t in zip(ids, ids[1:]):
        text += enc.decode([prev])
        queries.append((text, enc.encode_ordinary(enc.decode([t]))[0]))
    return queries


@torch.no_grad()
def next_token_logprobs(model, contexts, targets, device=None, batch_size=64):
    """contexts: distinct token-id lists; targets[c]: token ids -> list of float64 arrays, log P(target |
    context) for each. A causal model's logits at position p depend on tokens 0..p only, so a context that
    is a prefix of another is read from the longer one's forward (at its own last position): in sorted
    order a list's extensions follow it directly, so each list is read from the last of its run of
    extensions. One forward per remaining list (right padding). A learned-position model reads a context
    longer than block_size through its last block_size tokens."""
    device = device or next(model.parameters()).device
    W = model.config.block_size if getattr(model, "learned_pos", False) else None
    contexts = [c[-W:] if W else c for c in contexts]
    order = sorted(range(len(contexts)), key=lambda j: contexts[j])
    reads = {}  # the list whose forward is read -> [(context, position)]
    owner = None  # the host of the list after this one in sorted order
    for n in reversed(range(len(order))):
        j = order[n]
        nxt = order[n + 1] if n + 1 < len(order) else None
        host = owner if nxt is not None and contexts[nxt][:len(contexts[j])] == contexts[j] else j
        reads.setdefault(host, []).append((j, len(contexts[j]) - 1))
        owner = host
    hosts = sorted(reads, key=lambda h: len(contexts[h]))
    out = [None] * len(contexts)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(hosts), batch_size):
            rows = hosts[b:b + batch_size]
            x = torch.zeros((len(rows), len(contexts[rows[-1]])), dtype=torch.long)
            for r, h in enumerate(rows):
                x[r, :len(contexts[h])] = torch.tensor(contexts[h])
            r_idx, pos, who = zip(*[(r, p, j) for r, h in enumerate(rows) for j, p in reads[h]])
            logits = model(x.to(device))[0][torch.tensor(r_idx, device=device), torch.tensor(pos, device=device)]
            logp = F.log_softmax(logits.double(), dim=-1).cpu()  # (contexts read, vocab)
            for k, j in enumerate(who):
                out[j] = logp[k, targets[j]].numpy()
    finally:
        model.train(was_training)
    return out


def reading_surprisals(model, enc, data, device=None, batch_size=64):
    """-> (surprisal of each row's word, of its previous word: NaN for a sentence's first), in nats
    (-ln P, as the pipeline). Each distinct context string is read once, whichever rows and tokens need it."""
    words = [(c, w) for c, w in zip(data.item, data.word)]
    words += [(c, w) for c, w in zip(data.prev_item, data.prev_word) if c is not None]
    word_index = {cw: n for n, cw in enumerate(dict.fromkeys(words))}
    queries = {cw: word_queries(enc, *cw) for cw in word_index}
    context_index = {c: n for n, c in enumerate(dict.fromkeys(c for q in queries.values() for c, _ in q))}
    targets = [[] for _ in context_index]
    for q in queries.values():
        for c, t in q:
            targets[context_index[c]].append(t)
    targets = [sorted(set(ts)) for ts in targets]
    logp = next_token_logprobs(model, [[enc.eot_token] + enc.encode_ordinary(c) for c in context_index], targets,
                               device, batch_size)
    lookup = lambda c, t: logp[context_index[c]][targets[context_index[c]].index(t)]
    surprisal = {cw: -sum(lookup(c, t) for c, t in q) for cw, q in queries.items()}
    here = np.array([surprisal[cw] for cw in zip(data.item, data.word)])
    prev = np.array([math.nan if c is None else surprisal[c, w] for c, w in zip(data.prev_item, data.prev_word)])
    return here, prev


def r_squared(y, X):
    """R² of the least-squares fit of y on the columns of X and an intercept: 1 - SSR / (centred TSS)."""
    A = np.column_stack([np.ones(len(y)), X])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    return 1.0 - resid @ resid / ((y - y.mean()) @ (y - y.mean()))


def with_interactions(columns):
    """Predictors and their pairwise products: the design of the pipeline's formula `a + b + ... + a:b + ...`."""
    return np.column_stack(columns + [a * b for n, a in enumerate(columns) for b in columns[n + 1:]])


def r2_gain(y, base, pred):
    """100 · (R²(base + pred) - R²(base)) / (1 - R²(base)): the gain in R² from adding the model's surprisal,
    as a percentage of what is possible; rows with a missing value among y, base and pred are left out."""
    keep = np.isfinite(y) & np.isfinite(base).all(1)  # the baseline's rows (pred is finite where they are)
    r2_base = r_squared(y[keep], base[keep])
    keep &= np.isfinite(pred)
    r2_model = r_squared(y[keep], np.column_stack([base[keep], pred[keep]]))
    return 100.0 * (r2_model - r2_base) / (1.0 - r2_base), int(keep.sum())


def score_reading(model, enc, data, device=None, batch_size=64):
    """ReadingData -> dict(eye_tracking, self_paced_reading, measures={measure: gain %}, measures_spillover=
    {measure: gain %}, n_rows={...}, surprisal=mean surprisal). Two regressions for each measure (ordinary
    least squares, as the pipeline's statsmodels `ols`):
      plain:     measure ~ freq + length + context_length + their pairwise products [+ surprisal]
      spillover: measure ~ freq + length + context_length + prev_length + prev_surprisal + pairwise products
                 [+ surprisal]
    eye_tracking = mean of the plain gains of the four eye-tracking measures; self_paced_reading = the
    spillover gain of self_paced_reading_time (the pipeline's EYE TRACKING and SELF-PACED READING SCOREs)."""
    here, prev = reading_surprisals(model, enc, data, device, batch_size)
    v = data.numbers
    plain = with_interactions([v["Subtlex_log10"], v["length"], v["context_length"]])
    spill = with_interactions([v["Subtlex_log10"], v["length"], v["context_length"], v["prev_length"], prev])
    res = dict(measures={}, measures_spillover={}, n_rows={}, n_rows_spillover={})
    for m in MEASURES:
        res["measures"][m], res["n_rows"][m] = r2_gain(v[m], plain, here)
        res["measures_spillover"][m], res["n_rows_spillover"][m] = r2_gain(v[m], spill, here)
    res["eye_tracking"] = sum(res["measures"][m] for m in EYE_TRACKING) / len(EYE_TRACKING)
    res["self_paced_reading"] = res["measures_spillover"][SELF_PACED]
    res["surprisal"] = float(here.mean())
    return res
