"""
Performance benchmarks: a table on stdout and the numbers in JSON.

    python bench.py [--suite=kernels|train|decode|optim|all] [--device=auto] [--json=FILE]

kernels  forward+backward of the sequence mixers at a fixed B*T tokens, 12 heads of 64, bfloat16:
         SDPA causal (flash), sliding-window attention (blocked SDPA, flex_attention), the
         mLSTM parallel (where it fits), chunkwise eager and compiled (and with the Triton intra-chunk
         kernel, eager and compiled, when triton is installed), Hedgehog linear attention compiled;
         median ms, peak memory, compile time (every length compiled afresh)
train    tokens/s and MFU of one training step (forward, backward, optimizer) for BLaLM and the softmax
         baseline of the same width and depth, compiled, bfloat16
decode   per-token latency and memory of decoding after a context of 256 .. 16k tokens
optim    Muon and AdamW step time, as a fraction of the training step: wall time alone, and the GPU time
         of its kernels

On a CPU every suite runs tiny sizes (a smoke test, not a measurement). Compare numbers only within
one run on one card: every table names the device it ran on.
"""

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import device_peak_flops, parse_args, pick_device, run_cli, write_json
from hedgehog import HedgehogFeatureMap, linear_attention_chunkwise
from muon import configure_optimizers
from blalm import (BLaLM, BLaLMConfig, mlstm_chunkwise, mlstm_parallel, sliding_window_attention,
                   sliding_window_attention_flex)


@dataclass
class BenchConfig:
    suite: str = "all"        # kernels | train | decode | optim | all
    device: str = "auto"
    json: str = ""            # write the results here too
    tokens: int = 65536       # B * T of the kernel suite
    lengths: str = "512,2048,8192,32768"
    window: int = 128         # SWA window
    repeat: int = 20


def timed(fn, repeat, device):
    """Median milliseconds of fn() over `repeat` runs after one warm-up run (which includes any
    compilation; its seconds are returned too), and the peak memory in MiB."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    return sorted(times)[len(times) // 2], peak, first


def kernel_ms(fn):
    """Milliseconds the GPU spends in the kernels (and copies) that one call of fn launches, by the profiler:
    busy time only, not the gaps where the GPU waits for launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1000


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} logical cores, torch on {torch.get_num_threads()} threads)"


# -----------------------------------------------------------------------------


def bench_kernels(c, device, gpu):
    NH, D = (12, 64) if gpu else (2, 16)
    tokens = c.tokens if gpu else 1024
    lengths = [int(t) for t in c.lengths.split(",")] if gpu else [128, 512]
    dtype = torch.bfloat16 if gpu else torch.float32
    # compiled afresh for every length: static shapes, as in training, and each length's compile time measured
    compile = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)) if gpu else (lambda fn: fn)  # CPU: eager
    # the optional Triton kernel for step (c) (mlstm_triton.py): eager, and compiled around it -- the autograd
    # Function that launches the kernels sits inside the graph torch.compile captures
    with_triton = gpu and importlib.util.find_spec("triton") is not None
    chunk_triton = lambda q, k, v, i, f: mlstm_chunkwise(q, k, v, i, f, kernel="triton")
    fq, fk = HedgehogFeatureMap(D, NH).to(device), HedgehogFeatureMap(D, NH).to(device)
    rows = []
    for T in lengths:
        torch.compiler.reset()  # nothing compiled for one length or mixer is reused, or guarded against, by another
        chunk_c, chunk_triton_c = compile(mlstm_chunkwise), compile(chunk_triton)
        hedgehog_c = compile(lambda q, k, v: linear_attention_chunkwise(fq(q), fk(k), v))
        swa_c = compile(lambda q, k, v: sliding_window_attention(q, k, v, c.window))
        swa_flex_c = compile(lambda q, k, v: sliding_window_attention_flex(q, k, v, c.window))
        B = max(1, tokens // T)
        g = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, device=device)).to(dtype).requires_grad_()
        q, k, v = rnd(B, NH, T, D), rnd(B, NH, T, D), rnd(B, NH, T, D)
        i, f = rnd(B, NH, T), rnd(B, NH, T, scale=2.0)
        dy = torch.randn(B, NH, T, D, generator=g, device=device).to(dtype)
        mixers = {
            "sdpa causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            f"swa w={c.window} blocked sdpa eager": lambda: sliding_window_attention(q, k, v, c.window),
            "mlstm parallel": lambda: mlstm_parallel(q, k, v, i, f),
            "mlstm chunkwise eager": lambda: mlstm_chunkwise(q, k, v, i, f),
            "hedgehog linear attn" + (" compiled" if gpu else ""): lambda: hedgehog_c(q, k, v),
        }
        if gpu:  # the compiled rows (on the CPU the same eager functions: no rows of their own); flex has no CPU backward
            mixers[f"swa w={c.window} blocked sdpa compiled"] = lambda: swa_c(q, k, v)
            mixers["mlstm chunkwise compiled"] = lambda: chunk_c(q, k, v, i, f)
            mixers[f"swa w={c.window} flex_attention compiled"] = lambda: swa_flex_c(q, k, v)
        if with_triton:
            mixers["mlstm chunkwise triton"] = lambda: chunk_triton(q, k, v, i, f)
            mixers["mlstm chunkwise triton compiled"] = lambda: chunk_triton_c(q, k, v, i, f)
        for name, fwd in mixers.items():
            if name == "mlstm parallel" and B * NH * T * T * 4 > (8 << 30 if gpu else 1 << 28):
                rows.append(dict(T=T, B=B, mixer=name, ms=None, peak_mib=None, first_s=None, note="does not fit"))
                continue
            step = lambda: torch.autograd.backward(fwd(), dy)
            try:
                ms, peak, first = timed(step, c.repeat, device)
                rows.append(dict(T=T, B=B, mixer=name, ms=ms, peak_mib=peak, first_s=first))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(T=T, B=B, mixer=name, ms=None, peak_mib=None, first_s=None, note="out of memory"))
            except Exception as e:  # the optional kernel's failure (e.g. to compile) is a result, not the end
                if "triton" not in name:
                    raise
                note = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
                rows.append(dict(T=T, B=B, mixer=name, ms=None, peak_mib=None, first_s=None, note=note))
            for t in (q, k, v, i, f):
                t.grad = None
    return rows


def model_pair(gpu, T):
    """BLaLM (the strict_small shape), with the Triton intra-chunk kernel too where triton is installed,
    and the softmax baseline of the same width and depth."""
    shape = dict(n_layer=12, n_head=7, n_embd=448, vocab_size=16384) if gpu else \
        dict(n_layer=2, n_head=2, n_embd=32, vocab_size=256)
    models = {"blalm": BLaLMConfig(block_size=T, **shape)}
    if gpu and importlib.util.find_spec("triton") is not None:
        models["blalm triton"] = BLaLMConfig(block_size=T, mlstm_kernel="triton", **shape)
    models["softmax"] = BLaLMConfig(block_size=T, mixer="attn", bias=True, **shape)
    return models


def bench_train(c, device, gpu, with_optim=False):
    rows = []
    peak_flops = device_peak_flops(device)
    for T in ([512, 2048] if gpu else [64]):
        B = (32768 if gpu else 256) // T
        for name, cfg in model_pair(gpu, T).items():
            # every model compiled from scratch: the blocks of all models share Block.forward's code, so without a
            # reset a later model runs behind the earlier models' guards and recompilations (seen here: the Triton
            # model's step took 123 ms after two other models, 63 ms in a fresh process)
            torch.compiler.reset()
            torch.manual_seed(0)
            model = BLaLM(cfg).to(device)
            opts = {"muon": configure_optimizers(model, "muon", verbose=False),
                    "adamw": configure_optimizers(model, "adamw", verbose=False)}
            if gpu:
                model.compile_blocks()
            x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)

            def fwd_bwd():
                with autocast:
                    loss = model(x, x)[1]
                loss.backward()

            def step(opt=opts["muon"]):
                fwd_bwd()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms, peak, first = timed(step, c.repeat, device)
            tok_s = B * T / ms * 1000
            mfu = model.flops_per_token(T) * tok_s / peak_flops if peak_flops else None
            row = dict(T=T, model=name, params=model.num_params(), tok_s=tok_s, mfu=mfu, step_ms=ms,
                       peak_mib=peak, compile_s=first)
            if with_optim:
                # two measures of what an optimizer step costs: its wall time alone (launch-bound at this size: the
                # GPU waits for Python to launch ~100 small kernels), and the GPU time of its kernels alone (what it
                # costs where its launches overlap the backward pass still running on the GPU)
                saved = [p.detach().clone() for p in model.parameters()]
                fwd_bwd()  # gradients in place, then time the optimizers alone
                for oname, opt in opts.items():
                    oms, _, _ = timed(lambda: opt.step(), c.repeat, device)
                    row[f"{oname}_ms"], row[f"{oname}_fraction"] = oms, oms / ms
                    if gpu:
                        row[f"{oname}_kernels_ms"] = kernel_ms(opt.step)
                        row[f"{oname}_kernels_fraction"] = row[f"{oname}_kernels_ms"] / ms
                with torch.no_grad():
                    for p, s in zip(model.parameters(), saved):
                        p.copy_(s)
            rows.append(row)
            del model, opts
            if gpu:
                torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def bench_decode(c, device, gpu):
    rows = []
    contexts = [256, 1024, 4096, 16384] if gpu else [32, 128]
    n_new = 32
    for name, cfg in model_pair(gpu, max(contexts) + 2 * n_new).items():
        if name == "blalm triton":  # decoding is one mlstm_step per token: the chunkwise kernel plays no part
            continue
        torch.manual_seed(0)
        model = BLaLM(cfg).to(device).eval()
        if gpu:
            model = model.to(torch.bfloat16)
        for ctx in contexts:
            cache = model.new_cache()
            model(torch.randint(0, cfg.vocab_size, (1, ctx), device=device), cache=cache)
            tok = torch.randint(0, cfg.vocab_size, (1, 1), device=device)
            base = torch.cuda.memory_allocated() if gpu else 0
            ms, peak, _ = timed(lambda: model(tok, cache=cache), n_new, device)
            state_mib = cache.nbytes() / 2**20
            rows.append(dict(model=name, context=ctx, ms_per_token=ms, cache_mib=state_mib,
                             allocated_mib=base / 2**20 if gpu else None))
        del model
    return rows


def print_table(title, rows):
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(fmt(r.get(k)) for k in keys))


def main(argv):
    c = parse_args(argv, BenchConfig, doc=__doc__)
    suites = ["kernels", "train", "decode", "optim"] if c.suite == "all" else [c.suite]
    for s in suites:
        if s not in ("kernels", "train", "decode", "optim"):
            raise ValueError(f"--suite={c.suite!r} is not one of kernels, train, decode, optim, all")
    device = pick_device(c.device)
    gpu = device.startswith("cuda")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {"device": device_name(device), "torch": torch.__version__}
    print(f"# bench on {results['device']}, torch {torch.__version__}")
    if "train" in suites and "optim" in suites:  # one pass measures both
        suites.remove("train")
    for s in suites:
        if s == "kernels":
            results[s] = bench_kernels(c, device, gpu)
        elif s == "train":
            results[s] = bench_train(c, device, gpu)
        elif s == "optim":
            results[s] = bench_train(c, device, gpu, with_optim=True)
        else:
            results[s] = bench_decode(c, device, gpu)
        print_table(f"{s} ({results['device']})", results[s])
        sys.stdout.flush()
        if c.json:  # after every suite, so that a run cut short keeps what it measured
            write_json(results, c.json)
    return results


if __name__ == "__main__":
    run_cli(main)
