"""
Conversion of a trained softmax Transformer to Hedgehog linear attention (Zhang et al., ICLR 2024).

The teacher is a trained softmax model (mixer="attn", GPT-2 layout); the student is its twin with
mixer="hedgehog": the same weights, with softmax(q kᵀ/√d) v replaced by linear attention over
phi(q), phi(k) (hedgehog.py holds the feature maps, the linear attention and the distillation loss).

  stage 1, attention distillation: every weight frozen except the feature maps. On training batches the
    frozen teacher gives each layer's q, k, and the maps learn to reproduce that layer's softmax weights:
    min over phi of  sum_l attention_distillation_loss(q_l, k_l, phi_q^l, phi_k^l)
  stage 2, finetuning: the student, now a linear-attention model, trained with the next-token loss:
    every weight, or (lora_rank > 0) low-rank adapters on the attention projections plus the feature
    maps, as the paper does for Llama-2. The adapters are merged into the weights before saving.

    python convert.py --init_from=out/ckpt.pt --data=DIR     # a softmax (mixer="attn") checkpoint of train.py
    python convert.py --init_from=gpt2:PATH --data=DIR       # a local Hugging Face GPT-2 folder
    python convert.py --init_from=... --data=DIR --lora_rank=8 --feature_map=elu_learned
    python convert.py --help

It writes out_dir/ckpt.pt (a mixer="hedgehog" BLaLM that eval.py and sample.py load) and
out_dir/report.md + report.json (perplexities and the distillation loss of every layer).
"""

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from blalm import BLaLM, BLaLMConfig
import checkpoint
from common import lr_factor, parse_args, pick_device, run_cli, setup_precision, write_atomic
from hedgehog import (EluFeatureMap, HedgehogFeatureMap, acc_dtype, attention_distillation_loss,
                      linear_attention_weights, softmax_attention_weights)

# -----------------------------------------------------------------------------
# The student and its distillation (stage 1)
#
# Every layer's maps see the teacher's q, k, not the student's (whose inputs drift as earlier layers
# change): each layer learns to mimic its own softmax attention, independently of the others.

CONVERSION_FEATURE_MAPS = ("hedgehog", "elu", "elu_learned")


def make_feature_map(name, head_dim, n_heads):
    """A converted layer's feature map: "hedgehog" (HedgehogFeatureMap), "elu" (1 + elu, fixed, nothing
    to train) or "elu_learned" (1 + elu(x W), W trained with the same distillation as Hedgehog's)."""
    if name == "hedgehog":
        return HedgehogFeatureMap(head_dim, n_heads)
    if name in ("elu", "elu_learned"):
        return EluFeatureMap(head_dim, n_heads, learned=name == "elu_learned")
    raise ValueError(f"feature_map={name!r} is not one of {CONVERSION_FEATURE_MAPS}")


def make_student(teacher, feature_map="hedgehog"):
    """
    The linear-attention twin of a softmax BLaLM (mixer="attn"): mixer="hedgehog", every weight copied,
    fresh feature maps of the kind asked for, on the teacher's device and dtype. A "hedgehog" student is
    a plain BLaLM (its state dict loads with checkpoint.load_model); the baselines swap its
    fmap_q / fmap_k modules for EluFeatureMap ones.
    """
    if teacher.config.mixer != "attn":
        raise ValueError(f"conversion starts from softmax attention (mixer='attn'), got mixer={teacher.config.mixer!r}")
    student = BLaLM(BLaLMConfig.from_dict({**teacher.config.to_dict(), "mixer": "hedgehog"}))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(".fmap_" not in key for key in missing):
        raise ValueError(f"teacher weights do not fit the hedgehog model: missing {missing}, unexpected {unexpected}")
    D, NH = teacher.config.n_embd // teacher.config.n_head, teacher.config.n_head
    if feature_map != "hedgehog":
        for block in student.transformer.h:
            block.mixer.fmap_q = make_feature_map(feature_map, D, NH)
            block.mixer.fmap_k = make_feature_map(feature_map, D, NH)
    p = next(teacher.parameters())
    return student.to(device=p.device, dtype=p.dtype).eval()


def feature_map_parameters(model):
    """The parameters of every layer's fmap_q and fmap_k: all that stage 1 trains."""
    return [p for name, p in model.named_parameters() if ".fmap_" in name]


def layer_qk(model, idx):
    """
    Run model (GPT-2 layout, "attn" or "hedgehog") on tokens idx (B, T) and return for every layer the
    q, k its attention computes: a list of n_layer pairs of (B, NH, T, D) tensors.

    A forward pre-hook on each mixer records the mixer's input, ln_1 of the residual stream;
    mixer.qkv turns it into q, k, v. Call under torch.no_grad() for teacher targets.
    """
    inputs = []
    hooks = [block.mixer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.transformer.h]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return [block.mixer.qkv(x)[:2] for block, x in zip(model.transformer.h, inputs)]


def _autocast(model, dtype):
    """Forward passes in bfloat16 autocast when dtype is torch.bfloat16, else as the weights are."""
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def _tokens(batch):
    """A batch is idx (B, T) or a pair (x, y); distillation needs only the tokens."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _layer_losses(teacher, student, idx, dtype):
    """Per layer, the distillation loss of the student's maps on the teacher's q, k: a list of scalars
    (with a graph to the maps when called with gradients on)."""
    with torch.no_grad(), _autocast(teacher, dtype):
        qk = layer_qk(teacher, idx)
    losses = []
    for (q, k), block in zip(qk, student.transformer.h):
        acc = acc_dtype(q.dtype)  # distil in float32 even when the teacher ran in bfloat16
        losses.append(attention_distillation_loss(q.to(acc), k.to(acc), block.mixer.fmap_q, block.mixer.fmap_k))
    return losses


@torch.no_grad()
def distillation_losses(teacher, student, batches, dtype=None):
    """The attention distillation loss of every layer (a list of n_layer floats), averaged over the
    batches: how far the student's linear attention weights are from the teacher's softmax weights."""
    totals = None
    for batch in batches:
        losses = torch.stack([loss.double() for loss in _layer_losses(teacher, student, _tokens(batch), dtype)])
        totals = losses if totals is None else totals + losses
    return (totals / len(batches)).tolist()


def distill_feature_maps(teacher, batches_fn, iters, lr, feature_map="hedgehog", student=None, dtype=None,
                         log_interval=0):
    """
    Stage 1: train only the student's feature maps, with Adam at a constant rate lr, to minimise the sum
    over layers of the distillation loss on the teacher's q, k. batches_fn() gives a training batch
    (idx, or (x, y)). The student is make_student(teacher, feature_map) unless one is given.
    -> (student, history): history has one entry per step, {"iter", "loss" (summed over layers),
    "layers" (per layer)}; it is empty for the fixed 1 + elu map, which has nothing to train.
    """
    teacher.eval()
    student = make_student(teacher, feature_map) if student is None else student
    student.eval()  # no dropout: the maps learn the weights the model will use
    params = feature_map_parameters(student)
    history = []
    if not params or iters == 0:
        return student, history
    trainable = [p.requires_grad for p in student.parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        for it in range(1, iters + 1):
            losses = []
            for loss in _layer_losses(teacher, student, _tokens(batches_fn()), dtype):
                # one layer's graph at a time: the maps of different layers share nothing, so the sum of
                # the per-layer gradients is the gradient of the summed loss, and only one layer's
                # (B, NH, T, T) weights are alive at once
                loss.backward()
                losses.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            layers = torch.stack(losses).tolist()
            history.append({"iter": it, "loss": sum(layers), "layers": layers})
            if log_interval and (it % log_interval == 0 or it == iters):
                print(f"stage 1 iter {it}/{iters}: distillation loss {sum(layers):.4f} "
                      f"(per layer {' '.join(f'{x:.3f}' for x in layers)})")
    finally:
        for p, flag in zip(student.parameters(), trainable):
            p.requires_grad_(flag)
    return student, history


# -----------------------------------------------------------------------------
# Finetuning (stage 2), with LoRA optional (Hu et al. 2021): W stays frozen and learns a low-rank
# correction, W + (alpha / r) B A.


class LoRALinear(nn.Module):
    """
    y = x Wᵀ + b + (alpha / r) x Aᵀ Bᵀ: a frozen nn.Linear plus a trainable rank-r update ΔW = (alpha / r) B A,
    A (r, in_features), B (out_features, r). B starts at zero, so the layer starts as the frozen one;
    A starts random (N(0, 1/in_features)), so B gets a gradient from the first step.
    """

    def __init__(self, base, rank, alpha):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        self.base, self.rank, self.alpha, self.scale = base, rank, alpha, alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.randn(rank, w.shape[1], device=w.device, dtype=w.dtype) / math.sqrt(w.shape[1]))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged(self):
        """A plain nn.Linear with W + (alpha / r) B A and the base's bias."""
        w = self.base.weight
        out = nn.Linear(w.shape[1], w.shape[0], bias=self.base.bias is not None, device=w.device, dtype=w.dtype)
        out.weight.copy_(w + self.scale * self.lora_B @ self.lora_A)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


LORA_TARGETS = ("mixer.c_attn", "mixer.c_proj")  # the attention projections; add "mlp.c_fc", "mlp.c_proj" for the MLP


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """
    Wrap every nn.Linear whose name ends with one of `targets` in a LoRALinear (in place) and freeze
    everything else except the adapters and the feature maps (a few parameters that keep adapting to
    the changing attention). -> model.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full.endswith(tuple(targets)):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                replaced.append(full)
    if not replaced:
        raise ValueError(f"add_lora: no nn.Linear named like {tuple(targets)} in the model")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or ".fmap_" in name)
    return model


def merge_lora(model):
    """Replace every LoRALinear by the plain nn.Linear of its merged weight (in place) and make every
    parameter trainable again: the state dict is a plain model's. -> model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def lm_loss(model, batches, dtype=None):
    """Mean next-token loss of model over batches of (x, y): the same windows give comparable numbers."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with _autocast(model, dtype):
            losses.append(model(x, y)[1].double())
    model.train(was_training)
    return torch.stack(losses).mean().item()


def finetune(model, batches_fn, iters, lr, warmup_iters=0, grad_clip=1.0, dtype=None, compile=False,
             log_interval=0):
    """
    Stage 2: next-token loss on the parameters that require grad (all of them, or after add_lora the
    adapters and feature maps), AdamW (betas 0.9, 0.95, no weight decay), linear warmup then cosine decay
    to lr / 10 (common.lr_factor). batches_fn() gives (x, y). -> history, one {"iter", "loss"} per step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    history = []
    if iters == 0:
        return history
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    forward = torch.compile(model) if compile else model
    model.train()
    for it in range(iters):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(it, iters, warmup_iters, schedule="cosine", min_lr_ratio=0.1)
        x, y = batches_fn()
        with _autocast(model, dtype):
            loss = forward(x, y)[1]
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"iter": it + 1, "loss": loss.item()})
        if log_interval and ((it + 1) % log_interval == 0 or it + 1 == iters):
            print(f"stage 2 iter {it + 1}/{iters}: loss {history[-1]['loss']:.4f}, lr {optimizer.param_groups[0]['lr']:.2e}")
    model.eval()
    return history


# -----------------------------------------------------------------------------
# Both stages, and one layer's attention weights for plots


def convert(teacher, batches_fn, val_batches, stage1_iters, stage2_iters, lr1=1e-2, lr2=3e-4,
            feature_map="hedgehog", lora_rank=0, lora_alpha=16.0, lora_targets=LORA_TARGETS, warmup_iters=0,
            dtype=None, compile=False, log_interval=0):
    """
    Both stages on a softmax model in memory. batches_fn() -> a training batch (x, y); val_batches: a
    fixed list of (x, y) on which every loss is measured. -> (student, results) with results holding
    the validation loss and perplexity of the teacher, of the student before stage 1 (untrained maps),
    after stage 1 (no finetuning) and after stage 2; the per-layer distillation loss before and after
    stage 1; and both stages' histories. The teacher is left unchanged.
    """
    if feature_map not in CONVERSION_FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r} is not one of {CONVERSION_FEATURE_MAPS}")
    teacher.eval()  # it only ever runs under torch.no_grad(): its weights cannot change
    results = {"feature_map": feature_map}
    student = make_student(teacher, feature_map)
    results["teacher_loss"] = lm_loss(teacher, val_batches, dtype)
    results["student_untrained_loss"] = lm_loss(student, val_batches, dtype)
    results["distill_before"] = distillation_losses(teacher, student, val_batches, dtype)

    t0 = time.time()
    student, results["stage1_history"] = distill_feature_maps(teacher, batches_fn, stage1_iters, lr1, student=student,
                                                              dtype=dtype, log_interval=log_interval)
    results["stage1_seconds"] = time.time() - t0
    results["distill_after"] = distillation_losses(teacher, student, val_batches, dtype)
    results["stage1_loss"] = lm_loss(student, val_batches, dtype)

    t0 = time.time()
    if lora_rank:
        add_lora(student, lora_rank, lora_alpha, lora_targets)
    results["stage2_trainable_params"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
    results["stage2_history"] = finetune(student, batches_fn, stage2_iters, lr2, warmup_iters, dtype=dtype,
                                         compile=compile, log_interval=log_interval)
    if lora_rank:
        merge_lora(student)
    results["stage2_seconds"] = time.time() - t0
    results["stage2_loss"] = lm_loss(student, val_batches, dtype)
    for name in ("teacher", "student_untrained", "stage1", "stage2"):
        results[f"{name}_ppl"] = math.exp(results[f"{name}_loss"])
    return student, results


@torch.no_grad()
def attention_maps(teacher, student, idx, layer, own_qk=False):
    """
    The attention weights of one layer for plots: (teacher's softmax weights, student's linear attention
    weights), two (B, NH, T, T) float32 CPU tensors, rows summing to 1 (up to eps) over s ≤ t.

    By default both come from the teacher's q, k at that layer: the pairs stage 1 matches. With
    own_qk=True the student's weights come from its own forward pass (its own hidden states and, after
    stage 2, its own finetuned projections): what the converted model really computes.
    """
    if not 0 <= layer < teacher.config.n_layer:
        raise ValueError(f"layer={layer} is outside [0, n_layer={teacher.config.n_layer})")
    q, k = layer_qk(teacher, idx)[layer]
    mixer = student.transformer.h[layer].mixer
    q_s, k_s = layer_qk(student, idx)[layer] if own_qk else (q, k)
    acc = acc_dtype(q.dtype)
    student_w = linear_attention_weights(mixer.fmap_q(q_s.to(acc)), mixer.fmap_k(k_s.to(acc)))
    return softmax_attention_weights(q, k).float().cpu(), student_w.float().cpu()


# -----------------------------------------------------------------------------
# Loading the softmax model: a train.py checkpoint, or a local Hugging Face GPT-2 (gpt2:PATH)


def load_gpt2(path):
    """
    A local Hugging Face GPT-2 checkpoint -> (BLaLM with mixer="attn", tiktoken's GPT-2 encoding
    (data.gpt2_encoding: a clear error when tiktoken cannot load it, with how to make it available)).
    path: a folder holding model.safetensors (read when the safetensors package is installed) or
    pytorch_model.bin, or one of those files. n_head comes from config.json beside the weights when there
    is one, else n_embd // 64 (true of every GPT-2 size).
    """
    if os.path.isdir(path):
        folder = path
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))]
        has_safetensors = importlib.util.find_spec("safetensors") is not None
        if not names:
            raise FileNotFoundError(f"gpt2:{path} holds neither model.safetensors nor pytorch_model.bin")
        if names[0] == "model.safetensors" and not has_safetensors and len(names) > 1:
            names = names[1:]
        file = os.path.join(path, names[0])
    elif os.path.isfile(path):
        folder, file = os.path.dirname(path), path
    else:
        raise FileNotFoundError(f"gpt2:{path} does not exist (expected a Hugging Face GPT-2 folder or its weights file)")
    if file.endswith(".safetensors"):
        if importlib.util.find_spec("safetensors") is None:
            raise ValueError(f"{file} is a safetensors file but the safetensors package is not installed: "
                             "pip install safetensors, or use the folder's pytorch_model.bin")
        from safetensors.torch import load_file
        sd = load_file(file)
    else:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{file} is not a PyTorch state dict ({type(e).__name__}: {e})") from None
    n_head = None
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as fh:
            n_head = json.load(fh).get("n_head")
    wte = sd.get("transformer.wte.weight", sd.get("wte.weight"))
    if n_head is None and wte is not None:
        C = wte.shape[-1]
        if C < 64 or C % 64:
            raise ValueError(f"{file}: no config.json with n_head beside it, and n_embd={C} is not a multiple of 64 "
                             "to infer GPT-2's n_head = n_embd // 64")
    model = BLaLM.from_gpt2_state_dict(sd, n_head=n_head)
    return model.eval(), data.gpt2_encoding()


def load_softmax_model(init_from):
    """--init_from -> (softmax BLaLM on the CPU in eval mode, tokenizer description, source checkpoint dict):
    a train.py checkpoint of a mixer="attn" model, or gpt2:PATH (load_gpt2; the source dict is empty)."""
    if init_from.startswith("gpt2:"):
        model, enc = load_gpt2(init_from[len("gpt2:"):])
        return model, data.tokenizer_to_dict(enc), {}
    ckpt = checkpoint.load(init_from)
    config = BLaLMConfig.from_dict(ckpt["config"])
    if config.mixer != "attn":
        raise ValueError(f"{init_from} holds a mixer={config.mixer!r} model; conversion starts from a softmax "
                         "attention model (train.py --mixer=attn) or gpt2:PATH")
    model = BLaLM(config)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["tokenizer"], ckpt


# -----------------------------------------------------------------------------
# The command line


@dataclass
class ConvertConfig:
    init_from: str = ""             # a softmax (mixer="attn") checkpoint of train.py, or gpt2:PATH (local Hugging Face GPT-2)
    data: str = ""                  # a prepared data dir (meta.json, train/val bins) tokenized with the model's tokenizer
    out_dir: str = "out-hedgehog"
    feature_map: str = "hedgehog"   # "hedgehog" | "elu" (1 + elu, fixed) | "elu_learned" (1 + elu(x W), W distilled like Hedgehog's)
    stage1_iters: int = 300         # attention distillation steps (feature maps only)
    stage2_iters: int = 300         # finetuning steps (next-token loss)
    batch_size: int = 8
    block_size: int = 0             # 0 = the checkpoint's
    lr1: float = 1e-2               # stage 1 (Adam, constant)
    lr2: float = 3e-4               # stage 2 (AdamW, warmup then cosine to lr2 / 10); ~1e-3 suits LoRA
    warmup_iters: int = 20
    lora_rank: int = 0              # 0 = finetune every weight; R = LoRA adapters of rank R (+ the feature maps)
    lora_alpha: float = 16.0
    lora_mlp: bool = False          # LoRA on the MLP's c_fc / c_proj too (else the attention's c_attn / c_proj only)
    eval_iters: int = 20            # validation batches for every loss in the report (the same windows each time)
    log_interval: int = 50
    seed: int = 1337
    device: str = "auto"            # "auto" | "cuda" | "cpu" | "mps" | "cuda:1" ...
    dtype: str = "auto"             # "auto" (bfloat16 on CUDA, else float32) | "bfloat16" | "float32"
    compile: bool = False           # torch.compile the student for stage 2


def check_convert_config(c):
    if not c.init_from or not c.data:
        raise ValueError("--init_from=CKPT|gpt2:PATH and --data=DIR are required (see --help)")
    if c.feature_map not in CONVERSION_FEATURE_MAPS:
        raise ValueError(f"--feature_map={c.feature_map!r} is not one of {CONVERSION_FEATURE_MAPS}")
    if c.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype={c.dtype!r} is not one of ('auto', 'bfloat16', 'float32')")
    for key in ("stage1_iters", "stage2_iters", "block_size", "warmup_iters", "lora_rank", "log_interval"):
        if getattr(c, key) < 0:
            raise ValueError(f"--{key}={getattr(c, key)} must be >= 0")
    for key in ("batch_size", "eval_iters"):
        if getattr(c, key) < 1:
            raise ValueError(f"--{key}={getattr(c, key)} must be >= 1")
    for key in ("lr1", "lr2", "lora_alpha"):
        if not getattr(c, key) > 0:
            raise ValueError(f"--{key}={getattr(c, key)} must be > 0")


def write_report(results, c, out_dir):
    """report.json (everything, histories included) and report.md (the tables), both written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    before, after = results["distill_before"], results["distill_after"]
    lines = [f"# Conversion to linear attention ({results['feature_map']} feature map)", "",
             f"from `{c.init_from}`, data `{c.data}`; stage 1: {c.stage1_iters} iters at lr {c.lr1}, "
             f"stage 2: {c.stage2_iters} iters at lr {c.lr2}, "
             + (f"LoRA rank {c.lora_rank} alpha {c.lora_alpha}" if c.lora_rank else "all weights")
             + f"; batch {c.batch_size} x {results['block_size']} tokens.", "",
             f"Validation: {c.eval_iters} batches of {c.batch_size} windows of {results['block_size']} tokens, "
             "the same windows for every row.", "",
             "| model | val loss | perplexity |", "|---|---|---|"]
    for name, label in (("teacher", "softmax teacher"), ("student_untrained", "linear, untrained maps"),
                        ("stage1", "linear, after stage 1 (no finetuning)"), ("stage2", "linear, after stage 2")):
        lines.append(f"| {label} | {results[name + '_loss']:.4f} | {results[name + '_ppl']:.2f} |")
    lines += ["", "Attention distillation loss (KL(softmax weights ‖ linear attention weights) per query, "
              "mean over the validation windows):", "", "| layer | before stage 1 | after stage 1 |", "|---|---|---|"]
    lines += [f"| {l} | {b:.4f} | {a:.4f} |" for l, (b, a) in enumerate(zip(before, after))]
    lines.append(f"| sum | {sum(before):.4f} | {sum(after):.4f} |")
    if not results["stage1_history"]:
        lines += ["", f"Stage 1 had nothing to train (feature_map={results['feature_map']!r} has no parameters "
                  "or stage1_iters=0)."]
    lines += ["", f"Checkpoint: {results['checkpoint'] or 'none'}" + (f" ({results['checkpoint_note']})"
                                                                      if results.get("checkpoint_note") else ""), ""]
    write_atomic(os.path.join(out_dir, "report.md"), "\n".join(lines))
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps(results, indent=1))


def main(argv):
    c = parse_args(argv, ConvertConfig, doc=__doc__)
    check_convert_config(c)
    c.device = pick_device(c.device)
    c.dtype, _ = setup_precision(c.device, c.dtype)  # the name; autocast is per model (_autocast), not global
    dtype = torch.bfloat16 if c.dtype == "bfloat16" else None
    torch.manual_seed(c.seed)

    # --- the softmax model and data tokenized the same way
    teacher, tokenizer, source = load_softmax_model(c.init_from)
    teacher.to(c.device)
    meta = data.load_meta(c.data)
    data_name, model_name = meta["tokenizer"]["name"], tokenizer.get("name")
    if data_name != model_name or (data_name == "bpe" and data.tokenizer_to_dict(data.load_tokenizer(c.data)) != tokenizer):
        raise ValueError(f"--data={c.data} is tokenized with another tokenizer ({data_name!r}, {meta['vocab_size']} "
                         f"tokens) than {c.init_from} ({model_name!r}, vocab_size {teacher.config.vocab_size}); "
                         "prepare the data with the model's tokenizer" + (" (python prepare.py --tokenizer=gpt2 ...)"
                                                                         if model_name == "gpt2" else ""))
    block_size = c.block_size or teacher.config.block_size
    if block_size > teacher.config.block_size:
        raise ValueError(f"--block_size={block_size} is longer than the checkpoint's block_size="
                         f"{teacher.config.block_size} (its learned positions)")
    train_data, val_data = data.open_bin(c.data, "train"), data.open_bin(c.data, "val")
    g_train = torch.Generator().manual_seed(c.seed)
    g_val = torch.Generator().manual_seed(1234)  # the same validation windows for every number in the report
    val_batches = [data.get_batch(val_data, c.batch_size, block_size, g_val, c.device) for _ in range(c.eval_iters)]
    print(f"converting {c.init_from}: {teacher.config.n_layer} layers x {teacher.config.n_embd}, "
          f"feature map {c.feature_map}, device {c.device} {c.dtype}")

    # --- both stages
    student, results = convert(
        teacher, lambda: data.get_batch(train_data, c.batch_size, block_size, g_train, c.device), val_batches,
        c.stage1_iters, c.stage2_iters, lr1=c.lr1, lr2=c.lr2, feature_map=c.feature_map, lora_rank=c.lora_rank,
        lora_alpha=c.lora_alpha, lora_targets=LORA_TARGETS + (("mlp.c_fc", "mlp.c_proj") if c.lora_mlp else ()),
        warmup_iters=c.warmup_iters, dtype=dtype, compile=c.compile, log_interval=c.log_interval)
    results["block_size"] = block_size
    results["config"] = asdict(c)

    # --- checkpoint (the words seen before the conversion, if known, plus those of both stages) and report
    tokens = (c.stage1_iters + c.stage2_iters) * c.batch_size * block_size
    words_per_token = data.words_per_token(meta)
    if c.feature_map == "hedgehog":
        path = os.path.join(c.out_dir, "ckpt.pt")
        checkpoint.save({"model": student.state_dict(), "config": student.config.to_dict(),
                         "iter": c.stage1_iters + c.stage2_iters,
                         "tokens_seen": source.get("tokens_seen", 0) + tokens,
                         "words_seen": source.get("words_seen", 0) + tokens * words_per_token,
                         "best_val_loss": results["stage2_loss"], "tokenizer": tokenizer,
                         "train_config": source.get("train_config"), "convert_config": asdict(c),
                         "data_meta": meta}, path)
        results["checkpoint"] = path
    else:  # blalm's "hedgehog" mixer holds Hedgehog maps only, so a baseline's student has no checkpoint format
        results["checkpoint"] = None
        results["checkpoint_note"] = (f"feature_map={c.feature_map!r} is a baseline for comparison; only Hedgehog "
                                      "students are saved (blalm's hedgehog mixer holds Hedgehog maps)")
    write_report(results, c, c.out_dir)
    print(f"val perplexity: teacher {results['teacher_ppl']:.2f}, stage 1 {results['stage1_ppl']:.2f}, "
          f"stage 2 {results['stage2_ppl']:.2f}; distillation loss {sum(results['distill_before']):.4f} -> "
          f"{sum(results['distill_after']):.4f}")
    print(f"wrote {os.path.join(c.out_dir, 'report.md')}" + (f" and {results['checkpoint']}" if results["checkpoint"] else ""))


if __name__ == "__main__":
    run_cli(main)
