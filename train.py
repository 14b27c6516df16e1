"""
Train BLaLM (or the softmax baseline) under the BabyLM rules. One GPU by default, CPU works,
several GPUs with `torchrun --nproc_per_node=N train.py ...` (PyTorch DDP).

    python train.py                                  # small model on the built-in synthetic corpus
    python train.py --data=DIR                       # a prepared corpus (a raw one is prepared into data_prepared/)
    python train.py --preset=strict_small --data=DIR # the BabyLM STRICT-SMALL track: 10M words, <= 10 epochs
    python train.py --plot=RUN_DIR[,RUN_DIR...]      # loss against words seen for one or several runs
    python train.py --help
"""

import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict, fields

import torch

from blalm import BLaLM, BLaLMConfig

# -----------------------------------------------------------------------------
# Checkpoints: one file, written atomically, enough to rebuild model and tokenizer alone


def save_checkpoint(ckpt, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path, map_location="cpu"):
    """torch.load with errors that name the file and say what is wrong with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("model", "config", "tokenizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; expected a file written by train.py or hedgehog.py")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode on device, tiktoken tokenizer, the checkpoint dict)."""
    from data import tokenizer_from_dict
    ckpt = read_checkpoint(path)
    config = BLaLMConfig.from_dict(ckpt["config"])
    if config.mlstm_kernel == "triton" and not str(device).startswith("cuda"):
        # the kernel is a speed option, not part of the model: both kernels compute the same function
        print(f"note: {path} was trained with mlstm_kernel='triton' (CUDA only); using 'torch' on {device}")
        config.mlstm_kernel = "torch"
    model = BLaLM(config)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer_from_dict(ckpt["tokenizer"]), ckpt


# -----------------------------------------------------------------------------
# Config: everything a run needs, overridable with --key=value


@dataclass
class TrainConfig:
    # data
    data: str = ""                  # a prepared dir (has meta.json), a raw corpus to prepare, or "" = synthetic
    prepared_dir: str = ""          # where a raw corpus is prepared ("" = data_prepared/<name>)
    budget_words: int = 0           # word budget when preparing (0 = all the data; presets set the BabyLM track's)
    vocab_size: int = 0             # BPE vocabulary when preparing (0 = data.py's default: 16384, synthetic 1024)
    curriculum: bool = False        # order the training stream easy-to-hard by readability when preparing
    eval_pairs: str = "auto"        # minimal pairs: "auto" (built-in pairs for synthetic data), "none", "builtin", or a BLiMP/Zorro dir
    eval_max_pairs: int = 50        # pairs per paradigm scored at each evaluation
    # model (BLaLMConfig; vocab_size comes from the data)
    block_size: int = 128           # context length in tokens
    n_layer: int = 4                # residual blocks
    n_head: int = 4                 # heads (head size = n_embd / n_head)
    n_embd: int = 128               # width
    mixer: str = "mlstm"            # "mlstm" (BLaLM) | "attn" (softmax GPT-2 baseline) | "hedgehog" (linear attention)
    mlstm_form: str = "chunkwise"   # "chunkwise" | "parallel" | "recurrent" (all compute the same function)
    mlstm_kernel: str = "torch"     # chunkwise intra-chunk part: "torch" | "triton" (optional fused kernel, CUDA only)
    chunk_size: int = 64            # chunk length of the chunkwise forms
    short_conv: int = 4             # causal depthwise conv kernel on q, k, v (0 = off)
    swa_window: int = 64            # sliding-window attention branch (0 = off)
    modulation: bool = True         # dynamic modulation of the SWA branch (else averaged with the mLSTM)
    feature_map: str = "none"       # "none" | "hedgehog" on the mLSTM's q, k
    gate_softcap: float = 15.0      # gates -> cap * tanh(x / cap) (0 = off)
    bias: bool = False              # biases in Linear and LayerNorm (GPT-2 layout: True)
    dropout: float = 0.0
    # optimizer and schedule
    optimizer: str = "muon"         # "muon" (Muon for hidden matrices + AdamW for the rest) | "adamw"
    learning_rate: float = 0.02     # Muon's rate (AdamW's is adam_lr)
    adam_lr: float = 3e-3
    weight_decay: float = 0.0       # Muon's decoupled weight decay
    adam_weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # 0 = off
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
    resume: bool = False
    stop_iter: int = 0              # stop at this iteration with a checkpoint, to continue with --resume (0 = at the end)
    seed: int = 1337
    # system
    device: str = "auto"            # "auto" | "cuda" | "cpu" | "mps" | "cuda:1" ...
    dtype: str = "auto"             # "auto" (bfloat16 on CUDA, else float32) | "bfloat16" | "float32"
    compile: bool = False


PRESETS = {
    # a small model that finishes in a few minutes on 2 CPU cores (the default)
    "default": {},
    # the BabyLM tracks: a ~30M non-embedding parameter model, context 512, at most 10 epochs
    "strict_small": dict(budget_words=10_000_000, vocab_size=16384, block_size=512, n_layer=12, n_head=7,
                         n_embd=448, swa_window=128, batch_size=64, max_iters=0, max_epochs=10,
                         eval_interval=500, log_interval=50, warmup_iters=200, compile=True),
    "strict": dict(budget_words=100_000_000, vocab_size=16384, block_size=512, n_layer=12, n_head=7,
                   n_embd=448, swa_window=128, batch_size=64, max_iters=0, max_epochs=10,
                   eval_interval=2000, log_interval=100, warmup_iters=500, compile=True),
}
MODEL_KEYS = [f.name for f in fields(BLaLMConfig) if f.name != "vocab_size"]


def _parse_value(key, text, current):
    kind = type(current)
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--{key}={text}: expected True or False")
    try:
        if kind is int:  # 10_000_000 and 1e7 both mean ten million
            value = float(text.replace("_", ""))
            if value != int(value):
                raise ValueError
            return int(value)
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key}={text}: expected a value of type {kind.__name__}") from None


def parse_args(argv, config_cls=TrainConfig, presets=None, doc=""):
    """--key=value overrides of a config dataclass (a --preset=NAME first, when given). --help prints the
    doc and the dataclass with its defaults and comments. Unknown keys, malformed flags and values of the
    wrong type raise ValueError naming them. Every script of the project parses its flags with this."""
    valid = [f.name for f in fields(config_cls)]
    if any(a in ("-h", "--help") for a in argv):
        comments = {}  # the comment on each field's line of the dataclass source
        for line in inspect.getsource(config_cls).splitlines():
            name, _, rest = line.strip().partition(":")
            if name in valid and "#" in rest:
                comments[name] = rest.split("#", 1)[1].strip()
        print(doc.strip() + "\n\noptions (--key=value), with their defaults:")
        defaults = config_cls()
        for name in valid:
            flag = f"--{name}={getattr(defaults, name)}"
            print(f"  {flag:<34} {comments.get(name, '')}".rstrip())
        if presets:
            print(f"  --preset={'|'.join(presets):<25} named settings, applied before the other flags")
        sys.exit(0)
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"malformed argument {arg!r}: expected --key=value (see --help)")
        key, value = arg[2:].split("=", 1)
        if key not in valid and not (key == "preset" and presets is not None):
            raise ValueError(f"unknown option {arg!r}; valid options: {', '.join('--' + k for k in valid)}")
        pairs.append((key, value))
    config = config_cls()
    for key, value in pairs:
        if key == "preset":
            if value not in presets:
                raise ValueError(f"unknown preset {value!r}; choose one of {sorted(presets)}")
            for k, v in presets[value].items():
                setattr(config, k, v)
    for key, value in pairs:
        if key != "preset":
            setattr(config, key, _parse_value(key, value, getattr(config, key)))
    return config


def check_config(c):
    choices = {"optimizer": ("muon", "adamw"), "schedule": ("cosine", "wsd"), "dtype": ("auto", "bfloat16", "float32")}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise ValueError(f"--{key}={getattr(c, key)!r} is not one of {allowed}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        if getattr(c, key) < 1:
            raise ValueError(f"--{key}={getattr(c, key)} must be >= 1")
    if c.max_iters < 0 or c.max_epochs <= 0:
        raise ValueError(f"--max_iters={c.max_iters} must be >= 0 and --max_epochs={c.max_epochs} > 0")
    if not 0 <= c.decay_frac <= 1 or not 0 <= c.min_lr_ratio <= 1:
        raise ValueError(f"--decay_frac={c.decay_frac} and --min_lr_ratio={c.min_lr_ratio} must lie in [0, 1]")


# -----------------------------------------------------------------------------
# Pieces of the run


def lr_factor(it, c, max_iters):
    """Warmup, then cosine decay to min_lr_ratio, or warmup-stable-decay (linear over the last decay_frac)."""
    if it < c.warmup_iters:
        return (it + 1) / c.warmup_iters
    if c.schedule == "wsd":
        decay_start = max_iters * (1 - c.decay_frac)
        if it < decay_start:
            return 1.0
        return 1.0 - (1.0 - c.min_lr_ratio) * min(1.0, (it - decay_start) / max(1.0, max_iters - decay_start))
    progress = min(1.0, (it - c.warmup_iters) / max(1, max_iters - c.warmup_iters))
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def milestone_words(words_before, words_after):
    """BabyLM 2025 checkpoint milestones crossed in (words_before, words_after]: every 1M words up to 10M,
    every 10M up to 100M, then every 100M."""
    marks = [m * 1_000_000 for m in range(1, 10)] + [m * 10_000_000 for m in range(1, 10)]
    marks += [m * 100_000_000 for m in range(1, 1 + int(words_after // 100_000_000))]
    return [m for m in marks if words_before < m <= words_after]


def pick_device(device):
    """"auto" -> CUDA when available, else Apple's mps, else the CPU; any other name is kept."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def device_peak_flops(device):
    """Dense bfloat16 peak of the device (datasheet), for MFU; None when unknown (CPU, other GPUs)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def resolve_data(c):
    """-> a prepared data dir (meta.json, bins, tokenizer), preparing the corpus first when needed."""
    import data
    if c.data and os.path.isfile(os.path.join(c.data, "meta.json")):
        return c.data
    if not c.data:
        target = c.prepared_dir or os.path.join("data_prepared", "synthetic")
        source = "synthetic"
    else:
        if not os.path.exists(c.data):
            raise FileNotFoundError(f"--data={c.data} does not exist (expected a prepared dir with meta.json "
                                    "or a corpus folder to prepare)")
        target = c.prepared_dir or os.path.join("data_prepared", os.path.basename(os.path.normpath(c.data)))
        source = c.data
    if os.path.isfile(os.path.join(target, "meta.json")):
        return target
    print(f"preparing {source} into {target} (vocab {c.vocab_size}, budget {c.budget_words or 'all'} words)")
    data.prepare(source, target, budget_words=c.budget_words or None, vocab_size=c.vocab_size or None,
                 curriculum=c.curriculum, seed=0)
    if source == "synthetic":
        print("note: the synthetic corpus is a teaching corpus. For real data, download the BabyLM corpus "
              "(https://babylm.github.io) or use any folder of .txt files, then run: "
              "python train.py --data=PATH (or --preset=strict_small --data=PATH)")
    return target


def plot_runs(run_dirs, out_path):
    """Train and validation loss against words seen, one colour per run."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's (a notebook's) backend alone
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for k, run in enumerate(run_dirs):
        path = os.path.join(run, "log.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: --plot expects run directories written by train.py")
        rows = [json.loads(line) for line in open(path)]
        train = [(r["words"], r["loss"]) for r in rows if r["kind"] == "train"]
        val = [(r["words"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
        color = f"C{k % 10}"
        name = os.path.basename(os.path.normpath(run))
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.35, lw=1)
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=3, lw=1.5, label=f"{name} (val)")
    lows = [float(l.get_ydata()[1]) for l in ax.get_lines() if len(l.get_ydata()) > 2]
    if lows:  # zoom past the first evaluation (the loss at initialisation dwarfs the rest)
        ax.set_ylim(top=max(lows) + 0.2)
    ax.set_xlabel("words seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("train (faint) and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out_path)
    return out_path


# -----------------------------------------------------------------------------
# The run


def main(argv):
    plot = [a for a in argv if a.startswith("--plot=")]
    if plot:  # python train.py --plot=RUN_DIR[,RUN_DIR...]: figure only, no training
        runs = plot[0].split("=", 1)[1].split(",")
        print("wrote", plot_runs(runs, os.path.join(runs[0], "loss.png" if len(runs) == 1 else "compare.png")))
        return
    c = parse_args(argv, TrainConfig, PRESETS, __doc__)
    check_config(c)
    import data
    import eval as evaluate
    from muon import configure_optimizers

    # --- processes, device, precision
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    c.device = pick_device(c.device)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if c.device.startswith("cuda") else "gloo")
        if c.device.startswith("cuda"):
            c.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(c.device)
    device_type = "cuda" if c.device.startswith("cuda") else c.device.split(":")[0]
    if c.dtype == "auto":
        c.dtype = "bfloat16" if device_type == "cuda" else "float32"
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if c.dtype == "bfloat16"
                else torch.autocast(device_type, enabled=False))
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(c.seed)

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
    train_words, train_tokens = meta["splits"]["train"]["words"], meta["splits"]["train"]["tokens"]
    words_per_token = train_words / train_tokens
    if c.budget_words and train_words > c.budget_words:
        raise ValueError(f"{data_dir} holds {train_words:,} training words, over --budget_words={c.budget_words:,} "
                         "(the BabyLM track's budget); prepare it with data.py --budget_words")
    pairs = None
    if c.eval_pairs == "builtin" or (c.eval_pairs == "auto" and meta.get("source") == "synthetic"):
        pairs = evaluate.builtin_pairs()
    elif c.eval_pairs not in ("auto", "none"):
        pairs = evaluate.load_pairs(c.eval_pairs)

    # --- model, optimizer, state
    model_config = BLaLMConfig(vocab_size=meta["vocab_size"], **{k: getattr(c, k) for k in MODEL_KEYS})
    model = BLaLM(model_config).to(c.device)
    optimizer = configure_optimizers(model, c.optimizer, lr=c.learning_rate, adam_lr=c.adam_lr,
                                     weight_decay=c.weight_decay, adam_weight_decay=c.adam_weight_decay,
                                     betas=(c.beta1, c.beta2), verbose=master)
    curriculum = bool(meta.get("settings", {}).get("curriculum"))  # keep the easy-to-hard stream order
    batches = data.EpochBatches(train_data, c.batch_size, c.block_size, seed=c.seed, shuffle=not curriculum,
                                rank=rank, world_size=world)
    it, tokens_seen, best_val = 0, 0, float("inf")
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    if c.resume:
        ckpt = read_checkpoint(ckpt_path, map_location=c.device)
        if ckpt["config"] != model_config.to_dict():
            raise ValueError(f"--resume: {ckpt_path} was trained with model config {ckpt['config']}, "
                             f"not {model_config.to_dict()}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        batches.load_state_dict(ckpt["batches"])
        it, tokens_seen, best_val = ckpt["iter"], ckpt["tokens_seen"], ckpt["best_val_loss"]
        if master:
            print(f"resuming {ckpt_path} at iter {it}, {ckpt['words_seen']:,.0f} words seen")
    if master:
        print(f"model: {model.num_params():,} non-embedding parameters, mixer={c.mixer}, "
              f"{c.n_layer} layers x {c.n_embd}, device {c.device} {c.dtype}")
    raw_model = model
    if c.compile:
        model.compile_blocks()
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()]
                                                          if device_type == "cuda" else None)

    tokens_per_iter = c.batch_size * c.block_size * c.gradient_accumulation_steps * world
    epoch_cap_iters = int(c.max_epochs * batches.tokens_per_epoch // tokens_per_iter)
    max_iters = min(c.max_iters, epoch_cap_iters) if c.max_iters else epoch_cap_iters
    if master and c.max_iters > epoch_cap_iters:
        print(f"note: --max_iters={c.max_iters} would exceed --max_epochs={c.max_epochs}; stopping at {max_iters}")
    flops_per_iter = raw_model.flops_per_token(c.block_size) * tokens_per_iter
    peak = device_peak_flops(c.device)

    @torch.no_grad()
    def evaluate_now():  # rank 0 only, on the unwrapped model (DDP's forward would wait for the other ranks)
        model.eval()
        g = torch.Generator().manual_seed(1234)  # the same validation windows every time
        losses = []
        for _ in range(c.eval_iters):
            x, y = data.get_batch(val_data, c.batch_size, c.block_size, g, c.device)
            with autocast:
                losses.append(raw_model(x, y)[1].item())
        result = {"val_loss": sum(losses) / len(losses)}
        if pairs is not None:
            scores = evaluate.score_pairs(raw_model, enc, pairs, c.device, batch_size=64,
                                          max_pairs_per_paradigm=c.eval_max_pairs)
            result["pairs_macro"] = scores["macro_average"]
        model.train()
        return result

    def checkpoint(path):
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "config": model_config.to_dict(), "train_config": asdict(c), "iter": it,
                         "tokens_seen": tokens_seen, "words_seen": tokens_seen * words_per_token,
                         "best_val_loss": best_val, "batches": batches.state_dict(),
                         "tokenizer": data.tokenizer_to_dict(enc), "data_meta": meta}, path)

    os.makedirs(c.out_dir, exist_ok=True)
    log_path = os.path.join(c.out_dir, "log.jsonl")
    if master and not c.resume and os.path.exists(log_path):
        os.remove(log_path)

    def log(row):
        if master:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    # --- the training loop
    model.train()
    t0 = t_last = time.time()
    it_last, resumed_at = it, (it if c.resume else None)
    bad_iter = torch.full((), -1, device=c.device)  # first iter with a non-finite loss, checked without a sync per step

    def stop_if_nonfinite():
        if bad_iter.item() >= 0:
            print(f"stopping: the loss is not finite at iter {bad_iter.item()}; the last good checkpoint is {ckpt_path}")
            sys.exit(1)

    while True:
        words = tokens_seen * words_per_token
        stopping = it == max_iters or (c.stop_iter > 0 and it == c.stop_iter)
        if master and (it % c.eval_interval == 0 or stopping) and it != resumed_at:
            stop_if_nonfinite()
            result = evaluate_now()
            improved = result["val_loss"] < best_val
            best_val = min(best_val, result["val_loss"])
            extra = f", pairs {result['pairs_macro']:.2f}" if "pairs_macro" in result else ""
            print(f"eval iter {it}: val loss {result['val_loss']:.4f}{extra}, {words:,.0f} words")
            log({"kind": "eval", "iter": it, "words": words, **result})
            checkpoint(ckpt_path)
            if improved and c.keep_best:  # early stopping within the epoch cap: evaluate this one too
                checkpoint(os.path.join(c.out_dir, "ckpt_best.pt"))
            t_last = time.time()  # evaluation time does not count against tokens/s
        if stopping:
            break
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(it, c, max_iters)
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
            stop_if_nonfinite()
            lossf = loss.item() * c.gradient_accumulation_steps
            dt = time.time() - t_last
            tok_s = (it - it_last) * tokens_per_iter / dt
            mfu = f"{100 * flops_per_iter * (it - it_last) / dt / peak / world:.1f}%" if peak else "-"
            eta = (max_iters - it) * dt / max(1, it - it_last)
            new_words = tokens_seen * words_per_token
            if master:
                print(f"iter {it}/{max_iters}: loss {lossf:.4f}, lr {optimizer.param_groups[0]['lr']:.2e}, "
                      f"{tok_s:,.0f} tok/s, MFU {mfu}, {new_words:,.0f} words, epoch {batches.epoch}, "
                      f"ETA {eta / 60:.1f} min")
            log({"kind": "train", "iter": it, "words": new_words, "loss": lossf,
                 "lr": optimizer.param_groups[0]["lr"], "tok_s": tok_s, "epoch": batches.epoch})
            t_last, it_last = time.time(), it
        if master and c.milestones:
            for m in milestone_words(words, tokens_seen * words_per_token):
                stop_if_nonfinite()
                checkpoint(os.path.join(c.out_dir, f"ckpt_{m // 1_000_000}M_words.pt"))
    if master and it < max_iters:
        print(f"stopped at iter {it} of {max_iters}; continue with --resume=True (checkpoint {ckpt_path})")
    elif master:
        print(f"done: {it} iters in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}")
        print("wrote", plot_runs([c.out_dir], os.path.join(c.out_dir, "loss.png")))
    if ddp:
        torch.distributed.destroy_process_group()


def run_cli(main):
    """Run a script's main(argv): a user's mistake (a bad flag or value, a missing file) prints one line
    naming it and exits with status 2, instead of a traceback. Every script ends with this."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main)
