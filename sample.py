"""
Generate text from a checkpoint: the prompt is read once, then each new token is decoded from the
model's recurrent state (model.generate); the samples are the rows of one batch.

    python sample.py --ckpt=out/ckpt.pt --start="Once upon a time" --num_samples=3
    python sample.py --ckpt=out/ckpt.pt --start=FILE:prompt.txt    # the prompt from a file
    python sample.py --help

An empty --start prompts with the end-of-text token alone: a sample from scratch.
"""

from dataclasses import dataclass

import torch

from common import load_checkpoint, parse_args, pick_device, run_cli


@dataclass
class SampleConfig:
    ckpt: str = ""            # checkpoint written by train.py (required)
    start: str = ""           # the prompt, or FILE:path to read it from a file; "" = end-of-text
    num_samples: int = 3
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50           # keep the top_k most likely tokens (0 = all)
    seed: int = 1337
    device: str = "auto"      # "auto" = cuda when present, else cpu


def main(argv):
    cfg = parse_args(argv, SampleConfig, doc=__doc__)
    if not cfg.ckpt:
        raise ValueError("--ckpt=PATH is required (a checkpoint written by train.py)")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1 or cfg.temperature < 0 or cfg.top_k < 0:
        raise ValueError(f"expected num_samples >= 1 (got {cfg.num_samples}), max_new_tokens >= 1 "
                         f"(got {cfg.max_new_tokens}), temperature >= 0 (got {cfg.temperature}), top_k >= 0 "
                         f"(got {cfg.top_k})")
    device = pick_device(cfg.device)
    model, enc, _ = load_checkpoint(cfg.ckpt, device)
    start = cfg.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    prompt = enc.encode_ordinary(start) if start else [enc.eot_token]
    n = len(prompt) + cfg.max_new_tokens
    if model.learned_pos and n > model.config.block_size:  # "attn"/"hedgehog" have block_size positions
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {n} is longer "
                         f"than block_size={model.config.block_size} of this mixer={model.config.mixer!r} model")
    torch.manual_seed(cfg.seed)
    x = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)  # all samples in one batch
    y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
    for row in y.tolist():
        print(enc.decode(row[0 if start else 1:]))
        print("-" * 40)


if __name__ == "__main__":
    run_cli(main)
