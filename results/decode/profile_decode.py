"""
Where a decoding step's time goes: one token through the strict_small models (bench.py's model_pair: BLaLM and
the softmax baseline), bfloat16, the blocks compiled for decoding (model.compile_decode) and the step, sampling
included, captured as one CUDA graph -- bench.py --suite=decode's "compiled" row -- replayed under the profiler.
Per model: the step's wall time, the number of kernels one step runs, their summed GPU time (the rest of the
wall time is the GPU idle between kernels), and the kernels that take the most.

    python -m results.decode.profile_decode [--context=256] [--batch=1] [--steps=20] [--top=20]     (a GPU)
    python -m results.decode.profile_decode --device=cpu     # a few seconds: the same path, CPU ops, no graph

It is what the issue's batch-1 target (BLaLM's step no slower than softmax's) is measured against: a step that is
launch-bound shows many short kernels and a wall time well above their sum.
"""

import argparse
import sys

import torch

from bench import decode_steps, kernel_times, model_pair, timed
from blalm import BLaLM, BLaLMConfig
from results.kernels.profile_step import print_top


def profile_model(name, cfg, kernels, a, gpu):
    torch.compiler.reset()
    torch.manual_seed(0)
    model = BLaLM(cfg).set_kernels(kernels).to(a.device).eval()
    if gpu:
        model = model.to(torch.bfloat16)
    model.compile_decode()
    with torch.no_grad():
        # room for the timed steps (and timed's warm-up), then the profiled ones
        steps, static = decode_steps(model, cfg, a.context, a.batch, 2 * a.steps + 8, a.device, gpu, ("compiled",))
        step = steps["compiled"][0]
        static.pos.fill_(a.context)
        wall_ms = timed(step, a.steps, a.device)[0]   # its warm-up step compiles (on a CPU; CUDA: at the capture)
        static.pos.fill_(a.context)
        times = kernel_times(lambda: [step() for _ in range(a.steps)], a.device)
    n = sum(k for _, k in times.values()) / a.steps
    busy = sum(ms for ms, _ in times.values()) / a.steps
    what = "kernels" if gpu else "CPU ops (no graph on a CPU: the eager step)"
    print(f"\n{name}, context {a.context}, batch {a.batch}: {wall_ms:.3f} ms a step (wall, median of {a.steps}); "
          f"{n:.0f} {what} a step, {busy:.3f} ms of their time"
          + (f" ({100 * busy / wall_ms:.0f}% of the wall time)" if gpu else "") + f"; the top {a.top}:")
    print_top(times, a.top, per=a.steps)
    return dict(model=name, wall_ms=wall_ms, kernels=n, busy_ms=busy)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="steps timed and profiled (each model)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--only", default="blalm,softmax", help="comma-separated model names of bench.model_pair")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--window", type=int, default=BLaLMConfig.swa_window,
                    help="BLaLM's SWA window (default: BLaLMConfig's, the committed logs' window; the "
                         "strict_small preset's is 128)")
    a = ap.parse_args(argv)
    for key in ("context", "batch", "steps", "top", "window"):
        if getattr(a, key) < 1:
            sys.exit(f"error: --{key}={getattr(a, key)} must be >= 1")
    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("error: --device=cuda, but there is no CUDA device here (--device=cpu runs the CPU path)")
    models = model_pair(gpu, a.context + 2 * a.steps + 16, a.window)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    for n in names:
        if n not in models:
            sys.exit(f"error: --only: {n!r} is not one of {sorted(models)} (\"blalm triton\": the fused decoding "
                     "step, where triton is installed)")
    rows = [profile_model(n, *models[n], a, gpu) for n in names]
    if len(rows) > 1:
        base = rows[-1]
        for r in rows[:-1]:
            print(f"\n{r['model']} / {base['model']}: wall {r['wall_ms'] / base['wall_ms']:.2f}x, kernels "
                  f"{r['kernels'] / base['kernels']:.2f}x, kernel time {r['busy_ms'] / base['busy_ms']:.2f}x")


if __name__ == "__main__":
    main()
