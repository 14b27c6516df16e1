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
from collections import defaultdict

import torch

from bench import model_pair
from blalm import BLaLM
from muon import configure_optimizers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--only", default="blalm triton,softmax", help="comma-separated model names of bench.model_pair")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_step.py profiles the GPU step: no CUDA device here")
    from torch.profiler import ProfilerActivity, profile
    models = model_pair(True, a.T)
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
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        ms, calls = defaultdict(float), defaultdict(int)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation:
                ms[e.name[:90]] += e.self_device_time_total / 1000
                calls[e.name[:90]] += 1
        total = sum(ms.values())
        print(f"\n{name}, T={a.T}, B={x.size(0)}: {total:.2f} ms of GPU time in one step, {sum(calls.values())} "
              f"kernels; the top {a.top}:")
        for k, v in sorted(ms.items(), key=lambda kv: -kv[1])[:a.top]:
            print(f"  {v:7.3f} ms {100 * v / total:5.1f}%  x{calls[k]:<4} {k}")
        del model, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
