"""
BLaLM: a Transformer whose self-attention is replaced by an mLSTM token mixer, with lightweight
enhancements (short causal convolutions, sliding-window attention with dynamic modulation, Hedgehog
feature maps), and the softmax GPT-2 baseline it is compared against. Read top to bottom:

1. the mLSTM in three forms that compute the same function (parallel, chunkwise, recurrent + step)
2. layers: norms, the MLP, rotary positions, the mixers (softmax attention, mLSTM (+ conv, + SWA),
   Hedgehog linear attention), the residual block
3. BLaLMConfig and BLaLM: forward, generation from recurrent state, GPT-2 weight loading, FLOPs.
   (The decoding caches, sampling and CUDA-graph capture that generation uses are in decode.py.)

References: Beck et al., "xLSTM: Extended Long Short-Term Memory" (2024) for the mLSTM; Haller, Golde,
Akbik, "Sample-Efficient Language Modeling with Linear Attention and Lightweight Enhancements" (BabyLM
2025) for the enhancements; Zhang et al., "The Hedgehog & the Porcupine" (ICLR 2024) for the feature maps.
"""

import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from decode import DecodeCache, StaticCache, cuda_graph, ring_attention_step, sample_next
from hedgehog import HedgehogFeatureMap, acc_dtype, causal_mask, linear_attention_chunkwise, linear_attention_step

# -----------------------------------------------------------------------------
# 1. The mLSTM, three ways
#
# Every form computes, for each head (q scaled by 1/sqrt(DQK)):
#
#   F[t,s] = sum_{r=s+1..t} log sigmoid(f_r)                  (s <= t)
#   w[t,s] = (q_t . k_s) * exp(F[t,s] + i_s)                   (s <= t, else 0)
#   h_t    = sum_s w[t,s] v_s / max(|sum_s w[t,s]|, 1)
#
# The exponential input gate makes exp(F + i) overflow quickly, so all forms work with weights
# divided by exp(m_t), m_t the largest log-weight a row sees (the xLSTM stabiliser):
#
#   h_t = sum_s w'[t,s] v_s / (max(|sum_s w'[t,s]|, exp(-m_t)) + eps),   w' = w * exp(-m_t)
#
# which is the same h_t up to eps. The initial state (C, n, m) counts as one more "source" whose
# log-weight is m decayed by every forget gate since the start, so a zero state with m = 0 enters
# the maximum as sum_{r<=t} log sigmoid(f_r). With that convention the three forms compute the
# same m_t and therefore the same h_t, eps included, which is what lets a test demand 1e-10.
# m_t is a numerical device, not part of the model: its gradient is not propagated (it would only
# carry the tiny eps term), in every form alike.
#
# One name per quantity in every form (and in mlstm_triton.py):
#   lf        log sigmoid(f), the log forget gates                       (B, NH, T)
#   logA, A   log and value of the stabilised gate matrix exp(F[t,s] + i_s - m_t)
#   S, P      the scores q_t . k_s and the stabilised weights P = S * A  (w' above)
#   m         the stabiliser; log_init the log-weight of the initial (or entering) state at t
#   num, den  sum_s P[t,s] v_s and max(|sum_s P[t,s]|, exp(-m_t)) + eps: h = num / den
#   (C, n, m) the state: C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH); C0, n0, m0 the initial one
# The state and all gate arithmetic are float32 at least (acc_dtype; float64 stays float64).
# -----------------------------------------------------------------------------


def segsum(x):
    """S[..., t, s] = x[..., s+1] + ... + x[..., t] for s <= t, -inf for s > t.

    Built by a masked cumulative sum (not as cumsum[t] - cumsum[s]), so long runs of very negative
    log forget gates do not cancel catastrophically."""
    T = x.size(-1)
    xx = x[..., :, None].expand(*x.shape, T)                                     # xx[r, s] = x_r
    xx = xx.masked_fill(~causal_mask(T, x.device, diagonal=-1), 0.0)             # keep r > s
    sums = torch.cumsum(xx, dim=-2)                                              # [t, s] = sum_{s<r<=t}
    return sums.masked_fill(~causal_mask(T, x.device), float("-inf"))


def _zero_state(B, NH, DQK, DV, dtype, device):
    return (torch.zeros(B, NH, DQK, DV, dtype=dtype, device=device),
            torch.zeros(B, NH, DQK, dtype=dtype, device=device),
            torch.zeros(B, NH, dtype=dtype, device=device))


def mlstm_parallel(q, k, v, i, f, eps=1e-6):
    """The quadratic form from the zero state: the readable reference. O(T^2) memory.
    q, k: (B, NH, T, DQK); v: (B, NH, T, DV); i, f: (B, NH, T) gate pre-activations -> h (B, NH, T, DV)."""
    in_dtype = v.dtype
    dt = acc_dtype(q.dtype)
    DQK = q.size(-1)
    q, k, v = q.to(dt) / math.sqrt(DQK), k.to(dt), v.to(dt)
    lf = F.logsigmoid(f.to(dt))                                       # (B, NH, T)
    logA = segsum(lf) + i.to(dt)[..., None, :]                        # (B, NH, T, T): F[t,s] + i_s, unstabilised
    log_init = torch.cumsum(lf, dim=-1)                               # the zero initial state (m = 0), decayed
    m = torch.maximum(log_init, logA.amax(dim=-1)).detach()           # (B, NH, T)
    P = (q @ k.transpose(-2, -1)) * torch.exp(logA - m[..., None])    # S * A = w'[t, s]
    num = P @ v                                                       # (B, NH, T, DV)
    den = torch.maximum(P.sum(dim=-1).abs(), torch.exp(-m)) + eps     # (B, NH, T)
    return (num / den[..., None]).to(in_dtype)


def mlstm_step(q, k, v, i, f, state=None, eps=1e-6):
    """One time step of the recurrence (what generation uses).
    q, k: (B, NH, DQK); v: (B, NH, DV); i, f: (B, NH); state (C, n, m) or None (zero state)
    -> h (B, NH, DV), the new state."""
    in_dtype = v.dtype
    dt = acc_dtype(q.dtype)
    B, NH, DQK = q.shape
    if state is None:
        state = _zero_state(B, NH, DQK, v.size(-1), dt, q.device)
    C, n, m = state
    q, k, v = q.to(dt) / math.sqrt(DQK), k.to(dt), v.to(dt)
    lf, i = F.logsigmoid(f.to(dt)), i.to(dt)
    m_new = torch.maximum(lf + m, i).detach()                        # m_t = max(log f_t + m_{t-1}, i_t)
    fg = torch.exp(lf + m - m_new)                                   # stabilised forget gate
    ig = torch.exp(i - m_new)                                        # stabilised input gate
    C = fg[..., None, None] * C + ig[..., None, None] * (k[..., :, None] * v[..., None, :])
    n = fg[..., None] * n + ig[..., None] * k
    # q^T C as a product and a sum, not a matmul: under torch.compile the readout can then fuse with the state
    # update above (a batched matrix-vector product is a cuBLAS kernel of its own: `gemvNSP` in a decode profile)
    num = (q[..., :, None] * C).sum(-2)                              # (B, NH, DV)
    den = torch.maximum((q * n).sum(-1).abs(), torch.exp(-m_new)) + eps
    h = num / den[..., None]
    return h.to(in_dtype), (C, n, m_new)


def mlstm_recurrent(q, k, v, i, f, state=None, return_state=False, eps=1e-6):
    """The recurrent form: mlstm_step over t = 0..T-1. O(1) memory per step, slow in Python.
    q, k: (B, NH, T, DQK); v: (B, NH, T, DV); i, f: (B, NH, T); state (C, n, m) or None (zero state)
    -> h (B, NH, T, DV), and the final state when return_state."""
    hs = []
    for t in range(q.size(2)):
        h, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps)
        hs.append(h)
    h = torch.stack(hs, dim=2)
    return (h, state) if return_state else h


def mlstm_chunkwise(q, k, v, i, f, chunk_size=64, state=None, return_state=False, eps=1e-6, kernel="torch"):
    """Parallel inside chunks of L = chunk_size tokens, recurrent across chunks. Memory O(T * L).
    q, k: (B, NH, T, DQK); v: (B, NH, T, DV); i, f: (B, NH, T); state (C, n, m) or None (zero state)
    -> h (B, NH, T, DV), and the final state when return_state. Any T: the last chunk is padded.

    The states entering all chunks are computed at once, without a Python loop: each chunk c first
    summarises its own tokens into a local state U_c (stabilised by its own maximum M_c); the state
    at the end of chunk c is then the initial state plus every U_c' (c' <= c) decayed by the forget
    gates in between -- a small parallel form over chunks with an (NC x NC) decay matrix.

    Precision: only P @ v runs in the input dtype (bfloat16 inputs: tensor cores, as in flash attention);
    the scores q . k, the states and every other product, gates, stabilisers and sums are float32 (float64
    stays float64; on a GPU with TF32 allowed, float32 products use TF32). The output h sums terms of both
    signs: where they cancel, every product rounded to bfloat16 is amplified -- with the state products in
    bfloat16, gradients erred ~7e-2 against float64 on random inputs, ~3e-3 now (test_all.py).

    kernel="triton" computes the same function with the fused Triton kernels of mlstm_triton.py (optional:
    needs triton and CUDA tensors, chunk_size and head sizes powers of two); "torch" (below) is the reference.
    """
    if kernel not in MLSTM_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {MLSTM_KERNELS}")
    if kernel == "triton":  # imported only when asked for: triton is optional
        from mlstm_triton import mlstm_chunkwise_triton
        return mlstm_chunkwise_triton(q, k, v, i, f, chunk_size, state, return_state, eps)
    in_dtype = v.dtype
    dt = acc_dtype(q.dtype)
    B, NH, T, DQK = q.shape
    DV = v.size(-1)
    L = chunk_size
    NC = (T + L - 1) // L
    pad = NC * L - T
    q = q * (1.0 / math.sqrt(DQK))
    lf, i = F.logsigmoid(f.to(dt)), i.to(dt)
    if pad:  # padded steps forget nothing (log f = 0) and write nothing (i = -inf): the state passes through
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        lf = F.pad(lf, (0, pad), value=0.0)
        i = F.pad(i, (0, pad), value=float("-inf"))
    q, k, v = (x.view(B, NH, NC, L, -1) for x in (q, k, v))           # (B, NH, NC, L, D)
    lf, i = lf.view(B, NH, NC, L), i.view(B, NH, NC, L)
    if state is None:
        state = _zero_state(B, NH, DQK, DV, dt, q.device)
    C0, n0, m0 = (s.to(dt) for s in state)

    # (a) each chunk's own tokens, summarised as a state at the chunk's end
    b = torch.cumsum(lf, dim=-1)                                      # (B, NH, NC, L) log decay from chunk start
    g = b[..., -1]                                                    # (B, NH, NC)    log decay over the chunk
    a = g[..., None] - b + i                                          # log-weight of token s at its chunk's end
    M = a.amax(dim=-1).detach()                                       # (B, NH, NC)
    w = torch.exp(a - M[..., None])[..., None]                        # (B, NH, NC, L, 1)
    U = (k.to(dt) * w).transpose(-2, -1) @ v.to(dt)                   # (B, NH, NC, DQK, DV): sum_s w_s k_s v_s^T
    u = (k.to(dt) * w).sum(dim=-2)                                    # (B, NH, NC, DQK):     sum_s w_s k_s

    # (b) state at the end of every chunk: a parallel form over chunks
    logW = segsum(g) + M[..., None, :]                                # (B, NH, NC, NC): chunk c' seen from c
    log_init_end = torch.cumsum(g, dim=-1) + m0[..., None]            # the initial state seen from c's end
    m_end = torch.maximum(log_init_end, logW.amax(dim=-1)).detach()   # (B, NH, NC)
    W = torch.exp(logW - m_end[..., None])
    g0 = torch.exp(log_init_end - m_end)
    C_end = g0[..., None, None] * C0[:, :, None] + torch.einsum("bhcx,bhxde->bhcde", W, U)
    n_end = g0[..., None] * n0[:, :, None] + torch.einsum("bhcx,bhxd->bhcd", W, u)
    # the state entering chunk c is the one that left chunk c-1 (the initial state for c = 0)
    C_in = torch.cat([C0[:, :, None], C_end[:, :, :-1]], dim=2)
    n_in = torch.cat([n0[:, :, None], n_end[:, :, :-1]], dim=2)
    m_in = torch.cat([m0[:, :, None], m_end[:, :, :-1]], dim=2)

    # (c) outputs: the parallel form inside each chunk plus the entering state. Token s of the chunk
    # reaches t with log-weight b_t - b_s + i_s, so a row's largest is b_t + max_{s<=t}(i_s - b_s): a
    # running maximum, no L x L matrix needed.
    log_init = b + m_in[..., None]                                    # log-weight of the entering state at t
    m = torch.maximum(log_init, b + torch.cummax(i - b, dim=-1).values).detach()   # (B, NH, NC, L)
    num, den = _intra_chunk_torch(q, k, v, b, i, m)                   # (B, NH, NC, L, DV), (B, NH, NC, L)
    init = torch.exp(log_init - m)
    num = num + init[..., None] * (q.to(dt) @ C_in)
    den = torch.maximum((den + init * (q.to(dt) @ n_in[..., None]).squeeze(-1)).abs(), torch.exp(-m)) + eps
    h = (num / den[..., None]).reshape(B, NH, NC * L, DV)[:, :, :T].to(in_dtype)
    if return_state:  # copies: a slice would keep every chunk's state (NC x DQK x DV) alive
        return h, tuple(x[:, :, -1].clone() for x in (C_end, n_end, m_end))
    return h


def _intra_chunk_torch(q, k, v, b, i, m):
    """Step (c) inside each chunk: P[t,s] = (q_t . k_s) exp(b_t - b_s + i_s - m_t) for s <= t, else 0;
    returns num = P @ v (B, NH, NC, L, DV) and den = P.sum(-1) (B, NH, NC, L), in b's dtype.
    (mlstm_triton.py's kernels keep these L x L matrices in registers.)"""
    L = b.size(-1)
    logA = (b[..., :, None] - b[..., None, :] + i[..., None, :] - m[..., None]).masked_fill(~causal_mask(L, b.device),
                                                                                            float("-inf"))
    # scores in float32 (as the Triton kernel keeps them): den sums them with signs, and where that sum
    # cancels, scores rounded to bfloat16 cost ~10x the error of the rounded inputs alone
    P = (q.to(b.dtype) @ k.to(b.dtype).transpose(-2, -1)) * torch.exp(logA)   # (B, NH, NC, L, L)
    return (P.to(v.dtype) @ v).to(b.dtype), P.sum(-1)


# -----------------------------------------------------------------------------
# 2. Layers


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot switch the bias off alone)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def rotary(x, pos, base=10000.0):
    """Rotary position embedding on (B, NH, T, D) at absolute positions pos (T,); rotate-half layout."""
    D = x.size(-1)
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = pos.to(torch.float32)[:, None] * inv_freq[None, :]                  # (T, D/2)
    cos, sin = ang.cos().repeat(1, 2).to(x.dtype), ang.sin().repeat(1, 2).to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def sliding_window_attention(q, k, v, window):
    """Causal softmax attention where query t sees keys t-window+1..t. Memory O(T * window).

    The sequence is cut into blocks of `window` queries; each block attends to its own keys and the
    previous block's (2 * window keys) under a banded mask, so no (T x T) matrix is ever built.
    A masked SDPA has no flash kernel: compiled training on a GPU uses sliding_window_attention_flex."""
    B, NH, T, D = q.shape
    W = window
    NB = (T + W - 1) // W
    pad = NB * W - T
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb = q.view(B, NH, NB, W, D)
    kb, vb = k.view(B, NH, NB, W, D), v.view(B, NH, NB, W, D)
    prev = lambda x: F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1]            # the block before (zeros for the first)
    k2, v2 = torch.cat([prev(kb), kb], dim=3), torch.cat([prev(vb), vb], dim=3)  # (B, NH, NB, 2W, D)
    a = torch.arange(W, device=q.device)[:, None]                       # query offset in its block
    j = torch.arange(2 * W, device=q.device)[None, :]                   # key offset in the 2W keys
    band = (j > a) & (j <= a + W)                                       # 0 <= t - s < W
    first = band & (j >= W)                                             # block 0 has no previous block
    mask = torch.stack([first] + [band] * (NB - 1))[None, None]         # (1, 1, NB, W, 2W)
    y = F.scaled_dot_product_attention(qb, k2, v2, attn_mask=mask)
    return y.reshape(B, NH, NB * W, D)[:, :, :T]


def sliding_window_attention_flex(q, k, v, window):
    """The same attention through flex_attention: the mask is a rule on (query t, key s), from which
    flex_attention derives which key blocks to visit (about window / block size + 1 per query block) and
    generates a flash-style kernel for it. Fast only under torch.compile (5x the blocked SDPA, bench.py);
    outside it, flex_attention falls back to a reference that builds the (T x T) scores. T must be static
    in the compiled graph: the block mask cannot be built for a symbolic length (inductor fails with
    CantSplit), and torch.compile makes T symbolic once a frame has seen two lengths -- hence
    BLaLM.compile_blocks compiles with static shapes, for training only, the only place MLSTMLayer uses this."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T = q.size(2)
    visible = lambda b, h, t, s: (s <= t) & (t - s < window)
    return flex_attention(q, k, v, block_mask=create_block_mask(visible, None, None, T, T, device=q.device))


def _heads(x, n_head):
    """(B, T, C) -> (B, NH, T, C/NH)."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def _merge(y):
    """(B, NH, T, D) -> (B, T, NH*D)."""
    B, NH, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, NH * D)


class CausalSelfAttention(nn.Module):
    """GPT-2's attention (fused c_attn, biases), through scaled_dot_product_attention (flash on GPU)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def qkv(self, x):
        return [_heads(t, self.n_head) for t in self.c_attn(x).split(x.size(-1), dim=2)]

    def forward(self, x, cache=None, pos=0):
        q, k, v = self.qkv(x)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        elif cache.static:  # StaticCache: one token into preallocated keys/values, pos a 0-dim tensor
            y = ring_attention_step(q, k, v, cache.k, cache.v, pos)
        else:  # key/value cache: grows with the context
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            cache.k, cache.v = k.contiguous(), v.contiguous()  # the prompt's: copies, not views of c_attn(x)
            T, S = q.size(2), k.size(2)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)   # query t is token S - T + t
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(_merge(y))


class HedgehogAttention(CausalSelfAttention):
    """GPT-2's attention with softmax replaced by causal linear attention over Hedgehog feature maps
    (hedgehog.py). Same c_attn/c_proj as the softmax layer, so a trained softmax model converts by
    loading its weights and learning only fmap_q/fmap_k first (attention distillation)."""

    def __init__(self, config):
        super().__init__(config)
        D = config.n_embd // config.n_head
        self.fmap_q = HedgehogFeatureMap(D, config.n_head)
        self.fmap_k = HedgehogFeatureMap(D, config.n_head)
        self.chunk_size = RUN_DEFAULTS["chunk_size"]  # a run setting: BLaLM.set_kernels

    def forward(self, x, cache=None, pos=0):
        q, k, v = self.qkv(x)
        q, k = self.fmap_q(q), self.fmap_k(k)
        if cache is None:
            y = linear_attention_chunkwise(q, k, v, chunk_size=self.chunk_size)
        else:
            if x.size(1) == 1:
                y, state = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], cache.state)
                y = y[:, :, None]
            else:
                y, state = linear_attention_chunkwise(q, k, v, chunk_size=self.chunk_size, state=cache.state,
                                                      return_state=True)
            cache.update("state", state)
        return self.c_proj(_merge(y))


def causal_conv(u, w, bias):
    """The short causal depthwise convolution along time, as K shifted multiply-adds in u's dtype:
    y_t = bias + sum_j w[:, j] u_{t+j}. u (B, K-1+T, C): the inputs, preceded by the K-1 before them (zeros at
    the start of a sequence); w (C, K) (nn.Conv1d's weight[:, 0, :]); bias (C,) -> y (B, T, C).
    (conv_triton.short_conv computes the same in one fused pass, forward and backward.)"""
    K = w.size(-1)
    T = u.size(1) - (K - 1)
    w, bias = w.to(u.dtype), bias.to(u.dtype)
    return bias + sum(u[:, j:j + T] * w[:, j] for j in range(K))


class MLSTMLayer(nn.Module):
    """The mLSTM token mixer with BLaLM's lightweight enhancements.

    x -> q, k, v (+ short causal depthwise convolution) -> mLSTM(q, k, v, i, f) -> per-head norm
      (+ sliding-window softmax attention on the same q, k, v with rotary positions)
      -> output gate -> projection.

    Dynamic modulation -- our reading of the BLaLM paper: the SWA branch's output is scaled by a
    data-dependent gate g = sigmoid(W_g x) (one scalar per head and token, computed from the layer
    input) before it is added to the mLSTM output, so each token decides how much local, exact
    softmax attention to mix into the global linear-attention memory: y = h_mlstm + g * y_swa.
    With modulation off the two branches are averaged: y = (h_mlstm + y_swa) / 2.
    """

    def __init__(self, config):
        super().__init__()
        C, NH = config.n_embd, config.n_head
        self.n_head, self.D = NH, C // NH
        # run settings, not part of the model (every choice computes the same function): BLaLM.set_kernels
        self.chunk_size, self.form, self.kernel = RUN_DEFAULTS["chunk_size"], RUN_DEFAULTS["form"], RUN_DEFAULTS["kernels"]
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.K = config.short_conv
        if self.K:  # depthwise over the 3C channels of q, k, v (nn.Conv1d's parameters; applied by hand below)
            self.conv = nn.Conv1d(3 * C, 3 * C, self.K, groups=3 * C, bias=True)
        self.i_gate = nn.Linear(C, NH, bias=True)
        self.f_gate = nn.Linear(C, NH, bias=True)
        self.softcap = config.gate_softcap
        self.norm_weight = nn.Parameter(torch.ones(C))                # per-head norm's scale
        self.o_gate = nn.Linear(C, C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.window = config.swa_window
        if self.window and config.modulation:
            self.mod_gate = nn.Linear(C, NH, bias=True)
        self.modulation = config.modulation
        if config.feature_map == "hedgehog":
            self.fmap_q, self.fmap_k = HedgehogFeatureMap(self.D, NH), HedgehogFeatureMap(self.D, NH)
        self.feature_map = config.feature_map
        # in_weights' rows: q, k, v, o (C each), the gates (n_head each), zero rows up to a multiple of 8
        n_gates = len(self.gates())
        self.in_split = [3 * C, C] + [NH] * n_gates + [-(4 * C + NH * n_gates) % 8]
        self.init_gates()

    @torch.no_grad()
    def init_gates(self):
        """Forget-gate biases from 3 to 6 across heads (sigma = 0.95..0.998): early in training the
        memory remembers over tens to hundreds of tokens instead of forgetting at once."""
        self.f_gate.bias.copy_(torch.linspace(3.0, 6.0, self.n_head))
        self.i_gate.bias.zero_()

    def _cap(self, x):
        return self.softcap * torch.tanh(x / self.softcap) if self.softcap else x

    def forward(self, x, cache=None, pos=0):
        """x (B, T, C) -> (B, T, C). With a LayerCache the tokens continue the sequence it has seen, the
        first of them at position pos."""
        C = x.size(-1)
        qkv, o, i, f, mod = self.in_proj(x, cache)
        if cache is not None and cache.static and self.kernel == "triton" and self.feature_map == "none":
            return self.c_proj(self.decode_step_triton(qkv, o, i, f, mod, cache, pos))
        qkv = self.short_conv(qkv, cache)
        q, k, v = (_heads(t, self.n_head) for t in qkv.split(C, dim=-1))           # (B, NH, T, D)
        i, f = self._cap(i).transpose(1, 2), self._cap(f).transpose(1, 2)           # (B, NH, T)
        qm, km = (self.fmap_q(q), self.fmap_k(k)) if self.feature_map == "hedgehog" else (q, k)
        h = self.mlstm(qm, km, v, i, f, cache)
        h = F.layer_norm(h.float(), (self.D,)).to(x.dtype)                          # per-head norm
        if self.window:
            y = self.swa(q, k, v, cache, pos)
            if self.modulation:
                g = torch.sigmoid(mod).transpose(1, 2)[..., None]                   # (B, NH, T, 1)
                h = h + g * y
            else:
                h = 0.5 * (h + y)
        y = _merge(h) * self.norm_weight * torch.sigmoid(o)
        return self.c_proj(y)

    def decode_step_triton(self, qkv, o, i, f, mod, cache, pos):
        """forward's work between its two projections for one token through a StaticCache (conv, gates, mLSTM step,
        norm, SWA, modulation, output gate) in one Triton kernel launch, the cache updated in place: the same
        function (mlstm_triton.mlstm_layer_step_triton; kernels="triton", without Hedgehog feature maps)."""
        from mlstm_triton import mlstm_layer_step_triton
        conv = (cache.conv, self.conv.weight[:, 0, :], self.conv.bias) if self.K else (None, None, None)
        rings = (cache.k, cache.v) if self.window else (None, None)
        return mlstm_layer_step_triton(qkv, o, i, f, mod, *conv, cache.mlstm, *rings, pos, self.norm_weight,
                                       self.softcap)

    def in_proj(self, x, cache=None):
        """x (B, T, C) -> q|k|v (B, T, 3C), o (B, T, C), i, f (B, T, NH), mod (B, T, NH) or None: the layer's
        input projections (q_proj, k_proj, v_proj, o_gate, i_gate, f_gate, mod_gate) as one matrix product of
        in_weights(), or of the copy a StaticCache holds (decoding: stacked once, not every token)."""
        W, b = cache.in_weights if cache is not None and cache.in_weights is not None else self.in_weights()
        qkv, o, i, f, *mod, _zeros = F.linear(x, W, b).split(self.in_split, dim=-1)
        return qkv, o, i, f, (mod[0] if mod else None)

    def in_weights(self):
        """The input projections' weights stacked, (W, b): rows q | k | v | o | i | f | mod, then zero rows up to
        a multiple of 8. The parameters stay separate Linears; the stack is made at run time. One GEMM instead of
        seven: decoding at batch 1 is launch-bound, and the gates have only n_head outputs each. The zero rows
        keep the product's rows 16-byte aligned in bfloat16 (4C + 3 * 7 = 1813 for the preset; 1816 padded),
        which cuBLAS's tensor-core kernels want, in its backward too."""
        C, pad, gates = self.q_proj.weight.size(1), self.in_split[-1], self.gates()
        W = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_gate.weight]
                      + [g.weight for g in gates] + [self.q_proj.weight.new_zeros(pad, C)])
        b = torch.cat([W.new_zeros(4 * C)] + [g.bias for g in gates] + [W.new_zeros(pad)])  # q, k, v, o: no bias
        return W, b

    def gates(self):
        """The gate projections in in_weights' order: i, f, and the SWA modulation's where the layer has one."""
        return [self.i_gate, self.f_gate] + ([self.mod_gate] if self.window and self.modulation else [])

    def short_conv(self, qkv, cache):
        """Causal depthwise conv over the 3C channels: y_t = bias + sum_j w_j x_{t-K+1+j} (causal_conv). The
        cache keeps the last K-1 inputs. With kernels="triton", training on a GPU without a cache, the fused
        Triton kernel of conv_triton.py computes the same (forward and backward in one pass each)."""
        if not self.K:
            return qkv
        if self.kernel == "triton" and cache is None and self.training and qkv.is_cuda:
            from conv_triton import short_conv
            return short_conv(qkv, self.conv.weight[:, 0, :], self.conv.bias)
        B, T, C3 = qkv.shape
        past = cache.conv if cache is not None and cache.conv is not None else qkv.new_zeros(B, self.K - 1, C3)
        u = torch.cat([past, qkv], dim=1)                                            # (B, K-1+T, 3C)
        if cache is not None:
            cache.update("conv", u[:, u.size(1) - (self.K - 1):].clone())           # not a view of all of u
        return causal_conv(u, self.conv.weight[:, 0, :], self.conv.bias)             # weight (3C, K)

    def mlstm(self, q, k, v, i, f, cache):
        """The mLSTM in the configured form; with a cache, continued from and written back to cache.mlstm."""
        # the mLSTM forms choose their own precision (state, gates and scores in float32); autocast would
        # run their float32 matrix products in bfloat16
        with torch.autocast(q.device.type, enabled=False):
            if cache is None and self.form == "parallel":
                return mlstm_parallel(q, k, v, i, f)
            if cache is not None and cache.static and q.size(2) == 1 and self.kernel == "triton":
                # the fused step alone (mlstm_triton.py), for a layer with feature maps (without, forward's
                # decode_step_triton takes the whole layer): one kernel, the cache's state updated in place
                from mlstm_triton import mlstm_step_triton
                return mlstm_step_triton(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0],
                                         cache.mlstm)[:, :, None]
            state = cache.mlstm if cache is not None else None
            if cache is not None and q.size(2) == 1:
                h, state = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], state)
                h = h[:, :, None]
            elif self.form == "recurrent":
                h, state = mlstm_recurrent(q, k, v, i, f, state=state, return_state=True)
            else:
                h, state = mlstm_chunkwise(q, k, v, i, f, chunk_size=self.chunk_size, state=state,
                                           return_state=True, kernel=self.kernel)
        if cache is not None:
            cache.update("mlstm", state)
        return h

    def swa(self, q, k, v, cache, pos):
        """Sliding-window softmax attention on rotary q, k at positions pos.. ; the cache keeps the last
        window-1 keys and values, so decoding memory does not grow with the context. A static cache (one token
        at the 0-dim position tensor pos) keeps the last `window` in a ring buffer instead."""
        T = q.size(2)
        static = cache is not None and cache.static
        t = pos.view(1) if static else torch.arange(pos, pos + T, device=q.device)
        qr, kr = rotary(q, t), rotary(k, t)
        if cache is None:  # flex_attention: compiled training on a GPU, where the length is static
            flex = self.training and q.is_cuda and torch.compiler.is_compiling()
            return (sliding_window_attention_flex if flex else sliding_window_attention)(qr, kr, v, self.window)
        if static:
            return ring_attention_step(qr, kr, v, cache.k, cache.v, pos)
        if cache.k is not None:
            kr, v = torch.cat([cache.k, kr], 2), torch.cat([cache.v, v], 2)
        S = kr.size(2)
        t, s = torch.arange(S - T, S, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
        y = F.scaled_dot_product_attention(qr, kr, v, attn_mask=(s <= t) & (t - s < self.window))
        keep = S - min(S, self.window - 1)
        cache.k, cache.v = kr[:, :, keep:].clone(), v[:, :, keep:].clone()
        return y


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.mixer = {"attn": CausalSelfAttention, "mlstm": MLSTMLayer,
                      "hedgehog": HedgehogAttention}[config.mixer](config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, pos=0):
        x = x + self.mixer(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# 3. The model

MIXERS = ("mlstm", "attn", "hedgehog")
FEATURE_MAPS = ("none", "hedgehog")
MLSTM_FORMS = ("chunkwise", "parallel", "recurrent")
MLSTM_KERNELS = ("torch", "triton")
# How a model runs, not what it computes: the kernels ("triton": the fused mLSTM and short-convolution
# kernels in training, CUDA only), the mLSTM's form, the chunk length of the chunkwise forms. Set at run time
# with BLaLM.set_kernels; never saved in a checkpoint, so a checkpoint made with any of them loads anywhere.
RUN_DEFAULTS = dict(kernels="torch", form="chunkwise", chunk_size=64)
LEGACY_CONFIG_KEYS = ("mlstm_kernel", "mlstm_form", "chunk_size")  # run settings that older checkpoints saved
GRAPH_WARMUP = 2         # eager decode steps before the CUDA graph is captured (cuda_graph)
EOT_CHECK_EVERY = 64     # generate(eot=...) reads "has every row ended?" back from the device this often


@dataclass
class BLaLMConfig:
    # the one source of model defaults (train.py's flags are these fields; its presets override some):
    # a small model that trains in minutes on a laptop CPU
    vocab_size: int = 16384         # set from the data by train.py
    block_size: int = 128           # context length in tokens (the learned positions of "attn"/"hedgehog")
    n_layer: int = 4                # residual blocks
    n_head: int = 4                 # heads (head size = n_embd / n_head)
    n_embd: int = 128               # width
    mixer: str = "mlstm"            # "mlstm" (BLaLM) | "attn" (softmax GPT-2 baseline) | "hedgehog" (linear attention)
    short_conv: int = 4             # causal depthwise conv kernel on q, k, v (0 = off)
    swa_window: int = 64            # sliding-window attention branch beside the mLSTM (0 = off)
    modulation: bool = True         # dynamic modulation of the SWA branch (else averaged with the mLSTM)
    feature_map: str = "none"       # "none" | "hedgehog" on the mLSTM's q, k
    gate_softcap: float = 15.0      # gates -> cap * tanh(x / cap) (0 = off)
    bias: bool = False              # biases in Linear and LayerNorm (GPT-2 layout: True)
    dropout: float = 0.0

    def __post_init__(self):
        for name, value, allowed in (("mixer", self.mixer, MIXERS), ("feature_map", self.feature_map, FEATURE_MAPS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("short_conv", "swa_window", "gate_softcap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.mixer != "mlstm" and self.feature_map != "none":  # an mLSTM option: refuse, not ignore
            raise ValueError(f"feature_map={self.feature_map!r} applies to mixer='mlstm' only, not mixer={self.mixer!r}")

    @classmethod
    def from_dict(cls, d):
        """The config of a plain dict (a checkpoint's); the run settings older checkpoints saved are dropped."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k not in LEGACY_CONFIG_KEYS}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown BLaLMConfig keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self):
        return asdict(self)


def check_ids(idx):
    """idx must be a (B, T >= 1) tensor of int64/int32 token ids (their values are checked where data enters)."""
    if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a (B, T >= 1) tensor of int64/int32 token ids, got {idx.dtype} "
                         f"{tuple(idx.shape)}")


class BLaLM(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.learned_pos = config.mixer in ("attn", "hedgehog")  # GPT-2 layout; the mLSTM needs no positions
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        if self.learned_pos:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        self._compiled_blocks = None  # set by compile_blocks (a plain list: not submodules, not in the state dict)
        self._decode_blocks = None    # set by compile_decode, likewise
        self.set_kernels()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, MLSTMLayer):
            module.init_gates()  # apply() visits children first, so this runs after the gates' generic init

    def new_cache(self):
        """An empty decoding state for forward(idx, cache=...)."""
        return DecodeCache(self.config.n_layer)

    def check_length(self, T):
        """Learned positions ("attn", "hedgehog") end at block_size; the mLSTM has none and takes any length."""
        if self.learned_pos and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}, "
                             f"the learned positions of mixer={self.config.mixer!r}")

    def embed(self, idx, pos=0):
        """idx (B, T), the tokens from position pos on -> the residual stream entering the first block: token
        embeddings, plus learned positions where the mixer has them, then dropout."""
        check_ids(idx)
        T = idx.size(1)
        self.check_length(pos + T)
        x = self.transformer.wte(idx)
        if self.learned_pos:
            x = x + self.transformer.wpe(torch.arange(pos, pos + T, device=idx.device))
        return self.transformer.drop(x)

    def forward(self, idx, targets=None, cache=None, last_only=False):
        """idx (B, T) token ids in [0, vocab_size) -> logits (B, T, vocab); loss when targets (B, T) are given
        (-1 = ignore). With a cache (from new_cache) the tokens continue the sequence the cache has seen.
        last_only (without targets): the logits of the last position only, (B, 1, vocab), what decoding needs.
        Token ids are checked where data enters (bins, prompts, evaluation sentences), not here: a check of
        the values would synchronise the device on every call."""
        pos = cache.pos if cache is not None else 0
        x = self.embed(idx, pos)
        compiled = self._compiled_blocks if self.training and cache is None else None
        for l, block in enumerate(compiled or self.transformer.h):
            x = block(x, cache.layers[l] if cache is not None else None, pos)
        if cache is not None:
            cache.pos = pos + idx.size(1)
        if targets is None:
            return self.lm_head(self.transformer.ln_f(x[:, -1:] if last_only else x)), None
        return (self._compiled_loss if compiled else self.logits_and_loss)(x, targets)

    def logits_and_loss(self, x, targets):
        """The output head and the mean cross-entropy over targets != -1, in float32. compile_blocks compiles
        this too: the float32 cast then fuses into the softmax instead of writing a float32 copy of the
        (B, T, vocab) logits and reading it back in forward and backward."""
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def decode_step(self, idx, cache):
        """One token per row through a StaticCache, every shape fixed and nothing read back to the host (what a
        CUDA graph captures): idx (B, 1) token ids at position cache.pos -> logits (B, vocab), float32 at least. The
        cache is updated in place and cache.pos advanced. Trusts its caller to stay below the cache's max_len
        (and block_size for learned positions): generate checks once, before decoding."""
        pos = cache.pos
        x = self.transformer.wte(idx)
        if self.learned_pos:
            x = x + self.transformer.wpe(pos.view(1))
        for block, layer in zip(self._decode_blocks or self.transformer.h, cache.layers):
            x = block(x, layer, pos)
        pos.add_(1)
        logits = self.lm_head(self.transformer.ln_f(x))[:, -1]
        return logits.to(acc_dtype(logits.dtype))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, lengths=None, eot=None, graph=None,
                 progress=None):
        """Continue prompts by sampling (temperature 0 = greedy; top_k: sample among the k most likely tokens).

        idx (B, T): left-aligned prompts, row b's prompt idx[b, :lengths[b]] (lengths: B ints in [1, T]; None = all
        of each row; what follows a prompt is never read) -> (B, max(lengths) + max_new_tokens): each row its
        prompt, then its samples up to the common end, so a row with a shorter prompt gets max(lengths) -
        lengths[b] more than max_new_tokens. eot (a token id, optional): a row that has sampled it continues with
        eot alone (and decoding ends early once every row has, checked every EOT_CHECK_EVERY tokens).

        The common prefix min(lengths) is read by forward (the chunkwise form) into a DecodeCache, whose state
        StaticCache copies into preallocated tensors. Then one step per position, all rows at once: sample from
        the logits, for a row still inside its prompt take the prompt's token instead (so every row is exact),
        feed it through decode_step. Sampling runs on the device: no host sync per token. graph (None = on CUDA):
        capture that step, sampling included, as one CUDA graph and replay it; False runs it eagerly (the CPU's
        way); model.compile_decode() beforehand fuses the step's kernels. For "mlstm" the decoding state has a
        fixed size whatever the context; for "attn" it is a KV cache of max(lengths) + max_new_tokens.
        progress (optional): called as progress(steps done, steps in all) after each step (sample.py on a CPU)."""
        check_ids(idx)
        B, T = idx.shape
        V = self.config.vocab_size
        lengths = [T] * B if lengths is None else torch.as_tensor(lengths).tolist()
        if not isinstance(lengths, list) or len(lengths) != B or not all(isinstance(n, int) for n in lengths):
            raise ValueError(f"lengths must be {B} ints, one per prompt, got {lengths!r}")
        for b, n in enumerate(lengths):
            if not 1 <= n <= T:
                raise ValueError(f"prompt {b} has length {n}, expected 1..{T} (an empty prompt: give the "
                                 f"end-of-text token)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 (None = all tokens)")
        if eot is not None and not 0 <= eot < V:
            raise ValueError(f"eot={eot} is not a token id of this vocabulary (0..{V - 1})")
        graph = idx.is_cuda if graph is None else graph
        if graph and not idx.is_cuda:
            raise ValueError(f"graph=True captures a CUDA graph: it needs CUDA tensors, got idx on {idx.device}")
        end = max(lengths) + max_new_tokens
        self.check_length(end)
        L = torch.tensor(lengths, device=idx.device)                               # (B,)
        prompt_ids = idx[torch.arange(T, device=idx.device) < L[:, None]]
        if ((prompt_ids < 0) | (prompt_ids >= V)).any():                          # one sync, before decoding
            bad = prompt_ids[(prompt_ids < 0) | (prompt_ids >= V)][0].item()
            raise ValueError(f"prompt token id {bad} is not in [0, vocab_size={V})")

        P = min(lengths)
        cache = self.new_cache()
        logits = self(idx[:, :P], cache=cache, last_only=True)[0][:, -1]         # (B, V): for position P
        logits = logits.to(acc_dtype(logits.dtype))
        cache = StaticCache(self, cache, end)
        out = torch.zeros(B, end, dtype=idx.dtype, device=idx.device)             # the prompts, then the samples
        out[:, :min(T, end)] = idx[:, :end]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)                # rows that have sampled eot

        def step():
            """Choose every row's token at position cache.pos, write it to out and feed it to the model."""
            pos = cache.pos
            tok = sample_next(logits, temperature, top_k).to(out.dtype)
            tok = torch.where(pos < L, out.index_select(1, pos.view(1))[:, 0], tok)   # inside its prompt: the prompt's
            if eot is not None:
                tok = tok.masked_fill(done, eot)
                done.logical_or_((tok == eot) & (pos >= L))
            out.index_copy_(1, pos.view(1), tok[:, None])
            logits.copy_(self.decode_step(tok[:, None], cache))   # the last step's logits are not used

        n_steps, n, run = end - P, 0, step
        if graph and n_steps > GRAPH_WARMUP:
            run, n = cuda_graph(step, GRAPH_WARMUP), GRAPH_WARMUP
        while n < n_steps:
            run()
            n += 1
            if progress is not None:
                progress(n, n_steps)
            if eot is not None and n % EOT_CHECK_EVERY == 0 and n < n_steps and bool(done.all()):
                out[:, P + n:] = eot
                break
        return out

    def set_kernels(self, kernels=RUN_DEFAULTS["kernels"], form=RUN_DEFAULTS["form"],
                    chunk_size=RUN_DEFAULTS["chunk_size"]):
        """How the model runs, not what it computes: kernels "torch" | "triton" (the fused Triton kernels of the
        chunkwise mLSTM, of the short convolution in training, and of an mLSTM layer's decoding step through a
        StaticCache; CUDA), the mLSTM's form "chunkwise" | "parallel"
        | "recurrent", and the chunk length of the chunkwise forms (also of the hedgehog mixer). -> self."""
        for name, value, allowed in (("kernels", kernels, MLSTM_KERNELS), ("form", form, MLSTM_FORMS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")
        if self.config.mixer != "mlstm" and (kernels, form) != (RUN_DEFAULTS["kernels"], RUN_DEFAULTS["form"]):
            raise ValueError(f"kernels={kernels!r} and form={form!r} apply to mixer='mlstm' only, "
                             f"not mixer={self.config.mixer!r}")
        self.kernels, self.form, self.chunk_size = kernels, form, chunk_size
        for module in self.modules():
            if isinstance(module, MLSTMLayer):
                module.kernel, module.form, module.chunk_size = kernels, form, chunk_size
            elif isinstance(module, HedgehogAttention):
                module.chunk_size = chunk_size
        return self

    def compile_blocks(self, **kwargs):
        """torch.compile each residual block for training ("regional compilation"): the blocks have the same
        code and shapes, so they share one compiled graph and compile time does not grow with depth. The output
        head with the loss (logits_and_loss) is compiled as a region of its own.

        Compiled for the training length only (dynamic=False: static shapes, which flex_attention's block
        mask needs): forward uses the compiled regions in training mode, and evaluation (other lengths,
        decoding) runs the same modules eagerly, so it neither recompiles nor makes the length symbolic."""
        kwargs.setdefault("dynamic", False)
        self._compiled_blocks = [torch.compile(block, **kwargs) for block in self.transformer.h]
        self._compiled_loss = torch.compile(self.logits_and_loss, **kwargs)
        return self

    def compile_decode(self, **kwargs):
        """torch.compile each residual block for decode_step (one token through a StaticCache), regionally as
        compile_blocks does: inductor fuses the step's small kernels (about a hundred a layer, eagerly) into a
        few, which a CUDA graph then replays. Compiles at the first step of each batch size (and, for "attn",
        each static cache length). Undo with model._decode_blocks = None."""
        kwargs.setdefault("dynamic", False)
        self._decode_blocks = [torch.compile(block, **kwargs) for block in self.transformer.h]
        return self

    def num_params(self, non_embedding=True):
        """Parameters (the tied lm_head counted once); non_embedding leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if self.learned_pos:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward = 3 x forward): 6 per weight of every matrix
        multiply (nn.Linear layers, the lm_head included, and the Hedgehog maps' per-head matrices) plus the
        token mixer's own work at context T. Counts useful work: causal attention sees T/2 keys on average;
        the chunkwise mLSTM does an L x L block per chunk plus state updates; SWA sees `window` keys."""
        c = self.config
        T = T or c.block_size
        NH, D, L = c.n_head, c.n_embd // c.n_head, c.n_layer
        N = sum(mod.weight.numel() for mod in self.modules() if isinstance(mod, (nn.Linear, HedgehogFeatureMap)))
        if c.mixer == "attn":
            mix = 2 * 2 * NH * D * (T / 2)                                  # q k^T and a v over T/2 keys
        else:
            DQK = 2 * D if (c.feature_map == "hedgehog" or c.mixer == "hedgehog") else D
            Lc = self.chunk_size
            mix = NH * (2 * Lc / 2 * (DQK + D)                             # intra-chunk, causal half
                        + 2 * 2 * DQK * D                                  # state write and read
                        + 2 * (T / Lc) / 2 * DQK * D / Lc)                  # the chunk-level parallel form
            if c.mixer == "mlstm" and c.swa_window:
                mix += 2 * 2 * NH * D * min(c.swa_window, T)
        return 6 * N + 3 * L * mix

    @classmethod
    def from_gpt2_state_dict(cls, sd, n_head=None, mixer="attn", **overrides):
        """Build a GPT-2-layout model ("attn", or "hedgehog" with fresh feature maps) from a Hugging Face
        GPT-2 state dict (GPT2LMHeadModel or GPT2Model keys). HF stores c_attn, c_proj and c_fc as
        Conv1D, whose weight is the transpose of an nn.Linear's."""
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        for key in ("wte.weight", "wpe.weight", "ln_f.weight"):
            if key not in sd:
                raise ValueError(f"not a GPT-2 state dict: key {key!r} missing (have e.g. {sorted(sd)[:5]})")
        V, C = sd["wte.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
        config = BLaLMConfig(vocab_size=V, block_size=sd["wpe.weight"].size(0), n_layer=n_layer,
                             n_head=n_head or C // 64, n_embd=C, mixer=mixer, bias=True, **overrides)
        model = cls(config)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = {}
        for k, v in sd.items():
            if k == "lm_head.weight":
                continue  # tied to wte
            if k.startswith("h."):
                if k.endswith(conv1d):
                    v = v.t()
                k = k.replace(".attn.", ".mixer.")
            ours["transformer." + k] = v
        ours["lm_head.weight"] = ours["transformer.wte.weight"]
        missing, unexpected = model.load_state_dict(ours, strict=False)
        missing = [k for k in missing if ".fmap_" not in k]   # a "hedgehog" model keeps its fresh maps
        if missing or unexpected:
            raise ValueError(f"GPT-2 state dict does not fit: missing {missing}, unexpected {unexpected}")
        return model
