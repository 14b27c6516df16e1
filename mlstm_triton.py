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

For decoding, `mlstm_step_triton` (the end of this file) is blalm.mlstm_step's one token as one kernel, a program per
head, the state updated in place (the model uses it through a StaticCache when kernels="triton").

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
    if not q.is_cuda and not INTERPRETED:
        raise ValueError(f"kernel='triton' needs CUDA tensors, got device {q.device}; on the CPU it runs only "
                         "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)")
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
# One decoding step (blalm.mlstm_step's function) in one kernel, the state updated in place

@triton.jit
def _step(Q, K, V, I, Fg, C, N, M, H, sqb, sqh, skb, skh, svb, svh, sib, sih, sfb, sfh, shb, shh, NH, sqrt_dqk,
          eps, DQK: tl.constexpr, DV: tl.constexpr):
    """Head bh = (b, h): m' = max(log sigmoid(f) + m, i), C' = exp(lf + m - m') C + exp(i - m') k v^T, n' likewise
    with v -> 1, h = (q' C') / (max(|q' . n'|, exp(-m')) + eps) with q' = q / sqrt(DQK). The arithmetic runs in
    the state's dtype (float32; float64 in the tests); C, n, m are overwritten, each by the program of its head
    only, after that program has read them."""
    bh = tl.program_id(0)
    b, h = bh // NH, bh % NH
    dt = C.dtype.element_ty
    rk, rv = tl.arange(0, DQK), tl.arange(0, DV)
    q = tl.load(Q + b * sqb + h * sqh + rk).to(dt) / sqrt_dqk
    k = tl.load(K + b * skb + h * skh + rk).to(dt)
    v = tl.load(V + b * svb + h * svh + rv).to(dt)
    i = tl.load(I + b * sib + h * sih).to(dt)
    f = tl.load(Fg + b * sfb + h * sfh).to(dt)
    m = tl.load(M + bh)
    lf = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))          # log sigmoid(f), without overflow
    m_new = tl.maximum(lf + m, i)
    fg, ig = tl.exp(lf + m - m_new), tl.exp(i - m_new)
    c_ptr = C + bh.to(tl.int64) * (DQK * DV) + rk[:, None] * DV + rv[None, :]
    c = fg * tl.load(c_ptr) + ig * (k[:, None] * v[None, :])
    n = fg * tl.load(N + bh.to(tl.int64) * DQK + rk) + ig * k
    tl.store(c_ptr, c)
    tl.store(N + bh.to(tl.int64) * DQK + rk, n)
    tl.store(M + bh, m_new)
    den = tl.maximum(tl.abs(tl.sum(q * n, axis=0)), tl.exp(-m_new)) + eps
    out = tl.sum(q[:, None] * c, axis=0) / den
    tl.store(H + b * shb + h * shh + rv, out.to(H.dtype.element_ty))


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
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, i, f, C, n, m)):
        raise ValueError("mlstm_step_triton has no backward (decoding only): call it under torch.no_grad()")
    if not q.is_cuda and not INTERPRETED:
        raise ValueError(f"the Triton step needs CUDA tensors, got device {q.device}; on the CPU it runs only "
                         "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)")
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
                     math.sqrt(DQK), eps, DQK=DQK, DV=DV, num_warps=4)
    return h


@_step_op.register_fake
def _step_op_shape(q, k, v, i, f, C, n, m, eps):
    return v.new_empty(q.size(0), q.size(1), v.size(-1))
