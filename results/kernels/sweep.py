"""
Where the fused Triton chunkwise mLSTM (mlstm_triton.py) spends its time, and how its launch shapes change that:
a profile of one forward + backward (GPU time per kernel) and a sweep over warps, state-kernel tiling and chunk
size, each row timed like bench.py (median of --repeat runs, CUDA events), bfloat16, 12 heads x 64.

    python -m results.kernels.sweep [--T=2048] [--tokens=65536] [--repeat=20] [--json=FILE]     (a GPU with triton)

The sweep is for choosing mlstm_triton's defaults (NUM_WARPS, MIN_STATE_PROGRAMS); bench.py --suite=kernels
is where the kernels are compared with their peers.
"""

import argparse
import itertools
import json
import os
import sys
from collections import defaultdict

import torch

from bench import mlstm_bench_inputs, timed
import mlstm_triton


def profile(step):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ms = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation:
            ms[e.name[:60]] += e.self_device_time_total / 1000
    return dict(sorted(ms.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=65536, help="B * T")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the profile and the rows here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("sweep.py times the GPU kernels: no CUDA device here")
    B, NH, D = max(1, a.tokens // a.T), 12, 64
    q, k, v, i, f = mlstm_bench_inputs(B, NH, a.T, D, torch.bfloat16, "cuda")
    dh = torch.randn_like(v)
    default = (dict(mlstm_triton.NUM_WARPS), mlstm_triton.MIN_STATE_PROGRAMS)

    def step(L=64):
        h = mlstm_triton.mlstm_chunkwise_triton(q, k, v, i, f, chunk_size=L)
        torch.autograd.backward(h, dh)

    prof = profile(step)
    print(f"profile, T={a.T}, B={B}: GPU ms per kernel, one forward + backward ({sum(prof.values()):.3f} ms in all)")
    for name, ms in prof.items():
        print(f"  {ms:8.3f}  {name}")
    rows = []
    # the warps of the three big kernels around the default (L 64, warps 4 / 8 / 4, 264 programs), then the state
    # kernels' tiling and the chunk size, one at a time
    shapes = [(64, fw, bw, sw, 264) for fw, bw, sw in itertools.product((4, 8), (4, 8), (2, 4))]
    shapes += [(64, 4, 8, 4, 132), (64, 4, 8, 4, 528), (128, 4, 8, 4, 264), (32, 4, 8, 4, 264)]
    for L, fwd_w, bwd_w, states_w, min_prog in shapes:
        mlstm_triton.NUM_WARPS.update(fwd_out=fwd_w, bwd_qkv=bwd_w, states=states_w)
        mlstm_triton.MIN_STATE_PROGRAMS = min_prog
        try:
            ms = timed(lambda: step(L), a.repeat, "cuda")[0]
            note = ""
        except Exception as e:  # a launch shape that does not fit (registers, shared memory) is a result
            ms, note = None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        rows.append(dict(L=L, fwd_out_warps=fwd_w, bwd_qkv_warps=bwd_w, states_warps=states_w,
                         min_state_programs=min_prog, ms=ms, note=note))
        print(f"L={L:3} warps fwd {fwd_w} bwd {bwd_w} states {states_w}, >= {min_prog:3} state programs: "
              + (f"{ms:.3f} ms" if ms is not None else note), flush=True)
    mlstm_triton.NUM_WARPS.update(default[0])
    mlstm_triton.MIN_STATE_PROGRAMS = default[1]
    if a.json:
        with open(a.json + ".tmp", "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), T=a.T, B=B, profile=prof, rows=rows), fh, indent=1)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
