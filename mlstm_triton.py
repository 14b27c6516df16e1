"""
An optional Triton kernel for the intra-chunk part of the chunkwise mLSTM
(`blalm.mlstm_chunkwise(..., kernel="triton")`, step (c)).

What it computes, for each chunk of L tokens (q already scaled by 1/sqrt(DQK); b the cumulative sum of
log sigmoid(f) inside the chunk; i the input-gate pre-activations; m the row stabiliser, computed by the
caller and treated as a constant):

    A[t,s] = exp(b_t - b_s + i_s - m_t)     (s <= t, else 0)      the stabilised gate matrix (blalm's names)
    P[t,s] = (q_t . k_s) * A[t,s]
    num    = P @ V   (L x DV),   den = P.sum(-1)   (L)

and the gradients, with G = dP * P the gradient of the log-weights b_t - b_s + i_s:

    dP = dnum @ V^T + dden[:, None]      dV = P^T @ dnum
    dS = dP * A                          dq = dS @ K,   dk = dS^T @ Q
    db_t = sum_s G[t,s] - sum_s G[s,t]   di_s = sum_t G[t,s]

Why: the PyTorch form writes (B, NH, NC, L, L) float32 tensors (the decay matrix, its exp, the masks, P) to
memory and reads them back, and that traffic, not the matrix products, is most of its time. Here one program
handles one chunk of one head and keeps its L x L matrices in registers; they never reach global memory, and
the backward recomputes them (as flash attention does) instead of saving them. Only num and den leave the
kernel; the rest of step (c) (the entering state, the normaliser, the division) stays in PyTorch.

Precision follows the PyTorch form: the matrix products take the input dtype (bfloat16 runs on the tensor
cores), P and dP/dS are rounded to it before their products, and everything else is float32.
Float32 inputs get true float32 products (no TF32).

Tested (test_all.py) against mlstm_parallel in float64 and against kernel="torch", outputs and gradients, on
the GPU when there is one and otherwise under the Triton interpreter (TRITON_INTERPRET=1 set before this
module is imported; it runs the kernels with numpy on the CPU).

Optional: blalm.py imports this module only when kernel="triton" is asked for, so the project runs without
triton. It needs CUDA tensors (or the interpreter), chunk sizes 16..128 and head sizes 16..256, powers of two.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError(f"mlstm_chunkwise(kernel='triton') needs the optional triton package ({e}); "
                      "the default kernel='torch' does not") from e

# triton.jit reads TRITON_INTERPRET when the kernels below are defined: set it before importing this module
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gates(Bg, Ig, Mg, chunk, L: tl.constexpr):
    """A[t,s] = exp(b_t - b_s + i_s - m_t) for s <= t, else 0; float32 (L, L)."""
    t = tl.arange(0, L)[:, None]
    s = tl.arange(0, L)[None, :]
    row, col = chunk * L + t, chunk * L + s
    logA = tl.load(Bg + row) - tl.load(Bg + col) + tl.load(Ig + col) - tl.load(Mg + row)
    return tl.exp(tl.where(s <= t, logA, float("-inf")))   # mask first: above the diagonal logA can be +big


@triton.jit
def _scores(Q, K, chunk, L: tl.constexpr, DQK: tl.constexpr, BLOCK_DQK: tl.constexpr, PRECISION: tl.constexpr):
    """S = Q @ K^T (L, L) in float32, summed over blocks of BLOCK_DQK features (wide heads fit in registers)."""
    t = tl.arange(0, L)[:, None]
    d = tl.arange(0, BLOCK_DQK)[None, :]
    S = tl.zeros((L, L), dtype=tl.float32)
    for d0 in range(0, DQK, BLOCK_DQK):
        offs = chunk * L * DQK + t * DQK + d0 + d
        S = tl.dot(tl.load(Q + offs), tl.trans(tl.load(K + offs)), S, input_precision=PRECISION)
    return S


@triton.jit
def _intra_chunk_fwd(Q, K, V, Bg, Ig, Mg, NUM, DEN,
                     L: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                     BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)          # one (batch * head, chunk) per program; int64: big offsets
    t = tl.arange(0, L)[:, None]
    e = tl.arange(0, BLOCK_DV)[None, :]
    P = _scores(Q, K, chunk, L, DQK, BLOCK_DQK, PRECISION) * _gates(Bg, Ig, Mg, chunk, L)    # (L, L) float32
    tl.store(DEN + chunk * L + tl.arange(0, L), tl.sum(P, axis=1))
    for e0 in range(0, DV, BLOCK_DV):
        offs = chunk * L * DV + t * DV + e0 + e
        v = tl.load(V + offs)
        tl.store(NUM + offs, tl.dot(P.to(v.dtype), v, input_precision=PRECISION))


@triton.jit
def _intra_chunk_bwd(Q, K, V, Bg, Ig, Mg, DNUM, DDEN, DQ, DK, DVg, DB, DI,
                     L: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                     BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, L)[:, None]
    d = tl.arange(0, BLOCK_DQK)[None, :]
    e = tl.arange(0, BLOCK_DV)[None, :]
    A = _gates(Bg, Ig, Mg, chunk, L)
    P = _scores(Q, K, chunk, L, DQK, BLOCK_DQK, PRECISION) * A     # recomputed, not saved

    # dP = dnum @ V^T + dden (each P[t,s] enters den_t with weight 1); dV = P^T @ dnum
    dP = tl.zeros((L, L), dtype=tl.float32) + tl.load(DDEN + chunk * L + t)
    for e0 in range(0, DV, BLOCK_DV):
        offs = chunk * L * DV + t * DV + e0 + e
        v = tl.load(V + offs)
        dnum = tl.load(DNUM + offs).to(v.dtype)
        dP = tl.dot(dnum, tl.trans(v), dP, input_precision=PRECISION)
        dv = tl.dot(tl.trans(P.to(v.dtype)), dnum, input_precision=PRECISION)
        tl.store(DVg + offs, dv.to(DVg.dtype.element_ty))

    # P = S * A: dS = dP * A reaches q and k; G = dP * P is the gradient of log A[t,s] = b_t - b_s + i_s - m_t,
    # which b_t receives along row t (+), b_s and i_s along column s (-, +). A and P are 0 above the diagonal,
    # so dS and G are too, whatever dP holds there.
    dS = dP * A
    G = dP * P
    rows, cols = tl.sum(G, axis=1), tl.sum(G, axis=0)
    tl.store(DB + chunk * L + tl.arange(0, L), rows - cols)
    tl.store(DI + chunk * L + tl.arange(0, L), cols)

    for d0 in range(0, DQK, BLOCK_DQK):
        offs = chunk * L * DQK + t * DQK + d0 + d
        q, k = tl.load(Q + offs), tl.load(K + offs)
        dq = tl.dot(dS.to(k.dtype), k, input_precision=PRECISION)
        dk = tl.dot(tl.trans(dS.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty))
        tl.store(DK + offs, dk.to(DK.dtype.element_ty))


def _launch_args(q, v):
    L, DQK, DV = q.size(-2), q.size(-1), v.size(-1)
    # float32 inputs get true float32 products (no TF32 rounding, whatever torch's global flags say): who
    # passes float32 wants its accuracy; bfloat16 is the fast path (PRECISION only affects float32 operands)
    return dict(L=L, DQK=DQK, DV=DV, BLOCK_DQK=min(DQK, 64), BLOCK_DV=min(DV, 64),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4 if L <= 64 else 8)


class IntraChunk(torch.autograd.Function):
    """(q, k, v, b, i, m) -> (num, den); shapes (B, NH, NC, L, D) and (B, NH, NC, L). m gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, b, i, m):
        q, k, v, b, i, m = (x.contiguous() for x in (q, k, v, b, i, m))
        num = torch.empty(v.shape, dtype=b.dtype, device=v.device)
        den = torch.empty_like(b)
        grid = (b.numel() // b.size(-1),)                            # B * NH * NC chunks
        _intra_chunk_fwd[grid](q, k, v, b, i, m, num, den, **_launch_args(q, v))
        ctx.save_for_backward(q, k, v, b, i, m)
        return num, den

    @staticmethod
    def backward(ctx, dnum, dden):
        q, k, v, b, i, m = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        db, di = torch.empty_like(b), torch.empty_like(i)
        grid = (b.numel() // b.size(-1),)
        _intra_chunk_bwd[grid](q, k, v, b, i, m, dnum.contiguous(), dden.contiguous(), dq, dk, dv, db, di,
                               **_launch_args(q, v))
        return dq, dk, dv, db, di, None


def _is_power_of_two_in(x, lo, hi):
    return lo <= x <= hi and x & (x - 1) == 0


def intra_chunk(q, k, v, b, i, m):
    """num[t] = sum_{s<=t} P[t,s] v_s and den[t] = sum_{s<=t} P[t,s] for every chunk, where
    P[t,s] = (q_t . k_s) exp(b_t - b_s + i_s - m_t). Differentiable in q, k, v, b, i (not m).
    q, k: (B, NH, NC, L, DQK); v: (B, NH, NC, L, DV) in float32, float16 or bfloat16;
    b, i, m: (B, NH, NC, L) float32. Returns num (B, NH, NC, L, DV) and den (B, NH, NC, L), float32."""
    L, DQK, DV = q.size(-2), q.size(-1), v.size(-1)
    if not _is_power_of_two_in(L, 16, 128):
        raise ValueError(f"chunk_size={L}: the Triton kernel needs a power of two in [16, 128] "
                         "(tl.dot needs >= 16; larger L x L blocks do not fit in registers)")
    for name, D in (("DQK", DQK), ("DV", DV)):
        if not _is_power_of_two_in(D, 16, 256):
            raise ValueError(f"{name}={D}: the Triton kernel needs a head size that is a power of two in [16, 256]")
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1] or any(x.shape != q.shape[:-1] for x in (b, i, m)):
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, b {tuple(b.shape)}, "
                         f"i {tuple(i.shape)}, m {tuple(m.shape)} do not fit (B, NH, NC, L, D) / (B, NH, NC, L)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: the Triton kernel needs one of "
                         "float32, float16, bfloat16 for all three (float64: use kernel='torch')")
    if any(x.dtype != torch.float32 for x in (b, i, m)):
        raise ValueError(f"gate dtypes {b.dtype}, {i.dtype}, {m.dtype}: the Triton kernel needs float32")
    if not q.is_cuda and not INTERPRETED:
        raise ValueError(f"kernel='triton' needs CUDA tensors, got device {q.device}; on the CPU it runs only "
                         "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    return IntraChunk.apply(q, k, v, b, i, m)
