"""
Hedgehog: linear attention that learns to mimic softmax attention.

Zhang, Bhatia, Kumbong, Ré, "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry" (ICLR 2024). Softmax attention weights a key by exp(q·k/√d); linear attention
replaces that kernel with a dot product of feature maps, phi(q)·phi(k), so that the sum over the
past can be carried in a fixed-size state and the cost is linear in T. Hedgehog makes phi a small
trainable map and trains it to reproduce the softmax weights (attention distillation).

This file is the math only (torch, no project imports), top to bottom:
  1. feature maps: Hedgehog's, and the baselines it is compared with (1 + elu, relu, the
     second-order Taylor expansion of exp, Performer's positive random features)
  2. causal linear attention in three forms (parallel, chunkwise, recurrent) and one decoding step
  3. attention distillation: the softmax and linear attention weight matrices, the loss, and two
     measures of what makes softmax attention work (low entropy, monotonicity)
Converting a trained softmax model with these pieces is convert.py (python convert.py --help).

Scaling convention. Softmax attention uses exp(q·k/√d). The baseline maps that approximate exp
(`taylor_map`, `performer_map`) apply the 1/√d themselves by scaling their input by d^(-1/4), so
phi(q)·phi(k) ≈ exp(q·k/√d) with raw q, k; callers never scale. `elu_plus_one` and `relu_map` are
not approximations of exp and are used as published (Katharopoulos et al. 2020), on raw q, k; for
relu a positive scale cancels in the normalised attention anyway. `HedgehogFeatureMap` takes raw
q, k: its learned W absorbs whatever scale fits.

Precision convention. All sums run in acc_dtype(input dtype): float32, or float64 for float64 inputs;
outputs come back in the input dtype; the recurrent state (S, z) stays in that accumulation dtype.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def acc_dtype(dtype):
    """The dtype sums and states run in: float32 for half-precision and float32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def causal_mask(T, device, diagonal=0):
    """(T, T) bool, True at [t, s] where s <= t + diagonal: the keys query t may see (diagonal=-1: s < t)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril(diagonal)


# -----------------------------------------------------------------------------
# Feature maps


class HedgehogFeatureMap(nn.Module):
    """
    phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))], one W_h per head h.

    (B, NH, T, head_dim) -> (B, NH, T, 2 * feature_dim). Queries and keys each get their own map.

    Why this form (Zhang et al. 2024): softmax attention works because its weights are
    (1) positive, (2) low-entropy or "spiky" (a few keys take most of the weight) and
    (3) monotonic in q·k. exp of a linear function keeps every feature, and so every weight,
    positive; exponentials let the learned W make the weights as spiky as the teacher's; and pairing
    exp(xW) with exp(-xW) makes phi(q)·phi(k) large when projected coordinates of q and k are large
    with the same sign, negative as well as positive, just as each such pair raises q·k (exp(xW)
    alone sees only the positive ones), which keeps the weights rising with q·k. The paper ties these
    properties to how well a linear attention can match softmax. The paper writes plain exp;
    normalising each half with a softmax over the feature dimension keeps the features in [0, 1] and
    finite for any logits.

    Initialisation: W_h = I when feature_dim == head_dim, so training starts from the untrained map
    [softmax(x), softmax(-x)]. Otherwise W_h is a random semi-orthogonal matrix (W Wᵀ = I when
    feature_dim > head_dim: x W keeps the lengths and dot products of x, as the identity does;
    Wᵀ W = I when feature_dim < head_dim: a random orthogonal projection onto feature_dim directions).
    The bias, if any, starts at zero.
    """

    def __init__(self, head_dim, n_heads, feature_dim=None, bias=False):
        super().__init__()
        feature_dim = head_dim if feature_dim is None else feature_dim
        for name, value in (("head_dim", head_dim), ("n_heads", n_heads), ("feature_dim", feature_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HedgehogFeatureMap: {name} must be a positive int, got {value!r}")
        self.head_dim, self.n_heads, self.feature_dim = head_dim, n_heads, feature_dim
        self.weight = nn.Parameter(torch.empty(n_heads, head_dim, feature_dim))  # W
        self.bias = nn.Parameter(torch.empty(n_heads, feature_dim)) if bias else None  # b
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.feature_dim == self.head_dim:
            self.weight.copy_(torch.eye(self.head_dim).expand_as(self.weight))
        else:
            for W_h in self.weight:
                nn.init.orthogonal_(W_h)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.n_heads or x.shape[3] != self.head_dim:
            raise ValueError(f"HedgehogFeatureMap: expected x of shape (B, {self.n_heads}, T, {self.head_dim}), "
                             f"got {tuple(x.shape)}")
        acc = acc_dtype(x.dtype)
        z = torch.einsum("bhtd,hdf->bhtf", x.to(acc), self.weight.to(acc))  # (B, NH, T, feature_dim)
        if self.bias is not None:
            z = z + self.bias.to(acc)[:, None, :]
        phi = torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
        return phi.to(x.dtype)

    def extra_repr(self):
        return (f"head_dim={self.head_dim}, n_heads={self.n_heads}, feature_dim={self.feature_dim}, "
                f"bias={self.bias is not None}")


def elu_plus_one(x):
    """phi(x) = 1 + elu(x) > 0 (Katharopoulos et al. 2020, "Transformers are RNNs"). Same shape as x."""
    return F.elu(x) + 1


class EluFeatureMap(nn.Module):
    """
    The 1 + elu baseline as a module that can stand where a HedgehogFeatureMap stands (conversion):
    phi(x) = 1 + elu(x W_h), (B, NH, T, head_dim) -> (B, NH, T, head_dim).

    learned=False: no W, phi(x) = 1 + elu(x), the fixed map as published; distillation has nothing
    to train. learned=True: one trainable W_h per head, identity at start (so training starts from
    the published map), as many parameters as Hedgehog's W_h: the baseline trained with the same
    distillation budget, which is the fair comparison for Hedgehog's learned map (our reading of the
    paper's comparison with learned prior feature maps).
    """

    def __init__(self, head_dim, n_heads, learned=True):
        super().__init__()
        self.head_dim, self.n_heads, self.learned = head_dim, n_heads, learned
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(n_heads, 1, 1)) if learned else None  # W

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.n_heads or x.shape[3] != self.head_dim:
            raise ValueError(f"EluFeatureMap: expected x of shape (B, {self.n_heads}, T, {self.head_dim}), "
                             f"got {tuple(x.shape)}")
        if self.weight is not None:
            x = torch.einsum("bhtd,hdf->bhtf", x, self.weight.to(x.dtype))
        return elu_plus_one(x)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, n_heads={self.n_heads}, learned={self.learned}"


def relu_map(x):
    """phi(x) = max(x, 0): non-negative, but a query and a key can have no overlap (weight exactly 0)."""
    return F.relu(x)


def taylor_map(x):
    """
    Second-order Taylor features of exp(q·k/√d): (..., d) -> (..., 1 + d + d²).

    phi(x) = [1, x/d^(1/4), vec(x xᵀ)/(√2·√d)], so that
    phi(q)·phi(k) = 1 + q·k/√d + (q·k)²/(2d), the expansion of exp(u) to second order in u = q·k/√d.
    1 + u + u²/2 > 0 for every u, so the attention weights stay positive although features are not.
    """
    d, dtype = x.shape[-1], x.dtype
    x = x.to(acc_dtype(dtype)) / d ** 0.25  # now phi(q)·phi(k) = 1 + u + u²/2 with u = q·k/√d
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2)  # vec(x xᵀ)·vec(y yᵀ) = (x·y)²
    return torch.cat([torch.ones_like(x[..., :1]), x, x2], dim=-1).to(dtype)


def performer_projection(head_dim, n_features, seed=0, device=None, dtype=torch.float32):
    """Draw Performer's projection w_1..w_m ~ N(0, I_d) as a (head_dim, n_features) matrix, from `seed`.
    Drawn on the CPU generator, so the same seed gives the same matrix on any device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, n_features, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def performer_map(x, proj):
    """
    Positive random features (Choromanski et al. 2021, FAVOR+): (..., d) -> (..., m).

    phi(x) = exp(w_i·x - |x|²/2) / √m for the m columns w_i of `proj`, with x scaled by d^(-1/4).
    For w ~ N(0, I), E[exp(w·q - |q|²/2) exp(w·k - |k|²/2)] = exp(q·k), so phi(q)·phi(k) is an
    unbiased estimate of exp(q·k/√d) with raw q, k, and every feature is positive.
    """
    d, m = proj.shape
    if x.shape[-1] != d:
        raise ValueError(f"performer_map: proj has {d} rows but x has last dimension {x.shape[-1]}")
    dtype = x.dtype
    x = x.to(acc_dtype(dtype)) / d ** 0.25
    u = x @ proj.to(x.dtype) - 0.5 * (x * x).sum(-1, keepdim=True)  # (..., m)
    return (torch.exp(u) / math.sqrt(m)).to(dtype)


# -----------------------------------------------------------------------------
# Causal linear attention
#
# q, k (B, NH, T, DF) are feature-mapped (non-negative), v (B, NH, T, DV). Every form computes
#
#   y_t = q_t·(sum_{s≤t} k_s v_sᵀ) / (q_t·sum_{s≤t} k_s + eps) = num_t / (den_t + eps)
#
# and the recurrent ones carry the two sums as the state (S, z):
#
#   S_t = S_{t-1} + k_t v_tᵀ        (B, NH, DF, DV)
#   z_t = z_{t-1} + k_t             (B, NH, DF)
#   num_t = q_t·S_t  (B, NH, DV),   den_t = q_t·z_t  (B, NH)
#
# Features are non-negative, so den_t ≥ 0 and eps only guards against 0/0. Every form below uses the
# same names: q, k, v, the state (S, z), A[t, s] = q_t·k_s (s ≤ t) where a form writes the weights out,
# num and den.


def _check_qkv(name, q, k, v):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3] or q.shape[2] < 1:
        raise ValueError(f"{name}: expected q, k of shape (B, NH, T, DF) and v of shape (B, NH, T, DV) "
                         f"with T >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _initial_state(name, state, B, NH, DF, DV, acc, device):
    """(S, z) in the accumulation dtype; None means S = 0, z = 0."""
    if state is None:
        return (torch.zeros(B, NH, DF, DV, dtype=acc, device=device),
                torch.zeros(B, NH, DF, dtype=acc, device=device))
    S, z = state
    if S.shape != (B, NH, DF, DV) or z.shape != (B, NH, DF):
        raise ValueError(f"{name}: expected state (S, z) of shapes {(B, NH, DF, DV)} and {(B, NH, DF)}, "
                         f"got {tuple(S.shape)} and {tuple(z.shape)}")
    return S.to(acc), z.to(acc)


def linear_attention_weights(q, k, eps=1e-6):
    """
    The weight linear attention puts on each key, w[t, s] = A[t, s] / (den_t + eps), where A[t, s] = q_t·k_s
    for s ≤ t, else 0, and den_t = sum_s A[t, s]: (B, NH, T, T), so that y = w v. From feature-mapped q, k
    (B, NH, T, DF); float32 (float64 for float64).
    """
    acc = acc_dtype(q.dtype)
    A = (q.to(acc) @ k.to(acc).transpose(-2, -1)).masked_fill(~causal_mask(q.shape[2], q.device), 0.0)
    return A / (A.sum(-1, keepdim=True) + eps)


def linear_attention_parallel(q, k, v, eps=1e-6):
    """
    The (T, T) weight matrix written out: O(T²) time and memory, the clearest form.
    q, k (B, NH, T, DF) feature-mapped; v (B, NH, T, DV) -> y (B, NH, T, DV) in q's dtype.
    """
    _check_qkv("linear_attention_parallel", q, k, v)
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    A = (q @ k.transpose(-2, -1)).masked_fill(~causal_mask(q.shape[2], q.device), 0.0)  # (B, NH, T, T): q_t·k_s, s ≤ t
    num = A @ v  # (B, NH, T, DV)
    den = A.sum(-1)  # (B, NH, T)
    return (num / (den[..., None] + eps)).to(dtype)


def linear_attention_chunkwise(q, k, v, chunk_size=64, state=None, return_state=False, eps=1e-6):
    """
    The sequence cut into NC chunks of L = chunk_size tokens: between chunks the recurrence, carried by
    the state (S_in, z_in) entering each chunk; within a chunk the parallel form on an (L, L) mask.
    O(T·L) for the weights and O(T/L · DF·DV) for the states: linear in T.
    q, k (B, NH, T, DF) feature-mapped; v (B, NH, T, DV); state (S, z): S (B, NH, DF, DV), z (B, NH, DF),
    None for zeros -> y (B, NH, T, DV) in q's dtype, and with return_state the state after the last token.

    No Python loop over chunks: the state entering every chunk comes at once from an exclusive cumulative
    sum over the chunk axis, so the traced graph is the same size for any T (good for torch.compile).
    T need not be a multiple of L: the last chunk is padded with zero tokens, which add nothing to any
    sum (k = 0) and are cut off the output.
    """
    _check_qkv("linear_attention_chunkwise", q, k, v)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_attention_chunkwise: chunk_size must be a positive int, got {chunk_size!r}")
    B, NH, T, DF = q.shape
    DV = v.shape[-1]
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    S0, z0 = _initial_state("linear_attention_chunkwise", state, B, NH, DF, DV, acc, q.device)
    L = chunk_size
    NC = -(-T // L)
    pad = NC * L - T
    q, k, v = (F.pad(x.to(acc), (0, 0, 0, pad)).reshape(B, NH, NC, L, -1) for x in (q, k, v))  # (B, NH, NC, L, D)

    # what each chunk adds to the state: sum over its tokens of k_s v_sᵀ and of k_s
    dS = k.transpose(-2, -1) @ v  # (B, NH, NC, DF, DV)
    dz = k.sum(-2)  # (B, NH, NC, DF)
    # state entering chunk c = initial state + everything the chunks before c added (exclusive cumsum)
    S_in = torch.cat([S0[:, :, None], dS[:, :, :-1]], dim=2).cumsum(2)  # (B, NH, NC, DF, DV)
    z_in = torch.cat([z0[:, :, None], dz[:, :, :-1]], dim=2).cumsum(2)  # (B, NH, NC, DF)

    # inside a chunk: q_t·k_s for s ≤ t in the same chunk
    A = (q @ k.transpose(-2, -1)).masked_fill(~causal_mask(L, q.device), 0.0)  # (B, NH, NC, L, L)
    num = q @ S_in + A @ v  # (B, NH, NC, L, DV): earlier chunks + this chunk
    den = (q * z_in[:, :, :, None, :]).sum(-1) + A.sum(-1)  # (B, NH, NC, L)
    y = (num / (den[..., None] + eps)).reshape(B, NH, NC * L, DV)[:, :, :T].to(dtype)
    if not return_state:
        return y
    return y, (S_in[:, :, -1] + dS[:, :, -1], z_in[:, :, -1] + dz[:, :, -1])


def linear_attention_step(q, k, v, state=None, eps=1e-6):
    """
    One token, the decoding step: q, k (B, NH, DF) feature-mapped; v (B, NH, DV); state (S, z):
    S (B, NH, DF, DV), z (B, NH, DF), None for zeros -> (y (B, NH, DV) in q's dtype, the new (S, z)).
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"linear_attention_step: expected q, k of shape (B, NH, DF) and v of shape (B, NH, DV), "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, NH, DF = q.shape
    DV = v.shape[-1]
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    S, z = _initial_state("linear_attention_step", state, B, NH, DF, DV, acc, q.device)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    S = S + k[..., :, None] * v[..., None, :]  # S_t = S_{t-1} + k_t v_tᵀ
    z = z + k  # z_t = z_{t-1} + k_t
    num = (q[..., None, :] @ S).squeeze(-2)  # (B, NH, DV)
    den = (q * z).sum(-1)  # (B, NH)
    return (num / (den[..., None] + eps)).to(dtype), (S, z)


def linear_attention_recurrent(q, k, v, state=None, return_state=False, eps=1e-6):
    """
    The recurrence itself, linear_attention_step over t = 0..T-1: O(T) steps, O(DF·DV) memory. The reference form.
    q, k (B, NH, T, DF) feature-mapped; v (B, NH, T, DV); state (S, z): S (B, NH, DF, DV), z (B, NH, DF),
    None for zeros -> y (B, NH, T, DV) in q's dtype, and with return_state the state after the last token.
    """
    _check_qkv("linear_attention_recurrent", q, k, v)
    B, NH, T, DF = q.shape
    state = _initial_state("linear_attention_recurrent", state, B, NH, DF, v.shape[-1], acc_dtype(q.dtype), q.device)
    ys = []
    for t in range(T):
        y_t, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, eps)
        ys.append(y_t)
    y = torch.stack(ys, dim=2)  # (B, NH, T, DV)
    return (y, state) if return_state else y


# -----------------------------------------------------------------------------
# Attention distillation


def softmax_attention_weights(q, k):
    """Causal softmax attention weights softmax(q kᵀ/√d) over s ≤ t: (B, NH, T, T), rows sum to 1.
    Returned in float32 (float64 for float64 inputs)."""
    acc = acc_dtype(q.dtype)
    att = (q.to(acc) @ k.to(acc).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    att = att.masked_fill(~causal_mask(att.shape[-1], att.device), float("-inf"))
    return torch.softmax(att, dim=-1)


def attention_distillation_loss(q, k, fmap_q, fmap_k, eps=1e-6, reduction="mean"):
    """
    How far the Hedgehog linear attention weights of fmap_q(q), fmap_k(k) (student) are from the causal
    softmax weights of q, k (teacher): per query row t, the KL divergence

        KL(p_t || r_t) = sum_{s≤t} p_ts log p_ts - sum_{s≤t} p_ts log r_ts

    The paper trains with the soft-label cross-entropy -sum p log r; the first term, minus the teacher's
    entropy, does not depend on the student, so the gradients are the same, and the loss becomes 0
    exactly when the student reproduces the teacher's weights and positive otherwise (Gibbs' inequality;
    still true when eps makes the student's row sum a little below 1).

    The teacher is computed from q, k detached. The student sees q, k as given: to train only the feature
    maps (the paper's conversion), freeze the projections that make q, k. A student weight that underflows
    to 0 is read as the smallest positive float, so the loss stays finite.

    reduction: "mean" (over batch, heads and query positions) -> scalar; "head" -> (NH,); "none" -> (B, NH, T).
    """
    if reduction not in ("mean", "head", "none"):
        raise ValueError(f"attention_distillation_loss: reduction must be 'mean', 'head' or 'none', got {reduction!r}")
    p = softmax_attention_weights(q.detach(), k.detach())  # teacher (B, NH, T, T)
    r = linear_attention_weights(fmap_q(q), fmap_k(k), eps)  # student (B, NH, T, T)
    p = p.to(torch.promote_types(p.dtype, r.dtype))
    causal = causal_mask(p.shape[-1], p.device)
    # log r on the causal part only (above the diagonal p = 0 and r = 0; log 1 = 0 keeps 0·log 0 out)
    log_r = torch.log(torch.where(causal, r, 1.0).clamp_min(torch.finfo(r.dtype).tiny))
    kl = (torch.xlogy(p, p) - p * log_r).sum(-1)  # (B, NH, T)
    if reduction == "mean":
        return kl.mean()
    if reduction == "head":
        return kl.mean(dim=(0, 2))
    return kl


def attention_entropy(weights):
    """Mean over query rows of the entropy -sum_s w_ts log w_ts of causal weights (B, NH, T, T).
    Low entropy = spiky attention; uniform causal weights give the mean of log(t+1)."""
    return -torch.xlogy(weights, weights).sum(-1).mean()


def _average_ranks(x):
    """Ranks 1..n along the last dimension, tied values sharing the mean of their positions."""
    less = (x[..., None, :] < x[..., :, None]).sum(-1)
    equal = (x[..., None, :] == x[..., :, None]).sum(-1)  # including itself
    return less + (equal + 1) / 2


def attention_monotonicity(q, k, weights):
    """
    Mean Spearman rank correlation, over query rows t, between q_t·k_s and weights[t, s] for s ≤ t.
    1 means the weights rise with the dot product (softmax attention), -1 that they fall.
    Rows with a single key (t = 0) and rows where either ranking is constant have no rank correlation
    and are left out of the mean; nan if no row is left.
    """
    acc = acc_dtype(q.dtype)
    scores = q.to(acc) @ k.to(acc).transpose(-2, -1)  # (B, NH, T, T)
    weights = weights.to(acc)
    rhos = []
    for t in range(1, scores.shape[-1]):
        rx = _average_ranks(scores[..., t, :t + 1])
        ry = _average_ranks(weights[..., t, :t + 1])
        rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
        rhos.append((rx * ry).sum(-1) / ((rx * rx).sum(-1) * (ry * ry).sum(-1)).sqrt())  # (B, NH), nan if constant
    if not rhos:
        return torch.tensor(float("nan"), dtype=acc)
    return torch.stack(rhos).nanmean()
