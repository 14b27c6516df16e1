"""
Where the training step's GPU time goes: one compiled forward + backward + Muon step of the strict_small models
(bench.py's model_pair: BLaLM, BLaLM with the Triton kernels, the softmax baseline), bfloat16 autocast, the
profiler's GPU time per kernel, the largest first, summed over the step.

    python -m results.kernels.profile_step [--T=512] [--top=25] [--only=blalm triton,softmax]     (a GPU)

It is what the issue's training-step target is measured against in bench.py --suite=train: this shows which
kernels stand between BLaLM and the softmax baseline.
"""

import argparse
import sys

import torch

from bench import kernel_times, model_pair
from blalm import BLaLM, BLaLMConfig
from muon import configure_optimizers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--only", default="blalm triton,softmax", help="comma-separated model names of bench.model_pair")
    ap.add_argument("--window", type=int, default=BLaLMConfig.swa_window,
                    help="BLaLM's SWA window (default: BLaLMConfig's, the committed logs' window; the "
                         "strict_small preset's is 128)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_step.py profiles the GPU step: no CUDA device here")
    if a.window < 1:
        sys.exit(f"--window={a.window}: expected a window of at least 1 token")
    models = model_pair(True, a.T, a.window)
    for name in a.only.split(","):
        if name not in models:
            sys.exit(f"--only: {name!r} is not one of {sorted(models)}")
    for name in a.only.split(","):
        torch.compiler.reset()
        torch.manual_seed(0)
        cfg, kernels = models[name]
        model = BLaLM(cfg).set_kernels(kernels).to("cuda").compile_blocks()
        opt = configure_optimizers(model, "muon", verbose=False)
        x = torch.randint(0, cfg.vocab_size, (max(1, 32768 // a.T), a.T), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, x)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(3):  # compile and warm up
            step()
        torch.cuda.synchronize()
        times = kernel_times(step)
        total = sum(ms for ms, _ in times.values())
        print(f"\n{name}, T={a.T}, B={x.size(0)}: {total:.2f} ms of GPU time in one step, "
              f"{sum(n for _, n in times.values())} kernels; the top {a.top}:")
        print_top(times, a.top)
        del model, opt
        torch.cuda.empty_cache()


def print_top(times, top, per=1):
    """The `top` kernels of kernel_times' {name: [ms, launches]}, the largest first: time and launches per `per`
    calls, and share of the total."""
    total = sum(ms for ms, _ in times.values())
    for k, (ms, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms / per:7.4f} ms {100 * ms / total:5.1f}%  x{n / per:<5.0f} {k}")


if __name__ == "__main__":
    main()
