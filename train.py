"""
Train BLaLM (or the softmax baseline) under the BabyLM rules. One GPU by default, CPU works,
several GPUs with `torchrun --nproc_per_node=N train.py ...` (PyTorch DDP).

    python train.py                                  # small model on the built-in synthetic corpus
    python train.py --preset=cpu --data=DIR          # a real corpus on a 2-4 core CPU in about 10 minutes
    python train.py --data=DIR                       # a prepared corpus (a raw one is prepared into data_prepared/)
    python train.py --preset=strict_small --data=DIR # the BabyLM STRICT-SMALL track: 10M words, <= 10 epochs
    python train.py --plot=RUN_DIR[,RUN_DIR...]      # loss and accuracy against words seen (--plot_out=FILE)
    python train.py --help

A run lives in out_dir: ckpt.pt (the latest), ckpt_best.pt (the lowest validation loss), ckpt_<N>M_words.pt
(the BabyLM milestones), log.jsonl, loss.png. A second run into a folder that holds a checkpoint is refused:
continue it with --resume=True, or start over with another --out_dir or --overwrite=True. On --resume the
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
from dataclasses import dataclass, asdict, fields

import torch

import corpus
import data
import eval as evaluate
from blalm import BLaLM, BLaLMConfig
from common import (device_peak_flops, format_words, given_flags, lr_factor, parse_args, pick_device,
                    read_checkpoint, run_cli, save_checkpoint, setup_precision)
from muon import configure_optimizers

# -----------------------------------------------------------------------------
# Config: the run's settings here, the model's in BLaLMConfig; both overridable with --key=value


@dataclass
class TrainConfig:
    # data
    data: str = ""                  # a prepared dir (has meta.json), a raw corpus to prepare, or "" = synthetic
    prepared_dir: str = ""          # where a raw corpus is prepared ("" = data_prepared/<name>)
    budget_words: int = 0           # word budget when preparing (0 = all the data; presets set the BabyLM track's)
    vocab_size: int = 0             # BPE vocabulary when preparing (0 = prepare.py's default: 16384, synthetic 1024)
    curriculum: bool = False        # order the training stream easy-to-hard by readability when preparing
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


PRESETS = {
    # a small model that finishes in a few minutes on 2 CPU cores (the default)
    "default": {},
    # real text on a 2-4 core CPU: about 10 minutes, a line every few seconds
    "cpu": dict(budget_words=2_000_000, vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=192,
                swa_window=32, batch_size=16, max_iters=550, eval_interval=110, eval_iters=20, log_interval=12,
                warmup_iters=50, schedule="wsd", min_lr_ratio=0.0, eval_max_pairs=100),
    # the BabyLM tracks: a ~30M non-embedding parameter model, context 512. STRICT-SMALL: the recipe of
    # results/study2 -- 4 epochs (where validation stopped falling), warmup-stable-decay annealed to 0 over the
    # last 30%, so the final checkpoint is the best one, and weight decay 0.1 on Muon's matrices
    "strict_small": dict(budget_words=10_000_000, vocab_size=16384, block_size=512, n_layer=12, n_head=7,
                         n_embd=448, swa_window=128, batch_size=64, max_iters=0, max_epochs=4, schedule="wsd",
                         decay_frac=0.3, min_lr_ratio=0.0, weight_decay=0.1, eval_interval=250, log_interval=50,
                         warmup_iters=200, compile=True),
    "strict": dict(budget_words=100_000_000, vocab_size=16384, block_size=512, n_layer=12, n_head=7,
                   n_embd=448, swa_window=128, batch_size=64, max_iters=0, max_epochs=10,
                   eval_interval=2000, log_interval=100, warmup_iters=500, compile=True),
}
MODEL_KEYS = [f.name for f in fields(BLaLMConfig) if f.name != "vocab_size"]  # vocab_size comes from the data


def parse_config(argv):
    """-> (TrainConfig, BLaLMConfig without its vocab size), checked."""
    c, m = parse_args(argv, (TrainConfig, BLaLMConfig), PRESETS, __doc__)  # --vocab_size is TrainConfig's
    m = BLaLMConfig(**{**asdict(m), "vocab_size": 1})  # re-run the model config's checks on the parsed values
    check_config(c, m, given_flags(argv))
    return c, m


def check_config(c, m, given=()):
    """Every setting checked before any work: a one-line error naming the flag and what it expects."""
    choices = {"optimizer": ("muon", "adamw"), "schedule": ("cosine", "wsd"), "dtype": ("auto", "bfloat16", "float32")}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise ValueError(f"--{key}={getattr(c, key)!r} is not one of {allowed}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                "eval_max_pairs"):
        if getattr(c, key) < 1:
            raise ValueError(f"--{key}={getattr(c, key)} must be >= 1")
    for key in ("max_iters", "warmup_iters", "stop_iter", "budget_words", "vocab_size", "grad_clip", "weight_decay",
                "adam_weight_decay", "seed"):
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
    if m.mlstm_kernel == "triton":
        if not dev.startswith("cuda"):
            raise ValueError(f"--mlstm_kernel=triton needs a CUDA device, not {dev!r} (use --mlstm_kernel=torch)")
        import importlib.util  # triton is optional: ask for it here, before any work
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--mlstm_kernel=triton needs the optional triton package (pip install triton)")


def milestone_words(words_before, words_after):
    """BabyLM 2025 checkpoint milestones crossed in (words_before, words_after]: every 1M words up to 10M,
    every 10M up to 100M, then every 100M."""
    marks = [m * 1_000_000 for m in range(1, 10)] + [m * 10_000_000 for m in range(1, 10)]
    marks += [m * 100_000_000 for m in range(1, 1 + int(words_after // 100_000_000))]
    return [m for m in marks if words_before < m <= words_after]

# -----------------------------------------------------------------------------
# The run folder: refuse to destroy a run, check it can be written, read its log back


def check_out_dir(c):
    """out_dir must be a writable folder (made if missing); one that holds a run needs --resume or --overwrite."""
    out = c.out_dir
    data.check_out_dir(out, "--out_dir")   # a file, under a file, or not writable
    ckpt = os.path.join(out, "ckpt.pt")
    if c.resume and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--resume=True but {ckpt} does not exist: nothing to continue "
                                f"(start a new run without --resume)")
    held = sorted(f for f in os.listdir(out) if f.startswith("ckpt") and f.endswith(".pt")) if os.path.isdir(out) else []
    if not c.resume and not c.overwrite and held:
        raise ValueError(f"--out_dir={out} already holds a run ({', '.join(held[:3])}): continue it with "
                         f"--resume=True, or start over with another --out_dir or --overwrite=True")
    os.makedirs(out, exist_ok=True)
    if c.overwrite:  # the earlier run's files go, so that no milestone of it passes for one of this run
        for name in os.listdir(out):
            if (name.startswith("ckpt") and name.endswith(".pt")) or name in ("log.jsonl", "loss.png"):
                os.remove(os.path.join(out, name))
    data.remove_stray_temps(out)


def read_log(path, up_to_iter=None):
    """The rows of a log.jsonl; a torn last line (a killed run) is dropped with a note, and with up_to_iter
    the rows past that iteration (written after the checkpoint a run resumes from) are dropped too."""
    rows, lines = [], open(path, encoding="utf-8").read().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                print(f"note: {path} line {n} is torn (a killed run); dropped it")
                continue
            raise ValueError(f"{path} line {n} is not valid JSON") from None
    if up_to_iter is not None:
        rows = [r for r in rows if r["iter"] <= up_to_iter]
    return rows


def resolve_data(c):
    """-> a prepared data dir (meta.json, bins, tokenizer), preparing the corpus first when needed. A folder
    prepared before is reused only when it was prepared from the same source with the same settings."""
    if c.data and os.path.isfile(os.path.join(c.data, "meta.json")):
        return c.data
    if not c.data:
        source, target = "synthetic", c.prepared_dir or os.path.join("data_prepared", "synthetic")
    else:
        if not os.path.exists(c.data):
            raise FileNotFoundError(f"--data={c.data} does not exist (expected a prepared dir with meta.json "
                                    "or a corpus folder to prepare)")
        source = c.data
        target = c.prepared_dir or corpus.default_out_dir(c.data)
    settings = dict(budget_words=c.budget_words or None, vocab_size=c.vocab_size or None, curriculum=c.curriculum)
    if corpus.check_prepared(target, source, **settings):
        return target
    print(f"preparing {source} into {target} (vocab {c.vocab_size or 'default'}, budget {c.budget_words or 'all'} words)")
    corpus.prepare(source, target, **settings)
    return target


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
    data.write_atomic(out_path, lambda f: fig.savefig(f, dpi=120, format="png"))
    return out_path

# -----------------------------------------------------------------------------
# The run


def main(argv):
    plot = [a for a in argv if a.startswith("--plot=")]
    if plot:  # python train.py --plot=RUN_DIR[,RUN_DIR...] [--plot_out=FILE]: figure only, no training
        rest = [a for a in argv if not a.startswith(("--plot=", "--plot_out="))]
        if rest:
            raise ValueError(f"--plot takes only --plot_out=FILE besides it, not {rest}")
        runs = plot[0].split("=", 1)[1].split(",")
        outs = [a.split("=", 1)[1] for a in argv if a.startswith("--plot_out=")]
        out = outs[0] if outs else os.path.join(runs[0], "loss.png" if len(runs) == 1 else "compare.png")
        print("wrote", plot_runs(runs, out))
        return
    c, m = parse_config(argv)

    # --- processes, device, precision
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    c.device = pick_device(c.device)
    if master:
        check_out_dir(c)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if c.device.startswith("cuda") else "gloo")
        if c.device.startswith("cuda"):
            c.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(c.device)
    c.dtype, autocast = setup_precision(c.device, c.dtype)
    torch.manual_seed(c.seed)
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    ckpt = read_checkpoint(ckpt_path, map_location=c.device) if c.resume else None

    # --- data
    if master:
        data_dir = resolve_data(c)
    if ddp:
        box = [data_dir if master else None]
        torch.distributed.broadcast_object_list(box)
        data_dir = box[0]
    meta = data.load_meta(data_dir)
    enc = data.load_tokenizer(data_dir)
    train_data, val_data = data.open_bin(data_dir, "train"), data.open_bin(data_dir, "val")
    train_words = meta["splits"]["train"]["words"]
    words_per_token = data.words_per_token(meta)
    if c.budget_words and train_words > c.budget_words:
        raise ValueError(f"{data_dir} holds {train_words:,} training words, over --budget_words={c.budget_words:,} "
                         "(the BabyLM track's budget); prepare it with prepare.py --budget_words")
    pairs = None
    if c.eval_pairs == "builtin" or (c.eval_pairs == "auto" and meta.get("source") == "synthetic"):
        pairs = evaluate.builtin_pairs()
    elif c.eval_pairs not in ("auto", "none"):
        pairs = evaluate.load_pairs(c.eval_pairs)

    # --- model, optimizer, state
    model_config = BLaLMConfig(**{**asdict(m), "vocab_size": meta["vocab_size"]})
    if ckpt is not None and ckpt["config"] != model_config.to_dict():
        diff = {k: (ckpt["config"].get(k), v) for k, v in model_config.to_dict().items() if ckpt["config"].get(k) != v}
        raise ValueError(f"--resume: {ckpt_path} has another model; differing settings (checkpoint, now): {diff}")
    model = BLaLM(model_config).to(c.device)
    optimizer = configure_optimizers(model, c.optimizer, lr=c.learning_rate, adam_lr=c.adam_lr,
                                     weight_decay=c.weight_decay, adam_weight_decay=c.adam_weight_decay,
                                     betas=(c.beta1, c.beta2), verbose=master)
    curriculum = bool(meta.get("settings", {}).get("curriculum"))  # keep the easy-to-hard stream order
    batches = data.EpochBatches(train_data, c.batch_size, m.block_size, seed=c.seed, shuffle=not curriculum,
                                rank=rank, world_size=world)
    it, tokens_seen, best_val = 0, 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, now in zip(optimizer.param_groups, settings):  # the command line's rates, decay and betas
            group.update(now)
        batches.load_state_dict(ckpt["batches"])
        it, tokens_seen, best_val = ckpt["iter"], ckpt["tokens_seen"], ckpt["best_val_loss"]
        if "rng" in ckpt:  # dropout and sampling continue exactly where they were
            torch.set_rng_state(ckpt["rng"]["cpu"].cpu())   # read_checkpoint mapped it to c.device
            if ckpt["rng"].get("cuda") is not None and c.device.startswith("cuda"):
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), torch.device(c.device))
        if master:
            print(f"resuming {ckpt_path} at iter {it}, {format_words(ckpt['words_seen'])} words seen")
    if master:
        print(f"model: {model.num_params():,} non-embedding parameters, mixer={m.mixer}, "
              f"{m.n_layer} layers x {m.n_embd}, device {c.device} {c.dtype}")
    raw_model = model
    if c.compile:
        model.compile_blocks()
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()]
                                                          if c.device.startswith("cuda") else None)

    tokens_per_iter = c.batch_size * m.block_size * c.gradient_accumulation_steps * world
    epoch_cap_iters = int(c.max_epochs * batches.tokens_per_epoch // tokens_per_iter)
    max_iters = min(c.max_iters, epoch_cap_iters) if c.max_iters else epoch_cap_iters
    if master and c.max_iters > epoch_cap_iters:
        print(f"note: --max_iters={c.max_iters} would exceed --max_epochs={c.max_epochs}; stopping at {max_iters}")
    flops_per_iter = raw_model.flops_per_token(m.block_size) * tokens_per_iter
    peak = device_peak_flops(c.device)
    schedule = dict(warmup_iters=c.warmup_iters, schedule=c.schedule, decay_frac=c.decay_frac,
                    min_lr_ratio=c.min_lr_ratio)
    if master:
        print(f"schedule: {c.schedule} over {max_iters} iters, warmup {c.warmup_iters}, peak rates "
              + (f"Muon {c.learning_rate}, " if c.optimizer == "muon" else "") + f"AdamW {c.adam_lr}")

    @torch.no_grad()
    def evaluate_now():  # rank 0 only, on the unwrapped model (DDP's forward would wait for the other ranks)
        model.eval()
        g = torch.Generator().manual_seed(1234)  # the same validation windows every time
        losses = []
        for _ in range(c.eval_iters):
            x, y = data.get_batch(val_data, c.batch_size, m.block_size, g, c.device)
            with autocast:
                losses.append(raw_model(x, y)[1].item())
        result = {"val_loss": sum(losses) / len(losses)}
        if pairs is not None:
            with autocast:
                scores = evaluate.score_pairs(raw_model, enc, pairs, c.device, batch_size=64,
                                              max_pairs_per_paradigm=c.eval_max_pairs)
            result["pairs_macro"] = scores["macro_average"]
        model.train()
        return result

    def weights_finite():  # one device sync, not one per parameter
        return bool(torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all())

    def checkpoint(path):
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "config": model_config.to_dict(), "train_config": asdict(c), "iter": it,
                         "tokens_seen": tokens_seen, "words_seen": tokens_seen * words_per_token,
                         "best_val_loss": best_val, "batches": batches.state_dict(),
                         "rng": {"cpu": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state(torch.device(c.device))
                                 if c.device.startswith("cuda") else None},
                         "tokenizer": data.tokenizer_to_dict(enc), "data_meta": meta}, path)

    log_path = os.path.join(c.out_dir, "log.jsonl")
    if master:  # a resumed log continues from the checkpoint's iteration; a new run starts a new log
        rows = read_log(log_path, up_to_iter=it) if c.resume and os.path.exists(log_path) else []
        data.write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in rows))
    last_good = ckpt_path if c.resume else None

    def log(row):
        if master:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def stop_diverged(when):
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        print(f"stopping: the loss or the weights are not finite ({when}); {where}")
        sys.exit(1)

    # --- the training loop: SIGINT/SIGTERM ask it to stop at the next step with a checkpoint
    interrupted = []
    catch = not ddp and threading.current_thread() is threading.main_thread()  # DDP ranks would have to agree
    if catch:
        def ask_to_stop(signum, frame):
            interrupted.append(signal.Signals(signum).name)
            print(f"\n{interrupted[0]}: stopping after this step with a checkpoint (again to stop at once)", flush=True)
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, previous[s])
        previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    model.train()
    t0 = t_last = time.time()
    it_last, resumed_at = it, (it if c.resume else None)
    bad_iter = torch.full((), -1, device=c.device)  # first iter with a non-finite loss, checked without a sync per step

    def check_finite():
        if bad_iter.item() >= 0:
            stop_diverged(f"training loss at iter {bad_iter.item()}")

    try:
        while True:
            words = tokens_seen * words_per_token
            stopping = it == max_iters or (c.stop_iter > 0 and it == c.stop_iter) or bool(interrupted)
            if master and (it % c.eval_interval == 0 or stopping) and it != resumed_at:
                check_finite()
                result = evaluate_now()
                if not math.isfinite(result["val_loss"]) or not weights_finite():
                    stop_diverged(f"val loss {result['val_loss']} at iter {it}")
                improved = result["val_loss"] < best_val
                best_val = min(best_val, result["val_loss"])
                extra = f", pairs {result['pairs_macro']:.2f}" if "pairs_macro" in result else ""
                print(f"eval iter {it}: val loss {result['val_loss']:.4f}{extra}, {format_words(words)} words")
                log({"kind": "eval", "iter": it, "words": words, **result})
                if improved and c.keep_best:  # written first: ckpt.pt's best_val_loss never names a missing file
                    checkpoint(os.path.join(c.out_dir, "ckpt_best.pt"))
                checkpoint(ckpt_path)
                last_good = ckpt_path
                t_last = time.time()  # evaluation time does not count against tokens/s
            if stopping:
                break
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(it, max_iters, **schedule)
            for micro in range(c.gradient_accumulation_steps):
                x, y = batches.next_batch(c.device)
                sync = micro == c.gradient_accumulation_steps - 1
                if ddp:
                    model.require_backward_grad_sync = sync
                with autocast:
                    loss = model(x, y)[1] / c.gradient_accumulation_steps
                loss.backward()
                bad_iter = torch.where((bad_iter < 0) & ~torch.isfinite(loss.detach()), it + 1, bad_iter)
            if c.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            tokens_seen += tokens_per_iter
            if it % c.log_interval == 0 or it == max_iters:
                check_finite()
                lossf = loss.item() * c.gradient_accumulation_steps
                dt = time.time() - t_last
                tok_s = (it - it_last) * tokens_per_iter / dt
                mfu = f"{100 * flops_per_iter * (it - it_last) / dt / peak / world:.1f}%" if peak else "-"
                eta = (max_iters - it) * dt / max(1, it - it_last)
                new_words = tokens_seen * words_per_token
                if master:
                    print(f"iter {it}/{max_iters}: loss {lossf:.4f}, lr {optimizer.param_groups[0]['lr']:.2e}, "
                          f"{tok_s:,.0f} tok/s, MFU {mfu}, {format_words(new_words)} words, epoch {batches.epoch}, "
                          f"ETA {eta / 60:.1f} min", flush=True)
                log({"kind": "train", "iter": it, "words": new_words, "loss": lossf,
                     "lr": optimizer.param_groups[0]["lr"], "tok_s": tok_s, "epoch": batches.epoch})
                t_last, it_last = time.time(), it
            if master and c.milestones:
                for mark in milestone_words(words, tokens_seen * words_per_token):
                    check_finite()
                    if not weights_finite():
                        stop_diverged(f"weights at iter {it}")
                    checkpoint(os.path.join(c.out_dir, f"ckpt_{mark // 1_000_000}M_words.pt"))
    finally:  # also when a diverged run exits: the caller's handlers come back
        if catch:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, previous[s])
    if master and it < max_iters:
        print(f"stopped at iter {it} of {max_iters}; continue with --resume=True (checkpoint {ckpt_path})")
        if interrupted:
            sys.exit(128 + getattr(signal, interrupted[0]))  # what a shell reports for a process the signal ended
    elif master:
        print(f"done: {it} iters in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}")
        print("wrote", plot_runs([c.out_dir], os.path.join(c.out_dir, "loss.png")))
        if meta.get("source") == "synthetic":  # said last, where it does not scroll away
            print("note: the synthetic corpus is a teaching corpus. For real text use a BabyLM release "
                  "(https://babylm.github.io) or any folder of .txt files: python train.py --preset=cpu --data=PATH "
                  "on a CPU, --preset=strict_small --data=PATH on a GPU")
    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
