"""
Fine-tune a checkpoint (BLaLM or the softmax baseline) for a (Super)GLUE classification task in the BabyLM 2025
pipeline's JSON Lines layout, the way the pipeline's fine-tuning does it (evaluation_pipeline/finetune/):
a classifier head on the last real token's final state, the whole model trained.

    python finetune.py --ckpt=out/ckpt.pt --train=glue/rte.train.jsonl --valid=glue/rte.valid.jsonl
    python finetune.py --ckpt=out/ckpt.pt --train=T.jsonl --valid=V.jsonl --task=mrpc --json=ft_mrpc.json
    python finetune.py --help

Input: end-of-text + A, or end-of-text + A + end-of-text + B for a pair (the exported tokenizer's template),
cut to max_length tokens by dropping the last token of the longer part until it fits; padded on the right.
The fields per task (the pipeline's): boolq question | passage; cola, sst2 sentence; mnli premise |
hypothesis; mrpc, rte sentence1 | sentence2; qnli question | sentence; qqp question1 | question2; multirc
"Question: {question} Answer: {answer}" | paragraph; wsc 'Does "{span2_text}" refer to "{span1_text}" in this
passage?' | text; and an integer (or boolean) `label` in [0, num_labels).
Head: LayerNorm, Linear, GELU, LayerNorm, Dropout, Linear (the norms without weights). Training: AdamW on
every weight (betas 0.9/0.999, eps 1e-8, weight decay 0.01), linear warmup over 6% of the steps then cosine
decay to 0.1 of the rate, shuffled batches (the last incomplete one dropped), no gradient clipping; after
each epoch the validation file is scored and the best epoch (by --metric_for_valid, ties keep the earlier)
is the result. Defaults are eval_finetuning.sh's: lr 3e-5, batch 32 (use 16 for boolq and multirc), 10
epochs (30 for wsc), length 512, seed 42. Prints a progress line every --log_interval steps, each epoch's
validation accuracy / F1 (of label 1, two labels) / MCC, and last the line `best: accuracy X, f1 Y, mcc Z`;
--json writes the settings, every epoch's metrics, the best epoch and its validation predictions (atomically,
never over an existing file without --overwrite=True).
"""

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_model, resolve_path
from common import check_writable, jsonl_records, lr_factor, parse_args, pick_device, run_cli, write_json

# task -> (fields of part A, fields of part B or None, template of A, template of B): the pipeline's layouts
TASKS = {
    "boolq": (("question",), ("passage",), None, None),
    "cola": (("sentence",), None, None, None),
    "mnli": (("premise",), ("hypothesis",), None, None),
    "mrpc": (("sentence1",), ("sentence2",), None, None),
    "multirc": (("question", "answer"), ("paragraph",), "Question: {} Answer: {}", None),
    "qnli": (("question",), ("sentence",), None, None),
    "qqp": (("question1",), ("question2",), None, None),
    "rte": (("sentence1",), ("sentence2",), None, None),
    "sst2": (("sentence",), None, None, None),
    "wsc": (("span2_text", "span1_text"), ("text",), 'Does "{}" refer to "{}" in this passage?', None),
}
F1_TASKS = ("mrpc", "qqp")  # the pipeline picks their best epoch by F1, the others' by accuracy
METRICS = ("accuracy", "f1", "mcc")


@dataclass
class FinetuneConfig:
    ckpt: str = ""                  # checkpoint written by train.py (or its run folder: its ckpt.pt)
    train: str = ""                 # the task's training file (JSON Lines)
    valid: str = ""                 # the task's validation file (JSON Lines): scored after each epoch
    task: str = ""                  # one of TASKS ("" = the train file's name up to its first dot: rte.train.jsonl)
    num_labels: int = 0             # 0 = 3 for mnli, else 2
    batch_size: int = 32            # examples per optimizer step (eval_finetuning.sh: 16 for boolq, multirc)
    valid_batch_size: int = 64
    learning_rate: float = 3e-5     # the peak rate
    num_epochs: int = 10            # eval_finetuning.sh: 30 for wsc
    max_length: int = 512           # tokens per example, end-of-text included (learned positions: <= block_size)
    weight_decay: float = 0.01
    warmup_proportion: float = 0.06
    min_factor: float = 0.1         # the cosine ends at min_factor * learning_rate
    beta1: float = 0.9
    beta2: float = 0.999
    optimizer_eps: float = 1e-8
    classifier_dropout: float = 0.1
    classifier_layer_norm_eps: float = 1e-5
    metric_for_valid: str = ""      # accuracy | f1 | mcc ("" = f1 for mrpc and qqp, else accuracy)
    seed: int = 42
    log_interval: int = 10          # a progress line every this many steps
    device: str = "auto"            # "auto" = cuda when present, else cpu
    json: str = ""                  # write the results here (a new file; --overwrite=True to replace one)
    overwrite: bool = False

# -----------------------------------------------------------------------------
# Data


def read_task(path, task, num_labels):
    """A (Super)GLUE JSON Lines file -> list of (A, B or None, label). A line that is not a JSON object with the
    task's string fields and a label in [0, num_labels) names file, line and field."""
    a_keys, b_keys, a_template, b_template = TASKS[task]
    examples = []
    for n, r in jsonl_records(path):
        where = f"{path} line {n}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object; got {r!r:.60}")
        for key in a_keys + (b_keys or ()):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{where}: expected field {key!r} (task {task}) to be a string; got {r.get(key)!r:.60}")
        label = r.get("label")
        if isinstance(label, bool):
            label = int(label)
        if not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"{where}: expected 'label' to be an integer in [0, {num_labels}); got {r.get('label')!r:.60}")
        join = lambda keys, template: template.format(*(r[k] for k in keys)) if template else " ".join(r[k] for k in keys)
        examples.append((join(a_keys, a_template), join(b_keys, b_template) if b_keys else None, label))
    if not examples:
        raise ValueError(f"{path} holds no examples (an empty file)")
    return examples


def encode(enc, a, b, max_length):
    """-> token ids: end-of-text + A (+ end-of-text + B), the longer part cut at its end until it fits."""
    ta, tb = [enc.eot_token] + enc.encode_ordinary(a), None if b is None else [enc.eot_token] + enc.encode_ordinary(b)
    while len(ta) + len(tb or ()) > max_length:
        if tb is not None and len(tb) > len(ta):
            tb.pop()
        elif len(ta) > 1:
            ta.pop()
        else:
            raise ValueError(f"max_length={max_length} leaves no room for the second part of an example")
    return ta + (tb or [])


def batch(seqs, pad):
    """Token-id lists -> (ids (B, T) padded on the right, lengths (B,))."""
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = torch.tensor(s)
    return x, lengths

# -----------------------------------------------------------------------------
# Model, metrics, schedule


class Classifier(nn.Module):
    """The language model without its output matrix (model(idx) then returns the final normalised states
    (B, T, C)) and the pipeline's head on the last real token's state."""

    def __init__(self, lm, num_labels, dropout, eps):
        super().__init__()
        C = lm.config.n_embd
        lm.lm_head = nn.Identity()  # the embedding matrix stays (wte); only the tied output product goes
        self.lm = lm
        self.head = nn.Sequential(nn.LayerNorm(C, eps, elementwise_affine=False), nn.Linear(C, C), nn.GELU(),
                                  nn.LayerNorm(C, eps, elementwise_affine=False), nn.Dropout(dropout),
                                  nn.Linear(C, num_labels))

    def forward(self, x, lengths):
        h, _ = self.lm(x)                                                 # (B, T, C)
        return self.head(h[torch.arange(len(x), device=x.device), lengths.to(x.device) - 1])


def metrics(pred, gold, num_labels):
    """accuracy, F1 of label 1 (two labels only, else None) and Matthews' correlation (multiclass form; 0 when
    undefined), from the confusion matrix."""
    pred, gold = torch.as_tensor(pred), torch.as_tensor(gold)
    cm = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    cm.index_put_((gold, pred), torch.ones(len(gold), dtype=torch.float64), accumulate=True)  # rows: gold
    n, correct, t, p = cm.sum(), cm.trace(), cm.sum(1), cm.sum(0)
    f1 = None
    if num_labels == 2:
        tp = cm[1, 1]
        f1 = float(2 * tp / (p[1] + t[1])) if p[1] + t[1] > 0 else 0.0
    den = math.sqrt(float((n * n - (p * p).sum()) * (n * n - (t * t).sum())))
    mcc = float(correct * n - (p * t).sum()) / den if den > 0 else 0.0
    return dict(accuracy=float(correct / n), f1=f1, mcc=mcc)


def pipeline_lr_factor(step, total, warmup, min_factor):
    """The rate of update `step` (0-based) over the peak: linear from 0 over the warmup steps, then a cosine
    from 1 down to min_factor at the last step (the pipeline's schedule; its first update has rate 0)."""
    if step < warmup:
        return step / warmup  # one step behind train.py's warmup, which starts at 1 / warmup
    return lr_factor(step, total, warmup_iters=warmup, schedule="cosine", min_lr_ratio=min_factor)


def format_metrics(m):
    return ", ".join(f"{k} {'-' if m[k] is None else format(m[k], '.4f')}" for k in METRICS)


@torch.no_grad()
def predict(model, seqs, pad, device, batch_size):
    model.eval()
    preds = []
    for b in range(0, len(seqs), batch_size):
        x, lengths = batch(seqs[b:b + batch_size], pad)
        preds += model(x.to(device), lengths).argmax(-1).tolist()
    return preds

# -----------------------------------------------------------------------------


def check_finetune_config(cfg):
    """-> (task, num_labels, metric for the best epoch); every flag checked before any work."""
    if not (cfg.ckpt and cfg.train and cfg.valid):
        raise ValueError("give --ckpt=CKPT, --train=FILE and --valid=FILE (JSON Lines of a (Super)GLUE task)")
    task = cfg.task or Path(cfg.train).name.split(".")[0]
    if task not in TASKS:
        raise ValueError(f"--task={task!r}{'' if cfg.task else ' (from the --train file name)'}: expected one of "
                         f"{', '.join(TASKS)}")
    num_labels = cfg.num_labels or (3 if task == "mnli" else 2)
    metric = cfg.metric_for_valid or ("f1" if task in F1_TASKS else "accuracy")
    if metric not in METRICS or metric == "f1" and num_labels != 2:
        raise ValueError(f"--metric_for_valid={metric!r}: expected accuracy, mcc or (two labels) f1")
    if cfg.num_labels < 0 or cfg.num_labels == 1:
        raise ValueError(f"--num_labels={cfg.num_labels}: expected 2 or more (0 = the task's)")
    for name in ("batch_size", "valid_batch_size", "num_epochs", "max_length", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)}: expected a positive number")
    if not (cfg.learning_rate > 0 and 0 <= cfg.warmup_proportion <= 1 and 0 <= cfg.min_factor <= 1
            and 0 <= cfg.classifier_dropout < 1):
        raise ValueError("expected --learning_rate > 0 and --warmup_proportion, --min_factor, --classifier_dropout in [0, 1]")
    resolve_path(cfg.ckpt)
    if cfg.json:
        check_writable(cfg.json, "--json")
        if Path(cfg.json).exists() and not cfg.overwrite:
            raise ValueError(f"--json={cfg.json} exists (an earlier run's results); give another name or --overwrite=True")
    return task, num_labels, metric


def main(argv):
    cfg = parse_args(argv, FinetuneConfig, doc=__doc__)
    task, num_labels, metric = check_finetune_config(cfg)
    train_set, valid_set = read_task(cfg.train, task, num_labels), read_task(cfg.valid, task, num_labels)
    device = pick_device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    lm, enc, ckpt = load_model(cfg.ckpt, device)
    max_length = cfg.max_length
    if getattr(lm, "learned_pos", False) and max_length > lm.config.block_size:
        max_length = lm.config.block_size
        print(f"note: mixer={lm.config.mixer!r} has {max_length} learned positions: examples cut to {max_length} tokens")
    train_seqs = [encode(enc, a, b, max_length) for a, b, _ in train_set]
    valid_seqs = [encode(enc, a, b, max_length) for a, b, _ in valid_set]
    train_labels = torch.tensor([y for *_, y in train_set])
    valid_labels = [y for *_, y in valid_set]
    steps_per_epoch = len(train_seqs) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--train={cfg.train} has {len(train_seqs)} examples, fewer than --batch_size={cfg.batch_size}")
    model = Classifier(lm, num_labels, cfg.classifier_dropout, cfg.classifier_layer_norm_eps).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.optimizer_eps, weight_decay=cfg.weight_decay)
    total = steps_per_epoch * cfg.num_epochs
    warmup = int(cfg.warmup_proportion * total)
    print(f"{cfg.ckpt}: mixer={lm.config.mixer}, {task}: {len(train_seqs):,} training and {len(valid_seqs):,} "
          f"validation examples, {num_labels} labels; {cfg.num_epochs} epochs of {steps_per_epoch} steps of "
          f"{cfg.batch_size}, lr {cfg.learning_rate:g}, warmup {warmup} steps; best epoch by {metric}", flush=True)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    epochs, best, step, t0 = [], None, 0, time.time()
    for epoch in range(1, cfg.num_epochs + 1):
        model.train()
        order = torch.randperm(len(train_seqs), generator=shuffle)
        for s in range(steps_per_epoch):
            rows = order[s * cfg.batch_size:(s + 1) * cfg.batch_size].tolist()
            x, lengths = batch([train_seqs[j] for j in rows], enc.eot_token)
            lr = cfg.learning_rate * pipeline_lr_factor(step, total, warmup, cfg.min_factor)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(x.to(device), lengths), train_labels[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % cfg.log_interval == 0 or step == total:
                print(f"epoch {epoch} step {step}/{total}: loss {loss.item():.4f}, lr {lr:.2e}, "
                      f"{step * cfg.batch_size / (time.time() - t0):,.0f} examples/s", flush=True)
        preds = predict(model, valid_seqs, enc.eot_token, device, cfg.valid_batch_size)
        m = metrics(preds, valid_labels, num_labels)
        epochs.append(dict(epoch=epoch, **m))
        print(f"epoch {epoch} validation: {format_metrics(m)}", flush=True)
        if best is None or m[metric] > best["metrics"][metric]:
            best = dict(epoch=epoch, metrics=m, predictions=preds)
    result = dict(ckpt=cfg.ckpt, task=task, settings=asdict(cfg), n_train=len(train_seqs), n_valid=len(valid_seqs),
                  epochs=epochs, best_epoch=best["epoch"], best=best["metrics"], predictions=best["predictions"],
                  seconds=time.time() - t0)
    if cfg.json:
        write_json(result, cfg.json)
        print(f"wrote {cfg.json}")
    print(f"best: {format_metrics(best['metrics'])} (epoch {best['epoch']}, by {metric})")
    return result


if __name__ == "__main__":
    run_cli(main)
