"""
Issue 18's numerics target: the fused Triton chunkwise mLSTM (mlstm_triton.py) in bfloat16 against float64, beside
the PyTorch chunkwise form in bfloat16 -- outputs and the gradients of q, k, v, i, f, relative error (Frobenius).

The reference is the PyTorch chunkwise form in float64 on the same bfloat16-rounded inputs (it equals the parallel
form to 1e-10, test_all.py), so the errors are the kernels' own, not the inputs' rounding. Two input sets: the
kernels bench's (bench.mlstm_bench_inputs: gates around 0) and gates uniform in [-8, 8] (the README's Notes).
Each kernel also runs with the state products at "tf32x3" (float32 accuracy) to show what TF32 costs.

    python -m results.kernels.numerics [--T=2048] [--B=4] [--json=FILE]     (a GPU with triton)
"""

import argparse
import json
import os
import sys

import torch

from bench import mlstm_bench_inputs
from blalm import mlstm_chunkwise
import mlstm_triton

NAMES = ("h", "dq", "dk", "dv", "di", "df")


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def outputs_and_grads(fn, leaves, dh):
    h = fn(*leaves)
    return [h, *torch.autograd.grad(h, leaves, dh)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("numerics.py measures the GPU kernels: no CUDA device here")
    dev, NH, D = "cuda", 12, 64
    q, k, v, i, f = (x.detach() for x in mlstm_bench_inputs(a.B, NH, a.T, D, torch.bfloat16, dev))
    g = torch.Generator(device=dev).manual_seed(2)
    wide = [(8 * (2 * torch.rand(a.B, NH, a.T, generator=g, device=dev) - 1)).to(torch.bfloat16) for _ in range(2)]
    dh = torch.randn(a.B, NH, a.T, D, generator=g, device=dev).to(torch.bfloat16)
    rows = []
    for gates, (ii, ff) in (("bench", (i, f)), ("[-8, 8]", wide)):
        inputs = (q, k, v, ii, ff)
        ref = outputs_and_grads(lambda *x: mlstm_chunkwise(*x), [x.double().requires_grad_() for x in inputs],
                                dh.double())
        for name, kernel, state_precision in (("torch bf16", "torch", None), ("triton bf16", "triton", "tf32"),
                                              ("triton bf16, tf32x3 states", "triton", "tf32x3")):
            if state_precision:
                mlstm_triton.STATE_PRECISION = state_precision
            got = outputs_and_grads(lambda *x: mlstm_chunkwise(*x, kernel=kernel),
                                    [x.clone().requires_grad_() for x in inputs], dh)
            row = dict(gates=gates, kernel=name, **{n: rel_err(x, r) for n, x, r in zip(NAMES, got, ref)})
            rows.append(row)
            print(f"{gates:8} {name:28}" + "".join(f" {n} {row[n]:.2e}" for n in NAMES), flush=True)
    mlstm_triton.STATE_PRECISION = "tf32"
    if a.json:
        with open(a.json + ".tmp", "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), T=a.T, B=a.B, NH=NH, D=D, rows=rows), fh, indent=1)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
