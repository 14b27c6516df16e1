"""
The ground floor: what every other file may use, importing no project file. `--key=value` flags with
`--help`, the one-line error exit, device and precision setup, the GPU's peak FLOPs (for MFU), the
learning-rate schedule, the one atomic file writer, the one "can this be written?" check, the run folder's lock.

    common (torch only)                                           plumbing, the ground floor
      <- hedgehog, muon, mlstm_triton, conv_triton                math (torch only)
      <- blalm, decode, data, synthetic, corpus                   model and data
      <- checkpoint                                               the checkpoint format
      <- train, eval, sample, bench, convert, export, prepare     scripts
"""

import difflib
import gzip
import inspect
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import zlib
from dataclasses import fields
from pathlib import Path

import torch

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
# Reading text files: UTF-8 (gzip by suffix), JSON Lines; errors name the file and line


def read_text(path):
    """A UTF-8 text file, gzip-compressed when it ends in .gz -> str. Invalid UTF-8 names file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a valid gzip file ({e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not valid UTF-8 (byte {raw[e.start]:#04x})") from None


def jsonl_records(path, torn_last_ok=False):
    """(line number, value) for each line of a JSON Lines file; a line that is not JSON names file and line.
    torn_last_ok: a last line that is not JSON (what a killed writer leaves) is dropped with a note instead."""
    lines = read_text(path).split("\n")  # not splitlines(): JSON strings may hold U+2028 and friends
    if lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            if torn_last_ok and n == len(lines):
                print(f"note: {path} line {n} is torn (a killed run); dropped it")
                return
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None

# -----------------------------------------------------------------------------
# Files: the one atomic writer, the one "can this be written?" check, the run folder's lock

# A temporary file or folder is named .<target>.tmp-<host>-<pid>-<random>, so that a later run can remove
# what a killed process left (remove_stray_temps) and never touch a live one's.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMP = re.compile(r"\.(.+)\.tmp-([0-9a-f]{8})-(\d+)-[^/]*")


def temp_prefix(name):
    return f".{name}.tmp-{_HOST}-{os.getpid()}-"


def pid_alive(pid):
    if os.name != "posix":  # on Windows os.kill(pid, 0) is no liveness test: count everything as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stray_temps(folder, target=None):
    """Delete the temporary files and folders in `folder` (of write_atomic and prepare; those for `target`
    only, when given) whose process has died -> their paths. Only this host's: a pid means nothing on another
    machine sharing the disk. Older temp names without a pid are left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no such folder, or not a folder: nothing to clean
        return removed
    for e in entries:
        m = _TEMP.fullmatch(e.name)
        if not m or m[2] != _HOST or (target is not None and m[1] != target) or pid_alive(int(m[3])):
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            Path(e.path).unlink(missing_ok=True)
        removed.append(e.path)
    return removed


def write_atomic(path, data):
    """Write bytes, text, or what data(f) writes to a binary file f, to a temp file next to `path`, then
    rename it into place: a reader never sees half a file, a crash leaves the old one (and a temp file
    that the next write of `path` removes). The one atomic writer of the project."""
    path = Path(path)
    remove_stray_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name))
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj, path):
    """JSON to path, atomically (a reader never sees half a file)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def check_writable(path, flag, folder=False, make_parents=False):
    """Fail now, not after a long job, when `path` (a file, or with folder=True a folder) cannot be written:
    it is a folder where a file is expected or the reverse, lies under a file, or its folder is read-only
    (probed by writing, since os.access cannot see an immutable folder, or a read-only one when run as root).
    With make_parents the missing folders above path are made (path itself never is); without, a missing folder
    above a file is an error, while for a folder the nearest existing one above it is probed (the caller makes
    the rest later, once every check has passed)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag}={path} is a file; expected a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{flag}={path} is a folder; expected a file name")
    parent = path.absolute().parent
    blocker = next((p for p in path.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{flag}={path} lies under {blocker}, which is a file ({blocker.name} is a file, not a folder)")
    if not parent.is_dir() and make_parents:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{flag}={path}: cannot create {parent} ({e.strerror})") from None
    elif not parent.is_dir() and not folder:
        raise ValueError(f"{flag}={path}: folder {parent} does not exist")
    nearest = next(p for p in [parent, *parent.parents] if p.is_dir())
    for where in [nearest] + ([path] if folder and path.is_dir() else []):
        try:
            fd, probe = tempfile.mkstemp(dir=where, prefix=temp_prefix("probe"))
        except OSError as e:
            raise ValueError(f"{flag}={path}: cannot write in {where} ({e.strerror})") from None
        os.close(fd)
        os.unlink(probe)
    return path


class FolderLock:
    """An exclusive lock on a run folder: the file LOCK holds the owner's host and pid, created with O_EXCL
    (atomic on local and NFS v3+ file systems). A second process gets a one-line error naming the owner; a lock
    left by a dead process of this host is taken over with a note. A context manager; release() removes it."""

    def __init__(self, folder):
        self.path = Path(folder) / "LOCK"
        self.held = False

    def acquire(self):
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):  # the second try after removing a dead owner's lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text(errors="replace").split()
                host, pid = (owner + ["?", "0"])[:2] if owner else ("?", "0")
                if host != socket.gethostname() or not pid.isdigit() or pid_alive(int(pid)):
                    raise ValueError(f"{self.path.parent} is in use by another process ({host} pid {pid}, "
                                     f"{self.path}); wait for it, or remove {self.path} if that process is gone") from None
                print(f"note: {self.path} was left by a process that died (pid {pid}); taking it over")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return self
        raise ValueError(f"could not lock {self.path.parent}: another process took {self.path} at the same time")

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
