"""
How a corpus becomes a prepared folder (data.py reads it at run time; prepare.py is the command line):
corpora -> curated documents -> BPE tokenizer -> flat token bins, written atomically, meta.json last.

1. Sources. Three kinds, all read from disk (this file downloads nothing):
   - the BabyLM release layout: per-source files `<source>.train` / `<source>.dev` / `<source>.test`
     (e.g. train_10M/childes.train, dev/childes.dev; download it from the BabyLM site). `.dev` files become
     the validation split; `.test` files are never read.
   - any folder of `.txt` / `.txt.gz` files, searched recursively; the source name is the top-level
     sub-folder (corpus/childes_cds/x.txt.gz -> "childes_cds"), or the file stem for files at the top.
   - "synthetic": the built-in corpus of synthetic.py (child-directed English from a small grammar, with
     BLiMP-style minimal pairs). It trains fast and its pairs are learnable, but scores on it say nothing
     about BabyLM.
2. Curation. The unit of a text file is the *block*: a run of non-blank lines between blank lines (a CHILDES
   transcript, a book paragraph, a OneStopEnglish article). Lines are normalised (NFC, whitespace), hard-wrapped
   prose blocks are joined into one line, junk lines are dropped, exact duplicate blocks are dropped; with
   sentence_case, a line that starts a sentence gets a capital first letter (CHILDES writes utterances in lower
   case, the evaluation sets write every sentence with a capital).
   Consecutive blocks of one file are then packed into *documents* of at most `doc_words` words (a block
   longer than that is cut at line boundaries). A document is what validation holds out, what the budget
   counts, what the curriculum orders and what an end-of-text token closes.
   Readability: Flesch reading ease, used for the report and the optional easy-to-hard curriculum.
3. Tokenizer training: a byte-level BPE (GPT-2 pre-tokenisation, incremental pair counts) returned as a
   `tiktoken.Encoding`, or tiktoken's own GPT-2 encoding.
4. prepare(): sources -> documents -> tokenizer -> bins, written into a temporary folder next to the output
   and moved in at the end, meta.json last.
check_prepared(out_dir, source, ...) says whether a folder is a preparation of exactly that (train.py asks
before it reuses one).
"""

import codecs
import gzip
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import zlib
from collections import Counter, defaultdict, namedtuple
from functools import lru_cache
from heapq import heapify, heappop, heappush
from itertools import chain
from pathlib import Path

import numpy as np
import regex  # tiktoken's own dependency; needed for the \p{L} classes of the GPT-2 split pattern
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_SPLIT_PATTERN


from common import check_writable, remove_stray_temps, temp_prefix, write_atomic
from data import (FORMAT, META_FILE, TOKENIZER_FILE, encoding_from_ranks, gpt2_encoding, load_meta, ranks_to_text,
                  sha256_file, words_per_token)
from synthetic import PHENOMENA, synthetic_corpus, synthetic_minimal_pairs

BABYLM_SPLITS = {".train": "train", ".dev": "dev", ".test": "test"}
# target-child speech, Shakespeare, and the two OneStopEnglish levels that rewrite onestopenglish/ele
DEFAULT_EXCLUDE = "childes_child,tinyshakespeare,onestopenglish/int,onestopenglish/adv"

# -----------------------------------------------------------------------------
# 1. Sources

SourceFile = namedtuple("SourceFile", "source split path")  # split: "train" or "dev" (BabyLM dev files)


def _strip_suffixes(name):
    for suffix in (".txt.gz", ".txt", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_source_files(source):
    """Files of a corpus given as one path or several joined by commas -> (files, ignored paths).

    `<name>.train` / `<name>.dev` (BabyLM) belong to source <name>; `.txt` / `.txt.gz` files to the
    top-level sub-folder they sit in (or to their own stem at the top); everything else is ignored and
    listed in the report. `.test` files are ignored on purpose: they are for the final evaluation.
    """
    files, ignored = [], []
    for root in [Path(p) for p in str(source).split(",") if p.strip()]:
        if not root.exists():
            raise FileNotFoundError(f"source path {str(root)!r} does not exist (expected a folder of "
                                    f".txt/.txt.gz files, a BabyLM folder, a text file, or 'synthetic')")
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            rel = path.relative_to(root) if path != root else Path(path.name)
            name = path.name[:-3] if path.name.endswith(".gz") else path.name
            suffix = Path(name).suffix
            if suffix in BABYLM_SPLITS and BABYLM_SPLITS[suffix] != "test":
                files.append(SourceFile(Path(name).stem, BABYLM_SPLITS[suffix], path))
            elif name.endswith(".txt"):
                source_name = rel.parts[0] if len(rel.parts) > 1 else _strip_suffixes(path.name)
                files.append(SourceFile(source_name, "train", path))
            else:
                ignored.append(str(path))
    # two copies of one BabyLM source (say train_10M/ and train_100M/) would be mixed silently: refuse
    seen = {}
    for f in files:
        if f.path.name.endswith((".train", ".dev", ".train.gz", ".dev.gz")):
            key = (f.source, f.split)
            if key in seen:
                raise ValueError(f"{seen[key]} and {f.path} are both the {f.split} file of source {f.source!r}; "
                                 f"point --source at one release folder (several may be joined with commas)")
            seen[key] = f.path
    return files, ignored


def check_file(path):
    """Read a corpus file whole (gzip by suffix) -> how many bytes are not valid UTF-8 (each becomes U+FFFD
    when read). A truncated or non-gzip .gz, or an unreadable file, is a one-line error naming the file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    decoder, replaced = codecs.getincrementaldecoder("utf-8")("replace"), 0
    try:
        with opener(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                text = decoder.decode(chunk)
                replaced += text.count("\ufffd") - chunk.count(b"\xef\xbf\xbd")
            replaced += decoder.decode(b"", final=True).count("\ufffd")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a whole gzip file ({type(e).__name__}: {e}); re-download or re-compress it, "
                         "or remove it from the corpus") from None
    return max(replaced, 0)


def check_source(source, strict_utf8=False):
    """Before any long work: every file of a corpus reads to its end; one that is not valid UTF-8 is named on
    the console with its count of replaced bytes (with strict_utf8: an error instead)."""
    files, _ = find_source_files(source)
    for f in files:
        replaced = check_file(f.path)
        if replaced and strict_utf8:
            raise ValueError(f"{f.path} is not valid UTF-8 ({replaced:,} bytes cannot be decoded); convert it "
                             "(iconv -f latin1 -t utf-8), or leave out --strict_utf8=True to read them as U+FFFD")
        if replaced:
            print(f"warning: {f.path} is not valid UTF-8: {replaced:,} bytes read as U+FFFD "
                  "(--strict_utf8=True refuses such a file)", file=sys.stderr)
    return files


def read_lines(path, counts):
    """Lines of a text file (gzip by suffix) as str; undecodable bytes become U+FFFD and are counted."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace")
            if "\ufffd" in line:  # a U+FFFD that was in the file (EF BF BD) is not a replacement
                counts["replaced"] += line.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
            yield line


# -----------------------------------------------------------------------------
# 2. Curation and readability

_SPACES = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u200b\ufeff]")  # \s handles the rest
_NOT_LETTER = re.compile(r"[\W\d_]")
_REPEAT = re.compile(r"(\S)\1{9,}")  # one character ten times in a row: ----------, !!!!!!!!!!
_SENTENCE_END = re.compile(r"[.!?…][\"'’”»)\]]*$")


def normalize_line(line):
    """Unicode NFC, control characters out, every whitespace run one space, no space at the ends."""
    line = _CONTROL.sub("", unicodedata.normalize("NFC", line))
    return _SPACES.sub(" ", line).strip()


def unwrap_lines(lines):
    """Join a hard-wrapped paragraph (Gutenberg's ~70-character lines) into one line.

    A block is wrapped prose when at most half of its lines end a sentence and its lines (but the last)
    are 50 characters long on average. One utterance / sentence / paragraph per line (CHILDES, NLTK,
    OneStopEnglish) ends a sentence on nearly every line; verse has short lines; both keep their lines.
    """
    if len(lines) < 2:
        return lines
    ends = sum(1 for line in lines if _SENTENCE_END.search(line))
    mean_len = sum(len(line) for line in lines[:-1]) / (len(lines) - 1)
    return [" ".join(lines)] if 2 * ends <= len(lines) and mean_len >= 50 else lines


def sentence_case(lines):
    """Lines -> (lines, how many changed): the first letter of a line that starts a sentence (the first line, or
    one after a line that ends one) upper-cased, as written English has it ("what's that?" -> "What's that?").
    A line after one that does not end a sentence continues it and keeps its case."""
    out, changed = [], 0
    for k, line in enumerate(lines):
        if line[:1].islower() and (k == 0 or _SENTENCE_END.search(lines[k - 1])):
            line = line[0].upper() + line[1:]
            changed += 1
        out.append(line)
    return out, changed


def junk_rule(line):
    """The first rule a line breaks (None for a good line): under half letters, or a long character run."""
    chars = len(line) - line.count(" ")
    if 2 * (chars - len(_NOT_LETTER.sub("", line))) > chars:
        return "mostly_non_letters"
    if _REPEAT.search(line):
        return "char_repeat"
    return None


_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_SENTENCE_SPLIT = re.compile(r"[.!?…]+|\n")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


@lru_cache(maxsize=1 << 17)
def syllables(word):
    """Syllables of an English word by rule: vowel groups, less a silent final e (make), a silent -ed
    (jumped, but not wanted) and a silent -es (makes, but not boxes); at least one."""
    w = word.lower().replace("’", "'").split("'")[0]
    n = len(_VOWEL_GROUPS.findall(w))
    if n > 1 and w.endswith("e") and not w.endswith(("le", "ee", "ye")):
        n -= 1
    elif n > 1 and w.endswith("ed") and not w.endswith(("ted", "ded")):
        n -= 1
    elif n > 1 and w.endswith("es") and not w.endswith(("ses", "xes", "zes", "ces", "ges", "ches", "shes")):
        n -= 1
    return max(n, 1)


def readability(text):
    """Flesch reading ease, 206.835 - 1.015 * words/sentence - 84.6 * syllables/word: higher is easier
    (children's books ~80-100, newspapers ~50, legal text < 30). A sentence ends at . ! ? or a line end."""
    words = _WORD.findall(text)
    if not words:
        raise ValueError(f"readability needs a text with words, got {text[:60]!r}")
    sentences = sum(1 for s in _SENTENCE_SPLIT.split(text) if _WORD.search(s))
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * sum(map(syllables, words)) / len(words)


Doc = namedtuple("Doc", "source split offset nbytes words readability")  # text = scratch[offset:offset+nbytes]


def _blocks(lines, doc_words, counts):
    """Normalised non-blank lines grouped into blocks: cut at blank lines, and at a line boundary once a
    block reaches doc_words words (so a book without blank lines streams in pieces)."""
    block, n = [], 0
    for line in lines:
        counts["raw_words"] += len(line.split())
        line = normalize_line(line)
        if line:
            counts["lines"] += 1
            block.append(line)
            n += len(line.split())
        if block and (not line or n >= doc_words):
            yield block
            block, n = [], 0
    if block:
        yield block


def curate(files, scratch, doc_words=1000, min_doc_words=10, dedup_min_words=8, cased=False, log=print):
    """One streaming pass over all files: blocks -> unwrapped, junk-free (cased: sentence_case), deduplicated ->
    documents.

    Each rule is counted per source, in lines / blocks / documents and in words. A block of at least
    dedup_min_words words is dropped when an identical block came before (short ones such as "Yes," said
    Alice. recur naturally). Training files come first, so a dev block that repeats a train block goes.
    The documents' text is appended to the `scratch` file; returns ([Doc], {source: Counter}).
    """
    stats, seen, docs = defaultdict(Counter), set(), []
    with open(scratch, "wb") as out:

        def emit(source, split, blocks):
            text = "\n\n".join(blocks)
            n = len(text.split())
            if n < min_doc_words:
                stats[source]["short_doc"] += 1
                stats[source]["short_doc_words"] += n
                return
            raw = text.encode("utf-8")
            docs.append(Doc(source, split, out.tell(), len(raw), n, readability(text)))
            out.write(raw)

        for f in sorted(files, key=lambda f: (f.split != "train", f.source, str(f.path))):
            t0, st = time.time(), stats[f.source]
            st["files"] += 1
            pending, pending_words = [], 0
            for block in _blocks(read_lines(f.path, st), doc_words, st):
                st["blocks"] += 1
                kept = []
                for line in unwrap_lines(block):
                    rule = junk_rule(line)
                    if rule:
                        st[rule] += 1
                        st[rule + "_words"] += len(line.split())
                    else:
                        kept.append(line)
                if not kept:
                    continue
                if cased:
                    kept, changed = sentence_case(kept)
                    st["sentence_cased"] += changed
                text = "\n".join(kept)
                n = len(text.split())
                if n >= dedup_min_words:
                    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
                    if digest in seen:
                        st["duplicate"] += 1
                        st["duplicate_words"] += n
                        continue
                    seen.add(digest)
                if pending and pending_words + n > doc_words:
                    emit(f.source, f.split, pending)
                    pending, pending_words = [], 0
                pending.append(text)
                pending_words += n
            if pending:
                emit(f.source, f.split, pending)
            log(f"  read {f.path} ({f.source}, {f.split}) in {time.time() - t0:.1f}s")
    for d in docs:
        stats[d.source]["docs"] += 1
        stats[d.source]["words"] += d.words
    return docs, stats


def parse_sources(sources):
    """ "childes_cds:2,chilit_gutenberg:1" or "childes_cds,chilit_gutenberg" -> {name: weight or None}."""
    if isinstance(sources, dict):
        return dict(sources)
    out = {}
    for item in [s.strip() for s in str(sources or "").split(",") if s.strip()]:
        name, _, weight = item.partition(":")
        try:
            out[name] = float(weight) if weight else None
        except ValueError:
            raise ValueError(f"sources: weight {weight!r} of {name!r} is not a number (expected name:weight)")
        if out[name] is not None and not (out[name] > 0 and math.isfinite(out[name])):
            raise ValueError(f"sources: weight of {name!r} must be a positive number, got {weight!r}")
    if out and len({w is None for w in out.values()}) > 1:
        raise ValueError(f"sources: give a weight to every source or to none, got {sources!r}")
    return out


def allocate(avail, weights, total):
    """Split `total` words between sources in proportion to their weights. A source with fewer words than
    its share gives all it has and the rest is shared again among the others (water-filling)."""
    quota, active, left = {s: 0.0 for s in avail}, {s for s in avail if weights[s] > 0}, float(total)
    while active:
        wsum = sum(weights[s] for s in active)
        short = {s for s in active if avail[s] <= left * weights[s] / wsum}
        if not short:
            for s in active:
                quota[s] = left * weights[s] / wsum
            break
        for s in short:
            quota[s] = float(avail[s])
            left -= avail[s]
        active -= short
    return quota


def select_documents(docs, budget_words=None, val_fraction=0.01, weights=None, seed=0):
    """Whole documents for training (at most budget_words words) and validation -> (train, val, quotas).

    Without weights every source gives the same fraction of its words (the natural mix). Validation is
    val_fraction of all selected words: held-out documents of each source, or the BabyLM dev files when
    there are any. Within a source, documents are taken in a seeded random order: training takes each one
    that still fits its source's quota, validation takes documents until it has reached its quota.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = random.Random(seed)
    pools = {"train": defaultdict(list), "dev": defaultdict(list)}
    for d in docs:
        pools[d.split][d.source].append(d)
    avail = {s: sum(d.words for d in ds) for s, ds in pools["train"].items()}
    weights = {s: (weights or {}).get(s) or avail[s] for s in avail}  # natural mix: weight = size
    vf = val_fraction
    train_target = budget_words if budget_words else sum(avail.values()) * (1 if pools["dev"] else 1 - vf)

    # fill=True (validation): take documents until the quota is reached, the last may overshoot;
    # fill=False (training): take each document that still fits, so the quota is never exceeded
    def take(pool, quota, fill):
        chosen, n = [], 0
        for d in pool:
            if (fill and n < quota) or (not fill and n + d.words <= quota):
                chosen.append(d)
                n += d.words
        return chosen

    train, val = [], []
    if pools["dev"]:
        quota = allocate(avail, weights, train_target)
        dev_avail = {s: sum(d.words for d in ds) for s, ds in pools["dev"].items()}
        dev_quota = allocate(dev_avail, {s: weights.get(s, dev_avail[s]) for s in dev_avail}, vf * train_target)
        for s in sorted(avail):
            train += take(rng.sample(pools["train"][s], len(pools["train"][s])), quota[s], fill=False)
        for s in sorted(dev_avail):
            val += take(rng.sample(pools["dev"][s], len(pools["dev"][s])), dev_quota[s], fill=True)
    else:
        quota = allocate(avail, weights, train_target / (1 - vf))
        for s in sorted(avail):
            pool = rng.sample(pools["train"][s], len(pools["train"][s]))
            held = take(pool, vf * quota[s], fill=True) if vf > 0 else []
            val += held
            held = set(held)
            train += take([d for d in pool if d not in held], (1 - vf) * quota[s], fill=False)
    return train, val, quota


def order_documents(docs, curriculum, seed):
    """The curriculum reads easy to hard (descending Flesch ease); otherwise a seeded shuffle mixes sources."""
    if curriculum:
        return sorted(docs, key=lambda d: (-d.readability, d.source, d.offset))
    return random.Random(seed).sample(docs, len(docs))


def plot_readability(path, docs):
    """Histogram of document readability per source (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.figure import Figure

    by_source = defaultdict(list)
    for d in docs:
        by_source[d.source].append(d.readability)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    everything = np.concatenate([np.asarray(v) for v in by_source.values()])
    lo, hi = np.percentile(everything, 0.5), np.percentile(everything, 99.5)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
    for source, r in sorted(by_source.items()):
        ax.hist(np.clip(r, bins[0], bins[-1]), bins=bins, histtype="step", density=True,
                label=f"{source} ({len(r)} docs, median {np.median(r):.0f})")
    ax.set_xlabel("Flesch reading ease of a document (higher = easier; the outer 0.5% are clipped to the edges)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -----------------------------------------------------------------------------
# 3. Tokenizer training: byte-level BPE, encoded by tiktoken


def _apply_merge(word, a, b, new):
    """Replace each (a, b) in the token list `word`, left to right, by `new`."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(texts, vocab_size, log=None, log_every=2000):
    """Byte-level BPE on an iterable of documents -> tiktoken.Encoding with vocab_size tokens.

    Ranks 0..255 are the single bytes, every later rank one merge, and the last id is <|endoftext|>.
    Documents are split into pre-tokens by GPT-2's pattern and only the distinct pre-tokens are merged,
    each weighted by its count, so a corpus of 10M words is ~100k short words. Each step merges the most
    frequent adjacent pair (ties: the pair of smaller ids), then updates the pair counts of only the words
    that contained it (`where` maps a pair to those words) instead of recounting everything; a heap of
    (-count, pair) entries, skipped when stale, finds the next pair. A merge whose bytes already are a token
    (the same string reached by another split) rewrites the words but adds no rank, as tiktoken keys ranks
    by bytes. Deterministic: same texts, same ranks. log: called with a progress line every log_every tokens.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                         f"+ 1 end-of-text token, so vocab_size >= 257")
    t_start = time.time()
    pattern = regex.compile(GPT2_SPLIT_PATTERN)
    counts = Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    t_count = time.time() - t_start
    if log:
        log(f"  bpe: {len(counts)} distinct pre-tokens counted in {t_count:.1f} s")
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    del counts
    token_bytes = [bytes([b]) for b in range(256)]
    ranks = {t: i for i, t in enumerate(token_bytes)}
    pair_count, where = defaultdict(int), defaultdict(set)
    for wi, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += f
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapify(heap)
    n_merges = 0
    while len(ranks) < vocab_size - 1:
        if not heap:
            raise ValueError(f"vocab_size={vocab_size} is more than this text supports: every pre-token is "
                             f"a single token at {len(ranks) + 1} tokens; use a smaller vocab_size or more text")
        neg, pair = heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale entry: the count changed after it was pushed
        a, b = pair
        new_bytes = token_bytes[a] + token_bytes[b]
        new = ranks.get(new_bytes)
        if new is None:
            new = ranks[new_bytes] = len(token_bytes)
            token_bytes.append(new_bytes)
            if log and (len(ranks) + 1) % log_every == 0:
                log(f"  bpe: {len(ranks) + 1}/{vocab_size} tokens, {time.time() - t_start:.1f} s")
        n_merges += 1
        delta = defaultdict(int)
        for wi in where.pop(pair):
            word = words[wi]
            merged = _apply_merge(word, a, b, new)
            if len(merged) == len(word):
                continue  # stale: an earlier merge took this word's (a, b) away
            f = freqs[wi]
            for p in zip(word, word[1:]):
                delta[p] -= f
            for p in zip(merged, merged[1:]):
                delta[p] += f
                where[p].add(wi)
            words[wi] = merged
        for p, d in delta.items():
            if d:
                c = pair_count[p] = pair_count[p] + d
                if c > 0:
                    heappush(heap, (-c, p))
                else:
                    del pair_count[p]
    if log:
        total = time.time() - t_start
        log(f"  bpe trained: {vocab_size} tokens ({n_merges} merges) in {total:.1f} s, of which {t_count:.1f} s "
            f"reading and counting pre-tokens, {total - t_count:.1f} s merging")
    return encoding_from_ranks(ranks)


# -----------------------------------------------------------------------------
# 4. Bins, the report, prepare


def write_bin(path, docs, enc, dtype, read):
    """Encode document by document, each followed by <|endoftext|>, appending to `path`: memory stays at
    one chunk of documents. Returns (tokens, sha256, {source: tokens})."""
    h, n, per_source, limit = hashlib.sha256(), 0, Counter(), np.iinfo(dtype).max
    with open(path, "wb") as f:
        for i in range(0, len(docs), 256):
            chunk = docs[i : i + 256]
            ids = enc.encode_ordinary_batch([read(d) for d in chunk], num_threads=2)  # <|endoftext|> in text stays text
            for d, doc_ids in zip(chunk, ids):
                doc_ids.append(enc.eot_token)
                per_source[d.source] += len(doc_ids)
            arr = np.fromiter(chain.from_iterable(ids), dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() > limit):  # never clip a token id into the dtype
                raise ValueError(f"{path}: token id {arr.max()} does not fit {np.dtype(dtype).name}")
            data = arr.astype(dtype).tobytes()
            f.write(data)
            h.update(data)
            n += arr.size
    return n, h.hexdigest(), per_source


def write_pairs_jsonl(pairs, out_dir):
    """One <UID>.jsonl file per phenomenon in out_dir (BLiMP's layout); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_uid = defaultdict(list)
    for pair in pairs:
        by_uid[pair["UID"]].append(json.dumps(pair) + "\n")
    paths = []
    for uid, lines in by_uid.items():
        write_atomic(out_dir / f"{uid}.jsonl", "".join(lines))
        paths.append(out_dir / f"{uid}.jsonl")
    return paths


def _report(meta, stats, quota, weights, ignored, excluded, synthetic, budget_note):
    s = meta["settings"]
    lines = ["# Data report\n", f"source: `{meta['source']}`  \nsettings: " +
             ", ".join(f"{k}={v}" for k, v in s.items() if k != "source") + "\n"]
    if synthetic:
        lines.append("This is the built-in **synthetic teaching corpus**: child-directed English from a small "
                     "probabilistic grammar (a few hundred words). It exercises the pipeline and its minimal "
                     "pairs (`pairs/*.jsonl`) are learnable from it, but scores on it say nothing about BabyLM.\n")
    lines += ["## Curation\n",
              "Lines are normalised (NFC, whitespace), hard-wrapped paragraphs joined; a line with under half "
              "letters or a character repeated 10 times is junk; a block (run of lines between blank lines) "
              f"of >= 8 words identical to an earlier one is a duplicate; blocks are packed into documents of "
              f"<= {s['doc_words']} words and documents under {s['min_doc_words']} words are dropped."
              + (" A line that starts a sentence gets a capital first letter (sentence_case: "
                 + ", ".join(f"{src} {st['sentence_cased']} lines" for src, st in sorted(stats.items())) + ")."
                 if s.get("sentence_case") else "") + "\n",
              "| source | files | lines | raw words | bytes replaced | non-letter lines (words) | "
              "char-repeat lines (words) | duplicate blocks (words) | short docs (words) | docs kept | words kept |",
              "|---|" + "---:|" * 10]
    for src, st in sorted(stats.items()):
        lines.append(f"| {src} | {st['files']} | {st['lines']} | {st['raw_words']} | {st['replaced']} | "
                     f"{st['mostly_non_letters']} ({st['mostly_non_letters_words']}) | "
                     f"{st['char_repeat']} ({st['char_repeat_words']}) | {st['duplicate']} ({st['duplicate_words']}) | "
                     f"{st['short_doc']} ({st['short_doc_words']}) | {st['docs']} | {st['words']} |")
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    budget = s["budget_words"]
    lines += ["\n## Selection\n",
              f"budget: {budget or 'all'} training words; used {train['words']}"
              + (f" ({100 * train['words'] / budget:.1f}%)" if budget else "")
              + (f"  \n**{budget_note}**" if budget_note else "")
              + f"  \nvalidation: {meta['validation']}  \norder: {meta['order']}  \n"
              + ("weights: " + ", ".join(f"{k}={v:g}" for k, v in weights.items()) if weights else
                 "weights: natural mix (each source gives the same fraction of its words)") + "\n",
              "| source | quota (words) | train docs | train words | train tokens | val docs | val words | "
              "val tokens | mean readability |", "|---|" + "---:|" * 8]
    for src, m in sorted(meta["sources"].items()):
        lines.append(f"| {src} | {quota.get(src, 0):.0f} | {m['train_docs']} | {m['train_words']} | "
                     f"{m['train_tokens']} | {m['val_docs']} | {m['val_words']} | {m['val_tokens']} | "
                     f"{m['readability'] if m['readability'] is not None else float('nan'):.1f} |")
    lines += [f"| **total** | | {train['documents']} | {train['words']} | {train['tokens']} | {val['documents']} | "
              f"{val['words']} | {val['tokens']} | |",
              "\n## Tokenizer\n",
              f"{meta['tokenizer']['name']}, vocab_size {meta['vocab_size']} (end-of-text id {meta['eot_id']}), "
              f"{meta['dtype']} bins"
              + (f", trained in {meta['tokenizer']['train_seconds']:.1f}s" if "train_seconds" in meta["tokenizer"] else "")
              + f"; words per token: train {words_per_token(meta, 'train'):.3f}, "
              + (f"val {words_per_token(meta, 'val'):.3f}\n" if val["tokens"] else "val none\n"),
              "\n## Files\n", f"excluded sources: {', '.join(excluded) or 'none'}  ",
              f"ignored files (not .txt/.txt.gz/.train/.dev): {len(ignored)}"]
    lines += [f"- `{p}`" for p in ignored[:20]] + (["- ..."] if len(ignored) > 20 else [])
    lines += ["\n![readability per source](readability.png)\n"]
    return "\n".join(lines)


def _budget_note(used, budget, available, doc_words):
    """Why the training words fall short of the budget by more than 1% ("" when they do not). available:
    the words the sources can give to training."""
    if not budget or used >= 0.99 * budget:
        return ""
    why = (f"the sources give only {available} training words after curation" if available < budget else
           f"whole documents (up to doc_words={doc_words} words) leave the rest unfilled")
    return f"budget not reached: {used} of {budget} training words ({100 * used / budget:.1f}%); {why}"


def _corpus_files(source):
    """The files a corpus is read from, by path and size: a corpus edited after preparation differs."""
    files, _ = find_source_files(source)
    sizes = sorted(f"{f.path.resolve()}\t{f.path.stat().st_size}" for f in files)
    return {"files": len(sizes), "bytes": sum(int(x.rsplit("\t", 1)[1]) for x in sizes),
            "sha256": hashlib.sha256("\n".join(sizes).encode()).hexdigest()[:16]}


def _settings(source, budget_words, vocab_size, val_fraction, seed, curriculum, tokenizer, sources, exclude,
              doc_words, min_doc_words, synthetic_words, pairs_per_phenomenon, sentence_case=False):
    """What a folder is a preparation of, as meta.json's "settings" record it (JSON values): the corpus
    (resolved paths, and its files' paths and sizes) and every setting that changes the output, defaults
    filled in. prepare() writes it; check_prepared() compares with it."""
    synthetic = str(source) == "synthetic"
    paths = sorted(str(Path(p).resolve()) for p in str(source).split(",") if p.strip())
    if tokenizer == "bpe":
        vocab_size = int(vocab_size) if vocab_size else 1024 if synthetic else 16384
    s = {"source": "synthetic" if synthetic else paths, "corpus": None if synthetic else _corpus_files(source),
         "budget_words": int(budget_words or 0), "tokenizer": tokenizer,
         "vocab_size": vocab_size if tokenizer == "bpe" else None,  # gpt2's is fixed
         "val_fraction": float(val_fraction), "seed": int(seed), "curriculum": bool(curriculum),
         "sources": parse_sources(sources), "exclude": sorted({e.strip() for e in exclude.split(",") if e.strip()}),
         "doc_words": int(doc_words), "min_doc_words": int(min_doc_words)}
    if sentence_case:  # recorded only when on: folders prepared before the option existed still match
        s["sentence_case"] = True
    if synthetic:  # the size of the generated corpus, when no budget sets it
        s.update(synthetic_words=None if budget_words else int(synthetic_words),
                 pairs_per_phenomenon=int(pairs_per_phenomenon))
    return json.loads(json.dumps(s))  # as it reads back from meta.json: lists, not tuples


def default_out_dir(source):
    """data_prepared/<name of the (first) source folder>, or data_prepared/synthetic: prepare.py's default."""
    name = "synthetic" if str(source) == "synthetic" else Path(str(source).split(",")[0]).resolve().name
    return Path("data_prepared") / name


def _check_prepare_args(tokenizer, vocab_size, budget_words, doc_words, min_doc_words, val_fraction):
    if tokenizer not in ("bpe", "gpt2"):
        raise ValueError(f"tokenizer={tokenizer!r}; expected 'bpe' (trained here) or 'gpt2' (tiktoken's)")
    if tokenizer == "bpe" and vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                         f"+ 1 end-of-text token, so vocab_size >= 257")
    if budget_words is not None and budget_words < 0:
        raise ValueError(f"budget_words={budget_words} must be >= 0 (0 = all)")
    if doc_words < 1 or min_doc_words < 0:
        raise ValueError(f"doc_words={doc_words} must be >= 1 and min_doc_words={min_doc_words} >= 0")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")


def _source_files(source, tmp, s, log):
    """-> (files, ignored paths, wanted {source: weight or None}, excluded names): the corpus's files after
    `sources` and `exclude`; the synthetic corpus is generated into tmp first."""
    wanted = dict(s["sources"])
    if s["source"] == "synthetic":
        budget, doc_words = s["budget_words"], s["doc_words"]
        n = budget / (1 - s["val_fraction"]) * 1.02 + 2 * doc_words if budget else s["synthetic_words"]
        log(f"generating {n:.0f} words of synthetic child-directed English (seed {s['seed']})")
        (tmp / "synthetic.txt").write_text("\n\n".join(synthetic_corpus(int(n), seed=s["seed"])) + "\n")
        files, ignored = [SourceFile("synthetic", "train", tmp / "synthetic.txt")], []
    else:
        files, ignored = find_source_files(source)
    found = sorted({f.source for f in files})
    if wanted and set(wanted) - set(found):
        raise ValueError(f"sources: {sorted(set(wanted) - set(found))} not found in {source}; found {found}")
    # exclude names sources or single files ("onestopenglish/adv"); a source named in `sources` stays
    skip = set(s["exclude"])
    files = [f for f in files if f"{f.source}/{_strip_suffixes(f.path.name)}" not in skip
             and (f.source in wanted if wanted else f.source not in skip)]
    wanted = wanted or {name: None for name in sorted({f.source for f in files})}
    excluded = [name for name in found if name not in wanted] + sorted(name for name in skip if "/" in name)
    if not files:
        raise ValueError(f"no text files to read in {source} (expected .txt, .txt.gz, .train or .dev files; "
                         f"found sources {found}, excluded {excluded})")
    return files, ignored, wanted, excluded


def _train_tokenizer(tokenizer, vocab_size, texts, tmp, log):
    """-> (tiktoken encoding, meta.json's tokenizer entry): BPE trained on texts into tmp, or GPT-2's."""
    if tokenizer == "gpt2":
        return gpt2_encoding(), {"name": "gpt2"}
    t0 = time.time()
    enc = train_bpe(texts, vocab_size, log=log)
    train_seconds = round(time.time() - t0, 2)
    (tmp / TOKENIZER_FILE).write_text(ranks_to_text(enc._mergeable_ranks))
    return enc, {"name": "bpe", "file": TOKENIZER_FILE, "sha256": sha256_file(tmp / TOKENIZER_FILE),
                 "train_seconds": train_seconds}


def _publish(tmp, out_dir, outputs):
    """Move the outputs from tmp into out_dir: meta.json goes first out and last in, so that a half-moved
    folder has no meta.json."""
    out_dir.mkdir(exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    for stale in [out_dir / TOKENIZER_FILE] + [out_dir / "pairs" / f"{uid}.jsonl" for uid in PHENOMENA]:
        stale.unlink(missing_ok=True)
    for name in outputs + [META_FILE]:
        (out_dir / name).parent.mkdir(exist_ok=True)
        os.replace(tmp / name, out_dir / name)


def prepare(source, out_dir, budget_words=None, vocab_size=None, val_fraction=0.01, seed=1337, curriculum=False,
            tokenizer="bpe", sources="", exclude=DEFAULT_EXCLUDE, doc_words=1000, min_doc_words=10,
            synthetic_words=1_000_000, pairs_per_phenomenon=1000, sentence_case=False, strict_utf8=False,
            checked=False, verbose=True):
    """Corpus -> out_dir/{train.bin, val.bin, tokenizer.tiktoken, meta.json, report.md, readability.png}
    (+ pairs/*.jsonl for the synthetic source). Returns meta.

    source: folder / BabyLM folder / text file, several joined by commas, or "synthetic".
    budget_words: training words (None or 0: everything). vocab_size: None or 0: 16384 (1024 for synthetic).
    sources: "name[:weight],..." to use (default: every source found); exclude: sources or single files
    ("source/stem") to leave out, but never a source named in `sources`. sentence_case: capitalise the first
    letter of every line that starts a sentence (curation's sentence_case).
    Everything is written to a temporary folder next to out_dir and moved in at the end, meta.json last;
    meta.json's "settings" record what it was prepared from and with (see check_prepared). The temporary
    folders that killed runs left next to out_dir are removed first. Every file is read once before the long
    work (check_source: a broken .gz is an error, invalid UTF-8 a warning or, with strict_utf8, an error),
    unless the caller did that already (checked=True).
    """
    log = print if verbose else (lambda *args, **kwargs: None)
    t_start = time.time()
    synthetic = str(source) == "synthetic"
    budget_words = int(budget_words) if budget_words else None
    settings = _settings(source, budget_words, vocab_size, val_fraction, seed, curriculum, tokenizer, sources,
                         exclude, doc_words, min_doc_words, synthetic_words, pairs_per_phenomenon, sentence_case)
    vocab_size = settings["vocab_size"]
    _check_prepare_args(tokenizer, vocab_size, budget_words, doc_words, min_doc_words, val_fraction)
    out_dir = Path(out_dir)
    if not synthetic and not checked:
        check_source(source, strict_utf8)
    check_writable(out_dir, "out", folder=True, make_parents=True)
    for path in remove_stray_temps(out_dir.parent):
        log(f"removed {path}, left by a killed run")
    tmp, scratch = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir.name), dir=out_dir.parent)), None
    try:
        files, ignored, wanted, excluded = _source_files(source, tmp, settings, log)
        # curation and selection
        log(f"curating {len(files)} files from sources {sorted(wanted)}")
        docs, stats = curate(files, tmp / "scratch.txt", doc_words, min_doc_words, cased=sentence_case, log=log)
        if not any(d.split == "train" for d in docs):
            raise ValueError(f"corpus {source} is empty after filtering: no training document is left "
                             f"(sources {sorted(wanted)}; see the junk/duplicate counts: {dict(stats)})")
        weights = {s: w for s, w in wanted.items()} if any(w is not None for w in wanted.values()) else None
        train, val, quota = select_documents(docs, budget_words, val_fraction, weights, seed)
        from_dev = any(d.split == "dev" for d in docs)  # else validation is held out of the training sources
        if not train:
            raise ValueError(f"budget_words={budget_words} selects no document: documents have up to "
                             f"doc_words={doc_words} words; raise the budget or lower doc_words")
        if val_fraction > 0 and not val:
            raise ValueError(f"val_fraction={val_fraction} selects no validation document; raise it")
        train, val = order_documents(train, curriculum, seed), order_documents(val, curriculum, seed + 1)
        scratch = open(tmp / "scratch.txt", "rb")

        def read(d):
            scratch.seek(d.offset)
            return scratch.read(d.nbytes).decode("utf-8")

        # tokenizer and bins
        if tokenizer == "bpe":
            log(f"training byte-level BPE with vocab_size {vocab_size} on {len(train)} documents")
        enc, tok_info = _train_tokenizer(tokenizer, vocab_size, (read(d) for d in sorted(train, key=lambda d: d.offset)),
                                         tmp, log)
        outputs = ["train.bin", "val.bin", "report.md", "readability.png"] + ([TOKENIZER_FILE] if tokenizer == "bpe" else [])
        dtype = np.uint16 if enc.n_vocab <= 1 << 16 else np.uint32
        splits, per_source = {}, {}
        for split, ds in (("train", train), ("val", val)):
            t0 = time.time()
            n, sha, per_source[split] = write_bin(tmp / f"{split}.bin", ds, enc, dtype, read)
            words = sum(d.words for d in ds)
            splits[split] = {"file": f"{split}.bin", "documents": len(ds), "words": words, "tokens": n,
                             "bytes": n * np.dtype(dtype).itemsize, "sha256": sha}
            log(f"  {split}.bin: {len(ds)} documents, {words} words, {n} tokens ({time.time() - t0:.1f}s)")
        # meta.json, the pairs of the synthetic grammar, the report
        meta = {
            "format": FORMAT, "source": str(source), "splits": splits, "dtype": np.dtype(dtype).name,
            "vocab_size": enc.n_vocab, "eot_id": enc.eot_token, "tokenizer": tok_info,
            "order": ("curriculum: documents from easy to hard (Flesch reading ease, descending)" if curriculum
                      else f"shuffled documents (seed {seed})"),
            "validation": ("BabyLM dev files" if from_dev
                           else f"held-out documents, {val_fraction:g} of the selected words"),
            "sources": {}, "curation": {k: dict(v) for k, v in stats.items()},
            "settings": settings, "seconds": None,
        }
        for src in sorted(wanted):
            tr, va = [d for d in train if d.source == src], [d for d in val if d.source == src]
            meta["sources"][src] = {
                "train_docs": len(tr), "train_words": sum(d.words for d in tr), "train_tokens": per_source["train"][src],
                "val_docs": len(va), "val_words": sum(d.words for d in va), "val_tokens": per_source["val"][src],
                "readability": float(np.mean([d.readability for d in tr + va])) if tr + va else None}
        if synthetic:
            pairs = synthetic_minimal_pairs(pairs_per_phenomenon, seed=seed)
            paths = write_pairs_jsonl(pairs, tmp / "pairs")
            meta["pairs"] = [f"pairs/{p.name}" for p in paths]
            outputs += meta["pairs"]
            log(f"  wrote {len(pairs)} minimal pairs to pairs/ ({len(PHENOMENA)} phenomena)")
        available = sum(d.words for d in docs if d.split == "train") * (1 if from_dev else 1 - val_fraction)
        budget_note = _budget_note(splits["train"]["words"], budget_words, int(available), doc_words)
        plot_readability(tmp / "readability.png", train + val)
        (tmp / "report.md").write_text(_report(meta, stats, quota, weights, ignored, excluded, synthetic, budget_note))
        meta["seconds"] = round(time.time() - t_start, 1)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _publish(tmp, out_dir, outputs)
        log(f"wrote {out_dir} in {meta['seconds']} s: train {splits['train']['words']} words / "
            f"{splits['train']['tokens']} tokens, val {splits['val']['words']} words / {splits['val']['tokens']} tokens")
        if budget_note:
            log(f"note: {budget_note}")
        return meta
    finally:
        if scratch:
            scratch.close()
        shutil.rmtree(tmp, ignore_errors=True)


def check_prepared(out_dir, source, **settings):
    """Is out_dir a preparation of `source` with these settings (prepare()'s keywords; its defaults for the
    rest)? True if it is, False if out_dir holds no meta.json; if it holds another preparation (another
    corpus under the same folder name, another vocab_size, ...), a ValueError naming the keys that differ."""
    if not (Path(out_dir) / META_FILE).is_file():
        return False
    args = inspect.signature(prepare).bind(source, out_dir, **settings)
    args.apply_defaults()
    settings_of = inspect.signature(_settings).parameters  # what changes the output (not out_dir, verbose, ...)
    want = _settings(**{k: v for k, v in args.arguments.items() if k in settings_of})
    meta = load_meta(out_dir, verify=False)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{out_dir} was prepared by an older data.py that did not record its source and "
                         f"settings; delete it or prepare into another folder")
    have = meta["settings"]
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if differ:
        raise ValueError(f"{out_dir} holds another preparation than the one asked for: "
                         + "; ".join(f"{k} is {have.get(k)!r} there, {want.get(k)!r} here" for k in differ)
                         + f". Prepare into another folder, or delete {out_dir} to prepare it again")
    return True
