"""
Generate text from a checkpoint: the prompts are read once, then each new token is decoded from the
model's recurrent state (model.generate: on CUDA one captured CUDA graph per token); the samples are the rows
of one batch. On a CPU a progress line goes to stderr every few seconds; the time it took, and tokens per
second, go to stderr at the end.

    python sample.py --ckpt=out/ckpt.pt --start="Once upon a time" --num_samples=3
    python sample.py --ckpt=out/ckpt.pt --start=FILE:prompt.txt    # the prompt from a file
    python sample.py --ckpt=out/ckpt.pt --start=LINES:prompts.txt  # one prompt per line, num_samples each
    python sample.py --help

An empty --start (or an empty line of a LINES: file) prompts with the end-of-text token alone: a sample from
scratch. Prompts of different lengths decode in one batch; each sample is its prompt and max_new_tokens more.
"""

import sys
import time
from dataclasses import dataclass

import torch

from blalm import MLSTM_KERNELS
from checkpoint import load_model
from common import parse_args, pick_device, run_cli


@dataclass
class SampleConfig:
    ckpt: str = ""            # checkpoint written by train.py (required)
    start: str = ""           # the prompt; FILE:path reads it from a file, LINES:path one per line; "" = end-of-text
    num_samples: int = 3      # samples per prompt
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50           # keep the top_k most likely tokens (0 = all)
    stop_at_eot: bool = False # end a sample at the end-of-text token
    seed: int = 1337
    device: str = "auto"      # "auto" = cuda when present, else cpu
    dtype: str = "auto"       # "auto" (bfloat16 on CUDA, else float32) | "bfloat16" | "float32": the weights' dtype
    compile: bool = False     # torch.compile the decode step (CUDA): seconds to compile, then ~2.5x faster per token
    kernels: str = "torch"    # "torch" | "triton" (CUDA, triton installed): the prompt's chunkwise mLSTM and each
                              # decoding step's mLSTM layers as fused Triton kernels (the same function)


PROGRESS_EVERY_S = 5.0  # seconds between progress lines on a CPU


class DecodeProgress:
    """A line on stderr every few seconds while a CPU decodes (on a GPU it takes seconds): steps done, rate, ETA."""

    def __init__(self, t0):
        self.t0 = self.last = t0

    def __call__(self, n, total):
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            rate = n / (now - self.t0)
            print(f"  decoding: step {n}/{total}, {rate:.1f} steps/s, ETA {(total - n) / rate:.0f} s",
                  file=sys.stderr, flush=True)
            self.last = now


def main(argv):
    cfg = parse_args(argv, SampleConfig, doc=__doc__)
    if not cfg.ckpt:
        raise ValueError("--ckpt=PATH is required (a checkpoint written by train.py)")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1 or cfg.temperature < 0 or cfg.top_k < 0:
        raise ValueError(f"expected num_samples >= 1 (got {cfg.num_samples}), max_new_tokens >= 1 "
                         f"(got {cfg.max_new_tokens}), temperature >= 0 (got {cfg.temperature}), top_k >= 0 "
                         f"(got {cfg.top_k})")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype={cfg.dtype!r} is not one of ('auto', 'bfloat16', 'float32')")
    if cfg.kernels not in MLSTM_KERNELS:
        raise ValueError(f"--kernels={cfg.kernels!r} is not one of {MLSTM_KERNELS}")
    device = pick_device(cfg.device)
    if cfg.kernels == "triton" and not device.startswith("cuda"):
        raise ValueError(f"--kernels=triton runs Triton kernels on the GPU: it needs --device=cuda, not {device}")
    model, enc, _ = load_model(cfg.ckpt, device)
    model.set_kernels(cfg.kernels, model.form, model.chunk_size)   # a ValueError for a model without an mLSTM
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.startswith("cuda")):
        model = model.to(torch.bfloat16)
    if cfg.compile:
        if not device.startswith("cuda"):
            raise ValueError(f"--compile=True compiles the CUDA-graphed decode step: it needs --device=cuda, not {device}")
        model.compile_decode()
    start = cfg.start
    if start.startswith(("FILE:", "LINES:")):
        kind, path = start.split(":", 1)
        with open(path, encoding="utf-8") as f:
            start = f.read()
        texts = start.splitlines() if kind == "LINES" else [start]
        if not texts:
            raise ValueError(f"--start={cfg.start}: the file holds no prompt (no line)")
    else:
        texts = [start]
    samples = [t for t in texts for _ in range(cfg.num_samples)]                 # one row of the batch each
    prompts = [enc.encode_ordinary(t) if t else [enc.eot_token] for t in samples]
    longest = max(len(p) for p in prompts)
    n = longest + cfg.max_new_tokens
    if model.learned_pos and n > model.config.block_size:  # "attn"/"hedgehog" have block_size positions
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {n} is longer "
                         f"than block_size={model.config.block_size} of this mixer={model.config.mixer!r} model")
    torch.manual_seed(cfg.seed)
    x = torch.tensor([p + [enc.eot_token] * (longest - len(p)) for p in prompts], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                       lengths=[len(p) for p in prompts], eot=enc.eot_token if cfg.stop_at_eot else None,
                       progress=None if device.startswith("cuda") else DecodeProgress(t0)).tolist()
    seconds = time.perf_counter() - t0   # .tolist() waited for the device
    for text, prompt, row in zip(samples, prompts, y):
        new = row[len(prompt):len(prompt) + cfg.max_new_tokens]
        if cfg.stop_at_eot and enc.eot_token in new:
            new = new[:new.index(enc.eot_token)]
        print(enc.decode((prompt if text else []) + new))
        print("-" * 40)
    n_new = len(prompts) * cfg.max_new_tokens
    print(f"{len(prompts)} samples x {cfg.max_new_tokens} tokens in {seconds:.2f} s (prompts read, {device} "
          f"{next(model.parameters()).dtype}): {n_new / seconds:.0f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
