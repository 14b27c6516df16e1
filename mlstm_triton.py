"""
An optional fused Triton implementation of the whole chunkwise mLSTM, forward and backward
(`blalm.mlstm_chunkwise(..., kernel="triton")`): the same function as the PyTorch form, in five kernels.

Notation (blalm.py's): for head (b, h), chunks of L tokens, q scaled by 1/sqrt(DQK), lf = log sigmoid(f),
b_t the cumulative sum of lf inside a token's chunk, g = b at the chunk's last token, i the input gate.
The state entering chunk c is (C_c, n_c, m_c); chunk c's tokens t see

    A[t,s] = exp(b_t - b_s + i_s - m_t) (s <= t)    init_t = exp(b_t + m_c - m_t)
    m_t    = max(b_t + m_c, max_{s<=t} (b_t - b_s + i_s))                        the stabiliser
    num_t  = sum_s A[t,s] (q_t . k_s) v_s + init_t q_t C_c        dd_t = the same with v -> 1, C_c -> n_c
    h_t    = num_t / (max(|dd_t|, exp(-m_t)) + eps)

and the state leaves the chunk as
    m_{c+1} = max(g + m_c, max_s a_s),  a_s = g - b_s + i_s,  w_s = exp(a_s - m_{c+1})
    C_{c+1} = exp(g + m_c - m_{c+1}) C_c + sum_s w_s k_s v_s^T    n_{c+1}: the same with v -> 1.

The kernels (TFLA's split, Beck et al. 2025: a sequential pass over chunks for the states, parallel passes
over chunks for everything else; written here from the equations above):

  forward   _fwd_states  grid (B*NH, state tiles): walks the chunks in order, stores every C_c, n_c, m_c
            _fwd_out     grid (B*NH, NC): one chunk: its L x L part in registers plus the entering state -> h;
                         keeps m_t, the denominator, the sign of dd_t (which branch of the max) and, for
                         bfloat16/float16 inputs, h in float32 for backward
  backward  _bwd_prep    grid (B*NH, NC): ddd_t = d loss / d dd_t = -(dh_t . h_t) sign_t / den_t
            _bwd_states  grid (B*NH, state tiles): walks the chunks backwards, stores d loss / d C_c, d n_c
                         (dC_c = exp(g + m_c - m_{c+1}) dC_{c+1} + sum_t init_t q_t (dh_t / den_t)^T)
            _bwd_qkv     grid (B*NH, NC): dq, dk, dv of one chunk, the L x L part recomputed, not stored

For decoding (the end of this file): `mlstm_layer_step_triton`, a whole MLSTMLayer's step between its two
projections (conv, gates, mLSTM, norm, SWA, gates on the output) as one kernel, and `mlstm_step_triton`,
blalm.mlstm_step alone (the layer's way with Hedgehog feature maps); a program per head, the cache updated in
place. The model uses them through a StaticCache when kernels="triton"; both are torch operators of their own
(torch.library.custom_op), so that a compiled block traces each as one call.

The gates' gradients come from the same pass: the gradient of a pair's log-weight (source s, target t) is
G = dP * P inside the chunk, q_t . dq_t's state part for sources before it, k_s . dk_s's state part for targets
after it, and <C_c, dC_{c+1}> + <n_c, dn_{c+1}> (decayed) for what passes the whole chunk. Every pair with
source s carries exp(i_s), so d loss / d i_s sums the pairs of source s; lf_r decays the pairs with s < r <= t,
so d loss / d lf_r sums those -- all inside one chunk's registers, float32, the sums the PyTorch form's autograd
forms too. (The shortcut d loss / d lf = a reversed cumulative sum of q . dq - k . dk over the whole sequence
is exact in exact arithmetic, but it cancels large terms: 7x the error in d loss / d f, measured in bfloat16.)

Precision follows the PyTorch form: q . k and P @ v take the input dtype (bfloat16: tensor cores), the states,
the gates, the stabiliser and every sum are float32, the state products run as float32 with STATE_PRECISION
(float32 inputs: true float32, "ieee"). Float32 inputs get true float32 products everywhere.

Tested (test_all.py) against mlstm_parallel / mlstm_recurrent in float64 and against kernel="torch", outputs
and gradients (states in and out included), on the GPU when there is one and otherwise under the Triton
interpreter (TRITON_INTERPRET=1 set before this module is imported; it runs the kernels with numpy on the CPU).

Optional: blalm.py imports this module only when kernel="triton" is asked for, so the project runs without
triton. It needs CUDA tensors (or the interpreter), chunk sizes 16..128 and head sizes 16..256, powers of two.
"""

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError(f"mlstm_chunkwise(kernel='triton') needs the optional triton package ({e}); "
                      "the default kernel='torch' does not") from e

# triton.jit reads TRITON_INTERPRET when the kernels below are defined: set it before importing this module
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# the state products (k w)^T v, q C, and their backward, for bfloat16/float16 inputs: "tf32" rounds one operand
# to 10 mantissa bits (finer than the inputs' 7 or 10), "tf32x3" is float32 accuracy at three times the products
STATE_PRECISION = "tf32"
# launch shapes, by kernel: warps for the per-chunk kernels; the sequential state kernels split (DQK, DV) into
# tiles until there are at least MIN_STATE_PROGRAMS programs (long sequences, small batches), down to 16 x 16.
# Chosen by results/kernels/sweep.py on an H200 (T = 2048 and 32768, 65,536 tokens, 12 heads x 64)
NUM_WARPS = {"fwd_out": 4, "bwd_qkv": 4, "prep": 4, "states": 2}
MIN_STATE_PROGRAMS = 264


@triton.jit
def _rows(X, sb, sh, st, bh, NH, tok, T, col):
    """Pointers to rows tok (L,) and columns col (BD,) of head bh of a (B, NH, T, D) tensor with strides
    (sb, sh, st, 1), and the mask of the rows inside the sequence (the last chunk is padded)."""
    ptr = X + (bh // NH) * sb + (bh % NH) * sh + tok.to(tl.int64)[:, None] * st + col[None, :]
    return ptr, (tok < T)[:, None]


@triton.jit
def _state_tile(S, N, NC, DQK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """For a program (bh, ik, iv) of the state kernels: bh, its tile's rows d and columns e, and pointers to that
    tile of the states S (B*NH, NC+1, DQK, DV) and to its BK slice of N (B*NH, NC+1, DQK), at state index 0."""
    bh = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BK + tl.arange(0, BK)
    e = tl.program_id(2) * BV + tl.arange(0, BV)
    return bh, d, e, S + bh * (NC + 1) * DQK * DV + d[:, None] * DV + e[None, :], N + bh * (NC + 1) * DQK + d


@triton.jit
def _fwd_states(K, V, Bg, Ig, CS, NS, MS, skb, skh, skt, svb, svh, svt, NH, T, NC,
                L: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PRECISION: tl.constexpr):
    """C_c, n_c, m_c for c = 1..NC into CS (B*NH, NC+1, DQK, DV), NS (B*NH, NC+1, DQK), MS (B*NH, NC+1);
    index 0 holds the initial state (the caller writes it). One (BK, BV) tile of C per program."""
    bh, d, e, cs, ns = _state_tile(CS, NS, NC, DQK, DV, BK, BV)
    ik, iv = tl.program_id(1), tl.program_id(2)
    t = tl.arange(0, L)
    Tp = NC * L
    C = tl.load(cs)
    n = tl.load(ns)
    m = tl.load(MS + bh * (NC + 1))
    c = 0
    while c < NC:   # (a while loop: the Triton interpreter cannot take range() of a run-time bound)
        tok = c * L + t
        b = tl.load(Bg + bh * Tp + tok)
        g = tl.load(Bg + bh * Tp + c * L + L - 1)
        a = g - b + tl.load(Ig + bh * Tp + tok)                   # log-weight of token s at the chunk's end
        m_next = tl.maximum(g + m, tl.max(a, axis=0))
        w = tl.exp(a - m_next)
        kp, rows = _rows(K, skb, skh, skt, bh, NH, tok, T, d)
        vp, _ = _rows(V, svb, svh, svt, bh, NH, tok, T, e)
        kw = tl.load(kp, mask=rows, other=0.0).to(tl.float32) * w[:, None]          # (L, BK)
        v = tl.load(vp, mask=rows, other=0.0).to(tl.float32)                        # (L, BV)
        decay = tl.exp(g + m - m_next)
        C = tl.dot(tl.trans(kw), v, decay * C, input_precision=PRECISION)
        n = decay * n + tl.sum(kw, axis=0)
        m = m_next
        tl.store(cs + (c + 1) * DQK * DV, C)
        if iv == 0:
            tl.store(ns + (c + 1) * DQK, n)
            if ik == 0:
                tl.store(MS + bh * (NC + 1) + c + 1, m)
        c += 1


@triton.jit
def _fwd_out(Q, K, V, Bg, Ig, CS, NS, MS, H, H32, MT, DEN, SIG,
             sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, shb, shh, sht, NH, T, NC,
             SCALE: tl.constexpr, EPS: tl.constexpr, L: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
             SAVE_H32: tl.constexpr):
    """h for one chunk of one head (with SAVE_H32 also a float32 copy into H32, contiguous); m_t,
    den_t = max(|dd_t|, exp(-m_t)) + eps and sign_t (the sign of dd_t where |dd_t| is the larger, else 0) into
    MT, DEN, SIG (B*NH, NC*L)."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, L)
    Tp = NC * L
    tok = c * L + t
    b = tl.load(Bg + bh * Tp + tok)
    i = tl.load(Ig + bh * Tp + tok)
    m_in = tl.load(MS + bh * (NC + 1) + c)
    logA = tl.where(t[None, :] <= t[:, None], b[:, None] - b[None, :] + i[None, :], float("-inf"))
    m = tl.maximum(b + m_in, tl.max(logA, axis=1))
    A = tl.exp(logA - m[:, None])
    init = tl.exp(b + m_in - m) * SCALE                           # the entering state's weight (q's scale in it)

    S = tl.zeros((L, L), dtype=tl.float32)
    qn = tl.zeros((L,), dtype=tl.float32)
    for d0 in range(0, DQK, BK):
        d = d0 + tl.arange(0, BK)
        qp, rows = _rows(Q, sqb, sqh, sqt, bh, NH, tok, T, d)
        kp, _ = _rows(K, skb, skh, skt, bh, NH, tok, T, d)
        q = tl.load(qp, mask=rows, other=0.0)
        S = tl.dot(q, tl.trans(tl.load(kp, mask=rows, other=0.0)), S, input_precision=PRECISION)
        qn += tl.sum(q.to(tl.float32) * tl.load(NS + (bh * (NC + 1) + c) * DQK + d)[None, :], axis=1)
    P = S * SCALE * A
    dd = tl.sum(P, axis=1) + init * qn
    floor = tl.exp(-m)
    den = tl.maximum(tl.abs(dd), floor) + EPS
    tl.store(MT + bh * Tp + tok, m)
    tl.store(DEN + bh * Tp + tok, den)
    tl.store(SIG + bh * Tp + tok, tl.where(tl.abs(dd) > floor, tl.where(dd > 0, 1.0, -1.0), 0.0))

    for e0 in range(0, DV, BV):
        e = e0 + tl.arange(0, BV)
        vp, rows = _rows(V, svb, svh, svt, bh, NH, tok, T, e)
        v = tl.load(vp, mask=rows, other=0.0)
        qC = tl.zeros((L, BV), dtype=tl.float32)
        for d0 in range(0, DQK, BK):
            d = d0 + tl.arange(0, BK)
            qp, _ = _rows(Q, sqb, sqh, sqt, bh, NH, tok, T, d)
            Cc = tl.load(CS + ((bh * (NC + 1) + c) * DQK + d[:, None]) * DV + e[None, :])
            qC = tl.dot(tl.load(qp, mask=rows, other=0.0).to(tl.float32), Cc, qC, input_precision=STATE_PRECISION)
        num = tl.dot(P.to(v.dtype), v, input_precision=PRECISION) + init[:, None] * qC
        h = num / den[:, None]
        hp, _ = _rows(H, shb, shh, sht, bh, NH, tok, T, e)
        tl.store(hp, h.to(H.dtype.element_ty), mask=rows)
        if SAVE_H32:
            tl.store(H32 + bh * T * DV + tok.to(tl.int64)[:, None] * DV + e[None, :], h, mask=rows)


@triton.jit
def _bwd_prep(DH, H, DEN, SIG, DDD, sdb, sdh, sdt, shb, shh, sht, NH, T, NC,
              L: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """ddd_t = d loss / d dd_t = -(dh_t . h_t) sign_t / den_t into DDD (B*NH, NC*L); h float32 (rounded to
    bfloat16 it made d loss / d i err 1.3x the PyTorch form's, measured)."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    tok = c * L + tl.arange(0, L)
    dot = tl.zeros((L,), dtype=tl.float32)
    for e0 in range(0, DV, BV):
        e = e0 + tl.arange(0, BV)
        dp, rows = _rows(DH, sdb, sdh, sdt, bh, NH, tok, T, e)
        hp, _ = _rows(H, shb, shh, sht, bh, NH, tok, T, e)
        dot += tl.sum(tl.load(dp, mask=rows, other=0.0).to(tl.float32) *
                      tl.load(hp, mask=rows, other=0.0).to(tl.float32), axis=1)
    off = bh * NC * L + tok
    tl.store(DDD + off, -dot * tl.load(SIG + off) / tl.load(DEN + off))


@triton.jit
def _bwd_states(Q, DH, Bg, MS, MT, DEN, DDD, DCS, DNS, sqb, sqh, sqt, sdb, sdh, sdt, NH, T, NC,
                SCALE: tl.constexpr, L: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, PRECISION: tl.constexpr):
    """dC_c, dn_c (the gradients with respect to the state entering chunk c, c = NC-1..0) into DCS, DNS, shaped
    as CS, NS; index NC holds the final state's gradient (the caller writes it). One tile per program."""
    bh, d, e, dcs, dns = _state_tile(DCS, DNS, NC, DQK, DV, BK, BV)
    iv = tl.program_id(2)
    t = tl.arange(0, L)
    Tp = NC * L
    dC = tl.load(dcs + NC * DQK * DV)
    dn = tl.load(dns + NC * DQK)
    c = NC - 1
    while c >= 0:
        tok = c * L + t
        m_in = tl.load(MS + bh * (NC + 1) + c)
        m_out = tl.load(MS + bh * (NC + 1) + c + 1)
        g = tl.load(Bg + bh * Tp + c * L + L - 1)
        init = tl.exp(tl.load(Bg + bh * Tp + tok) + m_in - tl.load(MT + bh * Tp + tok)) * SCALE
        qp, rows = _rows(Q, sqb, sqh, sqt, bh, NH, tok, T, d)
        dp, _ = _rows(DH, sdb, sdh, sdt, bh, NH, tok, T, e)
        q = tl.load(qp, mask=rows, other=0.0).to(tl.float32)                          # (L, BK)
        dnum = tl.load(dp, mask=rows, other=0.0).to(tl.float32) / tl.load(DEN + bh * Tp + tok)[:, None]
        decay = tl.exp(g + m_in - m_out)
        dC = tl.dot(tl.trans(q * init[:, None]), dnum, decay * dC, input_precision=PRECISION)
        tl.store(dcs + c * DQK * DV, dC)
        if iv == 0:
            dn = decay * dn + tl.sum(q * (init * tl.load(DDD + bh * Tp + tok))[:, None], axis=0)
            tl.store(dns + c * DQK, dn)
        c -= 1


@triton.jit
def _bwd_qkv(Q, K, V, DH, Bg, Ig, CS, NS, MS, MT, DEN, DDD, DCS, DNS, DQ, DK, DVg, DLF, DI,
             sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, NH, T, NC,
             SCALE: tl.constexpr, L: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr):
    """dq, dk, dv of one chunk of one head (written contiguous (B, NH, T, D)); the gates' gradients d loss / d lf
    and d loss / d i into DLF, DI (B*NH, NC*L), float32."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, L)
    Tp = NC * L
    tok = c * L + t
    b = tl.load(Bg + bh * Tp + tok)
    i = tl.load(Ig + bh * Tp + tok)
    m = tl.load(MT + bh * Tp + tok)
    m_in = tl.load(MS + bh * (NC + 1) + c)
    m_out = tl.load(MS + bh * (NC + 1) + c + 1)
    g = tl.load(Bg + bh * Tp + c * L + L - 1)
    A = tl.exp(tl.where(t[None, :] <= t[:, None], b[:, None] - b[None, :] + i[None, :], float("-inf")) - m[:, None])
    init = tl.exp(b + m_in - m) * SCALE
    w = tl.exp(g - b + i - m_out)                      # token s's weight in the state leaving the chunk
    rden = 1.0 / tl.load(DEN + bh * Tp + tok)
    ddd = tl.load(DDD + bh * Tp + tok)
    cs = CS + (bh * (NC + 1) + c) * DQK * DV           # the state entering the chunk
    dcs = DCS + (bh * (NC + 1) + c + 1) * DQK * DV     # the gradient of the state leaving it
    out = bh * T * DQK                                 # dq, dk: contiguous (B, NH, T, DQK); dv: (B, NH, T, DV)

    S = tl.zeros((L, L), dtype=tl.float32)
    for d0 in range(0, DQK, BK):
        d = d0 + tl.arange(0, BK)
        qp, rows = _rows(Q, sqb, sqh, sqt, bh, NH, tok, T, d)
        kp, _ = _rows(K, skb, skh, skt, bh, NH, tok, T, d)
        S = tl.dot(tl.load(qp, mask=rows, other=0.0), tl.trans(tl.load(kp, mask=rows, other=0.0)), S,
                   input_precision=PRECISION)
    P = S * SCALE * A

    # dP = dnum v^T + ddd (P[t,s] enters num_t through v_s and dd_t with weight 1); dv = P^T dnum + w k dC_out
    dP = tl.zeros((L, L), dtype=tl.float32) + ddd[:, None]
    for e0 in range(0, DV, BV):
        e = e0 + tl.arange(0, BV)
        vp, rows = _rows(V, svb, svh, svt, bh, NH, tok, T, e)
        dp, _ = _rows(DH, sdb, sdh, sdt, bh, NH, tok, T, e)
        v = tl.load(vp, mask=rows, other=0.0)
        dnum = (tl.load(dp, mask=rows, other=0.0).to(tl.float32) * rden[:, None]).to(v.dtype)
        dP = tl.dot(dnum, tl.trans(v), dP, input_precision=PRECISION)
        kdC = tl.zeros((L, BV), dtype=tl.float32)
        for d0 in range(0, DQK, BK):
            d = d0 + tl.arange(0, BK)
            kp, _ = _rows(K, skb, skh, skt, bh, NH, tok, T, d)
            kdC = tl.dot(tl.load(kp, mask=rows, other=0.0).to(tl.float32),
                         tl.load(dcs + d[:, None] * DV + e[None, :]), kdC, input_precision=STATE_PRECISION)
        dv = tl.dot(tl.trans(P.to(v.dtype)), dnum, input_precision=PRECISION) + w[:, None] * kdC
        tl.store(DVg + bh * T * DV + tok.to(tl.int64)[:, None] * DV + e[None, :], dv.to(DVg.dtype.element_ty),
                 mask=rows)
    dS = dP * A * SCALE                                 # the gradient of the raw scores q_t . k_s
    G = dP * P                                          # the gradient of each pair's log-weight b_t - b_s + i_s

    # dq_t += init_t (C_in dnum_t + ddd_t n_in), dk_s += w_s (dC_out v_s + dn_out): the states' parts; their
    # row dot products with q and k are the gradients of the entering and leaving log-weights
    g_in = tl.zeros((L,), dtype=tl.float32)
    g_out = tl.zeros((L,), dtype=tl.float32)
    g_pass = tl.zeros((1,), dtype=tl.float32)      # <C_in, dC_out> + <n_in, dn_out>: what passes the whole chunk
    for d0 in range(0, DQK, BK):
        d = d0 + tl.arange(0, BK)
        qp, rows = _rows(Q, sqb, sqh, sqt, bh, NH, tok, T, d)
        kp, _ = _rows(K, skb, skh, skt, bh, NH, tok, T, d)
        q, k = tl.load(qp, mask=rows, other=0.0), tl.load(kp, mask=rows, other=0.0)
        dnC = tl.zeros((L, BK), dtype=tl.float32)
        vdC = tl.zeros((L, BK), dtype=tl.float32)
        for e0 in range(0, DV, BV):
            e = e0 + tl.arange(0, BV)
            vp, _ = _rows(V, svb, svh, svt, bh, NH, tok, T, e)
            dp, _ = _rows(DH, sdb, sdh, sdt, bh, NH, tok, T, e)
            dnum = tl.load(dp, mask=rows, other=0.0).to(tl.float32) * rden[:, None]
            state = d[None, :] * DV + e[:, None]                                      # (BV, BK): transposed
            C_in, dC_out = tl.load(cs + state), tl.load(dcs + state)
            dnC = tl.dot(dnum, C_in, dnC, input_precision=STATE_PRECISION)
            vdC = tl.dot(tl.load(vp, mask=rows, other=0.0).to(tl.float32), dC_out, vdC, input_precision=STATE_PRECISION)
            g_pass += tl.sum(tl.sum(C_in * dC_out, axis=1), axis=0)
        n_in = tl.load(NS + (bh * (NC + 1) + c) * DQK + d)
        dn_out = tl.load(DNS + (bh * (NC + 1) + c + 1) * DQK + d)
        g_pass += tl.sum(n_in * dn_out, axis=0)
        dq_in = init[:, None] * (dnC + ddd[:, None] * n_in[None, :])
        dk_out = w[:, None] * (vdC + dn_out[None, :])
        g_in += tl.sum(q.to(tl.float32) * dq_in, axis=1)
        g_out += tl.sum(k.to(tl.float32) * dk_out, axis=1)
        dq = _dot_split(dS, k, dq_in, PRECISION)
        dk = _dot_split(tl.trans(dS), q, dk_out, PRECISION)
        off = out + tok.to(tl.int64)[:, None] * DQK + d[None, :]
        tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=rows)
        tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=rows)

    # d loss / d lf_r sums the gradients of the log-weights of the pairs (s, t) with s < r <= t: inside the chunk
    # (the reversed cumulative sum of rows - cols), from before the chunk to t >= r, from s < r to after the chunk,
    # and from before to after it (exp(g) decays what passes through)
    rows_G, cols_G = tl.sum(G, axis=1), tl.sum(G, axis=0)
    after = t[None, :] >= t[:, None]                                                  # [r, t]: t >= r
    x = rows_G - cols_G + g_in
    dlf = tl.sum(tl.where(after, x[None, :], 0.0), axis=1) + tl.sum(tl.where(after, 0.0, g_out[None, :]), axis=1)
    dlf += tl.sum(tl.exp(g + m_in - m_out) * g_pass, axis=0)
    tl.store(DLF + bh * Tp + tok, dlf)
    tl.store(DI + bh * Tp + tok, cols_G + g_out)                      # every pair with source s carries exp(i_s)


@triton.jit
def _dot_split(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b for a float32 a and a b of the inputs' dtype: a half-precision b takes a as two half-precision
    parts (a = hi + lo, ~16 bits), two products at the tensor cores' half-precision rate, nothing rounded away
    that float32 products would keep (a float32 b: one float32 product)."""
    if b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    hi = a.to(b.dtype)
    lo = (a - hi.to(tl.float32)).to(b.dtype)
    return tl.dot(lo, b, tl.dot(hi, b, acc, input_precision=PRECISION), input_precision=PRECISION)


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _rowwise(x):
    """x itself when its rows (last dim) are contiguous, which is all the kernels need (no copy of the
    (B, T, NH, D) -> (B, NH, T, D) views the model passes); a contiguous copy otherwise."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _state_tiles(BH, DQK, DV):
    """(BK, BV) for the sequential state kernels: halve the tile (DQK side first) until B*NH*tiles programs fill
    the GPU, so a long sequence in a small batch still runs on many SMs."""
    BK, BV = min(DQK, 64), min(DV, 64)
    while BH * (DQK // BK) * (DV // BV) < MIN_STATE_PROGRAMS and max(BK, BV) > 16:
        if BK >= BV and BK > 16:
            BK //= 2
        else:
            BV //= 2
    return BK, BV


class ChunkwiseMLSTM(torch.autograd.Function):
    """(q, k, v, lf, i, C0, n0, m0) -> (h, C, n, m), the chunkwise mLSTM from state (C0, n0, m0) to the final one.
    q, k: (B, NH, T, DQK), v: (B, NH, T, DV), unscaled; lf = log sigmoid(f), i: (B, NH, NC*L) float32, padded past T
    (lf 0, i -inf); C0 (B, NH, DQK, DV), n0 (B, NH, DQK), m0 (B, NH) float32. h has q's dtype. m gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, lf, i, C0, n0, m0, L, eps):
        q, k, v = _rowwise(q), _rowwise(k), _rowwise(v)
        B, NH, T, DQK = q.shape
        DV = v.size(-1)
        NC = lf.size(-1) // L
        BH = B * NH
        b = lf.reshape(B, NH, NC, L).cumsum(-1).reshape(B, NH, NC * L)
        i = i.contiguous()
        f32 = dict(dtype=torch.float32, device=q.device)
        CS = torch.empty(B, NH, NC + 1, DQK, DV, **f32)
        NS = torch.empty(B, NH, NC + 1, DQK, **f32)
        MS = torch.empty(B, NH, NC + 1, **f32)
        CS[:, :, 0], NS[:, :, 0], MS[:, :, 0] = C0, n0, m0
        p = _precisions(q)
        BK, BV = _state_tiles(BH, DQK, DV)
        _fwd_states[(BH, DQK // BK, DV // BV)](k, v, b, i, CS, NS, MS, *_strides(k), *_strides(v), NH, T, NC,
                                               L=L, DQK=DQK, DV=DV, BK=BK, BV=BV, PRECISION=p["STATE_PRECISION"],
                                               num_warps=NUM_WARPS["states"])
        h = torch.empty(B, NH, T, DV, dtype=q.dtype, device=q.device)
        # backward needs h in float32: a copy when h is rounded and a gradient will be asked for
        save_h32 = q.dtype != torch.float32 and any(x.requires_grad for x in (q, k, v, lf, i, C0, n0))
        h32 = torch.empty(B, NH, T, DV, **f32) if save_h32 else h
        MT, DEN, SIG = (torch.empty(B, NH, NC * L, **f32) for _ in range(3))
        _fwd_out[(BH, NC)](q, k, v, b, i, CS, NS, MS, h, h32, MT, DEN, SIG, *_strides(q), *_strides(k), *_strides(v),
                           *_strides(h), NH, T, NC, SCALE=1.0 / math.sqrt(DQK), EPS=eps,
                           L=L, DQK=DQK, DV=DV, BK=min(DQK, 64), BV=min(DV, 64), **p, SAVE_H32=save_h32,
                           num_warps=NUM_WARPS["fwd_out"])
        ctx.save_for_backward(q, k, v, b, i, CS, NS, MS, MT, DEN, SIG, h32)
        ctx.L = L
        # copies: the outputs must not be views of what backward reads
        return h, CS[:, :, NC].clone(), NS[:, :, NC].clone(), MS[:, :, NC].clone()

    @staticmethod
    def backward(ctx, dh, dC_end, dn_end, _dm_end):
        q, k, v, b, i, CS, NS, MS, MT, DEN, SIG, h32 = ctx.saved_tensors
        L = ctx.L
        dh = _rowwise(dh)
        B, NH, T, DQK = q.shape
        DV = v.size(-1)
        NC = b.size(-1) // L
        BH = B * NH
        scale = 1.0 / math.sqrt(DQK)
        p = _precisions(q)
        f32 = dict(dtype=torch.float32, device=q.device)
        DDD = torch.empty(B, NH, NC * L, **f32)
        _bwd_prep[(BH, NC)](dh, h32, DEN, SIG, DDD, *_strides(dh), *_strides(h32), NH, T, NC,
                            L=L, DV=DV, BV=min(DV, 64), num_warps=NUM_WARPS["prep"])
        DCS = torch.empty(B, NH, NC + 1, DQK, DV, **f32)
        DNS = torch.empty(B, NH, NC + 1, DQK, **f32)
        DCS[:, :, NC], DNS[:, :, NC] = dC_end, dn_end
        BK, BV = _state_tiles(BH, DQK, DV)
        _bwd_states[(BH, DQK // BK, DV // BV)](q, dh, b, MS, MT, DEN, DDD, DCS, DNS, *_strides(q), *_strides(dh),
                                               NH, T, NC, SCALE=scale, L=L, DQK=DQK, DV=DV, BK=BK, BV=BV,
                                               PRECISION=p["STATE_PRECISION"], num_warps=NUM_WARPS["states"])
        dq, dk = (torch.empty(B, NH, T, DQK, dtype=q.dtype, device=q.device) for _ in range(2))
        dv = torch.empty(B, NH, T, DV, dtype=v.dtype, device=v.device)
        dlf, di = torch.empty(B, NH, NC * L, **f32), torch.empty(B, NH, NC * L, **f32)
        _bwd_qkv[(BH, NC)](q, k, v, dh, b, i, CS, NS, MS, MT, DEN, DDD, DCS, DNS, dq, dk, dv, dlf, di,
                           *_strides(q), *_strides(k), *_strides(v), *_strides(dh), NH, T, NC, SCALE=scale,
                           L=L, DQK=DQK, DV=DV, BK=min(DQK, 64), BV=min(DV, 64), **p, num_warps=NUM_WARPS["bwd_qkv"])
        return dq, dk, dv, dlf, di, DCS[:, :, 0], DNS[:, :, 0], None, None, None


def _precisions(q):
    # float32 inputs get true float32 products (no TF32 rounding, whatever torch's global flags say): who passes
    # float32 wants its accuracy; bfloat16 is the fast path (PRECISION only affects float32 operands)
    if q.dtype == torch.float32:
        return dict(PRECISION="ieee", STATE_PRECISION="ieee")
    return dict(PRECISION="tf32", STATE_PRECISION=STATE_PRECISION)


def _is_power_of_two_in(x, lo, hi):
    return lo <= x <= hi and x & (x - 1) == 0


def _check_device(x, what):
    """The kernels run on CUDA tensors, or on CPU ones under the interpreter: else a one-line error."""
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(f"{what} needs CUDA tensors, got device {x.device}; on the CPU it runs only under the "
                         "Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)")


def _check_no_grad(what, tensors):
    """The decoding kernels have no backward: refuse inputs that would need one."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        raise ValueError(f"{what} has no backward (decoding only): call it under torch.no_grad()")


def mlstm_chunkwise_triton(q, k, v, i, f, chunk_size=64, state=None, return_state=False, eps=1e-6):
    """blalm.mlstm_chunkwise's contract, fused: q, k: (B, NH, T, DQK); v: (B, NH, T, DV) in float32, float16 or
    bfloat16 (rows contiguous; other strides are fine); i, f: (B, NH, T) gate pre-activations; state (C, n, m)
    or None (zero state) -> h (B, NH, T, DV) in v's dtype, and the final state (float32) when return_state.
    Any T (the last chunk is padded inside the kernels). Differentiable in q, k, v, i, f and the state's C, n."""
    B, NH, T, DQK = q.shape
    DV = v.size(-1)
    L = chunk_size
    if not _is_power_of_two_in(L, 16, 128):
        raise ValueError(f"chunk_size={L}: the Triton kernel needs a power of two in [16, 128] "
                         "(tl.dot needs >= 16; larger L x L blocks do not fit in registers)")
    for name, D in (("DQK", DQK), ("DV", DV)):
        if not _is_power_of_two_in(D, 16, 256):
            raise ValueError(f"{name}={D}: the Triton kernel needs a head size that is a power of two in [16, 256]")
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1] or i.shape != q.shape[:-1] or f.shape != q.shape[:-1]:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, i {tuple(i.shape)}, "
                         f"f {tuple(f.shape)} do not fit (B, NH, T, D) / (B, NH, T)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: the Triton kernel needs one of "
                         "float32, float16, bfloat16 for all three (float64: use kernel='torch')")
    _check_device(q, "kernel='triton'")
    NC = (T + L - 1) // L
    pad = NC * L - T
    # padded steps forget nothing (log f = 0) and write nothing (i = -inf): the state passes through
    lf = F.pad(F.logsigmoid(f.float()), (0, pad), value=0.0)
    i = F.pad(i.float(), (0, pad), value=float("-inf"))
    if state is None:
        state = (q.new_zeros(B, NH, DQK, DV, dtype=torch.float32), q.new_zeros(B, NH, DQK, dtype=torch.float32),
                 q.new_zeros(B, NH, dtype=torch.float32))
    C0, n0, m0 = (s.float() for s in state)
    h, C, n, m = ChunkwiseMLSTM.apply(q, k, v, lf, i, C0, n0, m0.detach(), L, eps)
    return (h, (C, n, m)) if return_state else h


# -----------------------------------------------------------------------------
# One decoding step (blalm.mlstm_step's function) in one kernel, the state updated in place; and a whole
# MLSTMLayer's decoding step (everything between its input projection and its output projection) in another

@triton.jit
def _cell(q1, q2, k1, k2, v, i, f, C, N, M, bh, eps, DQK: tl.constexpr, DV: tl.constexpr):
    """The recurrence for head bh, q and k given as halves (q1 = q[:DQK/2], q2 = q[DQK/2:]: the rotary layout's,
    so that the layer kernel can rotate them without moving values between registers), q already scaled by
    1/sqrt(DQK): m' = max(log sigmoid(f) + m, i), C' = exp(lf + m - m') C + exp(i - m') k v^T, n' likewise with
    v -> 1 -> h = (q C') / (max(|q . n'|, exp(-m')) + eps), in the state's dtype. Overwrites C, n, m; the caller
    has a barrier between every load of them and this."""
    dt = C.dtype.element_ty
    r2, rv = tl.arange(0, DQK // 2), tl.arange(0, DV)
    m = tl.load(M + bh)
    lf = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))          # log sigmoid(f), without overflow
    m_new = tl.maximum(lf + m, i)
    fg, ig = tl.exp(lf + m - m_new), tl.exp(i - m_new)
    c1_ptr = C + bh.to(tl.int64) * (DQK * DV) + r2[:, None] * DV + rv[None, :]
    c2_ptr = c1_ptr + (DQK // 2) * DV
    n1_ptr = N + bh.to(tl.int64) * DQK + r2
    n2_ptr = n1_ptr + DQK // 2
    c1, c2 = tl.load(c1_ptr).to(dt), tl.load(c2_ptr).to(dt)
    n1, n2 = tl.load(n1_ptr).to(dt), tl.load(n2_ptr).to(dt)
    tl.debug_barrier()   # every thread has read m, C, n before any overwrites them (a vector's element has copies)
    c1 = fg * c1 + ig * (k1[:, None] * v[None, :])
    c2 = fg * c2 + ig * (k2[:, None] * v[None, :])
    n1, n2 = fg * n1 + ig * k1, fg * n2 + ig * k2
    tl.store(c1_ptr, c1)
    tl.store(c2_ptr, c2)
    tl.store(n1_ptr, n1)
    tl.store(n2_ptr, n2)
    tl.store(M + bh, m_new)
    den = tl.maximum(tl.abs(tl.sum(q1 * n1, axis=0) + tl.sum(q2 * n2, axis=0)), tl.exp(-m_new)) + eps
    return (tl.sum(q1[:, None] * c1, axis=0) + tl.sum(q2[:, None] * c2, axis=0)) / den


@triton.jit
def _step(Q, K, V, I, Fg, C, N, M, H, sqb, sqh, skb, skh, svb, svh, sib, sih, sfb, sfh, shb, shh, NH, eps,
          DQK: tl.constexpr, DV: tl.constexpr):
    """blalm.mlstm_step for head bh = (b, h), in the state's dtype (float32; float64 in the tests: sqrt(DQK) is
    taken in it, while eps, a float argument, arrives as float32 on a GPU)."""
    bh = tl.program_id(0)
    b, h = bh // NH, bh % NH
    dt = C.dtype.element_ty
    r2 = tl.arange(0, DQK // 2)
    q, k = Q + b * sqb + h * sqh + r2, K + b * skb + h * skh + r2
    sqrt_dqk = tl.sqrt(tl.full((), DQK, dt))
    q1, q2 = tl.load(q).to(dt) / sqrt_dqk, tl.load(q + DQK // 2).to(dt) / sqrt_dqk
    k1, k2 = tl.load(k).to(dt), tl.load(k + DQK // 2).to(dt)
    v = tl.load(V + b * svb + h * svh + tl.arange(0, DV)).to(dt)
    i, f = tl.load(I + b * sib + h * sih).to(dt), tl.load(Fg + b * sfb + h * sfh).to(dt)
    out = _cell(q1, q2, k1, k2, v, i, f, C, N, M, bh, eps, DQK, DV)
    tl.store(H + b * shb + h * shh + tl.arange(0, DV), out.to(H.dtype.element_ty))


def mlstm_step_triton(q, k, v, i, f, state, eps=1e-6):
    """blalm.mlstm_step's function, fused into one kernel launch for decoding: q, k: (B, NH, DQK); v: (B, NH, DV)
    (any float dtype, the last dim contiguous); i, f: (B, NH) gate pre-activations; state (C, n, m): contiguous
    (B, NH, DQK, DV), (B, NH, DQK), (B, NH) of one dtype, float32 or float64, **updated in place** -> h (B, NH, DV)
    in v's dtype. One program per head (each reads its own state, then overwrites it): eager, mlstm_step is about
    20 kernels and three copies back into a static cache. No backward: decoding only (inputs must not need grad)."""
    C, n, m = state
    B, NH, DQK = q.shape
    DV = v.size(-1)
    for name, D in (("DQK", DQK), ("DV", DV)):
        if not _is_power_of_two_in(D, 16, 256):
            raise ValueError(f"{name}={D}: the Triton step needs a head size that is a power of two in [16, 256]")
    if (k.shape != q.shape or v.shape != (B, NH, DV) or i.shape != (B, NH) or f.shape != (B, NH)
            or C.shape != (B, NH, DQK, DV) or n.shape != (B, NH, DQK) or m.shape != (B, NH)):
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, i {tuple(i.shape)}, "
                         f"f {tuple(f.shape)}, state {tuple(C.shape)}, {tuple(n.shape)}, {tuple(m.shape)} do not "
                         "fit (B, NH, D), (B, NH) and (B, NH, DQK, DV), (B, NH, DQK), (B, NH)")
    if C.dtype not in (torch.float32, torch.float64) or n.dtype != C.dtype or m.dtype != C.dtype:
        raise ValueError(f"state dtypes {C.dtype}, {n.dtype}, {m.dtype}: the Triton step needs one of float32, "
                         "float64 for all three")
    if not all(s.is_contiguous() for s in state):
        raise ValueError("the Triton step updates the state in place: C, n, m must be contiguous")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("q, k, v: the Triton step needs the last dim contiguous (stride 1)")
    _check_no_grad("mlstm_step_triton", (q, k, v, i, f, C, n, m))
    _check_device(q, "the Triton step")
    return _step_op(q, k, v, i, f, C, n, m, eps)


# An operator of its own, so that torch.compile (a compiled decoding block, model.compile_decode) traces the step
# as one call that mutates C, n, m, whatever triton.jit made of the kernel (the interpreter's function too)
@torch.library.custom_op("blalm::mlstm_step", mutates_args=("C", "n", "m"))
def _step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor, C: torch.Tensor,
             n: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    B, NH, DQK = q.shape
    DV = v.size(-1)
    h = torch.empty(B, NH, DV, dtype=v.dtype, device=v.device)
    _step[(B * NH,)](q, k, v, i, f, C, n, m, h, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                     v.stride(1), i.stride(0), i.stride(1), f.stride(0), f.stride(1), h.stride(0), h.stride(1), NH,
                     eps, DQK=DQK, DV=DV, num_warps=_step_warps(DQK, DV))
    return h


def _step_warps(DQK, DV):
    """_step's warps (also what results/kernels/compile_check.py compiles): 8 above 64 x 64, no spills at 128 x 128."""
    return 4 if DQK * DV <= 64 * 64 else 8


@_step_op.register_fake
def _step_op_shape(q, k, v, i, f, C, n, m, eps):
    return v.new_empty(q.size(0), q.size(1), v.size(-1))


@triton.jit
def _tanh(z):
    """tanh in float32 to a few ulp: the odd series to z^9 for |z| < 1/4 (its next term is below 1e-8 z there),
    1 - 2 / (exp(2z) + 1) beyond (near 0 that difference cancels: 1e-5 relative error at z = 0.01)."""
    z2 = z * z
    series = z * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(z) < 0.25, series, 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))


@triton.jit
def _conv_step(X, RING, W, WB, col, CH3, K: tl.constexpr, KP: tl.constexpr):
    """The short conv's decoding step at channels col (of the 3C): y = bias + sum_j w_j u_j over the K-1 inputs in
    RING (rows oldest first, row stride CH3) and the new one at X -> (y in float32, the ring's next rows)."""
    x = tl.load(X + col)
    rj = tl.arange(0, KP)[:, None]
    past = tl.load(RING + rj * CH3 + col[None, :], mask=rj < K - 1, other=0.0)
    w = tl.load(W + col[None, :] * K + rj, mask=rj < K - 1, other=0.0)
    y = (tl.load(WB + col).to(tl.float32) + tl.sum(past.to(tl.float32) * w.to(tl.float32), axis=0)
         + tl.load(W + col * K + K - 1).to(tl.float32) * x.to(tl.float32))
    later = tl.load(RING + (rj + 1) * CH3 + col[None, :], mask=rj + 1 < K - 1, other=0.0)
    return y, tl.where(rj == K - 2, x[None, :], later)


@triton.jit
def _layer_step(QKV, O, I, Fg, MOD, RING, CW, CB, C, N, M, KR, VR, POS, NW, Y, sqkv, so, si, sf, smod, sy, NH, S,
                cap, eps, base, sqrt_d, D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, SP: tl.constexpr,
                HAS_CONV: tl.constexpr, HAS_SWA: tl.constexpr, MODULATION: tl.constexpr, HAS_CAP: tl.constexpr):
    """blalm.MLSTMLayer.forward for one token of head bh = (b, h), from the input projection's outputs (qkv, o, the
    gates) to what c_proj reads: the short conv (its ring of the last K-1 inputs shifted), the gates' soft cap, the
    mLSTM step (_cell) and the per-head norm; the SWA branch (rotary q, k at position pos, the key and value
    written to ring slot pos % S, softmax over the slots written so far), its modulation; the output gate and
    norm scale. q and k are handled as halves (rotary's layout). Float32 arithmetic; the rings keep their dtype."""
    bh = tl.program_id(0)
    b, h = bh // NH, bh % NH
    CH = NH * D
    r2, rd = tl.arange(0, D // 2), tl.arange(0, D)
    c1, c2, cv = h * D + r2, h * D + D // 2 + r2, h * D + rd      # this head's channels: q's halves, v's
    X = QKV + b * sqkv
    if HAS_CONV:
        ring = RING + b * (K - 1) * 3 * CH
        q1, q1_next = _conv_step(X, ring, CW, CB, c1, 3 * CH, K, KP)
        q2, q2_next = _conv_step(X, ring, CW, CB, c2, 3 * CH, K, KP)
        k1, k1_next = _conv_step(X, ring, CW, CB, CH + c1, 3 * CH, K, KP)
        k2, k2_next = _conv_step(X, ring, CW, CB, CH + c2, 3 * CH, K, KP)
        v, v_next = _conv_step(X, ring, CW, CB, 2 * CH + cv, 3 * CH, K, KP)
    else:
        q1, q2 = tl.load(X + c1).to(tl.float32), tl.load(X + c2).to(tl.float32)
        k1, k2 = tl.load(X + CH + c1).to(tl.float32), tl.load(X + CH + c2).to(tl.float32)
        v = tl.load(X + 2 * CH + cv).to(tl.float32)
    i, f = tl.load(I + b * si + h).to(tl.float32), tl.load(Fg + b * sf + h).to(tl.float32)
    if HAS_CAP:   # the gates' soft cap, cap * tanh(x / cap)
        i, f = cap * _tanh(i / cap), cap * _tanh(f / cap)
    if HAS_SWA:
        pos = tl.load(POS)
        slot = pos % S
        # blalm.rotary's angles: inv_freq = base^(-2j/D) (here in float64, rounded once to float32), times pos
        inv_freq = tl.exp2(-(2.0 * r2.to(tl.float64) / D) * tl.log2(tl.full((), base, tl.float64)))
        ang = pos.to(tl.float32) * inv_freq.to(tl.float32)
        cos, sin = tl.cos(ang), tl.sin(ang)
        ring_dt = KR.dtype.element_ty   # the new key and value as the ring keeps them
        kr1 = (k1 * cos - k2 * sin).to(ring_dt)
        kr2 = (k2 * cos + k1 * sin).to(ring_dt)
        vr = v.to(ring_dt)
        rs = tl.arange(0, SP)[:, None]
        rows = (bh.to(tl.int64) * S + rs) * D
        now = rs == slot   # the slot of this position: its new key and value, not the ring's old ones
        key1 = tl.load(KR + rows + r2[None, :], mask=rs < S, other=0.0)
        key2 = tl.load(KR + rows + D // 2 + r2[None, :], mask=rs < S, other=0.0)
        val = tl.load(VR + rows + rd[None, :], mask=rs < S, other=0.0)
        key1 = tl.where(now, kr1[None, :], key1).to(tl.float32)
        key2 = tl.where(now, kr2[None, :], key2).to(tl.float32)
        val = tl.where(now, vr[None, :], val).to(tl.float32)
        score = (tl.sum((q1 * cos - q2 * sin)[None, :] * key1, axis=1)
                 + tl.sum((q2 * cos + q1 * sin)[None, :] * key2, axis=1)) / sqrt_d
        score = tl.where((tl.arange(0, SP) <= pos) & (tl.arange(0, SP) < S), score, float("-inf"))
        p = tl.exp(score - tl.max(score, axis=0))
        y = tl.sum(p[:, None] * val, axis=0) / tl.sum(p, axis=0)
    tl.debug_barrier()   # the rings read by every thread before any is overwritten (and, in _cell, the state)
    if HAS_CONV:
        ring_rows = ring + tl.arange(0, KP)[:, None] * 3 * CH
        keep = tl.arange(0, KP)[:, None] < K - 1
        tl.store(ring_rows + c1[None, :], q1_next, mask=keep)
        tl.store(ring_rows + c2[None, :], q2_next, mask=keep)
        tl.store(ring_rows + CH + c1[None, :], k1_next, mask=keep)
        tl.store(ring_rows + CH + c2[None, :], k2_next, mask=keep)
        tl.store(ring_rows + 2 * CH + cv[None, :], v_next, mask=keep)
    if HAS_SWA:
        slot_row = (bh.to(tl.int64) * S + slot) * D
        tl.store(KR + slot_row + r2, kr1)
        tl.store(KR + slot_row + D // 2 + r2, kr2)
        tl.store(VR + slot_row + rd, vr)
    out = _cell(q1 / sqrt_d, q2 / sqrt_d, k1, k2, v, i, f, C, N, M, bh, eps, D, D)
    mean = tl.sum(out, axis=0) / D
    var = tl.sum((out - mean) * (out - mean), axis=0) / D
    out = (out - mean) / tl.sqrt(var + 1e-5)                    # F.layer_norm over the head, no weight
    if HAS_SWA:
        if MODULATION:
            out += y / (1.0 + tl.exp(-tl.load(MOD + b * smod + h).to(tl.float32)))
        else:
            out = 0.5 * (out + y)
    gate = 1.0 / (1.0 + tl.exp(-tl.load(O + b * so + cv).to(tl.float32)))
    out = out * tl.load(NW + cv).to(tl.float32) * gate
    tl.store(Y + b * sy + cv, out.to(Y.dtype.element_ty))


def mlstm_layer_step_triton(qkv, o, i, f, mod, conv, conv_w, conv_b, state, k_ring, v_ring, pos, norm_weight,
                            softcap=0.0, rotary_base=10000.0, eps=1e-6):
    """blalm.MLSTMLayer's decoding step (one token per row through a StaticCache) between its input and output
    projections, in one kernel launch: qkv (B, 1, 3C), o (B, 1, C), i, f (B, 1, NH), mod (B, 1, NH) or None (no
    modulation: the branches averaged) -- the input projection's outputs (views of one tensor are fine); conv
    (B, K-1, 3C) the short conv's last inputs, conv_w (3C, K), conv_b (3C,), or all None (no conv); state
    (C, n, m) float32; k_ring, v_ring (B, NH, S, D) the SWA branch's ring buffers, or None (no SWA branch); pos a
    0-dim int64 device tensor (this token's position); norm_weight (C,) -> (B, 1, C) in qkv's dtype, what c_proj
    reads. The conv ring, the state and the SWA rings are updated in place (all contiguous). Head size D: a
    power of two in [16, 256]."""
    B, _, C3 = qkv.shape
    CH = C3 // 3
    NH = i.size(-1)
    D = CH // NH
    if not _is_power_of_two_in(D, 16, 256) or NH * D != CH or C3 != 3 * CH:
        raise ValueError(f"qkv of {C3} channels and {NH} heads: the Triton layer step needs 3 * NH * D channels "
                         "with a head size D that is a power of two in [16, 256]")
    K = conv_w.size(-1) if conv is not None else 0
    S = k_ring.size(2) if k_ring is not None else 0
    shapes = [(qkv, (B, 1, C3)), (o, (B, 1, CH)), (i, (B, 1, NH)), (f, (B, 1, NH)), (state[0], (B, NH, D, D)),
              (state[1], (B, NH, D)), (state[2], (B, NH)), (norm_weight, (CH,))]
    shapes += [(mod, (B, 1, NH))] if mod is not None else []
    shapes += [(conv, (B, K - 1, C3)), (conv_w, (C3, K)), (conv_b, (C3,))] if conv is not None else []
    shapes += [(k_ring, (B, NH, S, D)), (v_ring, (B, NH, S, D))] if k_ring is not None else []
    for x, want in shapes:
        if tuple(x.shape) != want:
            raise ValueError(f"the Triton layer step got a tensor of shape {tuple(x.shape)} where it expects {want}")
    updated = list(state) + ([conv] if conv is not None else []) + ([k_ring, v_ring] if k_ring is not None else [])
    if not all(x.is_contiguous() for x in updated) or any(x.dtype != torch.float32 for x in state):
        raise ValueError("the Triton layer step updates the state (float32), the conv's and the SWA's rings in "
                         "place: they must be contiguous")
    if conv is not None and conv_w.stride() != (K, 1):
        raise ValueError(f"conv_w strides {conv_w.stride()}: the Triton layer step needs ({K}, 1)")
    if any(x.stride(-1) != 1 for x in (qkv, o, i, f) + ((mod,) if mod is not None else ())):
        raise ValueError("qkv, o, i, f, mod: the Triton layer step needs their last dim contiguous (stride 1)")
    if not norm_weight.is_contiguous() or (conv is not None and not conv_b.is_contiguous()):
        raise ValueError("norm_weight, conv_b: the Triton layer step needs them contiguous")
    if pos.dim() != 0 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos: the Triton layer step needs a 0-dim integer tensor, got {pos.dtype} of shape "
                         f"{tuple(pos.shape)}")
    _check_no_grad("mlstm_layer_step_triton", (qkv, o, i, f, *updated))
    _check_device(qkv, "the Triton layer step")
    return _layer_step_op(qkv, o, i, f, mod, conv, conv_w, conv_b, *state, k_ring, v_ring, pos, norm_weight,
                          float(softcap), float(rotary_base), eps)


@torch.library.custom_op("blalm::mlstm_layer_step", mutates_args=("conv", "C", "n", "m", "k_ring", "v_ring"))
def _layer_step_op(qkv: torch.Tensor, o: torch.Tensor, i: torch.Tensor, f: torch.Tensor, mod: Optional[torch.Tensor],
                   conv: Optional[torch.Tensor], conv_w: Optional[torch.Tensor], conv_b: Optional[torch.Tensor],
                   C: torch.Tensor, n: torch.Tensor, m: torch.Tensor, k_ring: Optional[torch.Tensor],
                   v_ring: Optional[torch.Tensor], pos: torch.Tensor, norm_weight: torch.Tensor, softcap: float,
                   rotary_base: float, eps: float) -> torch.Tensor:
    B, _, C3 = qkv.shape
    NH = i.size(-1)
    D = C3 // 3 // NH
    K = conv_w.size(-1) if conv is not None else 0
    S = k_ring.size(2) if k_ring is not None else 0
    sizes, warps = _layer_step_sizes(D, K, S)
    y = qkv.new_empty(B, 1, C3 // 3)
    none = y   # the pointer given for a branch the layer does not have (its code is compiled out, never read)
    mod_ = none if mod is None else mod
    _layer_step[(B * NH,)](qkv, o, i, f, mod_, *((conv, conv_w, conv_b) if K else (none,) * 3), C, n, m,
                           *((k_ring, v_ring) if S else (none,) * 2), pos, norm_weight, y, qkv.stride(0),
                           o.stride(0), i.stride(0), f.stride(0), mod_.stride(0), y.stride(0), NH, max(S, 1),
                           softcap or 1.0, eps, rotary_base, math.sqrt(D), **sizes,
                           HAS_CONV=K > 0, HAS_SWA=S > 0, MODULATION=mod is not None, HAS_CAP=softcap > 0,
                           num_warps=warps)
    return y


def _layer_step_sizes(D, K, S):
    """-> (_layer_step's size constexprs, its warps) for head size D, conv width K and S ring slots (0: no conv,
    no SWA branch); also what results/kernels/compile_check.py compiles. 4 warps hold a window of up to 128 keys of
    64 in registers (SP x D floats); wider windows get 8 (unmeasured)."""
    SP = triton.next_power_of_2(max(S, 1))
    sizes = dict(D=D, K=max(K, 1), KP=triton.next_power_of_2(max(K - 1, 1)), SP=SP)
    return sizes, 4 if SP * D <= 8192 else 8


@_layer_step_op.register_fake
def _layer_step_op_shape(qkv, o, i, f, mod, conv, conv_w, conv_b, C, n, m, k_ring, v_ring, pos, norm_weight, softcap,
                         rotary_base, eps):
    return qkv.new_empty(qkv.size(0), 1, qkv.size(-1) // 3)
