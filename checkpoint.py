"""
The checkpoint format, owned here and nowhere else: one file written by `torch.save` of a plain dict, read
back with `torch.load(weights_only=True)`, so that a checkpoint from someone else can never run code.

    save(ckpt, path)                    atomically; the required keys checked first
    load(path)                          -> the dict; a folder means its ckpt.pt; errors name the file
    load_model(path, device)            -> (model, tokenizer, dict): what eval.py, sample.py, export.py need
    model_from_checkpoint(ckpt, ...)    the BLaLM of a loaded dict
    milestone_name(words) / milestones(run)   the BabyLM milestone files ckpt_<N>M_words.pt

What a checkpoint holds (train.py writes all of it; convert.py has no optimizer, batches or rng):
model (state dict), config (BLaLMConfig as a plain dict), tokenizer (data.tokenizer_to_dict), iter,
tokens_seen, words_seen; train.py adds optimizer, batches, rng, best_val_loss, train_config, data_meta.
Only tensors, dicts, lists, tuples, strings, numbers, booleans and None: what weights_only=True loads.
Run settings (kernels, the mLSTM's form, chunk size) are not in it: a checkpoint loads with any of them.
"""

import os
import re
from pathlib import Path

import torch

from blalm import BLaLM, BLaLMConfig
from common import write_atomic
from data import tokenizer_from_dict

REQUIRED = ("model", "config", "tokenizer")  # what rebuilds the model and its tokenizer alone
MILESTONE = re.compile(r"ckpt_(\d+)M_words\.pt")


def milestone_name(words):
    """The file of the BabyLM milestone at `words` words (a multiple of a million): ckpt_<N>M_words.pt."""
    return f"ckpt_{words // 1_000_000}M_words.pt"


def milestones(run):
    """-> [(N, path)] of a run folder's ckpt_<N>M_words.pt, sorted by N."""
    return sorted((int(m.group(1)), p) for p in Path(run).iterdir() if (m := MILESTONE.fullmatch(p.name)))


def check_keys(ckpt, path):
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; expected a file written by train.py or convert.py")


def save(ckpt, path):
    """torch.save, atomically: a crash never leaves half a file, a full disk says so with the path."""
    check_keys(ckpt, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        write_atomic(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:
        raise OSError(28 if "space" in str(e).lower() or "iostream" in str(e) else getattr(e, "errno", None) or 5,
                      f"cannot write checkpoint {path}: {getattr(e, 'strerror', None) or e} "
                      "(is the disk full or the folder read-only?)") from None


def resolve_path(path):
    """A checkpoint file, or a run folder (its ckpt.pt)."""
    if os.path.isdir(path):
        inside = os.path.join(path, "ckpt.pt")
        if not os.path.isfile(inside):
            raise FileNotFoundError(f"{path} is a folder without ckpt.pt; expected a checkpoint file or a run folder")
        return inside
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load(path, map_location="cpu"):
    """The checkpoint dict of a file (or a run folder's ckpt.pt), loaded without running any code in it: a
    file that holds other objects than tensors and plain data is refused with a one-line error. The model
    config is normalised (keys of run settings that older checkpoints saved are dropped)."""
    path = resolve_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        text = str(e)
        if "Unsupported global" in text:  # a pickled object: torch's allow-list refused it before running it
            name = re.search(r"GLOBAL (\S+)", text)
            raise ValueError(f"checkpoint {path} holds objects other than tensors and plain data "
                             f"({name[1] if name else 'a Python object'}); refusing to load it, since that could "
                             "run code") from None
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: "
                         f"{(detail[0] if detail else '')[:200]})") from None
    check_keys(ckpt, path)
    if not isinstance(ckpt["config"], dict):
        raise ValueError(f"checkpoint {path}: its config is a {type(ckpt['config']).__name__}, expected a plain dict")
    ckpt["config"] = BLaLMConfig.from_dict(ckpt["config"]).to_dict()
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint", device="cpu"):
    """The BLaLM of a checkpoint dict, weights loaded, on device, in eval mode, with the default run
    settings (the PyTorch kernels, the chunkwise form): set others with model.set_kernels."""
    model = BLaLM(BLaLMConfig.from_dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        bad = [line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing" in line
               or "Unexpected" in line]
        raise ValueError(f"checkpoint {path}: its weights do not fit its config ({'; '.join(bad)[:400]})") from None
    return model.to(device).eval()


def load_model(path, device="cpu"):
    """-> (model in eval mode on device, tiktoken tokenizer, the checkpoint dict). path: a file or a run folder."""
    path = resolve_path(path)
    ckpt = load(path)
    return model_from_checkpoint(ckpt, path, device), tokenizer_from_dict(ckpt["tokenizer"]), ckpt
