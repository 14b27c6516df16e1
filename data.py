"""
Data for BLaLM at run time: a prepared folder -> checked token bins, the tokenizer, batches. How a corpus
becomes such a folder (curation, readability, BPE, bins) is corpus.py; its command line is prepare.py:

    python prepare.py --source=synthetic                                   # -> data_prepared/synthetic
    python prepare.py --source=path/to/babylm/train_10M,path/to/babylm/dev --budget_words=10000000 --out=data_prepared/strict_small

A prepared folder holds train.bin / val.bin (the token ids of the documents, each followed by
<|endoftext|>, as flat uint16 arrays; uint32 for vocabularies over 65536), the tokenizer in tiktoken's
format, meta.json (sizes, sha256, and what the folder was prepared from and with), report.md and
readability.png (+ pairs/*.jsonl for the synthetic corpus).

1. A prepared folder: load_meta, open_bin (dtype, sizes and token ids are checked here, where the data
   enters), words_per_token.
2. Tokenizers: load_tokenizer, and tokenizer_to_dict / tokenizer_from_dict for checkpoints.
3. Batches: nanoGPT's random windows (`get_batch`) and epoch-exact, resumable batches (`EpochBatches`;
   with a curriculum, pass shuffle=False so the windows are visited in the stream's easy-to-hard order).
"""

import base64
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_SPLIT_PATTERN


EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.tiktoken"
META_FILE = "meta.json"
FORMAT = "blalm-data-2"  # 2: meta.json's "settings" record the resolved source and every setting
SPLITS = ("train", "val")
BIN_DTYPES = ("uint16", "uint32")  # what write_bin writes: uint16 up to 65536 tokens
ID_CHECK_CHUNK = 1 << 24  # ids per step of open_bin's range check (32 MB of uint16)

# -----------------------------------------------------------------------------
# 1. A prepared folder


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_meta(data_dir, verify=True):
    """meta.json of a prepared folder; checks its dtype and vocab_size, each bin's size (and with verify,
    the sha256 of the bins and the tokenizer file) against it. A mismatch is an error naming the file."""
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the data first (python prepare.py --out={data_dir})")
    try:
        meta = json.loads(path.read_text())
        files = [(data_dir / info["file"], info) for info in meta["splits"].values()]
        dtype, vocab_size = meta["dtype"], meta["vocab_size"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a meta.json written by data.py ({type(e).__name__}: {e})") from None
    if dtype not in BIN_DTYPES:
        raise ValueError(f"{path}: dtype {dtype!r} is not a token dtype data.py writes (expected one of {BIN_DTYPES})")
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= np.iinfo(dtype).max + 1:
        raise ValueError(f"{path}: vocab_size {vocab_size!r} is not a positive integer that fits {dtype}")
    for bin_path, info in files:
        if not bin_path.is_file():
            raise FileNotFoundError(f"{bin_path} is missing (listed in {path})")
        expected = info["tokens"] * np.dtype(dtype).itemsize
        if bin_path.stat().st_size != expected:
            raise ValueError(f"{bin_path} has {bin_path.stat().st_size} bytes but {path} says {info['tokens']} "
                             f"{dtype} tokens = {expected} bytes; run prepare.py again")
        if verify and sha256_file(bin_path) != info["sha256"]:
            raise ValueError(f"{bin_path}: sha256 differs from {path}; the file changed after prepare.py wrote it")
    tok = meta["tokenizer"]
    if verify and tok["name"] == "bpe" and sha256_file(data_dir / tok["file"]) != tok["sha256"]:
        raise ValueError(f"{data_dir / tok['file']}: sha256 differs from {path}; the file changed after prepare.py wrote it")
    return meta


def open_bin(data_dir, split):
    """The token ids of a split as a read-only np.memmap (dtype from meta.json), checked where the data
    enters: the file size against meta.json, and every id below vocab_size (one vectorised pass over the
    file, in chunks: milliseconds for a 10M-word corpus in the page cache)."""
    meta = load_meta(data_dir, verify=False)
    if split not in meta["splits"]:
        raise ValueError(f"split={split!r}; {Path(data_dir) / META_FILE} has {sorted(meta['splits'])}")
    if meta["splits"][split]["tokens"] == 0:  # an empty file cannot be memory-mapped
        return np.zeros(0, dtype=meta["dtype"])
    path = Path(data_dir) / meta["splits"][split]["file"]
    ids, V = np.memmap(path, dtype=meta["dtype"], mode="r"), meta["vocab_size"]
    for start in range(0, len(ids), ID_CHECK_CHUNK):
        chunk = ids[start : start + ID_CHECK_CHUNK]
        if chunk.max() >= V:
            i = start + int(np.argmax(chunk >= V))
            raise ValueError(f"{path}: token id {int(ids[i])} at position {i} is out of range for vocab_size {V} "
                             f"({Path(data_dir) / META_FILE}); run prepare.py again")
    return ids


def words_per_token(meta, split="train"):
    """Whitespace words per token (end-of-text tokens included) of a split: words seen = tokens * this.
    The one place the project turns tokens into words."""
    info = meta["splits"][split]
    if not info["tokens"]:
        raise ValueError(f"the {split} split has no tokens, so it has no words per token")
    return info["words"] / info["tokens"]


# -----------------------------------------------------------------------------
# 2. Tokenizers


def load_tokenizer(data_dir):
    """The tokenizer a prepared folder was encoded with, as a tiktoken.Encoding."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir, verify=False)
    if meta["tokenizer"]["name"] == "gpt2":
        return gpt2_encoding()
    path = data_dir / meta["tokenizer"]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (listed in {data_dir / META_FILE})")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["tokenizer"]["sha256"]:
        raise ValueError(f"{path}: sha256 differs from {data_dir / META_FILE}; the file changed after prepare.py wrote it")
    enc = encoding_from_ranks(ranks_from_text(data.decode("ascii", errors="replace"), name=str(path)))
    if enc.n_vocab != meta["vocab_size"]:
        raise ValueError(f"{path} has {enc.n_vocab} tokens but {data_dir / META_FILE} says vocab_size {meta['vocab_size']}")
    return enc


def encoding_from_ranks(ranks):
    return tiktoken.Encoding(f"blalm-bpe-{len(ranks) + 1}", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)


def ranks_to_text(ranks):
    """tiktoken's .tiktoken format: one "base64(token bytes) rank" line per token, by rank."""
    return "".join(f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def ranks_from_text(text, name="tokenizer"):
    """Inverse of ranks_to_text; a malformed line is an error naming `name` and the line."""
    ranks = {}
    for i, line in enumerate(text.splitlines()):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{name}: line {i + 1} {line[:60]!r} is not 'base64-token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{name}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def gpt2_encoding():
    """tiktoken's GPT-2 encoding; it is fetched once from the network and then read from tiktoken's cache."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise FileNotFoundError(
            "tokenizer='gpt2' needs tiktoken's GPT-2 files (vocab.bpe, encoder.json), which could not be loaded "
            f"({type(e).__name__}: {str(e)[:200]}). Run tiktoken.get_encoding('gpt2') once on a machine with "
            "internet access and set TIKTOKEN_CACHE_DIR to a folder that keeps its cache (copy that folder to "
            "offline machines), or use the trained tokenizer (tokenizer='bpe').") from e


def tokenizer_to_dict(enc):
    """A plain, picklable description that rebuilds the tokenizer alone (it goes into checkpoints)."""
    if enc.name == "gpt2":
        return {"name": "gpt2"}
    return {"name": "bpe", "ranks": ranks_to_text(enc._mergeable_ranks), "pat_str": enc._pat_str,
            "special_tokens": dict(enc._special_tokens)}


def tokenizer_from_dict(d):
    """Inverse of tokenizer_to_dict."""
    if d.get("name") == "gpt2":
        return gpt2_encoding()
    if d.get("name") != "bpe":
        raise ValueError(f"tokenizer description has name {d.get('name')!r}; expected 'bpe' or 'gpt2'")
    ranks = ranks_from_text(d["ranks"])
    return tiktoken.Encoding(f"blalm-bpe-{len(ranks) + len(d['special_tokens'])}", pat_str=d["pat_str"],
                             mergeable_ranks=ranks, special_tokens=dict(d["special_tokens"]))



# -----------------------------------------------------------------------------
# 3. Batches


def _to_device(x, y, device):
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_batch(data, batch_size, block_size, generator, device="cpu"):
    """nanoGPT's batch: batch_size random windows; y is x shifted by one token. -> int64 (B, T) tensors."""
    if len(data) <= block_size:
        raise ValueError(f"block_size={block_size} needs more than {block_size} tokens, the data has {len(data)}")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i : i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + block_size] for i in ix]).astype(np.int64))
    return _to_device(x, y, device)


class EpochBatches:
    """Batches that see every window once per epoch, in a new seeded order each epoch, and resume exactly.

    Window i is data[i*T : i*T + T + 1] (T = block_size): neighbours share one token, so the targets
    y = w[1:] tile the stream and each token is predicted once per epoch. Epoch e visits the windows in the
    order of a permutation drawn from (seed, e) (stream order with shuffle=False, for a curriculum); windows
    left over after the last full batch are skipped that epoch. With world_size > 1, rank r takes the r-th
    batch_size slice of each group of world_size batches, so the ranks never share a window.
    state_dict() holds (epoch, step), which with the seed determines everything that follows.
    """

    def __init__(self, data, batch_size, block_size, seed, shuffle=True, rank=0, world_size=1):
        self.data, self.batch_size, self.block_size, self.seed = data, batch_size, block_size, seed
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.n_windows = (len(data) - 1) // block_size
        self.batches_per_epoch = self.n_windows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(data)} tokens make {self.n_windows} windows of block_size={block_size}, fewer "
                             f"than one batch of batch_size={batch_size} x world_size={world_size}")
        self.tokens_per_epoch = self.batches_per_epoch * batch_size * world_size * block_size  # targets, all ranks
        self.epoch, self.step, self._order = 0, 0, None

    def _window_order(self):
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)

    def next_batch(self, device="cpu"):
        if self.step == self.batches_per_epoch:
            self.epoch, self.step, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._window_order()
        start = (self.step * self.world_size + self.rank) * self.batch_size
        T = self.block_size
        w = np.stack([self.data[i * T : i * T + T + 1] for i in self._order[start : start + self.batch_size]])
        w = torch.from_numpy(w.astype(np.int64))
        self.step += 1
        return _to_device(w[:, :-1].contiguous(), w[:, 1:].contiguous(), device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step, "n_windows": self.n_windows,
                "batch_size": self.batch_size, "block_size": self.block_size, "shuffle": self.shuffle,
                "world_size": self.world_size}

    def load_state_dict(self, state):
        mine = self.state_dict()
        differ = [k for k in mine if k not in ("epoch", "step") and state.get(k) != mine[k]]
        if differ:
            raise ValueError("EpochBatches state does not match: " +
                             ", ".join(f"{k} is {mine[k]} here but {state.get(k)} in the state" for k in differ))
        self.epoch, self.step, self._order = state["epoch"], state["step"], None


if __name__ == "__main__":
    print("data.py is the library; run python prepare.py (same flags, --help)", file=sys.stderr)
    sys.exit(2)
