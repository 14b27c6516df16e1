"""
An optional fused Triton kernel for the short causal depthwise convolution of the mLSTM layer
(`blalm.MLSTMLayer.short_conv`), forward and backward.

What it computes, for each channel c of x (B, T, C), with u = x preceded along time by `past`, the K-1 inputs
before the sequence (zeros when there is none):

    y[b,t,c] = bias[c] + sum_{j<K} w[c,j] u[b,t+j,c]          u = cat(past, x): (B, K-1+T, C)

and its gradients (terms that fall outside 0 <= t < T are left out):

    dx[b,s,c]    = sum_j w[c,j] dy[b,s+K-1-j,c]               the same taps, mirrored
    dw[c,j]      = sum_{b,t} dy[b,t,c] u[b,t+j,c]             dbias[c] = sum_{b,t} dy[b,t,c]
    dpast[b,a,c] = sum_{j<=a} w[c,j] dy[b,a-j,c]               (a < K-1; only the first K-1 outputs see past)

Why: in PyTorch the K shifted multiply-adds are K+1 passes over (B, T, C) in memory, and their backward as many
again plus the reductions for dw; even compiled they stay several memory-bound kernels (about 0.5 ms a layer
forward+backward at the strict_small shape on an H200). Here the forward is one pass: a program reads its
(BLOCK_T, BLOCK_C) tile of x once per tap (the K shifted reads overlap, so after the first they come from the
cache) and writes y once. The backward is one pass too: it writes dx and, for its block of rows, partial sums
of dw and dbias (float32), which PyTorch adds up over the blocks (no atomics: the sums are deterministic). Within
a program the products dy_t u_{t+j} are summed elementwise, one (tap, row, channel) tile, and reduced over the
rows once at its end: a sum across a tile's rows crosses warps (shared memory and a barrier), which done per tap
and per tile made the backward about 6x the forward's time (`_conv_bwd` in results/kernels/h200/profile.log).

Precision: products and sums in float32 whatever the input dtype; y and dx are rounded once, to x's dtype;
dw and dbias take the parameters' dtypes. (The PyTorch form rounds every multiply-add to x's dtype.)

Tested (test_all.py) against a float64 PyTorch computation, outputs and gradients, on the GPU where there is
one and otherwise under the Triton interpreter (TRITON_INTERPRET=1 set before this module is imported).

Optional: blalm.py imports this module only where it uses the kernel (kernels="triton", training on CUDA
without a cache), so the project runs without triton.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError(f"the fused short convolution needs the optional triton package ({e})") from e

# triton.jit reads TRITON_INTERPRET when the kernels below are defined: set it before importing this module
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

BLOCK_T, BLOCK_C = 32, 128     # a tile: 32 time steps x 128 channels (256 contiguous bytes a row in bfloat16)
BLOCK_T_BWD = 8                # the backward's tiles: 8 steps, so that K tiles of dw sums fit in registers
ROWS_BWD = 256                 # time steps a backward program walks through: one partial dw row per 256 steps


@triton.jit
def _shifted(X, PAST, b, s, c, T, C, K: tl.constexpr, HAS_PAST: tl.constexpr):
    """u at times s of batch b, channels c, as float32, in the shape s and c broadcast to ((BLOCK_T, 1) and
    (1, BLOCK_C) make a tile): x[b, s] for 0 <= s < T, past[b, K-1+s] for s < 0 when there is a past, else 0."""
    cm = c < C
    u = tl.load(X + (b * T + s) * C + c, mask=(s >= 0) & (s < T) & cm, other=0.0).to(tl.float32)
    if HAS_PAST:
        u += tl.load(PAST + (b * (K - 1) + (K - 1) + s) * C + c, mask=(s < 0) & (s >= 1 - K) & cm,
                     other=0.0).to(tl.float32)
    return u


@triton.jit
def _conv_fwd(X, PAST, W, BIAS, Y, T, C, n_row_blocks,
              K: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_row_blocks).to(tl.int64)                      # int64: offsets past 2**31 elements
    t = (pid % n_row_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]          # (BLOCK_T, 1)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]              # (1, BLOCK_C)
    cm = c < C
    y = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + c, mask=cm, other=0.0).to(tl.float32)
    for j in tl.static_range(K):                                # y_t = bias + sum_j w_j u_{t+j} = ... x_{t-K+1+j}
        w = tl.load(W + c * K + j, mask=cm, other=0.0).to(tl.float32)
        y += w * _shifted(X, PAST, b, t + j - (K - 1), c, T, C, K, HAS_PAST)
    tl.store(Y + (b * T + t) * C + c, y.to(Y.dtype.element_ty), mask=(t < T) & cm)


@triton.jit
def _conv_bwd(X, PAST, W, DY, DX, DW_PART, DB_PART, T, C, n_row_blocks,
              K: tl.constexpr, KP: tl.constexpr, HAS_PAST: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_row_blocks).to(tl.int64)
    t0 = (pid % n_row_blocks) * ROWS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    cm = c < C
    tap = tl.arange(0, KP)[:, None, None]                       # (KP, 1, 1): K padded to a power of two
    # this program's share of dw and dbias, summed elementwise over its rows and reduced at the end
    dw = tl.zeros((KP, BLOCK_T, BLOCK_C), dtype=tl.float32)     # [j, row, channel]: dy_t u_{t+j}
    db = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for r in range(0, ROWS, BLOCK_T):
        t = t0 + r + tl.arange(0, BLOCK_T)[:, None]             # (BLOCK_T, 1)
        dy = tl.load(DY + (b * T + t) * C + c, mask=(t < T) & cm, other=0.0).to(tl.float32)
        db += dy
        dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for j in tl.static_range(K):
            w = tl.load(W + c * K + j, mask=cm, other=0.0).to(tl.float32)
            s = t + (K - 1 - j)                                 # dx_t = sum_j w_j dy_{t+K-1-j}
            dx += w * tl.load(DY + (b * T + s) * C + c, mask=(s < T) & cm, other=0.0).to(tl.float32)
        tl.store(DX + (b * T + t) * C + c, dx.to(DX.dtype.element_ty), mask=(t < T) & cm)
        # every tap at once: u_{t+j} for j < KP as one (KP, BLOCK_T, BLOCK_C) load (the padded taps j >= K read
        # u after t, or zeros, and are not stored)
        dw += dy[None, :, :] * _shifted(X, PAST, b, t[None, :, :] + tap - (K - 1), c[None, :, :], T, C, K, HAS_PAST)
    taps = tl.arange(0, KP)[:, None]                            # (KP, 1): dw's rows
    tl.store(DW_PART + (pid * K + taps) * C + c, tl.sum(dw, axis=1), mask=(taps < K) & cm)
    tl.store(DB_PART + pid * C + c, tl.sum(db, axis=0)[None, :], mask=cm)


class ShortConv(torch.autograd.Function):
    """(x, w, bias, past) -> y; shapes (B, T, C), (C, K), (C,) or None, (B, K-1, C) or None."""

    @staticmethod
    def forward(ctx, x, w, bias, past):
        x, w = x.contiguous(), w.contiguous()
        past = past.contiguous() if past is not None else None
        B, T, C = x.shape
        K = w.size(-1)
        y = torch.empty_like(x)
        n_row_blocks = triton.cdiv(T, BLOCK_T)
        grid = (B * n_row_blocks, triton.cdiv(C, BLOCK_C))
        _conv_fwd[grid](x, past if past is not None else x, w, bias if bias is not None else w, y, T, C, n_row_blocks,
                        K=K, HAS_PAST=past is not None, HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(x, w, past)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, past = ctx.saved_tensors
        dy = dy.contiguous()
        B, T, C = x.shape
        K = w.size(-1)
        rows = min(ROWS_BWD, max(BLOCK_T_BWD, triton.next_power_of_2(T)))  # short sequences: fewer empty steps
        n_row_blocks = triton.cdiv(T, rows)
        dx = torch.empty_like(x)
        dw_part = torch.empty(B * n_row_blocks, K, C, dtype=torch.float32, device=x.device)
        db_part = torch.empty(B * n_row_blocks, C, dtype=torch.float32, device=x.device)
        grid = (B * n_row_blocks, triton.cdiv(C, BLOCK_C))
        _conv_bwd[grid](x, past if past is not None else x, w, dy, dx, dw_part, db_part, T, C, n_row_blocks,
                        K=K, KP=triton.next_power_of_2(K), HAS_PAST=past is not None,
                        BLOCK_T=BLOCK_T_BWD, BLOCK_C=BLOCK_C, ROWS=rows)
        dw = dw_part.sum(0).t().to(w.dtype)                                   # (C, K)
        db = db_part.sum(0).to(w.dtype) if ctx.has_bias else None
        dpast = None
        if past is not None:                               # dpast_a = sum_{j<=a} w_j dy_{a-j}: K-1 rows, in PyTorch
            dyf, wf = dy[:, :K - 1].float(), w.float()
            dpast = torch.zeros(past.shape, dtype=torch.float32, device=x.device)
            for a in range(K - 1):
                for j in range(max(0, a - T + 1), a + 1):
                    dpast[:, a] += wf[:, j] * dyf[:, a - j]
            dpast = dpast.to(past.dtype)
        return dx, dw, db, dpast


def short_conv(x, w, bias=None, past=None):
    """y[b,t] = bias + sum_j w[:, j] u[b,t+j], u = cat(past, x) along time: the causal depthwise convolution
    of nn.Conv1d(C, C, K, groups=C) over x's K-1 last inputs and itself. Differentiable in x, w, bias, past.
    x (B, T, C) float32, float16 or bfloat16; w (C, K) (Conv1d's weight[:, 0, :]); bias (C,) or None;
    past (B, K-1, C), the inputs before x (the previous call's last K-1), or None for zeros. -> y (B, T, C) in
    x's dtype."""
    if x.dim() != 3 or w.dim() != 2 or w.size(0) != x.size(-1):
        raise ValueError(f"shapes x {tuple(x.shape)}, w {tuple(w.shape)}: expected x (B, T, C) and w (C, K)")
    B, T, C = x.shape
    K = w.size(-1)
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias shape {tuple(bias.shape)}: expected ({C},)")
    if past is not None and past.shape != (B, K - 1, C):
        raise ValueError(f"past shape {tuple(past.shape)}: expected (B, K-1, C) = ({B}, {K - 1}, {C})")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype {x.dtype}: the Triton kernel needs float32, float16 or bfloat16")
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(f"the fused short convolution needs CUDA tensors, got device {x.device}; on the CPU it "
                         "runs only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    return ShortConv.apply(x, w, bias, past)
