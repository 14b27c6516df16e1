"""
Compile the decoding kernels of mlstm_triton.py for an NVIDIA GPU on a machine without one, and report what ptxas
says of each (registers, spills, stack), the way a session without device time can check that a kernel change
compiles and fits before the next GPU call. The Triton interpreter runs the tests on the CPU but accepts code that
real Triton rejects; this is the other half. Needs triton (its NVIDIA back end carries ptxas), not a GPU.

    python -m results.kernels.compile_check                     # the shapes the strict_small model decodes with
    python -m results.kernels.compile_check --arch=90 --window=256

Each line: a kernel, its specialisation, and ptxas's verdict; a compile error is printed and the exit status is 1.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import mlstm_triton as mt

PTR = {"bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}


def _ptxas(arch):
    """The ptxas Triton itself uses for arch (its NVIDIA back end ships one for the PTX version it writes)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(arch).path
        except TypeError:   # older Triton: no arch argument
            return get_ptxas().path
    except (ImportError, AttributeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(kernel, types, constexprs, num_warps, arch, tmp):
    """-> (ok, what ptxas reports or the error) for one specialisation of a triton.jit kernel."""
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except Exception as e:   # a compile error is the finding: report it, go on with the next
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    ptx = os.path.join(tmp, "k.ptx")
    with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
    ptxas = _ptxas(arch)
    r = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", ptx, "-o",
                        os.devnull], capture_output=True, text=True)
    info = [line.split(":", 1)[-1].strip() for line in r.stderr.splitlines() if "registers" in line or "spill" in line]
    return r.returncode == 0, " | ".join(info) or r.stderr.strip()[:300]


def layer_case(dtype, D, K, S, n_head, conv=True, swa=True, modulation=True, cap=True):
    """The arguments of mlstm_triton._layer_step as mlstm_layer_step_triton passes them (types, constexprs, warps)."""
    types = {name: "i32" for name in mt._layer_step.arg_names}
    types.update({name: PTR[dtype] for name in ("QKV", "O", "I", "Fg", "MOD", "RING", "CW", "CB", "KR", "VR",
                                                 "NW", "Y")})
    types.update(C="*fp32", N="*fp32", M="*fp32", POS="*i64", cap="fp32", eps="fp32", base="fp32", sqrt_d="fp32")
    sizes, warps = mt._layer_step_sizes(D, K, S)
    constexprs = dict(sizes, HAS_CONV=conv, HAS_SWA=swa, MODULATION=modulation, HAS_CAP=cap)
    return mt._layer_step, types, constexprs, warps


def step_case(dtype, state_dtype, DQK, DV):
    types = {name: "i32" for name in mt._step.arg_names}
    types.update(Q=PTR[dtype], K=PTR[dtype], V=PTR[dtype], H=PTR[dtype], I="*fp32", Fg="*fp32", C=PTR[state_dtype],
                 N=PTR[state_dtype], M=PTR[state_dtype], eps="fp32")
    return mt._step, types, dict(DQK=DQK, DV=DV), mt._step_warps(DQK, DV)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--window", type=int, default=128, help="the SWA window (ring slots) of the layer step")
    ap.add_argument("--head", type=int, default=64, help="head size D")
    a = ap.parse_args(argv)
    if a.window < 1 or a.head < 16 or a.head & (a.head - 1):
        sys.exit(f"error: --window={a.window} must be >= 1 and --head={a.head} a power of two >= 16")
    cases = {
        f"layer bf16, D={a.head}, K=4, window {a.window}": layer_case("bf16", a.head, 4, a.window, 7),
        f"layer fp32, D={a.head}, K=4, window {a.window}": layer_case("fp32", a.head, 4, a.window, 7),
        "layer bf16, no modulation, no soft cap": layer_case("bf16", a.head, 4, a.window, 7, modulation=False,
                                                               cap=False),
        "layer bf16, no SWA branch": layer_case("bf16", a.head, 4, 0, 7, swa=False),
        "layer bf16, no conv, no SWA": layer_case("bf16", a.head, 0, 0, 7, conv=False, swa=False),
        f"step bf16 inputs, fp32 state, {a.head} x {a.head}": step_case("bf16", "fp32", a.head, a.head),
        "step fp64, 32 x 16 (the tests')": step_case("fp64", "fp64", 32, 16),
    }
    print(f"triton {triton.__version__}, sm_{a.arch}")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kernel, types, constexprs, warps) in cases.items():
            ok, info = compile_one(kernel, types, constexprs, warps, a.arch, tmp)
            failed += not ok
            print(f"  {name}, {warps} warps: {'ok' if ok else 'FAILED'}: {info}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
