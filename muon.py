"""
Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan, 2024), and the parameter split around it.

Muon keeps SGD-Nesterov momentum for each hidden weight matrix and replaces the update by the nearest
semi-orthogonal matrix: for momentum M = U S V^T it steps along U V^T, so every singular direction moves by
the same amount, however small its share of the gradient was. U V^T is computed with a few matrix products
(Newton-Schulz), not an SVD. Muon is only for matrices that multiply hidden activations (nn.Linear weights);
embeddings, the output head, norms, biases, convolution kernels and other small tensors train with AdamW.
`configure_optimizers(model)` makes that split and returns one optimizer for the training loop.
notebooks/03_muon.ipynb shows what Newton-Schulz does to the singular values of a matrix.
"""

import math
import re

import torch
import torch.nn as nn


def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """
    Approximate U V^T for G = U S V^T (the "zeroth power" of G) with a quintic Newton-Schulz iteration.

    Why Newton-Schulz: an odd matrix polynomial p(X) = a X + b (X X^T) X + c (X X^T)^2 X acts on the singular
    values alone, p(U S V^T) = U p(S) V^T, so iterating a scalar map that sends every s in (0, 1] towards 1
    orthogonalises G with matrix products only, which GPUs run fast, where an SVD is slow and serial.

    Why (a, b, c) = (3.4445, -4.7750, 2.0315): a is the slope at zero, so a small singular value grows by 3.44
    per step (3.44^5 = 486 in five steps, against 1.5 per step for the classic cubic 1.5 x - 0.5 x^3). The slope
    is pushed so high that the map no longer converges to 1: the singular values end in a band, about
    [0.68, 1.20] (Keller Jordan quotes roughly [0.5, 1.5]), not exactly at 1. He found that this does not
    hurt training compared with the exact U V^T, and it saves steps: every step is three matmuls.
    Five steps lift s to 0.5 or more only if s / ||G||_F >= 1.07e-3 (to the band from 1.5e-3); smaller ones
    grow (up to 486-fold) but stay below 0.5. A matrix with condition number 1e3 always has a singular value
    below 1e-3 ||G||_F, so five steps never fully orthogonalise it; six steps do (see the tests).

    Why divide by the Frobenius norm first: the largest singular value is at most ||G||_F, so afterwards all
    singular values lie in [0, 1], where the polynomial is designed to work. eps guards a zero gradient; it
    clamps the norm from below, exactly as torch.optim.Muon does.

    Why the short side first: for a tall G (rows > cols) we iterate on G^T, so the Gram matrix X X^T is the
    small cols x cols one; p commutes with transposition, so transposing back gives the same result.

    Why bfloat16 is enough: the answer is wanted only to within the band above, a spread of +-30%, and
    bfloat16's 8-bit mantissa (2-3 digits) moves the singular values by 0.01 to 0.1; tensor cores run
    bfloat16 at full speed. On a CPU bfloat16 matmuls are about 20x slower than float32 ones, so `Muon` uses
    float32 there (pass dtype explicitly to choose). Returns X in `dtype`, the shape of G.

    G may also be a stack (N, rows, cols) of same-shape matrices, each orthogonalised on its own in one
    batched product: a model's dozens of equal-shape matrices then cost a few kernel launches, not hundreds.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz orthogonalises a matrix, got a tensor of shape {tuple(G.shape)}")
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mul_add = torch.addmm if X.ndim == 2 else torch.baddbmm  # one matrix, or a stack of same-shape matrices
    for _ in range(steps):
        A = X @ X.mT
        B = mul_add(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = mul_add(X, B, X, beta=a)  # a X + b (X X^T) X + c (X X^T)^2 X
    if tall:
        X = X.mT
    return X


def muon_update(params, grads, bufs, lr, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                ns_dtype=torch.bfloat16):
    """One Muon step for a list of same-shape (rows, cols) parameters with their gradients and momentum
    buffers; changes params and bufs. The list is orthogonalised as one stack (see above)."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)  # b = momentum b + (1 - momentum) g
    us = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs  # Nesterov: a step ahead
    o = zeropower_via_newtonschulz5(torch.stack(us) if len(us) > 1 else us[0], ns_steps, dtype=ns_dtype)
    o = list(o.to(params[0].dtype).unbind(0)) if len(us) > 1 else [o.to(params[0].dtype)]
    # o has singular values ~1: a square or wide o keeps the RMS of a typical input, but a tall one (rows > cols,
    # an isometry) maps it to an output whose RMS is sqrt(cols/rows) smaller; sqrt(rows/cols) evens that out.
    # This is Keller Jordan's scale, torch.optim.Muon's with adjust_lr_fn=None.
    rows, cols = params[0].shape
    torch._foreach_mul_(params, 1 - lr * weight_decay)  # decoupled weight decay, as in AdamW
    torch._foreach_add_(params, o, alpha=-lr * math.sqrt(max(1, rows / cols)))


class Muon(torch.optim.Optimizer):
    """
    Muon for 2-D parameters; the arithmetic of torch.optim.Muon(adjust_lr_fn=None), step for step.
    ns_dtype: the Newton-Schulz dtype; None means bfloat16 for CUDA tensors and float32 elsewhere
    (bfloat16 matmuls are slow on CPUs). Pass torch.bfloat16 to reproduce torch.optim.Muon on a CPU too.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, ns_dtype=None):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"Muon needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0 and ns_steps >= 1, got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, ns_steps={ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, ns_dtype=ns_dtype)
        super().__init__(params, defaults)

    def add_param_group(self, group):
        super().add_param_group(group)
        for p in self.param_groups[-1]["params"]:
            if p.ndim != 2:
                raise ValueError(f"Muon takes only 2-D weight matrices, got a parameter of shape {tuple(p.shape)}; "
                                 f"embeddings, norms, biases and other tensors belong to AdamW: "
                                 f"configure_optimizers(model) in muon.py makes that split")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets = {}  # same shape, dtype and device: orthogonalised together
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.shape, p.dtype, p.device), []).append(p)
            for (shape, dtype, device), params in buckets.items():
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                ns_dtype = group["ns_dtype"] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
                muon_update(params, [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params],
                            group["lr"], group["momentum"], group["nesterov"], group["ns_steps"],
                            group["weight_decay"], ns_dtype)
        return loss


# ---------------------------------------------------------------------------------------------------------------
# the split: Muon for hidden matrices, AdamW for everything else


def unwrap(model):
    """The model inside a DistributedDataParallel and/or torch.compile wrapper: same parameters, plain names."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def split_params(model, head_name="lm_head"):
    """
    Split the trainable parameters of `model` into (muon_named, adam_named), lists of (name, parameter).
    Muon gets the weight of every nn.Linear except the output head (a module called `head_name`) and except
    a weight shared with an nn.Embedding (a tied head). AdamW gets the rest: embeddings, the head, norm weights,
    biases, convolution kernels, 3-D per-head weights, scalars, and any 2-D nn.Parameter outside an nn.Linear
    (from its type we cannot tell a hidden matrix from a table such as a learned position embedding).
    A parameter shared by several modules appears once, under its first name; frozen parameters are left out.
    """
    model = unwrap(model)
    to_adam, linear_weights = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.split(".")[-1] == head_name:
            to_adam.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, nn.Linear):
            linear_weights.add(id(module.weight))
    muon_named, adam_named = [], []
    for name, p in model.named_parameters():  # each parameter once, even when tied
        if p.requires_grad:
            is_hidden_matrix = id(p) in linear_weights and id(p) not in to_adam and p.ndim == 2
            (muon_named if is_hidden_matrix else adam_named).append((name, p))
    return muon_named, adam_named


class CombinedOptimizer:
    """
    Several optimizers behind one object: step() and zero_grad() go to each; param_groups is the flat list of
    all their groups (each with 'lr' and its base rate 'initial_lr', so a schedule sets
    g['lr'] = g['initial_lr'] * factor); state_dict() holds one entry per optimizer, by name.
    """

    def __init__(self, optimizers, summary=""):
        self.optimizers = optimizers  # {name: torch.optim.Optimizer}
        self.summary = summary

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces the groups' dicts
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict):
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"optimizer state holds parts {sorted(state_dict)}, this optimizer has "
                             f"{sorted(self.optimizers)}: was it saved with another `optimizer` choice?")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


def _describe(title, named, aliases):
    """One line per parameter name, layer numbers folded into '*' (h.*.mlp.c_fc.weight [1024, 256] x4)."""
    counts = {}
    for _, p in named:
        name = " = ".join(aliases[id(p)])  # a tied weight under all its names
        key = (re.sub(r"(?<=\.)\d+(?=\.)", "*", name), tuple(p.shape))
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{title}: {len(named)} tensors, {sum(p.numel() for _, p in named):,} parameters"]
    lines += [f"    {name} {list(shape)}" + (f" x{k}" if k > 1 else "") for (name, shape), k in counts.items()]
    return "\n".join(lines)


def configure_optimizers(model, optimizer="muon", lr=0.02, adam_lr=3e-3, weight_decay=0.0, adam_weight_decay=0.1,
                         betas=(0.9, 0.95), momentum=0.95, verbose=True):
    """
    One optimizer for `model`. optimizer="muon": Muon (lr, momentum, weight_decay) for the hidden matrices of
    split_params, AdamW (adam_lr, betas) for the rest. optimizer="adamw": AdamW (adam_lr, betas) for everything.
    AdamW decays (adam_weight_decay) every tensor with ndim >= 2, embeddings and the head included (nanoGPT's
    rule), and no 1-D or 0-D tensor (norms, biases, gate biases, scalars). Returns a CombinedOptimizer; its
    .summary says which parameter went where, printed when verbose.
    """
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {optimizer!r}")
    model = unwrap(model)
    muon_named, adam_named = split_params(model)
    if optimizer == "adamw":
        muon_named, adam_named = [], [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    aliases = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    decay = [(n, p) for n, p in adam_named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in adam_named if p.ndim < 2]
    parts, summary = {}, []
    if muon_named:
        parts["muon"] = Muon([dict(params=[p for _, p in muon_named], initial_lr=lr)], lr=lr, momentum=momentum,
                             weight_decay=weight_decay)
        summary.append(_describe(f"Muon (lr {lr}, weight decay {weight_decay})", muon_named, aliases))
    groups = []
    for named, wd in ((decay, adam_weight_decay), (no_decay, 0.0)):
        if named:
            groups.append(dict(params=[p for _, p in named], weight_decay=wd, initial_lr=adam_lr))
            summary.append(_describe(f"AdamW (lr {adam_lr}, weight decay {wd})", named, aliases))
    if groups:
        fused = all(p.is_cuda for g in groups for p in g["params"])
        parts["adamw"] = torch.optim.AdamW(groups, lr=adam_lr, betas=betas, fused=fused or None)
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        summary.append(_describe("frozen (requires_grad=False), not optimized", frozen, aliases))
    if not parts:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    combined = CombinedOptimizer(parts, "\n".join(summary))
    if verbose:
        print(combined.summary)
    return combined
