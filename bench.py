"""
Performance benchmarks: a table on stdout and the numbers in JSON.

    python bench.py [--suite=kernels|train|decode|optim|all] [--device=auto] [--json=FILE] [--only=PATTERNS]

kernels  forward+backward of the sequence mixers at a fixed B*T tokens, 12 heads of 64, bfloat16:
         SDPA causal (flash), sliding-window attention (blocked SDPA, flex_attention), the
         mLSTM parallel (where it fits), chunkwise eager and compiled (and with the fused Triton
         kernel, eager and compiled, when triton is installed), Hedgehog linear attention compiled;
         median ms, the ratio to SDPA at the same length, peak memory, compile time (every length compiled
         afresh). Where installed, the peers, each in a subprocess of its own (a kernel that aborts the
         process is a row that says so): NX-AI's mlstm_kernels (the TFLA kernel chunkwise--triton_limit_chunk:
         the same mLSTM) and flash-linear-attention's chunk_simple_gla (fla-core: scalar-gated linear
         attention, no input gate or normaliser -- a lower bound), with their error against float64.
         Then the short causal convolution of the strict_small model (B=64, T=512, 3C=1344, K=4):
         PyTorch eager and compiled, and the fused Triton kernel (conv_triton.py)
train    tokens/s and MFU of one training step (forward, backward, optimizer) for BLaLM and the softmax
         baseline of the same width and depth, compiled, bfloat16
decode   per-token latency, tokens/s and memory of decoding after a context of 256 .. 16k tokens, batch 1 / 16 /
         64, BLaLM and softmax (static KV cache), eager / static / CUDA graph; generate end to end
optim    Muon and AdamW step time, as a fraction of the training step: wall time alone, and the GPU time
         of its kernels

On a CPU every suite runs tiny sizes (a smoke test, not a measurement). Compare numbers only within
one run on one card: every table names the device it ran on.
"""

import fnmatch
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from common import device_peak_flops, parse_args, pick_device, run_cli, write_json
from hedgehog import HedgehogFeatureMap, causal_mask, linear_attention_chunkwise
from muon import configure_optimizers
from blalm import (BLaLM, BLaLMConfig, causal_conv, mlstm_chunkwise, mlstm_parallel, sliding_window_attention,
                   sliding_window_attention_flex)
from decode import StaticCache, cuda_graph, sample_next


@dataclass
class BenchConfig:
    suite: str = "all"        # kernels | train | decode | optim | all
    device: str = "auto"
    json: str = ""            # write the results here too
    tokens: int = 65536       # B * T of the kernel suite
    lengths: str = "512,2048,8192,32768"
    window: int = 128         # SWA window of the kernel suite's attention rows
    model_window: int = 64    # the BLaLM models' SWA window (train, decode suites): BLaLMConfig's default, the window
                              # of every committed train / decode log; the strict_small preset trains at 128
    repeat: int = 20
    only: str = ""            # only the mixers / models whose name matches one of these patterns: "sdpa*,nx-ai*"
    train_lengths: str = "512,2048"   # sequence lengths of the train and optim suites on a GPU
    peer_timeout: int = 600   # seconds one peer package's kernel may take, all lengths (then its rows say so)
    decode_modes: str = "eager,static,graph,generate"   # of the decode suite; also: compiled, generate_compiled


def timed(fn, repeat, device):
    """Median milliseconds of fn() over `repeat` runs after one warm-up run (which includes any
    compilation; its seconds are returned too), and the peak memory in MiB (None on a CPU: not measured)."""
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
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return sorted(times)[len(times) // 2], peak, first


def kernel_times(fn, device="cuda"):
    """{kernel name (its first 90 characters): [milliseconds, launches]} of one call of fn, by the profiler. On
    CUDA the GPU's busy time in each kernel (and copy), not the gaps where it waits for launches; on a CPU the
    operators' own CPU time."""
    gpu = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        fn()
        if gpu:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    times = {}
    for e in prof.events():
        if e.device_type == kind and not e.is_user_annotation:
            t = times.setdefault(e.name[:90], [0.0, 0])
            t[0] += (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1000
            t[1] += 1
    return times


def kernel_ms(fn):
    """Milliseconds the GPU spends in the kernels (and copies) that one call of fn launches: busy time only."""
    return sum(ms for ms, _ in kernel_times(fn).values())


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} logical cores, torch on {torch.get_num_threads()} threads)"


# -----------------------------------------------------------------------------


def selected(c, name):
    """Whether --only lets the row (mixer or model) called name run."""
    return not c.only or any(fnmatch.fnmatchcase(name, p.strip()) for p in c.only.split(","))


def kernel_row(T, B, mixer, ms=None, peak=None, first=None, note=None, **extra):
    return dict(T=T, B=B, mixer=mixer, ms=ms, vs_sdpa=None, peak_mib=peak, first_s=first, note=note, **extra)


def failure_note(e):
    return f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"


def progress(rows):
    """One line a row as soon as it is measured (the table comes at the end of the suite): a run cut short by a
    time limit still shows what it measured."""
    for r in rows:
        print(f"  T={r['T']} {r['mixer']}: " + (f"{r['ms']:.4g} ms" if r["ms"] else str(r["note"])), flush=True)
    return rows


def bench_kernels(c, device, gpu):
    NH, D = (12, 64) if gpu else (2, 16)
    tokens = c.tokens if gpu else 1024
    lengths = [int(t) for t in c.lengths.split(",")] if gpu else [128, 512]
    dtype = torch.bfloat16 if gpu else torch.float32
    # compiled afresh for every length: static shapes, as in training, and each length's compile time measured
    compile = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)) if gpu else (lambda fn: fn)  # CPU: eager
    # the optional fused Triton kernels (mlstm_triton.py): eager, and compiled around it -- the autograd
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
        q, k, v, i, f = mlstm_bench_inputs(B, NH, T, D, dtype, device)
        dy = torch.randn(B, NH, T, D, generator=torch.Generator(device=device).manual_seed(1), device=device).to(dtype)
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
            if not selected(c, name):
                continue
            if name == "mlstm parallel" and B * NH * T * T * 4 > (8 << 30 if gpu else 1 << 28):
                rows += progress([kernel_row(T, B, name, note="does not fit")])
                continue
            step = lambda: torch.autograd.backward(fwd(), dy)
            try:
                rows += progress([kernel_row(T, B, name, *timed(step, c.repeat, device))])
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows += progress([kernel_row(T, B, name, note="out of memory")])
            except Exception as e:  # the optional kernel's failure (e.g. to compile) is a result, not the end
                if "triton" not in name:
                    raise
                rows += progress([kernel_row(T, B, name, note=failure_note(e))])
            for t in (q, k, v, i, f):
                t.grad = None
    conv_rows = progress(bench_short_conv(c, device, gpu))   # before the peers: fla's autotuning takes minutes
    if gpu:
        torch.cuda.empty_cache()  # the peers' processes share the card
    for name in PEERS:
        if selected(c, name):
            rows += progress(peer_rows(name, c, device, lengths, tokens, NH, D))
    sdpa = {r["T"]: r["ms"] for r in rows if r["mixer"] == "sdpa causal" and r["ms"]}
    for r in rows:
        if r["ms"] and r["T"] in sdpa:
            r["vs_sdpa"] = r["ms"] / sdpa[r["T"]]
    rows.sort(key=lambda r: (r["T"] is None, r["T"] or 0))   # stable: a length's rows together, the peers beside
    # the project's; a peer that did not run (one row, no length) last
    return rows + conv_rows


def mlstm_bench_inputs(B, NH, T, D, dtype, device, layout="BHTD"):
    """q, k, v (B, NH, T, D) and the gate pre-activations i, f (B, NH, T) (f around 0, scale 2: forget gates from
    ~0.02 to ~0.98), leaves in dtype; layout "BTHD": (B, T, NH, D) and (B, T, NH), the order flash-linear-attention
    takes. The same generator and order for every mixer, in this process and in the peers'."""
    g = torch.Generator(device=device).manual_seed(0)
    qkv_shape, gate_shape = ((B, NH, T, D), (B, NH, T)) if layout == "BHTD" else ((B, T, NH, D), (B, T, NH))
    rnd = lambda s, scale=1.0: (scale * torch.randn(*s, generator=g, device=device)).to(dtype).requires_grad_()
    return rnd(qkv_shape), rnd(qkv_shape), rnd(qkv_shape), rnd(gate_shape), rnd(gate_shape, scale=2.0)


# --- the peers: other packages' kernels, each timed in a process of its own ----------------------------------------

PEERS = {  # row name -> (module, pip name)
    "nx-ai mlstm_kernels chunkwise--triton_limit_chunk": ("mlstm_kernels", "mlstm_kernels"),
    "fla chunk_simple_gla (lower bound)": ("fla", "fla-core"),
}


def gated_linear_attention_float64(q, k, v, i, f):
    """What chunk_simple_gla computes, written plainly ((B, T, NH, D) layout; i unused: no input gate):
    o_t = sum_{s<=t} (q_t . k_s / sqrt(D)) exp(sum_{r=s+1..t} log sigmoid(f_r)) v_s."""
    q, k, v, f = (x.double() for x in (q, k, v, f))
    G = torch.cumsum(F.logsigmoid(f), dim=1).transpose(1, 2)                        # (B, NH, T)
    T = q.size(1)
    decay = torch.exp(G[..., :, None] - G[..., None, :]).masked_fill(~causal_mask(T, q.device), 0.0)  # (B, NH, T, T)
    S = torch.einsum("bthd,bshd->bhts", q, k) / q.size(-1) ** 0.5
    return torch.einsum("bhts,bshd->bthd", S * decay, v)


def peer_kernel(name):
    """-> (fwd(q, k, v, i, f) -> h, input layout, the float64 reference) of a peer package's kernel; imports it."""
    if name.startswith("nx-ai"):
        from mlstm_kernels.torch import get_mlstm_kernel
        kernel = get_mlstm_kernel("chunkwise--triton_limit_chunk")
        # q, k, v (B, NH, T, D), i, f (B, NH, T) gate pre-activations, q scaled by 1/sqrt(D) inside: the same
        # contract as mlstm_chunkwise; chunk 64 as ours; bfloat16 in, as given (no autocast here)
        fwd = lambda q, k, v, i, f: kernel(q, k, v, i, f, chunk_size=64, autocast_kernel_dtype=torch.bfloat16)
        return fwd, "BHTD", lambda *a: mlstm_parallel(*(x.double() for x in a))
    from fla.ops.simple_gla import chunk_simple_gla
    # (B, T, NH, D); g the log forget gate (float32), scale 1/sqrt(D) by default; returns (o, final state)
    return (lambda q, k, v, i, f: chunk_simple_gla(q, k, v, F.logsigmoid(f.float()))[0]), "BTHD", \
        gated_linear_attention_float64


def peer_main(spec):
    """The peer's process: time fwd+bwd at every length, one JSON row a line appended to spec["out"] as soon as it
    is measured (so that a crash keeps what came before). The first row carries the kernel's error against float64."""
    s = json.loads(spec)
    name, device, dtype = s["name"], s["device"], getattr(torch, s["dtype"])
    with open(s["out"], "a") as out:
        def write(row):
            out.write(json.dumps(row) + "\n")
            out.flush()
        try:
            fwd, layout, reference = peer_kernel(name)
            # rel. error of h (inputs in dtype) against float64 on the same rounded inputs: B=1, 2 heads, T=256
            small = [x.detach() for x in mlstm_bench_inputs(1, 2, 256, s["D"], dtype, device, layout)]
            h, ref = fwd(*small).double(), reference(*small)
            err = ((h - ref).norm() / ref.norm()).item()
        except Exception as e:
            for T in s["lengths"]:
                write(kernel_row(T, max(1, s["tokens"] // T), name, note=failure_note(e)))
            return
        for T in s["lengths"]:
            B = max(1, s["tokens"] // T)
            q, k, v, i, f = mlstm_bench_inputs(B, s["NH"], T, s["D"], dtype, device, layout)
            g = torch.Generator(device=device).manual_seed(1)
            dy = torch.randn(q.shape, generator=g, device=device).to(q.dtype)
            try:
                row = kernel_row(T, B, name, *timed(lambda: torch.autograd.backward(fwd(q, k, v, i, f), dy),
                                                   s["repeat"], device), h_err_vs_fp64=err)
            except torch.OutOfMemoryError:
                row = kernel_row(T, B, name, note="out of memory")
            except Exception as e:
                row = kernel_row(T, B, name, note=failure_note(e))
            write(row)


def peer_rows(name, c, device, lengths, tokens, NH, D):
    """The rows of one peer package's kernel, measured by peer_main in a child process (a kernel that aborts the
    process -- an LLVM assertion, say -- or hangs costs its own rows, not the suite): a row per length, or one row
    that says why there are none."""
    module, pip_name = PEERS[name]
    if importlib.util.find_spec(module) is None:
        return [kernel_row(None, None, name, note=f"not installed (pip install {pip_name})")]
    if not device.startswith("cuda"):
        return [kernel_row(None, None, name, note="needs a CUDA device")]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.jsonl")
        spec = json.dumps(dict(name=name, device=device, dtype="bfloat16", lengths=lengths, tokens=tokens, NH=NH, D=D,
                               repeat=c.repeat, out=out))
        return run_peer([sys.executable, "-c", "import sys, bench; bench.peer_main(sys.argv[1])", spec],
                        out, name, lengths, tokens, c.peer_timeout)


def run_peer(cmd, out, name, lengths, tokens, timeout):
    """Runs cmd (which appends JSON rows to the file out) in this file's folder -> its rows, plus a row that says
    why for every length it did not reach (a signal, a non-zero exit, the time limit: then it is killed). Its
    output goes to a file, not a pipe, and it stays in this process's group, so a `timeout` around bench.py
    ends it too."""
    log = out + ".log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=timeout)
            why = None if rc == 0 else \
                f"killed by signal {-rc} ({signal.strsignal(-rc)})" if rc < 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            why = f"timed out after {timeout} s"
    tail = [line for line in open(log, errors="replace").read().splitlines() if line.strip()][-20:]
    if why and tail:
        print(f"[{name}] {why}; its last lines:\n" + "\n".join(tail), file=sys.stderr)
        why += f": {tail[-1].strip()[:120]}"
    rows = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
    done = {r["T"] for r in rows}
    return rows + [kernel_row(T, max(1, tokens // T), name, note=why or "no row written")
                   for T in lengths if T not in done]


# --- the short causal convolution ----------------------------------------------------------------------------------


def bench_short_conv(c, device, gpu):
    """Forward+backward (to x, weight and bias) of one layer's short causal convolution at the strict_small shape,
    the PyTorch form (blalm.causal_conv, as MLSTMLayer runs it) eager and compiled, and the fused Triton kernel
    eager and compiled (as it runs in the compiled blocks of training). Ratios to the compiled PyTorch form."""
    B, T, C3, K = (64, 512, 3 * 448, 4) if gpu else (2, 64, 48, 4)
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, T, C3, generator=g, device=device).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(C3, K, generator=g, device=device)).requires_grad_()      # float32 parameters
    b = torch.randn(C3, generator=g, device=device).requires_grad_()
    dy = torch.randn(B, T, C3, generator=g, device=device).to(dtype)
    torch_conv = lambda x, w, b: causal_conv(F.pad(x, (0, 0, K - 1, 0)), w, b)   # zeros before t = 0, as the layer
    convs = {"short conv torch eager": torch_conv}
    if gpu:
        torch.compiler.reset()
        convs["short conv torch compiled"] = torch.compile(torch_conv, fullgraph=True, dynamic=False)
        if importlib.util.find_spec("triton") is not None:
            from conv_triton import short_conv
            convs["short conv triton"] = short_conv
            convs["short conv triton compiled"] = torch.compile(short_conv, fullgraph=True, dynamic=False)
    rows = []
    for name, fn in convs.items():
        if not selected(c, name):
            continue
        step = lambda: torch.autograd.backward(fn(x, w, b), dy)
        mixer = f"{name} (3C={C3}, K={K})"
        try:
            rows.append(kernel_row(T, B, mixer, *timed(step, c.repeat, device), vs_torch_conv=None))
        except Exception as e:
            if "triton" not in name:
                raise
            rows.append(kernel_row(T, B, mixer, note=failure_note(e), vs_torch_conv=None))
        for t in (x, w, b):
            t.grad = None
    base = next((r["ms"] for r in rows if r["mixer"].startswith("short conv torch " + ("compiled" if gpu else "eager"))
                 and r["ms"]), None)
    for r in rows:
        r["vs_torch_conv"] = r["ms"] / base if base and r["ms"] else None
    return rows


def model_pair(gpu, T, window=BLaLMConfig.swa_window):
    """-> {name: (config, kernels)}: BLaLM (the strict_small shape, SWA window `window`), with the fused Triton
    kernels too where triton is installed, and the softmax baseline of the same width and depth."""
    shape = dict(n_layer=12, n_head=7, n_embd=448, vocab_size=16384) if gpu else \
        dict(n_layer=2, n_head=2, n_embd=32, vocab_size=256)
    blalm = BLaLMConfig(block_size=T, swa_window=min(window, T), **shape)
    models = {"blalm": (blalm, "torch")}
    if gpu and importlib.util.find_spec("triton") is not None:
        models["blalm triton"] = (blalm, "triton")
    models["softmax"] = (BLaLMConfig(block_size=T, mixer="attn", bias=True, **shape), "torch")
    return models


def bench_train(c, device, gpu, with_optim=False):
    rows = []
    peak_flops = device_peak_flops(device)
    for T in ([int(t) for t in c.train_lengths.split(",")] if gpu else [64]):
        B = max(1, (32768 if gpu else 256) // T)
        for name, (cfg, kernels) in model_pair(gpu, T, c.model_window).items():
            if not selected(c, name):
                continue
            # every model compiled from scratch: the blocks of all models share Block.forward's code, so without a
            # reset a later model runs behind the earlier models' guards and recompilations (seen here: the Triton
            # model's step took 123 ms after two other models, 63 ms in a fresh process)
            torch.compiler.reset()
            torch.manual_seed(0)
            model = BLaLM(cfg).set_kernels(kernels).to(device)
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


DECODE_MODES = ("eager", "static", "graph", "generate", "compiled", "generate_compiled")


def decode_steps(model, cfg, ctx, B, room, device, gpu, modes):
    """{mode: (one decode step, the cache it uses)} after a prompt of ctx random tokens in B rows, and the
    StaticCache (its position is reset before each measurement)."""
    cache = model.new_cache()
    model(torch.randint(0, cfg.vocab_size, (B, ctx), device=device), cache=cache, last_only=True)
    static = StaticCache(model, cache, ctx + room)
    tok = torch.randint(0, cfg.vocab_size, (B, 1), device=device)

    def eager():
        sample_next(model(tok, cache=cache)[0][:, -1], 1.0, 50)

    def step():
        tok.copy_(sample_next(model.decode_step(tok, static), 1.0, 50)[:, None])

    steps = {"eager": (eager, cache), "static": (step, static)}
    if "graph" in modes and gpu:
        steps["graph"] = (cuda_graph(step), static)
    if "compiled" in modes:   # after model.compile_decode(), decode_step runs the compiled blocks
        steps["compiled"] = (cuda_graph(step) if gpu else step, static)
    return {m: s for m, s in steps.items() if m in modes}, static


def decode_progress(row):
    """One readable line a decode row, on stderr as it is measured (a run cut short keeps what it measured)."""
    what = row.get("note") or f"{row['ms_per_token']:.3g} ms/token, {row['tok_s']:,.0f} tok/s"
    print(f"  decode {row['model']} {row['mode']}: context {row['context']}, batch {row['batch']}: {what}",
          file=sys.stderr, flush=True)
    return row


def decode_step_rows(model, name, cfg, contexts, batches, room, c, device, gpu, pass_modes):
    """The eager / static / graph / compiled rows: ms per token from the end of each context, each batch size."""
    rows, compiled = [], "compiled" in pass_modes or "generate_compiled" in pass_modes
    for ctx in contexts if {"eager", "static", "graph", "compiled"} & set(pass_modes) else []:
        if compiled and (ctx == contexts[0] or cfg.mixer == "attn"):   # attn: a new KV cache length
            torch.compiler.reset()
            model.compile_decode()
        for B in batches:
            row = dict(model=name, context=ctx, batch=B)
            try:
                steps, static = decode_steps(model, cfg, ctx, B, room, device, gpu, pass_modes)
                for mode, (fn, cache) in steps.items():
                    static.pos.fill_(ctx)  # every measurement decodes from the end of the context
                    ms, _, _ = timed(fn, c.repeat, device)
                    rows.append(decode_progress(dict(row, mode=mode, ms_per_token=ms, tok_s=B * 1000 / ms,
                                                     cache_mib=cache.nbytes() / 2**20, allocated_mib=
                                                     torch.cuda.memory_allocated() / 2**20 if gpu else None)))
            except torch.OutOfMemoryError:
                rows.append(decode_progress(dict(row, mode="-", ms_per_token=None, tok_s=None, note="out of memory")))
            steps = static = None
            if gpu:
                torch.cuda.empty_cache()
    return rows


def decode_generate_rows(model, name, cfg, batches, device, gpu, compiled):
    """The generate rows: the whole of generate (a prompt, then new tokens) end to end, as sample.py runs it."""
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    rows, new = [], 256 if gpu else 16
    for B in batches:
        prompt = torch.randint(0, cfg.vocab_size, (B, 256 if gpu else 32), device=device)
        if compiled:   # the compile itself is not what is measured
            model.generate(prompt, 4)
        sync()
        t0 = time.perf_counter()
        model.generate(prompt, new, temperature=1.0, top_k=50)
        sync()
        s = time.perf_counter() - t0
        rows.append(decode_progress(dict(model=name, context=prompt.size(1), batch=B,
                                         mode="generate_compiled" if compiled else "generate",
                                         ms_per_token=1000 * s / new, tok_s=B * new / s, cache_mib=None,
                                         allocated_mib=None)))
    return rows


@torch.no_grad()
def bench_decode(c, device, gpu):
    """Milliseconds per decoded token (one step: the model, then sampling the next token with top_k=50) after a
    context of ctx tokens, for B rows at once (--decode_modes picks among these):

    eager     forward with a DecodeCache: tensors that grow, positions as Python ints
    static    decode_step with a StaticCache: preallocated tensors updated in place, run eagerly
    graph     that step, sampling included, captured as one CUDA graph (CUDA only)
    generate  the whole of generate (a prompt of 256, CUDA graph capture, 256 new tokens) end to end, as sample.py
    compiled, generate_compiled: graph (on a CPU: static) and generate with model.compile_decode() (the blocks
              compiled by inductor for decoding; compile time is not in the rows; "attn" compiles for every context)

    The softmax baseline's static KV cache holds the context and the decoded tokens; its learned positions reach
    that far because model_pair builds the models with block_size = the longest context plus room."""
    modes = [m.strip() for m in c.decode_modes.split(",") if m.strip()]
    for m in modes:
        if m not in DECODE_MODES:
            raise ValueError(f"--decode_modes: {m!r} is not one of {', '.join(DECODE_MODES)}")
    rows = []
    contexts = [256, 1024, 4096, 16384] if gpu else [32, 128]
    batches = [1, 16, 64] if gpu else [1, 3]
    room = max(128, c.repeat + 8)   # positions beyond the context that the caches hold (warm-up and timed steps)
    passes = [p for p in ([m for m in modes if m in ("eager", "static", "graph", "generate")],
                          [m for m in modes if m in ("compiled", "generate_compiled")]) if p]
    for name, (cfg, kernels) in model_pair(gpu, max(contexts) + room, c.model_window).items():
        if not selected(c, name):   # "blalm triton" decodes with mlstm_triton.mlstm_layer_step_triton
            continue
        torch.manual_seed(0)
        model = BLaLM(cfg).set_kernels(kernels).to(device).eval()
        if gpu:
            model = model.to(torch.bfloat16)
        for pass_modes in passes:
            compiled = "compiled" in pass_modes or "generate_compiled" in pass_modes
            rows += decode_step_rows(model, name, cfg, contexts, batches, room, c, device, gpu, pass_modes)
            if compiled and "generate_compiled" in pass_modes and (cfg.mixer == "attn" or "compiled" not in pass_modes):
                torch.compiler.reset()
                model.compile_decode()
            if {"generate", "generate_compiled"} & set(pass_modes):
                rows += decode_generate_rows(model, name, cfg, batches, device, gpu, compiled)
            model._decode_blocks = None
        del model
        if gpu:
            torch.cuda.empty_cache()
    return rows


def format_cell(v):
    """A table cell: "n/a" for what was not measured (memory on a CPU), numbers to 4 significant digits."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:,.4g}" if isinstance(v, float) else str(v)


def print_table(title, rows):
    """A Markdown table of the rows, columns padded to line up in a terminal."""
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [keys] + [[format_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    line = lambda row: "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"
    print(line(keys))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def main(argv):
    c = parse_args(argv, BenchConfig, doc=__doc__)
    suites = ["kernels", "train", "decode", "optim"] if c.suite == "all" else [c.suite]
    for s in suites:
        if s not in ("kernels", "train", "decode", "optim"):
            raise ValueError(f"--suite={c.suite!r} is not one of kernels, train, decode, optim, all")
    for key in ("window", "model_window"):
        if getattr(c, key) < 1:
            raise ValueError(f"--{key}={getattr(c, key)}: expected a window of at least 1 token")
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
