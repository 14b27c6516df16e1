"""
What every script shares, and nothing else: `--key=value` flags with `--help`, the one-line error exit,
device and precision setup, the GPU's peak FLOPs (for MFU), the learning-rate schedule, atomic file
writes, and checkpoint save/load. The layer above the model and the data, below the scripts:

    math (hedgehog, muon, mlstm_triton)  <-  blalm, data  <-  common  <-  train, eval, sample, bench, convert, export
"""

import difflib
import inspect
import json
import math
import os
import sys
from dataclasses import fields

import torch

from blalm import BLaLM, BLaLMConfig
from data import tokenizer_from_dict, write_atomic

# -----------------------------------------------------------------------------
# Command lines: --key=value overrides of a config dataclass


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
            if not math.isfinite(value) or value != int(value):
                raise ValueError
            return int(value)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(f"--{key}={text}: expected a finite number")
            return value
        return kind(text)
    except ValueError as e:
        if str(e).startswith("--"):
            raise
        raise ValueError(f"--{key}={text}: expected a value of type {kind.__name__}") from None


def field_comments(config_cls):
    """The comment on each field's line of the dataclass source: the help text of --help."""
    valid = {f.name for f in fields(config_cls)}
    comments = {}
    for line in inspect.getsource(config_cls).splitlines():
        name, _, rest = line.strip().partition(":")
        if name in valid and "#" in rest:
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def _flag_fields(classes, skip):
    """[(class index, field name)] of every flag, in order; a name appears once (the first class has it)."""
    seen, out = set(skip), []
    for n, cls in enumerate(classes):
        for f in fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                out.append((n, f.name))
    return out


def print_help(classes, doc, presets=None, skip=()):
    print(doc.strip() + "\n\noptions (--key=value), with their defaults:")
    defaults = [cls() for cls in classes]
    comments = [field_comments(cls) for cls in classes]
    for n, name in _flag_fields(classes, skip):
        flag = f"--{name}={getattr(defaults[n], name)}"
        print(f"  {flag:<34} {comments[n].get(name, '')}".rstrip())
    if presets:
        print(f"  --preset={'|'.join(presets):<25} named settings, applied before the other flags")


def parse_args(argv, config_cls, presets=None, doc="", skip=()):
    """--key=value overrides of a config dataclass, or of a tuple of them (each flag goes to the first class
    that has the field; names in skip are not flags) -> an instance, or a tuple of instances. A --preset=NAME
    is applied first. --help prints the doc and every field with its default and comment. Unknown keys (with
    the closest valid name), malformed flags and values of the wrong type raise ValueError naming them."""
    classes = config_cls if isinstance(config_cls, tuple) else (config_cls,)
    flag_fields = _flag_fields(classes, skip)
    owner = {name: n for n, name in flag_fields}
    valid = [name for _, name in flag_fields]
    if any(a in ("-h", "--help") for a in argv):
        print_help(classes, doc, presets, skip)
        sys.exit(0)
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"malformed argument {arg!r}: expected --key=value (see --help)")
        key, value = arg[2:].split("=", 1)
        if key not in owner and not (key == "preset" and presets is not None):
            close = difflib.get_close_matches(key, valid + (["preset"] if presets else []), n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise ValueError(f"unknown option {arg!r}; {hint}valid options: {', '.join('--' + k for k in valid)}")
        pairs.append((key, value))
    configs = [cls() for cls in classes]
    for key, value in pairs:
        if key == "preset":
            if value not in presets:
                raise ValueError(f"unknown preset {value!r}; choose one of {sorted(presets)}")
            for k, v in presets[value].items():
                setattr(configs[owner[k]], k, v)
    for key, value in pairs:
        if key != "preset":
            setattr(configs[owner[key]], key, _parse_value(key, value, getattr(configs[owner[key]], key)))
    return tuple(configs) if isinstance(config_cls, tuple) else configs[0]


def given_flags(argv):
    """The keys set on the command line (a preset's keys not included)."""
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and "=" in a}


def run_cli(main):
    """Run a script's main(argv): a user's mistake (a bad flag or value, a missing file, a full disk)
    prints one line naming it and exits with status 2, instead of a traceback. Every script ends with this."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk or another file-system failure: name the file when Python knows it
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)

def format_words(n):
    """12,345 -> "12.3k", 39,210,923 -> "39.2M": words seen, as a reader wants them."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"

# -----------------------------------------------------------------------------
# Device and precision


def pick_device(device):
    """"auto" -> CUDA when available, else Apple's mps, else the CPU. An explicit name is checked now,
    not at the first forward: "cuda" without CUDA, or a name torch does not know, is a ValueError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device={device!r} is not a device name (expected auto, cpu, cuda, cuda:N or mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={device!r} but CUDA is not available on this machine (use --device=cpu)")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise ValueError(f"--device={device!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device={device!r} but Apple's mps is not available on this machine")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device={device!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def setup_precision(device, dtype="auto"):
    """-> (dtype name, autocast context): "auto" is bfloat16 on CUDA, else float32; TF32 on for CUDA."""
    device_type = torch.device(device).type
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype={dtype!r} is not one of ('auto', 'bfloat16', 'float32')")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    return dtype, autocast


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def device_peak_flops(device):
    """Dense bfloat16 peak of the device (datasheet), for MFU; None when unknown (CPU, other GPUs)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)

# -----------------------------------------------------------------------------
# The learning-rate schedule (train.py, convert.py)


def lr_factor(it, max_iters, warmup_iters=0, schedule="cosine", decay_frac=0.2, min_lr_ratio=0.1):
    """Multiplier of the peak rate at step it: linear warmup, then cosine decay to min_lr_ratio, or
    warmup-stable-decay ("wsd": constant, then linear to min_lr_ratio over the last decay_frac of the run)."""
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if schedule == "wsd":
        decay_start = max_iters * (1 - decay_frac)
        if it < decay_start:
            return 1.0
        return 1.0 - (1.0 - min_lr_ratio) * min(1.0, (it - decay_start) / max(1.0, max_iters - decay_start))
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

# -----------------------------------------------------------------------------
# Files and checkpoints


def write_json(obj, path):
    """JSON to path, atomically (a reader never sees half a file)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def check_writable(path, what="--json"):
    """Fail now, not after a long job, when path cannot be written (its folder is missing, is a file, or is
    read-only; or path is a folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what}={path} is a folder; expected a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{what}={path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what}={path}: folder {folder} is not writable")


def save_checkpoint(ckpt, path):
    """torch.save, atomically: a crash never leaves half a file, a full disk says so with the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        write_atomic(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:
        raise OSError(28 if "space" in str(e).lower() or "iostream" in str(e) else getattr(e, "errno", None) or 5,
                      f"cannot write checkpoint {path}: {getattr(e, 'strerror', None) or e} "
                      "(is the disk full or the folder read-only?)") from None


def resolve_checkpoint_path(path):
    """A checkpoint file, or a run folder (its ckpt.pt)."""
    if os.path.isdir(path):
        inside = os.path.join(path, "ckpt.pt")
        if not os.path.isfile(inside):
            raise FileNotFoundError(f"{path} is a folder without ckpt.pt; expected a checkpoint file or a run folder")
        return inside
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def read_checkpoint(path, map_location="cpu"):
    """torch.load with errors that name the file and say what is wrong with it."""
    path = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("model", "config", "tokenizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; expected a file written by train.py or convert.py")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint", device="cpu"):
    """The BLaLM of a checkpoint dict, weights loaded, on device, in eval mode."""
    config = BLaLMConfig.from_dict(ckpt["config"])
    if config.mlstm_kernel == "triton" and torch.device(device).type != "cuda":
        # the kernel is a speed option, not part of the model: both kernels compute the same function
        print(f"note: {path} was trained with mlstm_kernel='triton' (CUDA only); using 'torch' on {device}")
        config.mlstm_kernel = "torch"
    model = BLaLM(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        bad = [line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing" in line
               or "Unexpected" in line]
        raise ValueError(f"checkpoint {path}: its weights do not fit its config ({'; '.join(bad)[:400]})") from None
    return model.to(device).eval()


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode on device, tiktoken tokenizer, the checkpoint dict). path: a file or a run folder."""
    path = resolve_checkpoint_path(path)
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, path, device), tokenizer_from_dict(ckpt["tokenizer"]), ckpt
