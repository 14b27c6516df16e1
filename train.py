"""
Train BLaLM (or the softmax baseline) under the BabyLM rules. One GPU by default, CPU works,
several GPUs with `torchrun --nproc_per_node=N train.py ...` (PyTorch DDP).

    python train.py                                  # small model on the built-in synthetic corpus
    python train.py --preset=cpu --data=DIR          # a real corpus on a 2-4 core CPU in about 10 minutes
    python train.py --data=DIR                       # a prepared corpus (a raw one is prepared into data_prepared/)
    python train.py --preset=strict_small --data=DIR # the BabyLM STRICT-SMALL track: 10M words, <= 10 epochs
    python train.py --plot=RUN_DIR[,RUN_DIR...]      # loss and accuracy against words seen (--plot_out=FILE)
    python train.py --kernels=triton                 # the fused Triton kernels (CUDA): a run setting, not saved
    python train.py --help

A run lives in out_dir: ckpt.pt (the latest), ckpt_best.pt (the lowest validation loss), ckpt_<N>M_words.pt
(the BabyLM milestones), log.jsonl, loss.png. A second run into a folder that holds a checkpoint is refused:
continue it with --resume=True, or start over with another --out_dir or --overwrite=True; a folder another run is
writing is locked (out_dir/LOCK; a lock left by a killed process is taken over). Every path is checked before
any work. --resume refuses a checkpoint of another model or tokenizer, and one without optimizer state (of
convert.py: start a new run instead); checkpoints load without running code (checkpoint.py). On --resume the
command line's optimizer and schedule settings (rates, weight decay, betas, warmup, schedule, max_iters) apply
from the resumed step on; the model's shape must match the checkpoint's. Ctrl-C or SIGTERM (a job scheduler's
time limit, `timeout`) ends the step in flight, evaluates and writes ckpt.pt, so that --resume=True loses
nothing; a second one stops at once (without DDP: a multi-GPU run stops at once on the first).
"""

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, asdict

import torch

import checkpoint
import corpus
import data
import eval as evaluate
import tasks
from blalm import MLSTM_FORMS, MLSTM_KERNELS, RUN_DEFAULTS, BLaLM, BLaLMConfig
from common import (FolderLock, check_writable, device_peak_flops, format_words, given_flags, jsonl_records, lr_factor,
                    parse_args, pick_device, remove_stray_temps, run_cli, setup_precision, write_atomic)
from muon import configure_optimizers

# -----------------------------------------------------------------------------
# Config: the run's settings here, the model's in BLaLMConfig; both overridable with --key=value


@dataclass
class TrainConfig:
    # data
    data: str = ""                  # a prepared dir (has meta.json), a raw corpus to prepare, or "" = synthetic
    prepared_dir: str = ""          # where a raw corpus is prepared ("" = data_prepared/<name>-<budget>-v<vocab>)
    budget_words: int = 0           # word budget when preparing (0 = all the data; presets set the BabyLM track's)
    vocab_size: int = 0             # BPE vocabulary when preparing (0 = prepare.py's default: 16384, synthetic 1024)
    curriculum: bool = False        # order the training stream easy-to-hard by readability when preparing
    strict_utf8: bool = False       # refuse a corpus file that is not valid UTF-8 (else: a warning, bad bytes -> U+FFFD)
    eval_pairs: str = "auto"        # minimal pairs: "auto" (built-in pairs for synthetic data), "none", "builtin", or a BLiMP/Zorro/BabyLM dir
    eval_max_pairs: int = 50        # pairs per paradigm scored at each evaluation
    # optimizer and schedule
    optimizer: str = "muon"         # "muon" (Muon for hidden matrices + AdamW for the rest) | "adamw"
    learning_rate: float = 0.02     # Muon's rate (with --optimizer=adamw give --adam_lr)
    adam_lr: float = 3e-3           # AdamW's rate (embeddings, head, norms, biases; everything with adamw)
    weight_decay: float = 0.0       # Muon's decoupled weight decay
    adam_weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # clip the gradient norm to this (0 = off)
    schedule: str = "cosine"        # "cosine" | "wsd" (warmup, stable, decay over the last decay_frac)
    warmup_iters: int = 20
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.1
    # batches and length of the run
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_iters: int = 300            # 0 = as many as max_epochs allows
    max_epochs: float = 10.0        # BabyLM cap on passes over the training words
    # evaluation, logging, checkpoints
    out_dir: str = "out"
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    milestones: bool = True         # keep a checkpoint at each BabyLM word milestone
    keep_best: bool = True          # also keep the checkpoint of the lowest validation loss (ckpt_best.pt)
    resume: bool = False            # continue the run in out_dir from its ckpt.pt
    overwrite: bool = False         # start over in an out_dir that holds a run (its files are replaced)
    stop_iter: int = 0              # stop at this iteration with a checkpoint, to continue with --resume (0 = at the end)
    seed: int = 1337
    # system
    device: str = "auto"            # "auto" | "cuda" | "cpu" | "mps" | "cuda:1" ...
    dtype: str = "auto"             # "auto" (bfloat16 on CUDA, else float32) | "bfloat16" | "float32"
    compile: bool = False
    threads: int = 0                # CPU threads torch uses (0 = torch's default, one per core); fewer on a shared machine
    # how the model runs, not what it computes (not saved in checkpoints: a checkpoint loads with any of them)
    kernels: str = "torch"          # "torch" | "triton": fused Triton kernels for the chunkwise mLSTM and the short conv (CUDA)
    mlstm_form: str = "chunkwise"   # "chunkwise" | "parallel" | "recurrent" (all compute the same function)
    chunk_size: int = 64            # chunk length of the chunkwise forms
    # a figure instead of a run
    plot: str = ""                  # RUN_DIR[,RUN_DIR...]: only plot loss and accuracy against words seen, no training
    plot_out: str = ""              # the figure of --plot ("" = RUN_DIR/loss.png, or compare.png for several runs)


PRESETS = {
    # a small model that finishes in a few minutes on 2 CPU cores (the default)
    "default": {},
    # real text on a 2-4 core CPU: about 10 minutes, a line every few seconds
    "cpu": dict(budget_words=2_000_000, vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=192,
                swa_window=32, batch_size=16, max_iters=550, eval_interval=110, eval_iters=20, log_interval=12,
                warmup_iters=50, schedule="wsd", min_lr_ratio=0.0, eval_max_pairs=100),
    # the BabyLM tracks: a ~30M non-embedding parameter model, context 512. STRICT-SMALL: warmup-stable-decay
    # annealed to 0 over the last 30% (the final checkpoint is the best one), weight decay 0.1 on Muon's matrices
    # (results/study2), and 6 epochs with dropout 0.1: below 4 epochs without in validation loss for each of three
    # seeds, BLiMP 22 +0.6 on the means, about the seed spread (results/study3). SWA window 128: 256 was level with
    # it on three seeds (the same loss, means within 0.3-1.1 on BLiMP, the supplement and entity tracking, its third
    # seed inside 128's range on all three); 512 was worse. STRICT keeps the same model (unmeasured at 100M)
    "strict_small": dict(budget_words=10_000_000, vocab_size=16384, block_size=512, n_layer=12, n_head=7,
                         n_embd=448, swa_window=128, batch_size=64, max_iters=0, max_epochs=6, dropout=0.1,
                         schedule="wsd", decay_frac=0.3, min_lr_ratio=0.0, weight_decay=0.1, eval_interval=250,
                         log_interval=50, warmup_iters=200, compile=True),
    "strict": dict(budget_words=100_000_000, vocab_size=16384, block_size=512, n_layer=12, n_head=7,
                   n_embd=448, swa_window=128, batch_size=64, max_iters=0, max_epochs=10,
                   eval_interval=2000, log_interval=100, warmup_iters=500, compile=True),
}


def parse_config(argv):
    """-> (TrainConfig, BLaLMConfig without its vocab size), checked."""
    c, m = parse_args(argv, (TrainConfig, BLaLMConfig), PRESETS, __doc__)  # --vocab_size is TrainConfig's
    m = BLaLMConfig(**{**asdict(m), "vocab_size": 1})  # re-run the model config's checks on the parsed values
    check_config(c, m, given_flags(argv))
    return c, m


def check_config(c, m, given=()):
    """Every setting checked before any work: a one-line error naming the flag and what it expects."""
    choices = {"optimizer": ("muon", "adamw"), "schedule": ("cosine", "wsd"), "dtype": ("auto", "bfloat16", "float32"),
               "kernels": MLSTM_KERNELS, "mlstm_form": MLSTM_FORMS}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise ValueError(f"--{key}={getattr(c, key)!r} is not one of {allowed}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                "eval_max_pairs", "chunk_size"):
        if getattr(c, key) < 1:
            raise ValueError(f"--{key}={getattr(c, key)} must be >= 1")
    for key in ("max_iters", "warmup_iters", "stop_iter", "budget_words", "vocab_size", "grad_clip", "weight_decay",
                "adam_weight_decay", "seed", "threads"):
        if getattr(c, key) < 0:
            raise ValueError(f"--{key}={getattr(c, key)} must be >= 0")
    if not c.max_epochs > 0:
        raise ValueError(f"--max_epochs={c.max_epochs} must be > 0")
    for key in ("learning_rate", "adam_lr"):
        if not 0 < getattr(c, key) < 3e38:  # finite in float32, where the optimizers keep it
            raise ValueError(f"--{key}={getattr(c, key)} must be > 0 and below 3e38")
    for key in ("beta1", "beta2", "decay_frac", "min_lr_ratio"):
        if not 0 <= getattr(c, key) <= 1:
            raise ValueError(f"--{key}={getattr(c, key)} must lie in [0, 1]")
    if c.optimizer == "adamw" and "learning_rate" in given:
        raise ValueError("--learning_rate is Muon's rate; with --optimizer=adamw set AdamW's with --adam_lr")
    if c.resume and c.overwrite:
        raise ValueError("--resume=True and --overwrite=True contradict each other: continue the run, or start over")
    if m.mixer == "mlstm" and m.swa_window > m.block_size:
        raise ValueError(f"--swa_window={m.swa_window} is longer than --block_size={m.block_size}: "
                         "a window beyond the context only costs memory")
    dev = pick_device(c.device)  # an unknown name, or cuda without CUDA, fails here
    if m.mixer != "mlstm" and (c.kernels, c.mlstm_form) != (RUN_DEFAULTS["kernels"], RUN_DEFAULTS["form"]):
        raise ValueError(f"--kernels={c.kernels} and --mlstm_form={c.mlstm_form} apply to --mixer=mlstm only")
    if c.kernels == "triton":
        if not dev.startswith("cuda"):
            raise ValueError(f"--kernels=triton needs a CUDA device, not {dev!r} (use --kernels=torch)")
        import importlib.util  # triton is optional: ask for it here, before any work
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--kernels=triton needs the optional triton package (pip install triton)")


def milestone_words(words_before, words_after):
    """BabyLM 2025 checkpoint milestones crossed in (words_before, words_after]: every 1M words up to 10M,
    every 10M up to 100M, then every 100M."""
    marks = [m * 1_000_000 for m in range(1, 10)] + [m * 10_000_000 for m in range(1, 10)]
    marks += [m * 100_000_000 for m in range(1, 1 + int(words_after // 100_000_000))]
    return [m for m in marks if words_before < m <= words_after]

# -----------------------------------------------------------------------------
# The log and its figure


def read_log(path, up_to_iter=None):
    """The rows of a log.jsonl; a torn last line (a killed run) is dropped with a note, and with up_to_iter
    the rows past that iteration (written after the checkpoint a run resumes from) are dropped too."""
    rows = [r for _, r in jsonl_records(path, torn_last_ok=True)]
    if up_to_iter is not None:
        rows = [r for r in rows if r["iter"] <= up_to_iter]
    return rows


def plot_runs(run_dirs, out_path):
    """Validation loss (and, where logged, minimal-pair accuracy) against words seen, one colour per run."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's (a notebook's) backend alone
    from matplotlib.ticker import FuncFormatter
    logs = {}
    for run in run_dirs:
        path = os.path.join(run, "log.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: --plot expects run directories written by train.py")
        logs[os.path.basename(os.path.normpath(run))] = read_log(path)
    with_pairs = any("pairs_macro" in r for rows in logs.values() for r in rows)
    fig = Figure(figsize=(11 if with_pairs else 7, 4.5))
    axes = fig.subplots(1, 2 if with_pairs else 1, squeeze=False)[0]
    words = FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x >= 1e3 else f"{x:g}")
    lows = []
    for k, (name, rows) in enumerate(logs.items()):
        color = f"C{k % 10}"
        train = [(r["words"], r["loss"]) for r in rows if r["kind"] == "train"]
        val = [(r["words"], r["val_loss"]) for r in rows if r["kind"] == "eval" and r["iter"] > 0]
        if train:
            axes[0].plot(*zip(*train), color=color, alpha=0.35, lw=1)
        if val:
            axes[0].plot(*zip(*val), color=color, marker="o", ms=3, lw=1.5, label=f"{name} (val)")
            lows.append(max(v for _, v in val))
        pairs = [(r["words"], r["pairs_macro"]) for r in rows if r["kind"] == "eval" and "pairs_macro" in r]
        if with_pairs and pairs:
            axes[1].plot(*zip(*pairs), color=color, marker="o", ms=3, lw=1.5, label=name)
    if lows:  # the initial point (loss at initialisation, not plotted) and the first train steps dwarf the rest
        axes[0].set_ylim(top=max(lows) + 0.3)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].set_title("train (faint) and validation loss")
    if with_pairs:
        axes[1].set_ylabel("minimal-pair accuracy (%)")
        axes[1].set_title("minimal pairs (macro-average)")
    for ax in axes:
        ax.xaxis.set_major_formatter(words)
        ax.set_xlabel("words seen")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_atomic(out_path, lambda f: fig.savefig(f, dpi=120, format="png"))
    return out_path


def plot_command(c, given):
    """python train.py --plot=RUN_DIR[,RUN_DIR...] [--plot_out=FILE]: the figure only, no training."""
    rest = sorted(given - {"plot", "plot_out"})
    if rest:
        raise ValueError(f"--plot takes only --plot_out=FILE besides it, not {['--' + k for k in rest]}")
    runs = c.plot.split(",")
    out = c.plot_out or os.path.join(runs[0], "loss.png" if len(runs) == 1 else "compare.png")
    print("wrote", plot_runs(runs, out))

# -----------------------------------------------------------------------------
# Before any work: every path checked, the run folder locked


def prepared_name(c):
    """Where a raw corpus is prepared: data_prepared/<corpus>-<budget>-v<vocabulary> (data_prepared/synthetic for
    the built-in corpus), so that presets with other budgets (--preset=cpu, --preset=strict_small) prepare one
    corpus side by side instead of refusing each other's folder."""
    if not c.data:
        return os.path.join("data_prepared", "synthetic")
    budget = f"{c.budget_words / 1e6:g}M" if c.budget_words else "all"
    return f"{corpus.default_out_dir(c.data)}-{budget}-v{c.vocab_size or 'default'}"


def plan_data(c):
    """-> (prepared dir, or None when the corpus must be prepared first, and the arguments of that preparation).
    Checks now what preparing would find late: the source exists, every file is readable, valid UTF-8 (or
    warned about), and a folder prepared before matches the asked-for settings."""
    if c.data and os.path.isfile(os.path.join(c.data, "meta.json")):
        return c.data, None
    if c.data and not os.path.exists(c.data):
        raise FileNotFoundError(f"--data={c.data} does not exist (expected a prepared dir with meta.json "
                                "or a corpus folder to prepare)")
    source = c.data or "synthetic"
    target = c.prepared_dir or prepared_name(c)
    settings = dict(budget_words=c.budget_words or None, vocab_size=c.vocab_size or None, curriculum=c.curriculum)
    if corpus.check_prepared(target, source, **settings):
        return target, None
    if c.data:
        corpus.check_source(source, c.strict_utf8)
    return target, dict(source=source, out_dir=target, strict_utf8=c.strict_utf8, checked=bool(c.data), **settings)


def load_eval_pairs(c):
    """The minimal pairs of --eval_pairs that name a folder, loaded now (a bad path fails before any work);
    "auto" is decided by the data (see main)."""
    if c.eval_pairs in ("auto", "none"):
        return None
    if c.eval_pairs == "builtin":
        return tasks.builtin_pairs()
    if not os.path.exists(c.eval_pairs):
        raise FileNotFoundError(f"--eval_pairs={c.eval_pairs} does not exist (expected auto, none, builtin, "
                                "or a BLiMP, Zorro or BabyLM suite folder)")
    if tasks.is_suite(c.eval_pairs):  # a BabyLM 2025 suite folder: scored as the suite (Run.evaluate)
        return tasks.load_babylm(c.eval_pairs)
    return tasks.load_pairs(c.eval_pairs)


def check_out_dir(c):
    """out_dir must be a writable folder; one that holds a run needs --resume or --overwrite. Makes nothing."""
    check_writable(c.out_dir, "--out_dir", folder=True)
    ckpt = os.path.join(c.out_dir, "ckpt.pt")
    if c.resume and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--resume=True but {ckpt} does not exist: nothing to continue "
                                f"(start a new run without --resume)")
    held = sorted(f for f in os.listdir(c.out_dir) if f.startswith("ckpt") and f.endswith(".pt")) \
        if os.path.isdir(c.out_dir) else []
    if not c.resume and not c.overwrite and held:
        raise ValueError(f"--out_dir={c.out_dir} already holds a run ({', '.join(held[:3])}): continue it with "
                         f"--resume=True, or start over with another --out_dir or --overwrite=True")


def open_run_folder(c):
    """Make and lock out_dir (a second train.py into it gets a clear error); with --overwrite the earlier run's
    files go, so that no milestone of it passes for one of this run. -> the lock, released when main ends."""
    check_writable(c.out_dir, "--out_dir", folder=True, make_parents=True)
    os.makedirs(c.out_dir, exist_ok=True)
    lock = FolderLock(c.out_dir).acquire()
    if c.overwrite:
        for name in os.listdir(c.out_dir):
            if (name.startswith("ckpt") and name.endswith(".pt")) or name in ("log.jsonl", "loss.png"):
                os.remove(os.path.join(c.out_dir, name))
    remove_stray_temps(c.out_dir)
    return lock


def check_resume(ckpt, path, model_config, tokenizer, data_dir):
    """A resumed run continues the same model on the same tokens: the model's settings, the tokenizer and an
    optimizer state must all be the checkpoint's."""
    if "optimizer" not in ckpt or "batches" not in ckpt:
        raise ValueError(f"--resume: {path} has no optimizer state (a checkpoint of convert.py, or of an older "
                         f"train.py); start a new run from it instead, e.g. convert.py's student with its own out_dir")
    if ckpt["config"] != model_config.to_dict():
        diff = {k: (ckpt["config"].get(k), v) for k, v in model_config.to_dict().items() if ckpt["config"].get(k) != v}
        raise ValueError(f"--resume: {path} has another model; differing settings (checkpoint, now): {diff}")
    if ckpt["tokenizer"] != tokenizer:
        was = (ckpt.get("data_meta") or {}).get("source", "another folder")
        raise ValueError(f"--resume: {path} was trained with another tokenizer (data from {was}) than the one of "
                         f"--data={data_dir}; resume with the run's own data folder")

# -----------------------------------------------------------------------------
# The run's state: model, optimizer, batches, counters; evaluation, checkpoints, the log


class Run:
    """What one training run holds, and the steps main takes with it."""

    def __init__(self, c, model_config, meta, enc, pairs, autocast, rank, world, ckpt):
        self.c, self.meta, self.enc, self.pairs, self.autocast, self.master = c, meta, enc, pairs, autocast, rank == 0
        # a BabyLM suite folder is scored as the suite (per task and UID), other pairs per paradigm
        self.score = evaluate.score_babylm if tasks.is_suite(c.eval_pairs) else evaluate.score_pairs
        self.model_config = m = model_config
        self.raw_model = BLaLM(self.model_config).set_kernels(c.kernels, c.mlstm_form, c.chunk_size).to(c.device)
        self.optimizer = configure_optimizers(self.raw_model, c.optimizer, lr=c.learning_rate, adam_lr=c.adam_lr,
                                              weight_decay=c.weight_decay, adam_weight_decay=c.adam_weight_decay,
                                              betas=(c.beta1, c.beta2), verbose=False)
        data_dir = meta["dir"]
        self.val_data = data.open_bin(data_dir, "val")
        curriculum = bool(meta.get("settings", {}).get("curriculum"))  # keep the easy-to-hard stream order
        self.batches = data.EpochBatches(data.open_bin(data_dir, "train"), c.batch_size, m.block_size, seed=c.seed,
                                         shuffle=not curriculum, rank=rank, world_size=world)
        self.words_per_token = data.words_per_token(meta)
        self.it, self.tokens_seen, self.best_val = 0, 0, float("inf")
        self.ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
        self.log_path = os.path.join(c.out_dir, "log.jsonl")
        self.last_good = None
        if ckpt is not None:
            self.restore(ckpt)
        self.model = self.raw_model
        if c.compile:
            self.raw_model.compile_blocks()
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[torch.cuda.current_device()] if c.device.startswith("cuda") else None)
        self.tokens_per_iter = c.batch_size * m.block_size * c.gradient_accumulation_steps * world
        epoch_cap = int(c.max_epochs * self.batches.tokens_per_epoch // self.tokens_per_iter)
        self.max_iters = min(c.max_iters, epoch_cap) if c.max_iters else epoch_cap
        if self.master and c.max_iters > epoch_cap:
            print(f"note: --max_iters={c.max_iters} would exceed --max_epochs={c.max_epochs}; stopping at {self.max_iters}")
        self.flops_per_iter = self.raw_model.flops_per_token(m.block_size) * self.tokens_per_iter
        self.peak, self.world = device_peak_flops(c.device), world
        self.bad_iter = torch.full((), -1, device=c.device)  # first iter with a non-finite loss, read back rarely

    def restore(self, ckpt):
        """Weights, optimizer state (with the command line's rates, decay and betas), batches, counters, RNG."""
        self.raw_model.load_state_dict(ckpt["model"])
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, now in zip(self.optimizer.param_groups, settings):
            group.update(now)
        self.batches.load_state_dict(ckpt["batches"])
        self.it, self.tokens_seen, self.best_val = ckpt["iter"], ckpt["tokens_seen"], ckpt["best_val_loss"]
        if "rng" in ckpt:  # dropout and sampling continue exactly where they were
            torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
            if ckpt["rng"].get("cuda") is not None and self.c.device.startswith("cuda"):
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), torch.device(self.c.device))
        self.last_good = self.ckpt_path

    @property
    def words(self):
        return self.tokens_seen * self.words_per_token

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)

    def log(self, row):
        if self.master:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def start_log(self, resumed):
        """A resumed log continues from the checkpoint's iteration; a new run starts a new log."""
        if self.master:
            rows = read_log(self.log_path, up_to_iter=self.it) if resumed and os.path.exists(self.log_path) else []
            write_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in rows))

    @torch.no_grad()
    def evaluate(self):
        """Validation loss on fixed windows (and minimal pairs), on rank 0's unwrapped model."""
        c = self.c
        self.raw_model.eval()
        g = torch.Generator().manual_seed(1234)  # the same validation windows every time
        losses = []
        for _ in range(c.eval_iters):
            x, y = data.get_batch(self.val_data, c.batch_size, self.model_config.block_size, g, c.device)
            with self.autocast:
                losses.append(self.raw_model(x, y)[1].item())
        result = {"val_loss": sum(losses) / len(losses)}
        if self.pairs is not None:
            with self.autocast:
                scores = self.score(self.raw_model, self.enc, self.pairs, c.device, 64, c.eval_max_pairs)
            result["pairs_macro"] = scores["macro_average"]
        self.raw_model.train()
        return result

    def evaluate_and_save(self):
        self.check_finite()
        result = self.evaluate()
        if not math.isfinite(result["val_loss"]) or not self.weights_finite():
            self.stop_diverged(f"val loss {result['val_loss']} at iter {self.it}")
        improved = result["val_loss"] < self.best_val
        self.best_val = min(self.best_val, result["val_loss"])
        extra = f", pairs {result['pairs_macro']:.2f}" if "pairs_macro" in result else ""
        print(f"eval iter {self.it}: val loss {result['val_loss']:.4f}{extra}, {format_words(self.words)} words")
        self.log({"kind": "eval", "iter": self.it, "words": self.words, **result})
        if improved and self.c.keep_best:  # written first: ckpt.pt's best_val_loss never names a missing file
            self.save(os.path.join(self.c.out_dir, "ckpt_best.pt"))
        self.save(self.ckpt_path)
        self.last_good = self.ckpt_path

    def save(self, path):
        c = self.c
        checkpoint.save({"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "config": self.model_config.to_dict(), "train_config": asdict(c), "iter": self.it,
                         "tokens_seen": self.tokens_seen, "words_seen": self.words, "best_val_loss": self.best_val,
                         "batches": self.batches.state_dict(),
                         "rng": {"cpu": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state(torch.device(c.device))
                                 if c.device.startswith("cuda") else None},
                         "tokenizer": data.tokenizer_to_dict(self.enc), "data_meta": self.meta}, path)

    def save_milestones(self, words_before):
        for mark in milestone_words(words_before, self.words):
            self.check_finite()
            if not self.weights_finite():
                self.stop_diverged(f"weights at iter {self.it}")
            self.save(os.path.join(self.c.out_dir, checkpoint.milestone_name(mark)))

    def train_step(self):
        """One optimizer step over gradient_accumulation_steps micro-batches -> the last micro-batch's loss."""
        c = self.c
        factor = lr_factor(self.it, self.max_iters, warmup_iters=c.warmup_iters, schedule=c.schedule,
                           decay_frac=c.decay_frac, min_lr_ratio=c.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        for micro in range(c.gradient_accumulation_steps):
            x, y = self.batches.next_batch(c.device)
            if self.world > 1:
                self.model.require_backward_grad_sync = micro == c.gradient_accumulation_steps - 1
            with self.autocast:
                loss = self.model(x, y)[1] / c.gradient_accumulation_steps
            loss.backward()
            self.bad_iter = torch.where((self.bad_iter < 0) & ~torch.isfinite(loss.detach()), self.it + 1, self.bad_iter)
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.it += 1
        self.tokens_seen += self.tokens_per_iter
        return loss

    def log_train(self, loss, since):
        """The log line: loss, rate, tokens/s, MFU, words, epoch, ETA. since = (time, iter) of the last one."""
        self.check_finite()
        lossf = loss.item() * self.c.gradient_accumulation_steps
        dt, n = time.time() - since[0], self.it - since[1]
        tok_s = n * self.tokens_per_iter / dt
        mfu = f"{100 * self.flops_per_iter * n / dt / self.peak / self.world:.1f}%" if self.peak else "-"
        eta = (self.max_iters - self.it) * dt / max(1, n)
        lr = self.optimizer.param_groups[0]["lr"]
        self.print(f"iter {self.it}/{self.max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, MFU {mfu}, "
                   f"{format_words(self.words)} words, epoch {self.batches.epoch}, ETA {eta / 60:.1f} min")
        self.log({"kind": "train", "iter": self.it, "words": self.words, "loss": lossf, "lr": lr, "tok_s": tok_s,
                  "epoch": self.batches.epoch})

    def weights_finite(self):  # one device sync, not one per parameter
        return bool(torch.stack([torch.isfinite(p).all() for p in self.raw_model.parameters()]).all())

    def check_finite(self):
        if self.bad_iter.item() >= 0:
            self.stop_diverged(f"training loss at iter {self.bad_iter.item()}")

    def stop_diverged(self, when):
        where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
        print(f"stopping: the loss or the weights are not finite ({when}); {where}")
        sys.exit(1)


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step, evaluate and write a checkpoint; a second
    signal stops at once. Only in the main thread of a single process (DDP ranks would have to agree)."""

    def __init__(self, enabled):
        self.enabled, self.asked = enabled and threading.current_thread() is threading.main_thread(), None

    def __enter__(self):
        if self.enabled:
            self.previous = {s: signal.signal(s, self.ask) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def ask(self, signum, frame):
        self.asked = signal.Signals(signum).name
        print(f"\n{self.asked}: stopping after this step with a checkpoint (again to stop at once)", flush=True)
        self.__exit__()

    def __exit__(self, *exc):  # also when a diverged run exits: the caller's handlers come back
        if self.enabled:
            for s, handler in self.previous.items():
                signal.signal(s, handler)

# -----------------------------------------------------------------------------
# The run


def setup(c):
    """Processes (DDP under torchrun), device, CPU threads, precision, seed -> (rank, world, autocast)."""
    c.device = pick_device(c.device)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if c.threads:
        torch.set_num_threads(c.threads)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if c.device.startswith("cuda") else "gloo")
        if c.device.startswith("cuda"):
            c.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(c.device)
    c.dtype, autocast = setup_precision(c.device, c.dtype)
    torch.manual_seed(c.seed)
    return rank, world, autocast


def open_data(c, plan, master, world):
    """The prepared folder (prepared now if needed, on rank 0) -> (meta with its "dir", tokenizer)."""
    data_dir, prepare_args = plan
    if master and prepare_args:
        print(f"preparing {prepare_args['source']} into {data_dir} (vocab {c.vocab_size or 'default'}, "
              f"budget {c.budget_words or 'all'} words)")
        corpus.prepare(**prepare_args)
    if world > 1:
        torch.distributed.barrier()
    meta = {**data.load_meta(data_dir), "dir": str(data_dir)}
    train_words = meta["splits"]["train"]["words"]
    if c.budget_words and train_words > c.budget_words:
        raise ValueError(f"{data_dir} holds {train_words:,} training words, over --budget_words={c.budget_words:,} "
                         "(the BabyLM track's budget); prepare it with prepare.py --budget_words")
    return meta, data.load_tokenizer(data_dir)


def print_start(run, c, m, resumed):
    """The banner: what is resumed, the model, the optimizer's groups in brief, the schedule, the threads."""
    if resumed:
        run.print(f"resuming {run.ckpt_path} at iter {run.it}, {format_words(run.words)} words seen")
    threads = f", {torch.get_num_threads()} CPU threads (--threads)" if c.device == "cpu" else ""
    run.print(f"model: {run.raw_model.num_params():,} non-embedding parameters, mixer={m.mixer}, "
              f"{m.n_layer} layers x {m.n_embd}, device {c.device} {c.dtype}{threads}, kernels {c.kernels}")
    run.print("optimizer: " + "; ".join(line for line in run.optimizer.summary.splitlines() if not line.startswith(" ")))
    run.print(f"schedule: {c.schedule} over {run.max_iters} iters, warmup {c.warmup_iters}, peak rates "
              + (f"Muon {c.learning_rate}, " if c.optimizer == "muon" else "") + f"AdamW {c.adam_lr}")


def print_end(run, c, started_at, t0, stop):
    if run.it < run.max_iters:
        run.print(f"stopped at iter {run.it} of {run.max_iters}; continue with --resume=True (checkpoint {run.ckpt_path})")
        if stop.asked:
            sys.exit(128 + getattr(signal, stop.asked))  # what a shell reports for a process the signal ended
        return
    run.print(f"done: {run.it - started_at} iters in this process ({run.it} in all) in {(time.time() - t0) / 60:.1f} "
              f"min; checkpoint {run.ckpt_path}")
    run.print("wrote", plot_runs([c.out_dir], os.path.join(c.out_dir, "loss.png")))
    if run.meta.get("source") == "synthetic":  # said last, where it does not scroll away
        run.print("note: the synthetic corpus is a teaching corpus. For real text use a BabyLM release "
                  "(https://babylm.github.io) or any folder of .txt files: python train.py --preset=cpu --data=PATH "
                  "on a CPU, --preset=strict_small --data=PATH on a GPU")


def main(argv):
    c, m = parse_config(argv)
    if c.plot:
        return plot_command(c, given_flags(argv))
    # --- setup: every path checked before any work, then the folder locked, the data prepared and opened
    master = int(os.environ.get("RANK", "0")) == 0
    plan = plan_data(c) if master else (None, None)
    pairs = load_eval_pairs(c)
    if master:
        check_out_dir(c)
    ckpt = checkpoint.load(os.path.join(c.out_dir, "ckpt.pt"), map_location="cpu") if c.resume else None
    rank, world, autocast = setup(c)
    if world > 1:
        box = [plan]
        torch.distributed.broadcast_object_list(box)
        plan = box[0]
    lock = open_run_folder(c) if master else None
    try:
        meta, enc = open_data(c, plan, master, world)
        if pairs is None and c.eval_pairs == "auto" and meta.get("source") == "synthetic":
            pairs = tasks.builtin_pairs()
        model_config = BLaLMConfig(**{**asdict(m), "vocab_size": meta["vocab_size"]})  # the vocabulary: the data's
        if ckpt is not None:
            check_resume(ckpt, os.path.join(c.out_dir, "ckpt.pt"), model_config, data.tokenizer_to_dict(enc), meta["dir"])
        run = Run(c, model_config, meta, enc, pairs, autocast, rank, world, ckpt)
        print_start(run, c, m, c.resume)
        run.start_log(c.resume)
        # --- the loop: evaluate and checkpoint every eval_interval, one step, a log line every log_interval
        started_at, t0 = run.it, time.time()
        since = (t0, run.it)
        with StopOnSignal(enabled=world == 1) as stop:
            run.raw_model.train()
            while True:
                stopping = run.it == run.max_iters or (c.stop_iter and run.it == c.stop_iter) or stop.asked is not None
                if master and (run.it % c.eval_interval == 0 or stopping) and not (c.resume and run.it == started_at):
                    if stop.asked:
                        print(f"{stop.asked}: a final evaluation ({c.eval_iters} batches"
                              f"{', minimal pairs' if pairs else ''}) and ckpt.pt, then exit", flush=True)
                    run.evaluate_and_save()
                    since = (time.time(), since[1])  # evaluation time does not count against tokens/s
                if stopping:
                    break
                words_before = run.words
                loss = run.train_step()
                if run.it % c.log_interval == 0 or run.it == run.max_iters:
                    run.log_train(loss, since)
                    since = (time.time(), run.it)
                if master and c.milestones:
                    run.save_milestones(words_before)
        # --- the end: say where the run stands
        print_end(run, c, started_at, t0, stop)
    finally:
        if lock is not None:
            lock.release()
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
