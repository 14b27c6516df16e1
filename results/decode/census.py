"""
How many kernels inductor makes of one compiled decode step, counted in the code it generates: fused kernels it
wrote and the library calls (matrix products, attention) between them. A CPU proxy for what a CUDA graph of the
step launches: inductor's CPU and GPU back ends split a graph at the same library calls, though not always into
the same number of fused kernels, so a change that removes a library call shows here without a GPU; its time
needs the GPU (profile_decode.py).

    python -m results.decode.census [--layers=2] [--context=32]     # the strict_small width, a few seconds

The blocks are compiled one by one (model.compile_decode), and every block of the same shape reuses one graph, so
the counts are per block; the embedding, the last norm, the lm_head and sampling run outside them.
"""

import argparse
import re
import sys
from collections import Counter

import torch
from torch._inductor.utils import run_and_get_code

from bench import decode_steps
from blalm import BLaLM, BLaLMConfig


def census(code):
    """-> (fused kernel calls, Counter of library calls) in one generated module's code."""
    fused = re.findall(r"^\s+(?:cpp_fused_\w+\(|triton_\w+\.run\()", code, re.M)   # call sites: CPU, CUDA
    library = re.findall(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)\(", code)   # aten's, blalm's operators
    return len(fused), Counter(library)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="blocks of the strict_small width (7 heads x 64)")
    ap.add_argument("--context", type=int, default=32, help="prompt tokens before the counted step")
    ap.add_argument("--kernels", default="torch", choices=("torch", "triton"),
                    help="triton: the fused decoding step (on a CPU only under TRITON_INTERPRET=1)")
    a = ap.parse_args(argv)
    if a.layers < 1 or a.context < 1:
        sys.exit(f"census.py: --layers={a.layers}, --context={a.context}: both must be >= 1")
    cfg = BLaLMConfig(block_size=a.context + 8, n_layer=a.layers, n_head=7, n_embd=448, vocab_size=16384)
    torch.manual_seed(0)
    model = BLaLM(cfg).set_kernels(a.kernels).eval().compile_decode()
    with torch.no_grad():
        steps, _ = decode_steps(model, cfg, a.context, 1, 8, "cpu", False, ("compiled",))
        _, codes = run_and_get_code(steps["compiled"][0])     # the first step compiles: its code is captured
    for n, code in enumerate(codes):
        fused, library = census(code)
        calls = ", ".join(f"{name} x{k}" for name, k in library.most_common())
        print(f"graph {n}: {fused} fused kernels, {sum(library.values())} library calls ({calls or 'none'})")


if __name__ == "__main__":
    main()
