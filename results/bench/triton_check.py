"""GPU check of the optional Triton intra-chunk kernel (mlstm_triton.py). Its output on an H200 is
triton_check_h200.log, run before the torch path kept its scores and state products in float32 (which
is why the torch rows of (a) err up to 0.3 in bfloat16 there). Run:

    python3 results/bench/triton_check.py            # (a) accuracy + (b) timing, ~2-3 minutes of GPU time
    python3 results/bench/triton_check.py --model    # also one BLaLM training step, torch vs triton kernel

(a) mlstm_chunkwise(kernel="triton") and kernel="torch" against mlstm_parallel in float64, bf16 and float32
    inputs, outputs and gradients (max rel error over h, dq, dk, dv, di, df), plus a sweep of chunk and head
    sizes (each one a fresh Triton compile: this is where the GPU compiler could reject a configuration)
(b) fwd+bwd median ms and peak memory at B*T = 65536, 12 heads x 64, bf16, T in 512..32768
Every case is wrapped in try/except, so one failure prints and the rest still run.
"""

import functools
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import torch
import torch.nn.functional as F

from blalm import _intra_chunk_torch, mlstm_chunkwise, mlstm_parallel
from bench import timed as bench_timed

DEV = "cuda"
assert torch.cuda.is_available(), "needs a GPU"
import triton
from mlstm_triton import intra_chunk

for attr in ("cache_size_limit", "recompile_limit"):  # 4 lengths x several compiled functions
    if hasattr(torch._dynamo.config, attr):
        setattr(torch._dynamo.config, attr, 64)
torch.backends.cuda.matmul.allow_tf32 = False  # float32 references stay float32 (the kernel uses ieee for f32)
print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_inputs(B, NH, T, DQK, DV, dtype, gate_range, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(B, NH, T, D, generator=g, device=DEV) for D in (DQK, DQK, DV))
    i, f = (gate_range * (2 * torch.rand(B, NH, T, generator=g, device=DEV) - 1) for _ in range(2))
    return [x.to(dtype).requires_grad_() for x in (q, k, v, i, f)]


def outs_and_grads(fn, xs):
    h = fn(*xs)
    probe = torch.sin(torch.arange(h.numel(), device=DEV, dtype=torch.float64)).view_as(h).to(h.dtype)
    return [h] + list(torch.autograd.grad((h * probe).sum(), xs))


def case(label, fn):
    try:
        fn()
    except Exception as e:
        print(f"{label}: FAILED {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        traceback.print_exc(limit=3)
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# (a) accuracy
print("\n## (a) max rel error vs mlstm_parallel float64 (h, dq, dk, dv, di, df)")
print("case | dtype | L | DQK | DV | gates | kernel | max rel err | per output")


def accuracy(dtype, L, DQK, DV, gate_range, B=2, NH=3, T=1000):
    xs = make_inputs(B, NH, T, DQK, DV, dtype, gate_range, seed=L + DQK + DV)
    ref = outs_and_grads(mlstm_parallel, [x.detach().double().requires_grad_() for x in xs])
    for kern in ("torch", "triton"):
        got = outs_and_grads(lambda *a: mlstm_chunkwise(*a, chunk_size=L, kernel=kern), xs)
        errs = [rel(a, b) for a, b in zip(got, ref)]
        ok = all(torch.isfinite(x).all().item() for x in got)
        print(f"acc | {str(dtype)[6:]} | {L} | {DQK} | {DV} | +-{gate_range:g} | {kern} | {max(errs):.2e} | "
              + " ".join(f"{e:.1e}" for e in errs) + ("" if ok else " NON-FINITE"))


for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for gate_range in (8.0, 50.0):
        case(f"acc {dtype} {gate_range}", lambda: accuracy(dtype, 64, 64, 64, gate_range))
# sizes: every (L, DQK, DV) is a separate compile of both kernels
for L, DQK, DV in [(16, 64, 64), (32, 64, 64), (128, 64, 64), (64, 16, 16), (64, 128, 128), (64, 256, 256),
                   (64, 128, 32), (128, 256, 256), (16, 256, 16)]:
    case(f"acc L={L} {DQK}x{DV}", lambda: accuracy(torch.bfloat16, L, DQK, DV, 8.0, B=1, NH=2, T=300))
case("extreme gates +-100 finite", lambda: accuracy(torch.bfloat16, 64, 64, 64, 100.0, B=1, NH=2, T=600))

# -----------------------------------------------------------------------------
# (b) timing


def timed(fn, repeat=20):
    return bench_timed(fn, repeat, DEV)


rows = []


def bench(T, name, fwd, args, dy):
    def step():
        torch.autograd.backward(fwd(*args), dy)
        for x in args:
            x.grad = None
    try:
        ms, peak, first = timed(step)
        rows.append((T, name, f"{ms:.3f}", f"{peak:.0f}", f"{first:.1f}", ""))
    except Exception as e:
        torch.cuda.empty_cache()
        rows.append((T, name, "-", "-", "-", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"))
        traceback.print_exc(limit=3)


compile = functools.partial(torch.compile, fullgraph=True, dynamic=False)  # one compile per shape, ~7 s each
chunk_torch_c = compile(lambda q, k, v, i, f: mlstm_chunkwise(q, k, v, i, f))
chunk_triton = lambda q, k, v, i, f: mlstm_chunkwise(q, k, v, i, f, kernel="triton")
chunk_triton_c = compile(lambda q, k, v, i, f: mlstm_chunkwise(q, k, v, i, f, kernel="triton"))
sdpa = lambda q, k, v, i, f: F.scaled_dot_product_attention(q, k, v, is_causal=True)
NH, D, TOKENS = 12, 64, 65536
for T in (512, 2048, 8192, 32768):
    B = TOKENS // T
    xs = make_inputs(B, NH, T, D, D, torch.bfloat16, 3.0)
    dy = torch.randn(B, NH, T, D, device=DEV, dtype=torch.bfloat16)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        bench(T, "sdpa flash", sdpa, xs, dy)
    bench(T, "chunkwise torch eager", mlstm_chunkwise, xs, dy)
    bench(T, "chunkwise torch compiled", chunk_torch_c, xs, dy)
    bench(T, "chunkwise triton eager", chunk_triton, xs, dy)
    bench(T, "chunkwise triton compiled", chunk_triton_c, xs, dy)
    del xs, dy
    torch.cuda.empty_cache()

# the intra-chunk part alone: its size is B*NH*NC chunks of L x L whatever T is (B*T fixed), so one shape
L = 64
NCH = TOKENS // L
g = torch.Generator(device=DEV).manual_seed(1)
q, k, v = (torch.randn(1, NH, NCH, L, D, generator=g, device=DEV).to(torch.bfloat16).requires_grad_() for _ in range(3))
b = torch.cumsum(F.logsigmoid(3 + torch.randn(1, NH, NCH, L, generator=g, device=DEV)), -1).requires_grad_()
i = torch.randn(1, NH, NCH, L, generator=g, device=DEV).requires_grad_()
m = (b + torch.cummax(i - b, -1).values).detach()
dnum = torch.randn(1, NH, NCH, L, D, device=DEV)
dden = torch.randn(1, NH, NCH, L, device=DEV)
intra_c = compile(lambda q, k, v, b, i: _intra_chunk_torch(q, k, v, b, i, m))


def intra_bench(name, fn):
    def step():
        num, den = fn(q, k, v, b, i)
        torch.autograd.backward((num, den), (dnum, dden))
        for x in (q, k, v, b, i):
            x.grad = None
    try:
        ms, peak, first = timed(step)
        rows.append(("intra only", name, f"{ms:.3f}", f"{peak:.0f}", f"{first:.1f}", ""))
    except Exception as e:
        rows.append(("intra only", name, "-", "-", "-", f"{type(e).__name__}: {str(e)[:120]}"))


intra_bench("_intra_chunk_torch eager", lambda *a: _intra_chunk_torch(*a, m))
intra_bench("_intra_chunk_torch compiled", intra_c)
intra_bench("intra_chunk triton", lambda *a: intra_chunk(*a, m))

print(f"\n## (b) fwd+bwd, B*T={TOKENS}, {NH} heads x {D}, bf16, L=64, on {torch.cuda.get_device_name()}")
print("T | case | median ms | peak MiB | first call s | note")
for r in rows:
    print(" | ".join(str(x) for x in r))

# -----------------------------------------------------------------------------
if "--model" in sys.argv:
    from blalm import BLaLM, BLaLMConfig
    print("\n## BLaLM (12 x 384, 6 heads of 64) training step, compile_blocks, bf16 autocast, B*T = 32768")
    for T in (512, 2048):
        for kern in ("torch", "triton"):
            def run():
                torch.manual_seed(0)
                cfg = BLaLMConfig(n_layer=12, n_head=6, n_embd=384, vocab_size=16384, block_size=T, mlstm_kernel=kern)
                model = BLaLM(cfg).to(DEV)
                model.compile_blocks()
                x = torch.randint(0, cfg.vocab_size, (32768 // T, T), device=DEV)

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = model(x, x)[1]
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                ms, peak, first = timed(step, repeat=10)
                print(f"T={T} kernel={kern}: {ms:.2f} ms/step, {32768 / ms * 1000:.3g} tok/s, peak {peak:.0f} MiB, "
                      f"first {first:.1f} s")
            case(f"model T={T} {kern}", run)
