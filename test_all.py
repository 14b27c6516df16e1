"""The whole test suite: python -m pytest -q test_all.py

Grouped by file in the order of the design: blalm.py, hedgehog.py, muon.py, data.py, train/eval/sample,
bench.py, notebooks. Each test's name states the property it proves."""

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import blalm
from blalm import (BLaLM, BLaLMConfig, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_step,
                   segsum)

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


# =============================================================================
# blalm.py: the mLSTM in three forms


def mlstm_reference(q, k, v, i, f):
    """The contract's formula written plainly, without stabiliser or eps (float64, moderate gates):
    w[t,s] = (q_t.k_s/sqrt(DQK)) exp(sum_{r=s+1..t} log sigmoid(f_r) + i_s); h_t = sum_s w v_s / max(|sum_s w|, 1)."""
    T, DQK = q.size(2), q.size(3)
    lf = F.logsigmoid(f)
    h = torch.zeros(*q.shape[:3], v.size(-1), dtype=q.dtype)
    for t in range(T):
        Fts = torch.stack([lf[..., s + 1:t + 1].sum(-1) for s in range(t + 1)], dim=-1)   # (B, NH, t+1)
        w = (q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-2, -1)).squeeze(2) / math.sqrt(DQK)
        w = w * torch.exp(Fts + i[..., :t + 1])
        h[:, :, t] = (w[..., None] * v[:, :, :t + 1]).sum(2) / w.sum(-1).abs().clamp_min(1.0)[..., None]
    return h


def random_mlstm_inputs(B=2, NH=2, T=37, DQK=8, DV=6, dtype=torch.float64, seed=0, gate_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v = r(B, NH, T, DQK), r(B, NH, T, DQK), r(B, NH, T, DV)
    i, f = gate_scale * r(B, NH, T), 3.0 + gate_scale * r(B, NH, T)
    return [x.to(dtype).requires_grad_() for x in (q, k, v, i, f)]


FORMS = {
    "parallel": lambda *a, **kw: mlstm_parallel(*a, **kw),
    "chunkwise": lambda *a, **kw: mlstm_chunkwise(*a, chunk_size=8, **kw),
    "recurrent": lambda *a, **kw: mlstm_recurrent(*a, **kw),
}


def outputs_and_grads(fn, inputs, **kw):
    h = fn(*inputs, **kw)
    probe = torch.sin(torch.arange(h.numel(), dtype=torch.float64, device=h.device)).view_as(h).to(h.dtype)  # generic
    return [h] + list(torch.autograd.grad((h * probe).sum(), inputs))


def test_segsum_is_the_sum_over_the_segment():
    x = torch.randn(7, dtype=torch.float64)
    S = segsum(x)
    for t in range(7):
        for s in range(7):
            expected = x[s + 1:t + 1].sum() if s <= t else float("-inf")
            assert S[t, s].item() == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_mlstm_form_computes_the_contract_formula_float64(form):
    inputs = random_mlstm_inputs(T=29)
    ref = outputs_and_grads(lambda *a: mlstm_reference(*a), inputs)
    got = outputs_and_grads(FORMS[form], inputs, eps=0.0)   # eps = 0: the stabiliser cancels exactly
    for name, a, b in zip(["h", "q", "k", "v", "i", "f"], got, ref):
        assert rel_err(a, b) <= 1e-10, f"{form}: d{name} rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_mlstm_forms_agree_with_parallel_outputs_and_gradients(form, dtype, tol):
    inputs = random_mlstm_inputs(T=45, dtype=dtype, seed=1)
    ref = outputs_and_grads(FORMS["parallel"], [x.detach().double().requires_grad_() for x in inputs])
    got = outputs_and_grads(FORMS[form], inputs)
    for name, a, b in zip(["h", "q", "k", "v", "i", "f"], got, ref):
        assert a.dtype == dtype
        assert rel_err(a, b) <= tol, f"{form} {dtype}: d{name} rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("T", [1, 7, 8, 9, 23])
def test_mlstm_chunkwise_any_length_matches_parallel(T):
    inputs = [x.detach() for x in random_mlstm_inputs(T=T, seed=T)]
    assert rel_err(mlstm_chunkwise(*inputs, chunk_size=8), mlstm_parallel(*inputs)) <= 1e-12


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_mlstm_state_passed_across_a_split_equals_one_pass(form):
    q, k, v, i, f = [x.detach() for x in random_mlstm_inputs(T=40, seed=2)]
    fn = FORMS[form]
    h_full, state_full = fn(q, k, v, i, f, return_state=True)
    cut = 21
    h1, s1 = fn(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], i[..., :cut], f[..., :cut], return_state=True)
    h2, s2 = fn(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], i[..., cut:], f[..., cut:], state=s1, return_state=True)
    assert rel_err(torch.cat([h1, h2], dim=2), h_full) <= 1e-12
    for a, b in zip(s2, state_full):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_mlstm_chunkwise_and_recurrent_final_states_agree():
    q, k, v, i, f = [x.detach() for x in random_mlstm_inputs(T=30, seed=3)]
    _, sc = mlstm_chunkwise(q, k, v, i, f, chunk_size=8, return_state=True)
    _, sr = mlstm_recurrent(q, k, v, i, f, return_state=True)
    for a, b in zip(sc, sr):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_mlstm_step_continues_from_a_nonzero_state_like_chunkwise():
    q, k, v, i, f = [x.detach() for x in random_mlstm_inputs(T=17, seed=4)]
    _, state = mlstm_chunkwise(q[:, :, :16], k[:, :, :16], v[:, :, :16], i[..., :16], f[..., :16],
                               chunk_size=8, return_state=True)
    h_step, _ = mlstm_step(q[:, :, 16], k[:, :, 16], v[:, :, 16], i[..., 16], f[..., 16], state)
    assert rel_err(h_step, mlstm_parallel(q, k, v, i, f)[:, :, 16]) <= 1e-12


def test_mlstm_forms_stay_finite_for_extreme_gates_long_sequences():
    g = torch.Generator().manual_seed(5)
    B, NH, T, D = 1, 2, 4096, 4
    q, k, v = (torch.randn(B, NH, T, D, generator=g) for _ in range(3))
    i = (torch.rand(B, NH, T, generator=g) * 200 - 100)
    f = (torch.rand(B, NH, T, generator=g) * 200 - 100)
    i[0, 0, : T // 2], f[0, 0, : T // 2] = -100.0, -100.0     # a long stretch at the worst corner
    i[0, 1, : T // 2], f[0, 1, : T // 2] = 100.0, 100.0
    inputs = [x.requires_grad_() for x in (q, k, v, i, f)]
    h = mlstm_chunkwise(*inputs, chunk_size=64)
    grads = torch.autograd.grad(h.sum(), inputs)
    assert torch.isfinite(h).all() and all(torch.isfinite(gr).all() for gr in grads)
    with torch.no_grad():
        hr = mlstm_recurrent(*inputs)
        hp = mlstm_parallel(*[x[:, :, :1024] if x.dim() == 4 else x[..., :1024] for x in inputs])
    assert torch.isfinite(hr).all() and torch.isfinite(hp).all()


def test_mlstm_bfloat16_inputs_keep_a_float32_state():
    q, k, v, i, f = [x.detach().to(torch.bfloat16)
                     for x in random_mlstm_inputs(B=2, NH=2, T=64, DQK=64, DV=64, dtype=torch.float32)]
    for fn in (lambda **kw: mlstm_chunkwise(q, k, v, i, f, chunk_size=16, **kw),
               lambda **kw: mlstm_recurrent(q, k, v, i, f, **kw)):
        h, (C, n, m) = fn(return_state=True)
        assert h.dtype == torch.bfloat16
        assert C.dtype == n.dtype == m.dtype == torch.float32


def test_mlstm_chunkwise_bfloat16_errs_like_flash_attention_where_sums_cancel():
    """Random q, k with gates in [-8, 8] make h a sum of terms of both signs that largely cancel, which
    amplifies every rounding inside. Only P @ v may run in bfloat16 (as flash attention does): then outputs
    and all five gradients stay within 1e-2 of float64 on the same (bfloat16-rounded) inputs. With the
    scores or the state products rounded to bfloat16 as well, the gradients of q and k erred ~7e-2."""
    g = torch.Generator().manual_seed(0)
    B, NH, T, D = 1, 2, 256, 64
    q, k, v = (torch.randn(B, NH, T, D, generator=g).bfloat16() for _ in range(3))
    i, f = ((torch.rand(B, NH, T, generator=g) * 2 - 1) * 8 for _ in range(2))
    leaves = [x.requires_grad_() for x in (q, k, v, i, f)]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    probe = torch.randn(B, NH, T, D, generator=g, dtype=torch.float64)
    h = mlstm_chunkwise(*leaves, chunk_size=64)
    got = [h] + list(torch.autograd.grad((h.double() * probe).sum(), leaves))
    h_ref = mlstm_parallel(*ref_leaves)
    ref = [h_ref] + list(torch.autograd.grad((h_ref * probe).sum(), ref_leaves))
    for name, a, b in zip(["h", "q", "k", "v", "i", "f"], got, ref):
        assert rel_err(a, b) < 1e-2, f"{name}: {rel_err(a, b):.1e}"


# =============================================================================
# mlstm_triton.py: the optional Triton kernel for the chunkwise form's intra-chunk part
#
# The kernel runs on CUDA tensors, or on the CPU under the Triton interpreter, which has to be on
# (TRITON_INTERPRET=1) before triton's kernels are defined. So the kernel tests run directly where the
# interpreter is on or a GPU is present; otherwise test_triton_kernel_tests_pass_under_the_interpreter runs
# them (-k triton) in a subprocess with the interpreter on. Without triton (as in CI) they skip.

import importlib.util
import os
import subprocess
import sys

from blalm import _intra_chunk_torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda" if torch.cuda.is_available() else None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (kernel='triton' is optional)")
needs_kernel = pytest.mark.skipif(
    not HAVE_TRITON or KERNEL_DEVICE is None,
    reason="no GPU and no Triton interpreter in this process: test_triton_kernel_tests_pass_under_the_interpreter "
           "runs this test in a subprocess with TRITON_INTERPRET=1" if HAVE_TRITON else "triton is not installed")


def mlstm_inputs(B=1, NH=2, T=45, DQK=16, DV=16, gate_range=8.0, seed=0):
    """float32 leaves on the kernel's device; gates uniform in [-gate_range, gate_range]."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, NH, T, D, generator=g) for D in (DQK, DQK, DV))
    i, f = (gate_range * (2 * torch.rand(B, NH, T, generator=g) - 1) for _ in range(2))
    return [x.to(KERNEL_DEVICE).requires_grad_() for x in (q, k, v, i, f)]


def as_float64(inputs):
    return [x.detach().double().requires_grad_() for x in inputs]


NAMES = ["h", "q", "k", "v", "i", "f"]


@needs_kernel
@pytest.mark.parametrize("gate_range,chunk_size,T", [(8.0, 16, 45), (50.0, 32, 70)])
def test_triton_kernel_matches_parallel_float64_outputs_and_gradients(gate_range, chunk_size, T):
    inputs = mlstm_inputs(T=T, gate_range=gate_range, seed=T)     # T not a multiple of chunk_size
    got = outputs_and_grads(lambda *a: mlstm_chunkwise(*a, chunk_size=chunk_size, kernel="triton"), inputs)
    ref = outputs_and_grads(mlstm_parallel, as_float64(inputs))
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 1e-4, f"gates +-{gate_range}: d{name} rel err {rel_err(a, b):.2e}"


@needs_kernel
def test_triton_kernel_half_precision_inputs_match_parallel_float64():
    # float16 takes the low-precision path (P, dP, dS rounded to the input dtype before their products); the
    # interpreter cannot run bfloat16 products (numpy has no bfloat16), the GPU can: same code path
    inputs = [x.detach().half().requires_grad_() for x in mlstm_inputs(T=45, gate_range=8.0, seed=7)]
    got = outputs_and_grads(lambda *a: mlstm_chunkwise(*a, chunk_size=16, kernel="triton"), inputs)
    ref = outputs_and_grads(mlstm_parallel, as_float64(inputs))
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == torch.float16
        assert rel_err(a, b) <= 5e-3, f"d{name} rel err {rel_err(a, b):.2e}"


@needs_kernel
def test_triton_kernel_continues_from_a_nonzero_state_like_parallel_over_the_whole_sequence():
    # the state after a prefix (float64, from the recurrent form) continued by the kernel over the rest must give
    # what the parallel form gives for the rest when it sees prefix and rest in one pass; the gradients with
    # respect to the rest's inputs agree too (the state is a constant for them)
    prefix = [x.detach().double() for x in mlstm_inputs(T=21, seed=1)]
    rest = mlstm_inputs(T=37, seed=2)
    _, state = mlstm_recurrent(*prefix, return_state=True)
    state32 = tuple(s.float() for s in state)
    assert state[2].abs().min() > 0.1                                  # a stabiliser m far from the zero state's
    got = outputs_and_grads(lambda *a: mlstm_chunkwise(*a, chunk_size=16, state=state32, kernel="triton"), rest)

    def parallel_after_prefix(*a):
        return mlstm_parallel(*(torch.cat([p, x], dim=2) for p, x in zip(prefix, a)))[:, :, 21:]
    ref = outputs_and_grads(parallel_after_prefix, as_float64(rest))
    for name, a, b in zip(NAMES, got, ref):
        assert rel_err(a, b) <= 1e-4, f"d{name} rel err {rel_err(a, b):.2e}"


@needs_kernel
def test_triton_kernel_matches_torch_kernel_wide_unequal_heads():
    # DQK = 128 takes two feature blocks of 64 inside the kernel; DV = 32 one; a non-zero initial state
    inputs = mlstm_inputs(B=2, NH=1, T=40, DQK=128, DV=32, seed=3)
    g = torch.Generator().manual_seed(4)
    state = (torch.randn(2, 1, 128, 32, generator=g), torch.randn(2, 1, 128, generator=g), 3 * torch.ones(2, 1))
    state = tuple(s.to(KERNEL_DEVICE) for s in state)
    got, ref = (outputs_and_grads(lambda *a: mlstm_chunkwise(*a, chunk_size=16, state=state, kernel=kern), inputs)
                for kern in ("triton", "torch"))
    for name, a, b in zip(NAMES, got, ref):
        assert rel_err(a, b) <= 1e-5, f"d{name} rel err {rel_err(a, b):.2e}"


@needs_kernel
def test_triton_intra_chunk_gradients_match_torch_including_the_gates():
    # the Function alone: d/db and d/di come from the kernel's row and column sums, checked against autograd
    # through _intra_chunk_torch in float64 (m is a constant for both)
    from mlstm_triton import intra_chunk
    g = torch.Generator().manual_seed(5)
    B, NH, NC, L, D = 1, 2, 3, 16, 16
    q, k, v = (torch.randn(B, NH, NC, L, D, generator=g) for _ in range(3))
    b = torch.cumsum(F.logsigmoid(4 * torch.randn(B, NH, NC, L, generator=g)), dim=-1)
    i = 4 * torch.randn(B, NH, NC, L, generator=g)
    m = b + torch.cummax(i - b, dim=-1).values
    inputs = [x.to(KERNEL_DEVICE).requires_grad_() for x in (q, k, v, b, i)]
    m = m.to(KERNEL_DEVICE)

    def both_outputs(fn, m):
        return lambda *a: torch.cat([x.flatten() for x in fn(*a, m)])
    got = outputs_and_grads(both_outputs(intra_chunk, m), inputs)
    ref = outputs_and_grads(both_outputs(_intra_chunk_torch, m.double()), as_float64(inputs))
    for name, a, b in zip(["num, den", "q", "k", "v", "b", "i"], got, ref):
        assert rel_err(a, b) <= 1e-5, f"d{name} rel err {rel_err(a, b):.2e}"


@needs_kernel
def test_triton_kernel_stays_finite_for_gates_at_the_contract_limits():
    inputs = mlstm_inputs(T=64, gate_range=100.0, seed=6)
    with torch.no_grad():
        inputs[3][0, 0, :32], inputs[4][0, 0, :32] = -100.0, -100.0
        inputs[3][0, 1, :32], inputs[4][0, 1, :32] = 100.0, 100.0
    got = outputs_and_grads(lambda *a: mlstm_chunkwise(*a, chunk_size=16, kernel="triton"), inputs)
    assert all(torch.isfinite(x).all() for x in got)


@needs_kernel
def test_triton_kernel_in_the_model_gives_the_torch_kernels_logits_and_gradients():
    cfg = dict(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, chunk_size=16)
    torch.manual_seed(0)
    model = BLaLM(BLaLMConfig(**cfg)).to(KERNEL_DEVICE)
    fused = BLaLM(BLaLMConfig(**cfg, mlstm_kernel="triton")).to(KERNEL_DEVICE)
    fused.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (2, 27), device=KERNEL_DEVICE)
    (logits, loss), (fused_logits, fused_loss) = model(idx, idx), fused(idx, idx)
    assert rel_err(fused_logits, logits) <= 1e-5
    loss.backward()
    fused_loss.backward()
    for (name, p), pf in zip(model.named_parameters(), fused.parameters()):
        assert rel_err(pf.grad, p.grad) <= 1e-4, f"{name}: rel err {rel_err(pf.grad, p.grad):.2e}"


@needs_triton
def test_triton_kernel_rejects_sizes_and_dtypes_it_cannot_run():
    q, k, v, i, f = [x.detach() for x in mlstm_inputs(T=32, DQK=16, DV=16)] if KERNEL_DEVICE else \
        [torch.randn(1, 1, 32, 16) for _ in range(3)] + [torch.randn(1, 1, 32) for _ in range(2)]
    with pytest.raises(ValueError, match="chunk_size=8"):
        mlstm_chunkwise(q, k, v, i, f, chunk_size=8, kernel="triton")
    with pytest.raises(ValueError, match="chunk_size=24"):
        mlstm_chunkwise(q, k, v, i, f, chunk_size=24, kernel="triton")
    with pytest.raises(ValueError, match="DQK=12"):
        mlstm_chunkwise(q[..., :12], k[..., :12], v, i, f, chunk_size=16, kernel="triton")
    with pytest.raises(ValueError, match="DV=8"):
        mlstm_chunkwise(q, k, v[..., :8], i, f, chunk_size=16, kernel="triton")
    with pytest.raises(ValueError, match="float64"):
        mlstm_chunkwise(*(x.double() for x in (q, k, v, i, f)), chunk_size=16, kernel="triton")


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="the Triton interpreter runs the kernel on CPU tensors")
def test_triton_kernel_refuses_cpu_tensors_outside_the_interpreter():
    q, k, v = (torch.randn(1, 1, 32, 16) for _ in range(3))
    i, f = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        mlstm_chunkwise(q, k, v, i, f, chunk_size=16, kernel="triton")


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="already under the interpreter: the kernel tests run in this process")
def test_triton_kernel_tests_pass_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", "triton",
                        str(Path(__file__).resolve())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_chunkwise_rejects_an_unknown_kernel_name():
    q, k, v = (torch.randn(1, 1, 8, 4) for _ in range(3))
    i, f = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    with pytest.raises(ValueError, match="kernel='cuda'"):
        mlstm_chunkwise(q, k, v, i, f, kernel="cuda")
    with pytest.raises(ValueError, match="mlstm_kernel='cuda'"):
        BLaLMConfig(mlstm_kernel="cuda")


@pytest.mark.skipif(HAVE_TRITON, reason="triton is installed")
def test_chunkwise_triton_kernel_without_triton_says_what_is_missing():
    q, k, v = (torch.randn(1, 1, 32, 16) for _ in range(3))
    i, f = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    with pytest.raises(ImportError, match="triton"):
        mlstm_chunkwise(q, k, v, i, f, chunk_size=16, kernel="triton")
    assert math.isfinite(mlstm_chunkwise(q, k, v, i, f, chunk_size=16).sum().item())  # the default needs nothing


# =============================================================================
# blalm.py: the model

TINY = dict(vocab_size=61, block_size=64, n_layer=2, n_head=2, n_embd=16)
VARIANTS = {
    "blalm": {},
    "attn": dict(mixer="attn", bias=True),
    "mlstm_only": dict(short_conv=0, swa_window=0),
    "no_modulation": dict(modulation=False, swa_window=6, chunk_size=4),
    "recurrent_form": dict(mlstm_form="recurrent"),
    "parallel_form": dict(mlstm_form="parallel"),
    "hedgehog_mixer": dict(mixer="hedgehog", bias=True, chunk_size=4),
    "hedgehog_feature_map": dict(feature_map="hedgehog", chunk_size=4),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_stepwise_decoding_logits_equal_full_forward(variant):
    torch.manual_seed(0)
    model = BLaLM(BLaLMConfig(**TINY, **VARIANTS[variant])).double().eval()
    idx = torch.randint(0, 61, (2, 25))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        parts = [model(idx[:, :10], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(10, 25)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-10


@pytest.mark.parametrize("variant", ["blalm", "attn", "mlstm_only"])
def test_model_forms_and_loss_are_consistent(variant):
    torch.manual_seed(0)
    cfg = BLaLMConfig(**TINY, **VARIANTS[variant])
    model = BLaLM(cfg)
    idx = torch.randint(0, 61, (3, 20))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 20, 61)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 61), idx.view(-1)).item(), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(61), rel=0.1)    # small init: near-uniform predictions


def test_mlstm_forms_give_the_same_model_output():
    torch.manual_seed(0)
    models = {form: BLaLM(BLaLMConfig(**TINY, mlstm_form=form, chunk_size=4)).double() for form in blalm.MLSTM_FORMS}
    sd = models["chunkwise"].state_dict()
    idx = torch.randint(0, 61, (2, 19))
    outs = {}
    for form, m in models.items():
        m.load_state_dict(sd)
        outs[form] = m(idx)[0]
    assert rel_err(outs["parallel"], outs["chunkwise"]) < 1e-12
    assert rel_err(outs["recurrent"], outs["chunkwise"]) < 1e-12


def cache_tensors(cache):
    """(key, tensor) for every tensor a decoding cache holds, per layer (a state tuple gives several)."""
    return [(key, t) for layer in cache["layers"] for key, v in layer.items()
            for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]


def cache_numel(cache):
    return sum(t.numel() for _, t in cache_tensors(cache))


def test_mlstm_decoding_memory_does_not_grow_with_context():
    torch.manual_seed(0)
    model = BLaLM(BLaLMConfig(**TINY, swa_window=8)).eval()
    cache = model.new_cache()
    sizes = []
    with torch.no_grad():
        model(torch.randint(0, 61, (1, 20)), cache=cache)
        for t in range(200):
            model(torch.randint(0, 61, (1, 1)), cache=cache)
            sizes.append(cache_numel(cache))
    assert len(set(sizes)) == 1, f"cache size changed: {sorted(set(sizes))}"


@pytest.mark.parametrize("T, window", [(50, 8), (64, 16), (7, 16)])
def test_sliding_window_attention_both_paths_match_the_banded_softmax_float64(T, window):
    # reference: the definition written plainly, a (T x T) softmax where query t sees keys t-window+1..t
    g = torch.Generator().manual_seed(T + window)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.arange(T)
    band = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window)
    scores = (q @ k.mT / math.sqrt(8)).masked_fill(~band, float("-inf"))
    ref = torch.softmax(scores, dim=-1) @ v
    blocked = blalm.sliding_window_attention(q, k, v, window)                # the blocked SDPA (CPU, eager)
    with warnings.catch_warnings():  # eager flex_attention warns that it is the unfused reference
        warnings.simplefilter("ignore")
        flex = blalm.sliding_window_attention_flex(q, k, v, window)          # the mask rule used under compile
    assert (blocked - ref).abs().max() < 1e-12
    assert (flex - ref).abs().max() < 1e-12


def test_compiled_blocks_keep_the_training_length_static_after_evaluation_at_other_lengths():
    # flex_attention (the SWA branch of compiled GPU training) cannot take a symbolic length; torch.compile makes a
    # length symbolic once it has seen two, e.g. minimal pairs scored between training steps. Record the graphs.
    graphs = []

    def record(gm, example_inputs):
        graphs.append([n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"])
        return gm.forward

    def symbolic(graph):  # a symbolic size as an input of its own, or in a tensor's shape
        return any(isinstance(v, torch.SymInt) or (torch.is_tensor(v) and any(isinstance(d, torch.SymInt)
                                                                               for d in v.shape)) for v in graph)

    torch._dynamo.reset()
    model = BLaLM(BLaLMConfig(**TINY, swa_window=4, chunk_size=4)).compile_blocks(backend=record)
    try:
        model.eval()
        with torch.no_grad():
            for T in (10, 12):  # the second length makes the blocks' graph dynamic in T
                model(torch.randint(0, 61, (2, T)))
        assert symbolic(graphs[-1]), "two lengths did not make the graph dynamic: the test would prove nothing"
        model.train()
        graphs.clear()
        idx = torch.randint(0, 61, (2, 24))
        model(idx, idx)[1].backward()
        assert graphs and not any(symbolic(g) for g in graphs)
    finally:
        torch._dynamo.reset()


def test_cache_after_a_long_prompt_holds_no_view_into_the_prompts_activations():
    # a slice of a big tensor keeps all of its storage alive: a cache that stores views of the prompt's
    # projections or per-chunk states holds memory that grows with the prompt, whatever its own size
    torch.manual_seed(0)
    for cfg in (dict(swa_window=8), dict(mixer="attn", bias=True), dict(mixer="hedgehog")):
        model = BLaLM(BLaLMConfig(**{**TINY, "block_size": 256}, **cfg)).eval()
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(0, 61, (1, 200)), cache=cache)
        for key, t in cache_tensors(cache):
            held, own = t.untyped_storage().nbytes(), t.numel() * t.element_size()
            assert held == own, f"{cfg} cache[{key!r}] holds {held} bytes for {own} of its own"


def test_generate_extends_the_prompt_and_greedy_matches_argmax():
    torch.manual_seed(0)
    model = BLaLM(BLaLMConfig(**TINY)).double().eval()
    prompt = torch.randint(0, 61, (2, 5))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():  # each greedy token is the argmax of a fresh full forward over what precedes it
        for t in range(5, 11):
            assert torch.equal(model(out[:, :t])[0][:, -1].argmax(-1), out[:, t])
    sampled = model.generate(prompt, 4, temperature=1.0, top_k=3)
    assert sampled.shape == (2, 9) and int(sampled.max()) < 61


def gpt2_reference_logits(sd, idx, n_head):
    """GPT-2's forward written against the Hugging Face key names and Conv1D layout (x @ W + b), float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][: idx.size(1)]
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)
    conv1d = lambda x, p: x @ sd[p + ".weight"] + sd[p + ".bias"]
    B, T, C = x.shape
    for l in range(n_layer):
        p = f"transformer.h.{l}."
        q, k, v = conv1d(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=-1)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // n_head)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(B, T, C), p + "attn.c_proj")
        hdn = conv1d(ln(x, p + "ln_2"), p + "mlp.c_fc")
        hdn = 0.5 * hdn * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hdn + 0.044715 * hdn ** 3)))
        x = x + conv1d(hdn, p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["lm_head.weight"].t()


def fake_gpt2_state_dict(V=70, P=32, C=24, n_layer=2, seed=0):
    """Random weights under GPT-2's Hugging Face key names and shapes (Conv1D weights are (in, out))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)
    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(P, C),
          "transformer.ln_f.weight": 1 + r(C), "transformer.ln_f.bias": r(C)}
    for l in range(n_layer):
        p = f"transformer.h.{l}."
        sd.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C), p + "ln_2.weight": 1 + r(C),
                   p + "ln_2.bias": r(C), p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                   p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                   p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                   p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
                   p + "attn.bias": torch.ones(1, 1, P, P).tril()})   # HF's causal-mask buffer
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def test_gpt2_state_dict_loads_and_reproduces_gpt2_logits():
    sd = fake_gpt2_state_dict()
    model = BLaLM.from_gpt2_state_dict(sd, n_head=3).double().eval()
    assert model.config.mixer == "attn" and model.config.n_layer == 2 and model.config.block_size == 32
    idx = torch.randint(0, 70, (2, 17))
    with torch.no_grad():
        ours = model(idx)[0]
    assert rel_err(ours, gpt2_reference_logits(sd, idx, n_head=3)) < 1e-12


def test_gpt2_state_dict_without_transformer_prefix_loads_too():
    sd = {k.removeprefix("transformer."): v for k, v in fake_gpt2_state_dict().items() if k != "lm_head.weight"}
    model = BLaLM.from_gpt2_state_dict(sd, n_head=3)
    assert torch.equal(model.lm_head.weight, sd["wte.weight"])


@pytest.mark.parametrize("bad,message", [
    (dict(mixer="rnn"), "mixer='rnn'"), (dict(feature_map="elu"), "feature_map='elu'"),
    (dict(mlstm_form="fast"), "mlstm_form='fast'"), (dict(n_embd=30, n_head=4), "n_embd=30"),
    (dict(swa_window=-1), "swa_window=-1"),
])
def test_bad_config_raises_naming_the_value(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        BLaLMConfig(**{**TINY, **bad})


def test_bad_token_ids_and_ranks_raise_naming_the_value():
    model = BLaLM(BLaLMConfig(**TINY))
    with pytest.raises(ValueError, match="token id 61 is outside"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="rank 1"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.rand(1, 3))
    attn = BLaLM(BLaLMConfig(**{**TINY, "block_size": 8}, mixer="attn"))
    with pytest.raises(ValueError, match="block_size=8"):
        attn(torch.zeros(1, 9, dtype=torch.long))


def test_num_params_counts_unique_parameters_and_flops_grow_with_the_mixer():
    model = BLaLM(BLaLMConfig(**TINY))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params(non_embedding=False) == sum(unique.values())
    assert model.num_params() == sum(unique.values()) - 61 * 16
    plain = BLaLM(BLaLMConfig(**TINY, swa_window=0))
    # 6 FLOPs per matmul weight is the floor; the mixer adds its own work on top
    assert model.flops_per_token() > 6 * (model.num_params() + 61 * 16)
    assert plain.flops_per_token() < model.flops_per_token()


def test_forget_gate_bias_starts_between_3_and_6():
    model = BLaLM(BLaLMConfig(**{**TINY, "n_head": 4}))
    for block in model.transformer.h:
        b = block.mixer.f_gate.bias
        assert b.min().item() == pytest.approx(3.0) and b.max().item() == pytest.approx(6.0)


# =============================================================================
# hedgehog.py: feature maps, linear attention in three forms, distillation, conversion

import math

import pytest
import torch

from hedgehog import (
    HedgehogFeatureMap,
    attention_distillation_loss,
    attention_entropy,
    attention_monotonicity,
    elu_plus_one,
    linear_attention_chunkwise,
    linear_attention_parallel,
    linear_attention_recurrent,
    linear_attention_step,
    linear_attention_weights,
    performer_map,
    performer_projection,
    relu_map,
    softmax_attention_weights,
    taylor_map,
)



def make_qkv(B=2, NH=2, T=13, DF=5, DV=3, dtype=torch.float64, seed=0):
    """Non-negative features for q, k (what a feature map gives), any sign for v; leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, NH, T, DF, generator=g, dtype=torch.float64)
    k = torch.rand(B, NH, T, DF, generator=g, dtype=torch.float64)
    v = torch.randn(B, NH, T, DV, generator=g, dtype=torch.float64)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def reference_linear_attention(q, k, v, eps=1e-6, S0=None, z0=None):
    """y_t = (sum_{s<=t} (q_t·k_s) v_s + q_t S0) / (sum_{s<=t} q_t·k_s + q_t·z0 + eps), one t at a time, float64."""
    q, k, v = q.double(), k.double(), v.double()
    ys = []
    for t in range(q.shape[2]):
        w = (q[:, :, t, None, :] * k[:, :, :t + 1, :]).sum(-1)  # (B, NH, t+1): q_t·k_s
        num = (w[..., None] * v[:, :, :t + 1]).sum(2)
        den = w.sum(-1)
        if S0 is not None:
            num = num + torch.einsum("bhd,bhde->bhe", q[:, :, t], S0.double())
            den = den + (q[:, :, t] * z0.double()).sum(-1)
        ys.append(num / (den[..., None] + eps))
    return torch.stack(ys, dim=2)


def linear_outputs_and_grads(fn, q, k, v, g):
    """y = fn(q, k, v) and the gradients of sum(y * g) with respect to q, k, v."""
    y = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad((y.double() * g).sum(), (q, k, v))
    return [y, dq, dk, dv]


LINEAR_FORMS = {
    "parallel": lambda q, k, v: linear_attention_parallel(q, k, v),
    "chunkwise4": lambda q, k, v: linear_attention_chunkwise(q, k, v, chunk_size=4),
    "chunkwise64": lambda q, k, v: linear_attention_chunkwise(q, k, v),
    "recurrent": lambda q, k, v: linear_attention_recurrent(q, k, v),
}


# ---------------------------------------------------------------- causal linear attention


@pytest.mark.parametrize("form", LINEAR_FORMS)
def test_linear_attention_forms_match_loop_reference_float64(form):
    q, k, v = make_qkv(T=13)
    g = torch.randn(2, 2, 13, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = linear_outputs_and_grads(LINEAR_FORMS[form], q, k, v, g)
    ref = linear_outputs_and_grads(reference_linear_attention, q, k, v, g)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float64
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("form", LINEAR_FORMS)
def test_linear_attention_forms_float32_match_float64_reference(form):
    q, k, v = make_qkv(T=37)
    g = torch.randn(2, 2, 37, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = linear_outputs_and_grads(reference_linear_attention, q, k, v, g)
    q32, k32, v32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    got = linear_outputs_and_grads(LINEAR_FORMS[form], q32, k32, v32, g)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_chunkwise_handles_lengths_not_multiple_of_chunk_size(T):
    # At T = 1, y = v·a/(a + eps) with a = q·k: the q, k gradients are only O(eps), a difference of O(1)
    # terms that two correct implementations round differently. A larger eps keeps them well-conditioned.
    q, k, v = make_qkv(B=1, NH=2, T=T, DF=4, DV=3)
    g = torch.randn(1, 2, T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = linear_outputs_and_grads(lambda q, k, v: linear_attention_chunkwise(q, k, v, chunk_size=64, eps=0.1), q, k, v, g)
    ref = linear_outputs_and_grads(lambda q, k, v: reference_linear_attention(q, k, v, eps=0.1), q, k, v, g)
    assert got[0].shape == (1, 2, T, 3)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-10


def test_returned_state_is_sum_of_key_value_products():
    q, k, v = make_qkv(T=11)
    S_ref = torch.einsum("bhtd,bhte->bhde", k, v)
    z_ref = k.sum(2)
    for _, (S, z) in (linear_attention_chunkwise(q, k, v, chunk_size=4, return_state=True),
                      linear_attention_recurrent(q, k, v, return_state=True)):
        assert rel_err(S, S_ref) <= 1e-12 and rel_err(z, z_ref) <= 1e-12


def test_initial_state_continues_from_that_state():
    q, k, v = make_qkv(T=9, seed=3)
    g = torch.Generator().manual_seed(4)
    S0 = torch.rand(2, 2, 5, 3, generator=g, dtype=torch.float64)
    z0 = torch.rand(2, 2, 5, generator=g, dtype=torch.float64)
    ref = reference_linear_attention(q, k, v, S0=S0, z0=z0)
    assert rel_err(linear_attention_chunkwise(q, k, v, chunk_size=4, state=(S0, z0)), ref) <= 1e-10
    assert rel_err(linear_attention_recurrent(q, k, v, state=(S0, z0)), ref) <= 1e-10


def test_split_sequence_with_state_passed_across_equals_one_pass():
    q, k, v = make_qkv(T=21, seed=5)
    full = linear_attention_parallel(q, k, v)
    a, b = slice(0, 8), slice(8, 21)
    for first, second in [(linear_attention_chunkwise, linear_attention_chunkwise),
                          (linear_attention_recurrent, linear_attention_recurrent),
                          (linear_attention_chunkwise, linear_attention_recurrent),
                          (linear_attention_recurrent, linear_attention_chunkwise)]:
        y1, state = first(q[:, :, a], k[:, :, a], v[:, :, a], return_state=True)
        y2 = second(q[:, :, b], k[:, :, b], v[:, :, b], state=state)
        assert rel_err(torch.cat([y1, y2], dim=2), full) <= 1e-10
    # token by token with the decoding step
    state, ys = None, []
    for t in range(21):
        y_t, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        ys.append(y_t)
    assert rel_err(torch.stack(ys, dim=2), full) <= 1e-10


@pytest.mark.parametrize("form", ["chunkwise", "recurrent", "step"])
def test_bfloat16_inputs_keep_float32_state(form):
    q, k, v = make_qkv(T=70, seed=6)
    ref = reference_linear_attention(q, k, v)
    qb, kb, vb = [x.detach().bfloat16() for x in (q, k, v)]
    if form == "chunkwise":
        y, (S, z) = linear_attention_chunkwise(qb, kb, vb, return_state=True)
    elif form == "recurrent":
        y, (S, z) = linear_attention_recurrent(qb, kb, vb, return_state=True)
    else:
        y, (S, z) = linear_attention_step(qb[:, :, 0], kb[:, :, 0], vb[:, :, 0])
        ref = ref[:, :, 0]
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32 and z.dtype == torch.float32
    # the inputs themselves are rounded to bfloat16 (relative 2^-9); sums in float32 add little to that
    assert rel_err(y, ref) <= 2e-2


def test_chunkwise_traces_to_one_graph_whose_size_does_not_grow_with_length():
    # a Python loop over chunks would unroll into a graph that grows with T; the cumsum form does not
    sizes = []

    def count_nodes(gm, example_inputs):
        sizes.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(linear_attention_chunkwise, backend=count_nodes, fullgraph=True, dynamic=False)
    for T in (128, 8192):
        q, k, v = [x.detach().float() for x in make_qkv(B=1, NH=1, T=T, DF=2, DV=2)]
        y = fn(q, k, v, chunk_size=64)
        assert torch.equal(y, linear_attention_chunkwise(q, k, v, chunk_size=64))
    torch._dynamo.reset()
    assert len(sizes) == 2 and sizes[0] == sizes[1]


def test_linear_attention_rejects_bad_shapes():
    q, k, v = make_qkv(T=5)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention_chunkwise(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        linear_attention_parallel(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="state"):
        linear_attention_recurrent(q, k, v, state=(torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5)))


# ---------------------------------------------------------------- feature maps


def test_hedgehog_feature_map_identity_init_gives_softmax_of_x_and_minus_x():
    fmap = HedgehogFeatureMap(head_dim=6, n_heads=3).double()
    assert torch.equal(fmap.weight.detach(), torch.eye(6, dtype=torch.float64).expand(3, 6, 6))
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    phi = fmap(x)
    assert phi.shape == (2, 3, 7, 12)
    ex, emx = x.exp(), (-x).exp()
    expected = torch.cat([ex / ex.sum(-1, keepdim=True), emx / emx.sum(-1, keepdim=True)], dim=-1)
    assert rel_err(phi, expected) <= 1e-12


@pytest.mark.parametrize("feature_dim", [4, 16])
def test_hedgehog_feature_map_other_sizes_are_semi_orthogonal_and_positive(feature_dim):
    torch.manual_seed(0)
    fmap = HedgehogFeatureMap(head_dim=8, n_heads=2, feature_dim=feature_dim, bias=True)
    W = fmap.weight.detach()
    gram = W @ W.transpose(-2, -1) if feature_dim > 8 else W.transpose(-2, -1) @ W
    assert torch.allclose(gram, torch.eye(gram.shape[-1]).expand_as(gram), atol=1e-5)
    phi = fmap(torch.randn(3, 2, 5, 8))
    assert phi.shape == (3, 2, 5, 2 * feature_dim)
    assert (phi > 0).all()
    halves = phi.split(feature_dim, dim=-1)
    for h in halves:  # each half is a softmax over the feature dimension
        assert torch.allclose(h.sum(-1), torch.ones(3, 2, 5), atol=1e-6)


def test_hedgehog_feature_map_heads_are_independent_and_dtype_preserved():
    fmap = HedgehogFeatureMap(head_dim=4, n_heads=2)
    x = torch.randn(1, 2, 5, 4)
    before = fmap(x)
    with torch.no_grad():
        fmap.weight[1].mul_(3.0)
    after = fmap(x)
    assert torch.equal(after[:, 0], before[:, 0]) and not torch.allclose(after[:, 1], before[:, 1])
    y = fmap(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, after) <= 1e-2


def test_hedgehog_feature_map_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="expected x of shape"):
        HedgehogFeatureMap(head_dim=4, n_heads=2)(torch.randn(1, 3, 5, 4))


def test_elu_plus_one_and_relu_are_the_published_maps():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert torch.allclose(elu_plus_one(x), torch.where(x > 0, x + 1, x.exp()), atol=1e-15)
    assert (elu_plus_one(x) > 0).all()
    assert torch.equal(relu_map(x), torch.where(x > 0, x, torch.zeros_like(x)))


def test_taylor_map_inner_product_is_second_order_expansion_of_exp():
    d = 6
    q, k = torch.randn(2, 3, 4, d, dtype=torch.float64), torch.randn(2, 3, 4, d, dtype=torch.float64)
    pq, pk = taylor_map(q), taylor_map(k)
    assert pq.shape == (2, 3, 4, 1 + d + d * d)
    u = (q * k).sum(-1) / math.sqrt(d)
    assert torch.allclose((pq * pk).sum(-1), 1 + u + u ** 2 / 2, rtol=1e-12, atol=1e-12)


def test_performer_features_positive_and_unbiased_for_exp():
    d, m = 4, 1 << 16
    g = torch.Generator().manual_seed(0)
    q = 0.5 * torch.randn(8, d, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(8, d, generator=g, dtype=torch.float64)
    proj = performer_projection(d, m, seed=123, dtype=torch.float64)
    assert torch.equal(proj, performer_projection(d, m, seed=123, dtype=torch.float64))
    pq, pk = performer_map(q, proj), performer_map(k, proj)
    assert pq.shape == (8, m) and (pq > 0).all() and (pk > 0).all()
    estimate = (pq * pk).sum(-1)  # the mean over m random features of exp(w·q' - |q'|²/2) exp(w·k' - |k'|²/2)
    target = torch.exp((q * k).sum(-1) / math.sqrt(d))
    # One feature's product X has E[X] = exp(q'·k') and E[X²] / E[X]² = exp(|q' + k'|²) (Gaussian moment
    # generating function, q' = q / d^(1/4)), so the mean of m features has relative standard deviation
    # sqrt((exp(|q'+k'|²) - 1) / m), about 1e-2 here. Five of those: a fixed seed that fails is a bug.
    qs, ks = q / d ** 0.25, k / d ** 0.25
    rel_std = torch.sqrt((torch.exp(((qs + ks) ** 2).sum(-1)) - 1) / m)
    assert ((estimate - target).abs() / target <= 5 * rel_std).all()


# ---------------------------------------------------------------- attention distillation


def explicit_softmax_weights(q, k):
    """p[t, s] = exp(q_t·k_s/√d) / sum_{s'<=t} exp(q_t·k_s'/√d) for s <= t, one row at a time, float64."""
    q, k = q.double(), k.double()
    T = q.shape[2]
    p = torch.zeros(*q.shape[:2], T, T, dtype=torch.float64)
    for t in range(T):
        e = torch.exp((q[:, :, t, None, :] * k[:, :, :t + 1]).sum(-1) / math.sqrt(q.shape[-1]))
        p[:, :, t, :t + 1] = e / e.sum(-1, keepdim=True)
    return p


def test_softmax_attention_weights_match_explicit_formula():
    q, k = torch.randn(2, 3, 9, 4, dtype=torch.float64), torch.randn(2, 3, 9, 4, dtype=torch.float64)
    assert rel_err(softmax_attention_weights(q, k), explicit_softmax_weights(q, k)) <= 1e-12


def test_distillation_loss_zero_when_student_reproduces_teacher():
    # Test-only feature maps whose linear attention weights equal the softmax weights exactly:
    # phi_k(k_s) = e_s (one-hot of the position), phi_q(q_t) = p_t (the teacher's row), so that
    # phi_q(q_t)·phi_k(k_s) = p_ts and each causal row already sums to 1 (eps = 0: no shrinkage).
    B, NH, T, D = 2, 3, 8, 4
    q, k = torch.randn(B, NH, T, D, dtype=torch.float64), torch.randn(B, NH, T, D, dtype=torch.float64)
    p = explicit_softmax_weights(q, k)
    loss = attention_distillation_loss(q, k, lambda q_: p, lambda k_: torch.eye(T, dtype=torch.float64).expand(B, NH, T, T),
                                       eps=0.0, reduction="none")
    assert loss.shape == (B, NH, T)
    assert loss.abs().max() <= 1e-12


@pytest.mark.parametrize("student", ["hedgehog", "elu", "teacher_eps"])
def test_distillation_loss_positive_otherwise(student):
    B, NH, T, D = 2, 3, 8, 4
    q, k = torch.randn(B, NH, T, D, dtype=torch.float64), torch.randn(B, NH, T, D, dtype=torch.float64)
    if student == "hedgehog":
        fq, fk = HedgehogFeatureMap(D, NH).double(), HedgehogFeatureMap(D, NH).double()
        eps = 1e-6
    elif student == "elu":
        fq = fk = elu_plus_one
        eps = 1e-6
    else:  # the exact student of the test above, only with eps > 0: rows sum to 1/(1 + eps) < 1
        p = explicit_softmax_weights(q, k)
        fq, fk = (lambda q_: p), (lambda k_: torch.eye(T, dtype=torch.float64).expand(B, NH, T, T))
        eps = 1e-3
    loss = attention_distillation_loss(q, k, fq, fk, eps=eps, reduction="none")
    # row t = 0 has a single key, weight 1 for both (up to eps): only later rows must be positive
    assert (loss[:, :, 1:] > 0).all() and (loss >= 0).all()
    assert attention_distillation_loss(q, k, fq, fk, eps=eps) > 0


def test_distillation_loss_is_kl_with_the_cross_entropy_gradient():
    torch.manual_seed(0)
    B, NH, T, D = 1, 2, 6, 4
    q, k = torch.randn(B, NH, T, D, dtype=torch.float64), torch.randn(B, NH, T, D, dtype=torch.float64)
    fq, fk = HedgehogFeatureMap(D, NH, bias=True).double(), HedgehogFeatureMap(D, NH, bias=True).double()
    with torch.no_grad():
        for p_ in (*fq.parameters(), *fk.parameters()):
            p_.add_(0.3 * torch.randn_like(p_))
    params = [*fq.parameters(), *fk.parameters()]
    # independent: explicit student weights row by row, cross-entropy and teacher entropy
    p = explicit_softmax_weights(q, k)
    phq, phk = fq(q), fk(k)
    ce = torch.zeros((), dtype=torch.float64)
    ent = torch.zeros((), dtype=torch.float64)
    for t in range(T):
        a = (phq[:, :, t, None, :] * phk[:, :, :t + 1]).sum(-1)
        r = a / (a.sum(-1, keepdim=True) + 1e-6)
        ce = ce - (p[:, :, t, :t + 1] * r.log()).sum()
        ent = ent - (p[:, :, t, :t + 1] * p[:, :, t, :t + 1].log()).sum()
    ce, ent = ce / (B * NH * T), ent / (B * NH * T)
    loss = attention_distillation_loss(q, k, fq, fk)
    assert abs(loss.item() - (ce - ent).item()) <= 1e-12
    g_loss = torch.autograd.grad(loss, params)
    g_ce = torch.autograd.grad(ce, params)
    for a, b in zip(g_loss, g_ce):
        assert rel_err(a, b) <= 1e-10


def test_distillation_teacher_is_detached():
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, requires_grad=True)
    const = torch.rand(1, 2, 5, 3)
    # students that ignore q and k: any gradient reaching q or k would have to come from the teacher
    loss = attention_distillation_loss(q, k, lambda x: const.requires_grad_(), lambda x: const)
    loss.backward()
    assert q.grad is None and k.grad is None and const.grad is not None


def test_distillation_reductions():
    q, k = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    fq, fk = HedgehogFeatureMap(4, 3), HedgehogFeatureMap(4, 3)
    none = attention_distillation_loss(q, k, fq, fk, reduction="none")
    head = attention_distillation_loss(q, k, fq, fk, reduction="head")
    mean = attention_distillation_loss(q, k, fq, fk)
    assert none.shape == (2, 3, 6) and head.shape == (3,) and mean.shape == ()
    assert torch.allclose(head, none.mean(dim=(0, 2))) and torch.allclose(mean, none.mean())
    with pytest.raises(ValueError, match="reduction"):
        attention_distillation_loss(q, k, fq, fk, reduction="sum")


def test_distillation_training_makes_hedgehog_closer_to_softmax():
    # spiky teacher (large q, k) that the identity-initialised map matches poorly; a few Adam steps on
    # the feature maps alone must cut the KL substantially and sharpen the student's weights
    torch.manual_seed(0)
    B, NH, T, D = 4, 2, 16, 8
    q, k = 2.0 * torch.randn(B, NH, T, D), 2.0 * torch.randn(B, NH, T, D)
    fq, fk = HedgehogFeatureMap(D, NH), HedgehogFeatureMap(D, NH)
    opt = torch.optim.Adam([*fq.parameters(), *fk.parameters()], lr=0.05)
    first = attention_distillation_loss(q, k, fq, fk).item()
    for _ in range(60):
        loss = attention_distillation_loss(q, k, fq, fk)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = attention_distillation_loss(q, k, fq, fk).item()
    assert last < 0.5 * first
    with torch.no_grad():
        teacher = softmax_attention_weights(q, k)
        trained = linear_attention_weights(fq(q), fk(k))
        untrained = linear_attention_weights(HedgehogFeatureMap(D, NH)(q), HedgehogFeatureMap(D, NH)(k))
    assert attention_entropy(teacher) < attention_entropy(trained) < attention_entropy(untrained)


def test_attention_entropy_of_uniform_causal_weights_is_mean_log_length():
    T = 7
    w = torch.tril(torch.ones(T, T, dtype=torch.float64))
    w = (w / w.sum(-1, keepdim=True)).expand(2, 3, T, T)
    expected = sum(math.log(t + 1) for t in range(T)) / T
    assert abs(attention_entropy(w).item() - expected) <= 1e-12


def test_monotonicity_is_one_for_softmax_and_minus_one_when_reversed():
    q, k = torch.randn(2, 3, 10, 4, dtype=torch.float64), torch.randn(2, 3, 10, 4, dtype=torch.float64)
    assert abs(attention_monotonicity(q, k, softmax_attention_weights(q, k)).item() - 1) <= 1e-12
    assert abs(attention_monotonicity(q, k, softmax_attention_weights(-q, k)).item() + 1) <= 1e-12
    # a constant row has no ranking: uniform weights leave every row out
    w = torch.tril(torch.ones(10, 10, dtype=torch.float64))
    assert torch.isnan(attention_monotonicity(q, k, (w / w.sum(-1, keepdim=True)).expand(2, 3, 10, 10)))


# -----------------------------------------------------------------------------
# Conversion of a trained softmax model (stage 1: distillation, stage 2: finetuning)

import json

from blalm import BLaLM, BLaLMConfig
from hedgehog import (
    EluFeatureMap,
    LoRALinear,
    add_lora,
    attention_maps,
    distill_feature_maps,
    distillation_losses,
    layer_qk,
    load_softmax_model,
    make_student,
    merge_lora,
)


def tiny_teacher(vocab_size=64, block_size=32, spiky=10.0, dtype=torch.float32, seed=0):
    """A random softmax (mixer="attn") model; its q, k weights scaled by `spiky` so that attention is far from
    uniform (a freshly initialised model attends almost uniformly, which any map mimics)."""
    torch.manual_seed(seed)
    config = BLaLMConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16, mixer="attn",
                         bias=True, chunk_size=8)
    model = BLaLM(config)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mixer.c_attn.weight[: 2 * config.n_embd] *= spiky
    return model.to(dtype).eval()


def manual_layer_qk(model, idx):
    """q, k of every layer by running the blocks by hand (the independent check of layer_qk's hooks)."""
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))
    out = []
    for block in model.transformer.h:
        h = block.ln_1(x)
        q, k, _ = block.mixer.c_attn(h).split(h.shape[-1], dim=2)
        out.append(tuple(t.view(*h.shape[:2], model.config.n_head, -1).transpose(1, 2) for t in (q, k)))
        x = block(x)
    return out


def test_layer_qk_and_attention_maps_match_a_hand_run_forward():
    teacher = tiny_teacher()
    student = make_student(teacher)
    idx = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = layer_qk(teacher, idx), manual_layer_qk(teacher, idx)
        for (q, k), (q_ref, k_ref) in zip(got, want):
            assert torch.allclose(q, q_ref, atol=1e-6) and torch.allclose(k, k_ref, atol=1e-6)
        soft, lin = attention_maps(teacher, student, idx, layer=1)
        q, k = want[1]
        mixer = student.transformer.h[1].mixer
        assert torch.allclose(soft, softmax_attention_weights(q, k), atol=1e-6)
        assert torch.allclose(lin, linear_attention_weights(mixer.fmap_q(q), mixer.fmap_k(k)), atol=1e-6)
        # the per-layer losses are attention_distillation_loss on these q, k
        losses = distillation_losses(teacher, student, [idx])
        for l, (q, k) in enumerate(want):
            m = student.transformer.h[l].mixer
            assert abs(losses[l] - attention_distillation_loss(q, k, m.fmap_q, m.fmap_k).item()) <= 1e-5
    with pytest.raises(ValueError, match="layer"):
        attention_maps(teacher, student, idx, layer=2)


def test_stage1_changes_only_feature_map_parameters_and_lowers_distillation_loss():
    teacher = tiny_teacher()
    student = make_student(teacher)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 64, (4, 32), generator=g)
    first = sum(distillation_losses(teacher, student, [batch]))
    student, history = distill_feature_maps(teacher, lambda: batch, iters=15, lr=0.05, student=student)
    assert len(history) == 15 and len(history[0]["layers"]) == 2
    assert sum(distillation_losses(teacher, student, [batch])) < 0.5 * first
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert changed and all(".fmap_" in k for k in changed)
    assert sorted(changed) == sorted(k for k in student_before if ".fmap_" in k)  # every map learned
    assert all(p.requires_grad for p in student.parameters())  # stage 1 restores what it froze


def test_elu_baselines_fixed_map_has_nothing_to_train_learned_map_starts_at_it():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    fixed, learned = EluFeatureMap(4, 3, learned=False), EluFeatureMap(4, 3, learned=True).double()
    assert list(fixed.parameters()) == [] and torch.equal(fixed(x), elu_plus_one(x))
    assert torch.allclose(learned(x), elu_plus_one(x), atol=1e-15, rtol=0)
    teacher = tiny_teacher()
    student, history = distill_feature_maps(teacher, lambda: torch.zeros(1, 4, dtype=torch.long), 5, 0.01,
                                            feature_map="elu")
    assert history == [] and isinstance(student.transformer.h[0].mixer.fmap_q, EluFeatureMap)


def test_lora_merged_model_equals_adapter_model_float64():
    torch.manual_seed(0)
    model = make_student(tiny_teacher(dtype=torch.float64))
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        base_logits = model(idx)[0]
    add_lora(model, rank=3, alpha=6.0, targets=("mixer.c_attn", "mixer.c_proj", "mlp.c_fc", "mlp.c_proj"))
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * model.config.n_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".fmap_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], base_logits)  # B = 0: the adapters start as the frozen model
        for m in wrapped:
            m.lora_B.normal_(0.0, 0.1)
        adapter_logits = model(idx)[0]
        W_expected = [m.base.weight + m.scale * m.lora_B @ m.lora_A for m in wrapped]
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapters change the function
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], adapter_logits, atol=1e-12, rtol=0)
    merged = [b.mixer.c_attn for b in model.transformer.h]
    assert torch.equal(merged[0].weight, W_expected[0])
    # the merged state dict is a plain mixer="hedgehog" model's
    plain = BLaLM(model.config).double()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], model(idx)[0])


def gpt2_style_state_dict(model):
    """The Hugging Face GPT2LMHeadModel state dict of a BLaLM mixer="attn" model, written out key by key
    (Conv1D weights are (in, out): the transpose of nn.Linear's)."""
    c = model.config
    sd = {"transformer.wte.weight": model.transformer.wte.weight, "transformer.wpe.weight": model.transformer.wpe.weight,
          "transformer.ln_f.weight": model.transformer.ln_f.weight, "transformer.ln_f.bias": model.transformer.ln_f.bias,
          "lm_head.weight": model.lm_head.weight}
    for l, b in enumerate(model.transformer.h):
        p = f"transformer.h.{l}."
        sd.update({p + "ln_1.weight": b.ln_1.weight, p + "ln_1.bias": b.ln_1.bias,
                   p + "attn.c_attn.weight": b.mixer.c_attn.weight.t(), p + "attn.c_attn.bias": b.mixer.c_attn.bias,
                   p + "attn.c_proj.weight": b.mixer.c_proj.weight.t(), p + "attn.c_proj.bias": b.mixer.c_proj.bias,
                   p + "attn.bias": torch.tril(torch.ones(1, 1, c.block_size, c.block_size)),  # HF's causal mask buffer
                   p + "ln_2.weight": b.ln_2.weight, p + "ln_2.bias": b.ln_2.bias,
                   p + "mlp.c_fc.weight": b.mlp.c_fc.weight.t(), p + "mlp.c_fc.bias": b.mlp.c_fc.bias,
                   p + "mlp.c_proj.weight": b.mlp.c_proj.weight.t(), p + "mlp.c_proj.bias": b.mlp.c_proj.bias})
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (c.n_embd, 3 * c.n_embd)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (c.n_embd, 4 * c.n_embd)
    return sd


def fake_gpt2_encoding():
    """A stand-in for tiktoken's GPT-2 encoding (no network here): byte tokens, named "gpt2"."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def test_gpt2_state_dict_through_init_from_gives_the_same_logits(tmp_path, monkeypatch):
    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake_gpt2_encoding())
    original = tiny_teacher(vocab_size=257, spiky=1.0, seed=3)
    torch.save(gpt2_style_state_dict(original), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2, "n_embd": 16, "n_layer": 2}))
    model, tokenizer, source = load_softmax_model(f"gpt2:{tmp_path}")
    assert model.config.mixer == "attn" and model.config.n_head == 2 and model.config.bias
    assert tokenizer == {"name": "gpt2"} and source == {}
    idx = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], original(idx)[0], atol=1e-6, rtol=0)


def test_gpt2_loading_errors_say_what_is_missing(tmp_path, monkeypatch):
    import importlib.util
    import tiktoken
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_softmax_model(f"gpt2:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_softmax_model(f"gpt2:{tmp_path}")
    if importlib.util.find_spec("safetensors") is None:
        (tmp_path / "model.safetensors").write_bytes(b"x")
        with pytest.raises(ValueError, match="pip install safetensors"):
            load_softmax_model(f"gpt2:{tmp_path}")
        (tmp_path / "model.safetensors").unlink()

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    torch.save(gpt2_style_state_dict(tiny_teacher(vocab_size=257, seed=3)), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2}))
    with pytest.raises((ValueError, FileNotFoundError), match="TIKTOKEN_CACHE_DIR"):
        load_softmax_model(f"gpt2:{tmp_path}")


@pytest.fixture(scope="module")
def tiny_prepared_data(tmp_path_factory):
    import data
    out = tmp_path_factory.mktemp("hedgehog_data") / "synthetic"
    data.prepare("synthetic", out, budget_words=4000, vocab_size=300, pairs_per_phenomenon=2, verbose=False)
    return out


def test_conversion_end_to_end_lowers_distillation_loss_and_writes_a_loadable_hedgehog_checkpoint(
        tiny_prepared_data, tmp_path):
    import data
    import hedgehog
    from train import load_checkpoint, save_checkpoint
    torch.set_num_threads(1)
    meta = data.load_meta(tiny_prepared_data)
    tokenizer = data.tokenizer_to_dict(data.load_tokenizer(tiny_prepared_data))
    teacher = tiny_teacher(vocab_size=meta["vocab_size"])
    save_checkpoint({"model": teacher.state_dict(), "config": teacher.config.to_dict(), "iter": 7, "tokens_seen": 1000,
                     "words_seen": 300.0, "tokenizer": tokenizer}, str(tmp_path / "teacher.pt"))
    out = tmp_path / "converted"
    hedgehog.main([f"--init_from={tmp_path / 'teacher.pt'}", f"--data={tiny_prepared_data}", f"--out_dir={out}",
                   "--stage1_iters=25", "--stage2_iters=4", "--batch_size=4", "--block_size=24", "--lr1=0.03",
                   "--eval_iters=2", "--log_interval=0", "--device=cpu", "--lora_rank=2"])
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file()
    assert sum(report["distill_after"]) < 0.5 * sum(report["distill_before"])
    assert len(report["stage1_history"]) == 25 and len(report["stage2_history"]) == 4
    model, enc, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert model.config.mixer == "hedgehog" and ckpt["tokenizer"] == tokenizer
    assert ckpt["tokens_seen"] == 1000 + 29 * 4 * 24 and ckpt["words_seen"] > 300.0
    # the saved model is the one the report measured: recompute its loss on the same validation windows
    g = torch.Generator().manual_seed(1234)
    val = data.open_bin(tiny_prepared_data, "val")
    batches = [data.get_batch(val, 4, 24, g) for _ in range(2)]
    with torch.no_grad():
        loss = sum(model(x, y)[1].item() for x, y in batches) / 2
    assert abs(loss - report["stage2_loss"]) <= 1e-5
    assert abs(math.exp(loss) - report["stage2_ppl"]) <= 1e-4 * report["stage2_ppl"]
    # the learned maps were saved (no longer the identity start)
    assert not torch.equal(model.transformer.h[0].mixer.fmap_q.weight, HedgehogFeatureMap(8, 2).weight)


def test_conversion_refuses_data_of_another_tokenizer_and_bad_flags(tiny_prepared_data, tmp_path, capsys):
    import data
    import hedgehog
    from train import save_checkpoint
    teacher = tiny_teacher(vocab_size=data.load_meta(tiny_prepared_data)["vocab_size"])
    save_checkpoint({"model": teacher.state_dict(), "config": teacher.config.to_dict(), "iter": 0, "tokens_seen": 0,
                     "words_seen": 0, "tokenizer": {"name": "gpt2"}}, str(tmp_path / "teacher.pt"))
    with pytest.raises(ValueError, match="another tokenizer"):
        hedgehog.main([f"--init_from={tmp_path / 'teacher.pt'}", f"--data={tiny_prepared_data}", "--device=cpu"])
    with pytest.raises(ValueError, match="--lora_rank"):
        hedgehog.main(["--lora_rnak=2"])
    with pytest.raises(ValueError, match="feature_map"):
        hedgehog.main(["--init_from=x", "--data=y", "--feature_map=relu"])
    with pytest.raises(SystemExit):
        hedgehog.main(["--help"])
    assert "--stage1_iters" in capsys.readouterr().out


# =============================================================================
# muon.py: Newton-Schulz, Muon, the optimizer split

import copy
import io
import math
import re

import pytest
import torch
import torch.nn as nn

from muon import Muon, configure_optimizers, split_params, zeropower_via_newtonschulz5

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def quintic(x, steps):
    """The scalar map Newton-Schulz applies to each (Frobenius-normalised) singular value, in float64."""
    a, b, c = NS_COEFFS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def threshold(target, steps):
    """Smallest x in (0, 1) with quintic(x, steps) >= target (the map is increasing there), by bisection."""
    lo, hi = 1e-9, 0.5
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if quintic(mid, steps) < target else (lo, mid)
    return hi


def matrix_with_singular_values(rows, cols, s, seed):
    """U diag(s) V^T in float64 with random orthonormal U (rows x k), V (cols x k), k = len(s)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return U, V, U @ torch.diag(s) @ V.T


# --- Muon against torch.optim.Muon ------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_matches_torch_optim_muon_bit_for_bit_over_several_steps(nesterov, weight_decay):
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon to compare with")
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]  # tall, wide, square
    ours = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = Muon(ours, lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, ns_dtype=torch.bfloat16)
    opt_ref = torch.optim.Muon(ref, lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay,
                               adjust_lr_fn=None)
    for step in range(4):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        opt_ref.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), f"step {step}, shape {tuple(p.shape)}: max diff {(p - q).abs().max()}"
            assert torch.equal(opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])


def test_muon_rejects_non_matrix_parameter_naming_shape_and_configure_optimizers():
    for shape in [(3, 4, 5), (7,), ()]:
        with pytest.raises(ValueError, match=rf"{re.escape(str(shape))}.*configure_optimizers"):
            Muon([nn.Parameter(torch.zeros(shape))])
    with pytest.raises(ValueError, match=r"\(7,\)"):
        zeropower_via_newtonschulz5(torch.zeros(7))


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_newton_schulz_on_a_stack_equals_each_matrix_alone(shape):
    G = torch.randn(5, *shape, dtype=torch.float64)
    stacked = zeropower_via_newtonschulz5(G, dtype=torch.float64)
    for n in range(5):
        alone = zeropower_via_newtonschulz5(G[n], dtype=torch.float64)
        assert torch.allclose(stacked[n], alone, rtol=1e-12, atol=1e-12)


def test_muon_step_on_same_shape_parameters_equals_separate_optimizers():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 9, dtype=torch.float64)) for _ in range(3)]
    alone = [nn.Parameter(p.detach().clone()) for p in params]
    together = Muon(params, lr=0.05, weight_decay=0.1, ns_dtype=torch.float64)
    separate = [Muon([p], lr=0.05, weight_decay=0.1, ns_dtype=torch.float64) for p in alone]
    for _ in range(3):
        grads = [torch.randn(6, 9, dtype=torch.float64) for _ in params]
        for p, q, g in zip(params, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        together.step()
        for opt in separate:
            opt.step()
    for p, q in zip(params, alone):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-12)


# --- Newton-Schulz ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(40, 24), (24, 40), (32, 32)])
def test_newtonschulz_applies_the_quintic_to_each_singular_value_float64(rows, cols):
    """The matrix iteration equals U quintic(S / ||S||) V^T, computed on the singular values alone."""
    k = min(rows, cols)
    s = torch.logspace(0, -3, k, dtype=torch.float64)  # condition number 1e3
    U, V, G = matrix_with_singular_values(rows, cols, s, seed=rows * 100 + cols)
    X = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float64)
    expected = U @ torch.diag(quintic(s / s.norm(), 5)) @ V.T
    torch.testing.assert_close(X, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(32, 128), (128, 32), (48, 192)])
def test_newtonschulz_singular_values_of_random_rectangular_matrix_lie_in_half_to_three_halves(rows, cols, dtype):
    """
    Keller Jordan's claim, for Gaussian matrices of aspect ratio 4: their smallest singular value is about
    (sqrt(long) - sqrt(short)) / sqrt(short * long) of ||G||_F (0.09 here), far above the 1.07e-3 that five
    steps need. (A square Gaussian matrix has singular values near 0 and does not satisfy the claim.)
    """
    G = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    sv = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, steps=5, dtype=dtype).double())
    assert sv.min() >= 0.5 and sv.max() <= 1.5, (sv.min(), sv.max())


def test_newtonschulz_five_steps_orthogonalise_cond_1e3_only_above_1e_minus_3_of_the_norm_bfloat16():
    """
    With condition number 1e3 the reference claim fails for five steps, and must: quintic^5(x) >= 0.5 needs
    x = s / ||G||_F >= 1.07e-3, while s_min / ||G||_F <= s_min / s_max = 1e-3 for any such matrix. What holds
    (in bfloat16, Muon's dtype): each singular value follows the scalar map to within 0.1; none exceeds 1.5
    (quintic^k <= 1.21 on [0, 1]); those with x >= 1.5 x* lie in [0.5, 1.5] and those with x <= x* / 1.5 stay
    below 0.5 (the margin 1.5 absorbs bfloat16 rounding near x*); one more step (six) brings the whole
    spectrum (log-spaced from 1 to 1e-3, x_min = 4.4e-4 > 3.1e-4, the six-step threshold) into [0.5, 1.5].
    """
    x_star = threshold(0.5, 5)
    assert 1e-3 < x_star < 1.1e-3 and threshold(0.5, 6) < 3.2e-4
    s = torch.logspace(0, -3, 64, dtype=torch.float64)
    x = s / s.norm()
    U, V, G = matrix_with_singular_values(64, 96, s, seed=1)
    for steps in (5, 6):
        X = zeropower_via_newtonschulz5(G, steps=steps, dtype=torch.bfloat16).double()
        out = torch.diagonal(U.T @ X @ V)  # X's singular values, matched to the inputs' (X = U diag V^T + noise)
        assert torch.linalg.svdvals(X).max() <= 1.5
        assert (out - quintic(x, steps)).abs().max() < 0.1  # bfloat16 rounding, against the float64 scalar map
        if steps == 5:
            assert out[x >= 1.5 * x_star].min() >= 0.5 and out[x <= x_star / 1.5].max() < 0.5
        else:
            assert torch.linalg.svdvals(X).min() >= 0.5


# --- the split and the combined optimizer ------------------------------------------------------------------------


class SplitTestBlock(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C)
        self.c_attn = nn.Linear(C, 3 * C)
        self.gate = nn.Linear(C, NH)  # a gate projection with bias
        self.conv = nn.Conv1d(C, C, 4, groups=C, padding=3)  # depthwise kernel (C, 1, 4)
        self.fmap = nn.Parameter(torch.randn(NH, C // NH, C // NH) * 0.1)  # per-head feature-map weights
        self.scale = nn.Parameter(torch.ones(()))
        self.ln_2 = nn.RMSNorm(C)
        self.c_fc = nn.Linear(C, 2 * C, bias=False)
        self.c_proj = nn.Linear(2 * C, C, bias=False)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        NH = self.fmap.shape[0]
        h = self.conv(self.ln_1(x).transpose(1, 2))[..., :T].transpose(1, 2)
        q, k, v = self.c_attn(h).split(C, dim=2)
        q = torch.einsum("bthd,hde->bthe", q.view(B, T, NH, -1), self.fmap).reshape(B, T, C)
        x = x + self.scale * torch.sigmoid(self.gate(h)).repeat_interleave(C // NH, dim=2) * q * k.tanh() + v
        return x + self.c_proj(torch.relu(self.c_fc(self.ln_2(x))))


class TinyLM(nn.Module):
    def __init__(self, V=50, T=16, C=16, NH=2, L=2, tied=True, head_first=False):
        super().__init__()
        if head_first:  # the tied weight is met first under lm_head
            self.lm_head = nn.Linear(C, V, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C), wpe=nn.Embedding(T, C),
            h=nn.ModuleList([SplitTestBlock(C, NH) for _ in range(L)]), ln_f=nn.LayerNorm(C)))
        if not head_first:
            self.lm_head = nn.Linear(C, V, bias=False)
        if tied:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


MUON_NAMES = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("c_attn", "gate", "c_fc", "c_proj")}


@pytest.mark.parametrize("tied,head_first", [(True, False), (True, True), (False, False)])
def test_split_puts_hidden_linear_weights_in_muon_and_every_other_parameter_once_in_adamw(tied, head_first):
    model = TinyLM(tied=tied, head_first=head_first)
    muon_named, adam_named = split_params(model)
    assert {n for n, _ in muon_named} == MUON_NAMES
    by_id = {id(p): p for p in model.parameters()}  # model.parameters() yields a tied weight once
    muon_ids, adam_ids = [id(p) for _, p in muon_named], [id(p) for _, p in adam_named]
    assert len(set(muon_ids)) == len(muon_ids) and len(set(adam_ids)) == len(adam_ids)
    assert set(muon_ids).isdisjoint(adam_ids) and set(muon_ids) | set(adam_ids) == set(by_id)
    for name in ("wte", "wpe"):
        assert id(model.transformer[name].weight) in adam_ids
    assert id(model.lm_head.weight) in adam_ids
    assert any(p.ndim == 3 for _, p in adam_named) and any(p.ndim == 0 for _, p in adam_named)
    for mode in ("muon", "adamw"):  # the combined optimizer's groups hold each parameter exactly once
        opt = configure_optimizers(model, optimizer=mode, verbose=False)
        grouped = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(grouped) == sorted(by_id)
        if mode == "adamw":  # decay exactly the tensors with ndim >= 2
            for g in opt.param_groups:
                assert all((p.ndim >= 2) == (g["weight_decay"] > 0) for p in g["params"])


@pytest.mark.parametrize("mixer", ["mlstm", "attn"])
def test_split_of_a_blalm_model_sends_hidden_matrices_to_muon_and_the_rest_to_adamw(mixer):
    model = BLaLM(BLaLMConfig(**TINY, mixer=mixer, bias=mixer == "attn", feature_map="none"))
    muon_named, adam_named = split_params(model)
    everything = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for _, p in muon_named + adam_named]
    assert sorted(seen) == sorted(everything), "every parameter in exactly one group"
    for name, p in muon_named:   # hidden matrices only: 2-D nn.Linear weights, not the head or an embedding
        assert p.ndim == 2 and name.endswith(".weight") and ".transformer.wte" not in "." + name
        assert not name.startswith("lm_head") and "wpe" not in name
    adam_names = {n for n, _ in adam_named}
    assert any(n in adam_names for n in ("transformer.wte.weight", "lm_head.weight"))   # tied: listed once
    assert all(p.ndim != 2 or n.endswith(("wte.weight", "wpe.weight", "lm_head.weight")) for n, p in adam_named)
    if mixer == "mlstm":   # gate biases, the conv kernel (3-D) and norms go to AdamW
        assert {"transformer.h.0.mixer.f_gate.bias", "transformer.h.0.mixer.conv.weight",
                "transformer.h.0.mixer.norm_weight"} <= adam_names
        assert "transformer.h.0.mixer.q_proj.weight" in {n for n, _ in muon_named}


def test_muon_reaches_a_lower_training_loss_than_adamw_on_the_builtin_data(tiny_data):
    """The same tiny BLaLM, seed, batches and steps; each optimizer at its usual rate (Muon 0.02 with AdamW
    3e-3 for the non-matrix parameters; AdamW 3e-3 everywhere). Mean loss over the last 10 of 80 steps."""
    import data
    losses = {}
    for name in ("muon", "adamw"):
        torch.manual_seed(0)
        model = BLaLM(BLaLMConfig(vocab_size=data.load_meta(tiny_data)["vocab_size"], block_size=32, n_layer=2,
                                  n_head=2, n_embd=32, swa_window=8, chunk_size=16))
        opt = configure_optimizers(model, name, lr=0.02, adam_lr=3e-3, verbose=False)
        batches = data.EpochBatches(data.open_bin(tiny_data, "train"), 8, 32, seed=0)
        trace = []
        for _ in range(80):
            x, y = batches.next_batch()
            loss = model(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            trace.append(loss.item())
        losses[name] = sum(trace[-10:]) / 10
    print(f"Muon {losses['muon']:.4f}, AdamW {losses['adamw']:.4f}")
    assert losses["muon"] < losses["adamw"], f"Muon {losses['muon']:.4f} vs AdamW {losses['adamw']:.4f}"


def test_split_of_torch_compiled_model_is_the_split_of_the_model_with_the_same_names():
    model = TinyLM()
    plain, via_compiled = split_params(model), split_params(torch.compile(model))  # compiles lazily: no tracing
    for a, b in zip(plain, via_compiled):
        assert [(n, id(p)) for n, p in a] == [(n, id(p)) for n, p in b]


def test_combined_optimizer_state_dict_round_trip_mid_training_continues_bit_identically():
    torch.manual_seed(0)
    model = TinyLM()
    opt = configure_optimizers(model, lr=0.02, adam_lr=3e-3, weight_decay=0.1, verbose=False)
    assert {"muon", "adamw"} == set(opt.state_dict())
    batches = [torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def train(model, opt, batches, start):
        for it, idx in enumerate(batches, start):
            for g in opt.param_groups:  # a schedule, as train.py would run it
                g["lr"] = g["initial_lr"] * (1 - it / 10)
            model(idx, idx).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    train(model, opt, batches[:3], 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    train(model, opt, batches[3:], 3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = TinyLM()
    resumed.load_state_dict(ckpt["model"])
    opt2 = configure_optimizers(resumed, lr=0.02, adam_lr=3e-3, weight_decay=0.1, verbose=False)
    opt2.load_state_dict(ckpt["optimizer"])
    train(resumed, opt2, batches[3:], 3)
    for (n, p), (_, q) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="adamw"):
        configure_optimizers(resumed, optimizer="adamw", verbose=False).load_state_dict(ckpt["optimizer"])


def test_zero_learning_rate_in_param_groups_freezes_both_optimizers():
    """param_groups reaches the groups of both parts: with every 'lr' set to 0 a step changes nothing."""
    model = TinyLM()
    opt = configure_optimizers(model, weight_decay=0.1, verbose=False)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    model(idx, idx).backward()
    before = copy.deepcopy(model.state_dict())
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"]
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_configure_optimizers_summary_names_each_part_and_rejects_unknown_optimizer():
    model = TinyLM()
    model.transformer.wpe.weight.requires_grad_(False)
    summary = configure_optimizers(model, verbose=False).summary
    assert "Muon" in summary and "AdamW" in summary and "transformer.h.*.c_fc.weight [32, 16] x2" in summary
    assert "frozen" in summary and "transformer.wpe.weight" in summary
    assert "transformer.wte.weight = lm_head.weight [50, 16]" in summary  # the tied head, listed once
    with pytest.raises(ValueError, match="'sgd'"):
        configure_optimizers(model, optimizer="sgd")


# =============================================================================
# data.py: corpora, curation, readability, BPE, bins, batches

import gzip
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
import tiktoken.load
import torch

import data

DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
CORPUS = DATA / "corpus"


def corpus_sample(n_chars=3000):
    """A few KB of real text: child-directed speech, a book, a news article."""
    files = [CORPUS / "childes_cds" / "Eng-USA_Brown.txt.gz", CORPUS / "chilit_gutenberg" / "alice.txt.gz",
             CORPUS / "onestopenglish" / "ele.txt.gz"]
    if not all(f.is_file() for f in files):
        pytest.skip("shared/data/corpus is not present")
    texts = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            texts.append(fh.read(n_chars))
    return texts


ODD_UNICODE = [
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 and flags 🇩🇪🇯🇵",
    "combining marks: e\u0301 a\u0308 n\u0303 (not NFC) and é ä ñ (NFC), Z̴̡̛a̸l̷g̶o̵",
    "CJK 漢字かなカナ한국어 and fullwidth ＡＢＣ１２３",
    "control chars \x00\x01\x07\x1b[0m\x7f tab\there cr\r\nlf\n\n\nform\x0cfeed \u200b zero width \ufeff bom",
    "RTL עברית العربية, math ∑∫√∞ ≠ ≤, currency €£¥₹, ligature ﬁ, nbsp\u00a0here",
    "  leading and trailing spaces   \n\n  ",
    "<|endoftext|> written as text stays text",
]


# -----------------------------------------------------------------------------
# tokenizer


def naive_bpe(texts, vocab_size):
    """The textbook loop: recount every pair after every merge. Ties go to the pair of smaller ranks."""
    pattern = regex.compile(data.GPT2_SPLIT_PATTERN)
    counts = Counter(p for t in texts for p in pattern.findall(t))
    words = {w: [bytes([b]) for b in w.encode("utf-8")] for w in counts}
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size - 1:
        pairs = Counter()
        for w, toks in words.items():
            for p in zip(toks, toks[1:]):
                pairs[p] += counts[w]
        best = min(pairs, key=lambda p: (-pairs[p], ranks[p[0]], ranks[p[1]]))
        ranks.setdefault(best[0] + best[1], len(ranks))
        for w, toks in words.items():
            out, i = [], 0
            while i < len(toks):
                if i + 1 < len(toks) and (toks[i], toks[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(toks[i])
                    i += 1
            words[w] = out
    return ranks


def test_bpe_matches_textbook_loop_and_is_deterministic():
    texts = ["the cat sat on the mat. the cats sat on the mats!", "aaaa aaa aa a baaa", "Über straße über Straße 123 1234"]
    texts = texts * 3 + ["the the the that this these those", "hello world, hello there"]
    enc1 = data.train_bpe(texts, 310)
    enc2 = data.train_bpe(texts, 310)
    assert enc1._mergeable_ranks == enc2._mergeable_ranks
    assert enc1._mergeable_ranks == naive_bpe(texts, 310)
    assert enc1.n_vocab == 310 and enc1.eot_token == 309
    assert all(enc1._mergeable_ranks[bytes([i])] == i for i in range(256))  # single bytes come first


def test_bpe_round_trip_is_lossless_on_real_corpus_sample():
    texts = corpus_sample()
    enc = data.train_bpe(texts, 400)
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8"))  # merges are used


def test_bpe_round_trip_is_lossless_on_odd_unicode():
    enc = data.train_bpe(ODD_UNICODE + ["plain english text for a few merges"] * 5, 300)
    for text in ODD_UNICODE:
        ids = enc.encode_ordinary(text)
        assert enc.decode_bytes(ids) == text.encode("utf-8")
        assert enc.eot_token not in ids  # <|endoftext|> in the text is never the special token
    assert enc.decode(enc.encode_ordinary("a") + [enc.eot_token]) == "a" + data.EOT


def test_bpe_rejects_too_small_and_too_large_vocab():
    with pytest.raises(ValueError, match="257"):
        data.train_bpe(["hello"], 256)
    with pytest.raises(ValueError, match="vocab_size=5000 is more than this text supports"):
        data.train_bpe(["tiny text"], 5000)


def test_tokenizer_dict_and_file_rebuild_the_same_encoding(tmp_path, monkeypatch):
    enc = data.train_bpe(corpus_sample(1500) + ODD_UNICODE, 350)
    d = pickle.loads(pickle.dumps(data.tokenizer_to_dict(enc)))
    enc2 = data.tokenizer_from_dict(d)
    text = "".join(corpus_sample(1500)) + "".join(ODD_UNICODE)
    assert enc2.encode_ordinary(text) == enc.encode_ordinary(text) and enc2.eot_token == enc.eot_token
    # our file is tiktoken's format: tiktoken's own loader reads it (cache off, so nothing is written)
    path = tmp_path / data.TOKENIZER_FILE
    path.write_text(data.ranks_to_text(enc._mergeable_ranks))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == enc._mergeable_ranks
    path.write_text("not-base64!! x\n")
    with pytest.raises(ValueError, match="tokenizer.tiktoken"):
        data.ranks_from_text(path.read_text(), name=str(path))


def test_gpt2_unavailable_says_how_to_make_it_available(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(FileNotFoundError, match="TIKTOKEN_CACHE_DIR"):
        data.tokenizer_from_dict({"name": "gpt2"})


# -----------------------------------------------------------------------------
# readability and curation


def test_readability_ranks_onestopenglish_levels_article_by_article():
    levels = {}
    for level in ("ele", "int", "adv"):
        path = CORPUS / "onestopenglish" / f"{level}.txt.gz"
        if not path.is_file():
            pytest.skip("shared/data/corpus/onestopenglish is not present")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            levels[level] = [a for a in f.read().strip("\n").split("\n\n")]
    assert len(levels["ele"]) == len(levels["int"]) == len(levels["adv"]) == 189  # parallel: same index, same article
    right = sum(data.readability(e) > data.readability(i) > data.readability(a)
                for e, i, a in zip(levels["ele"], levels["int"], levels["adv"]))
    assert right / 189 >= 0.9


def test_readability_is_flesch_reading_ease():
    # 2 sentences, 8 words; syllables by hand: The(1) cat(1) sat(1) on(1) the(1) mat(1) Beautiful(3) flowers(2)
    expected = 206.835 - 1.015 * 8 / 2 - 84.6 * 11 / 8
    assert abs(data.readability("The cat sat on the mat. Beautiful flowers!") - expected) < 1e-9
    with pytest.raises(ValueError):
        data.readability("1234 !!")


def read_split_docs(out, split):
    """Decode a bin back into its documents (split at end-of-text tokens)."""
    enc, ids = data.load_tokenizer(out), np.asarray(data.open_bin(out, split), dtype=np.int64)
    cuts = np.flatnonzero(ids == enc.eot_token)
    assert len(ids) == 0 or cuts[-1] == len(ids) - 1  # every document is closed by <|endoftext|>
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [enc.decode(ids[s:e].tolist()) for s, e in zip(starts, cuts)]


def test_curation_counts_each_rule_and_keeps_good_text(tmp_path):
    src = tmp_path / "corpus"
    (src / "books").mkdir(parents=True)
    wrapped = ["Once upon a time there was a little rabbit who lived in a hole",
               "under a big green tree, and every morning he went out to look for",
               "carrots in the garden of the old farmer who lived down the lane."]
    dup = "This exact paragraph appears twice in the book, word for word here."
    (src / "books" / "tale.txt").write_text("\n".join(wrapped) + f"\n\n{dup}\n\n* * * * * *\n\n{dup}\n\n"
                                            "Ohhhhhhhhhhhh no, said the rabbit.\nShort line.\n")
    speech = b"where's the ball?\nthere it is.\n\nno \xff\xfe more juice.\nall gone.\n"
    with gzip.open(src / "speech.txt.gz", "wb") as f:
        f.write(speech)
    (src / "notes.md").write_text("not a corpus file")
    meta = data.prepare(src, tmp_path / "out", vocab_size=280, val_fraction=0.0, min_doc_words=1, verbose=False)
    books, talk = meta["curation"]["books"], meta["curation"]["speech"]
    assert (books["duplicate"], books["duplicate_words"]) == (1, len(dup.split()))
    assert (books["mostly_non_letters"], books["char_repeat"]) == (1, 1)
    assert talk["replaced"] == 2 and talk["raw_words"] == len(speech.split())
    text = "\n".join(read_split_docs(tmp_path / "out", "train"))
    assert " ".join(wrapped) in text  # the hard-wrapped paragraph became one line
    assert "where's the ball?\nthere it is." in text  # utterances keep their lines
    assert "no \ufffd\ufffd more juice." in text and "Short line." in text
    assert text.count(dup) == 1 and "* *" not in text and "Ohhhh" not in text
    assert meta["sources"].keys() == {"books", "speech"}
    assert "notes.md" in (tmp_path / "out" / "report.md").read_text()  # ignored files are listed


def write_source(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.txt").write_text("\n\n".join(docs) + "\n")


def test_budget_weights_and_whole_document_validation(tmp_path):
    src = tmp_path / "corpus"
    write_source(src / "big", data.synthetic_corpus(12000, seed=1))
    write_source(src / "small", data.synthetic_corpus(1500, seed=2))
    kw = dict(vocab_size=300, doc_words=100, verbose=False, seed=3)
    meta = data.prepare(src, tmp_path / "a", budget_words=6000, sources="big:1,small:1", val_fraction=0.1, **kw)
    s = meta["sources"]
    assert meta["splits"]["train"]["words"] <= 6000
    # water-filling: "small" cannot give its half, so it gives nearly everything and "big" fills the rest
    assert s["small"]["train_words"] + s["small"]["val_words"] >= 1500 - 2 * 100
    assert meta["splits"]["train"]["words"] >= 6000 - 2 * 100
    train, val = read_split_docs(tmp_path / "a", "train"), read_split_docs(tmp_path / "a", "val")
    assert sum(len(d.split()) for d in train) == meta["splits"]["train"]["words"]
    assert val and not set(val) & set(train)  # validation holds out whole documents
    meta = data.prepare(src, tmp_path / "b", budget_words=4000, sources="big:3,small:1", val_fraction=0.0, **kw)
    s = meta["sources"]
    assert abs(s["big"]["train_words"] - 3000) <= 100 and abs(s["small"]["train_words"] - 1000) <= 100


def test_babylm_layout_uses_dev_files_for_validation_and_never_reads_test(tmp_path):
    root = tmp_path / "babylm"
    for folder, suffix, seed in (("train_10M", "train", 1), ("dev", "dev", 2), ("test", "test", 3)):
        (root / folder).mkdir(parents=True)
        for name in ("childes", "gutenberg"):
            docs = data.synthetic_corpus(800, seed=seed + (10 if name == "gutenberg" else 0))
            if suffix == "test":
                docs = ["Zyxwvut marks the test file."] * 3
            (root / folder / f"{name}.{suffix}").write_text("\n\n".join(docs) + "\n")
    meta = data.prepare(root, tmp_path / "out", vocab_size=300, doc_words=100, val_fraction=0.1, verbose=False)
    assert meta["validation"] == "BabyLM dev files" and set(meta["sources"]) == {"childes", "gutenberg"}
    dev_text = (root / "dev" / "childes.dev").read_text() + (root / "dev" / "gutenberg.dev").read_text()
    val = read_split_docs(tmp_path / "out", "val")
    assert val and all(block in dev_text for doc in val for block in doc.split("\n\n"))
    everything = "".join(read_split_docs(tmp_path / "out", "train") + val)
    assert "Zyxwvut" not in everything


def test_curriculum_orders_training_documents_easy_to_hard(tmp_path):
    src = tmp_path / "corpus"
    write_source(src / "easy", data.synthetic_corpus(1500, seed=1))
    write_source(src / "hard", corpus_sample(1500))
    data.prepare(src, tmp_path / "out", vocab_size=300, doc_words=60, val_fraction=0.0, curriculum=True, verbose=False)
    ease = [data.readability(d) for d in read_split_docs(tmp_path / "out", "train")]
    assert len(ease) > 10 and all(a >= b for a, b in zip(ease, ease[1:]))


# -----------------------------------------------------------------------------
# bins, meta and bad input


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "out"
    data.prepare("synthetic", out, budget_words=5000, vocab_size=512, pairs_per_phenomenon=20, verbose=False)
    return out


def test_prepare_synthetic_bins_match_meta_and_encode_each_document(synthetic_dir):
    meta = data.load_meta(synthetic_dir)
    enc = data.load_tokenizer(synthetic_dir)
    assert meta["vocab_size"] == enc.n_vocab == 512 and meta["eot_id"] == enc.eot_token and meta["dtype"] == "uint16"
    for split in ("train", "val"):
        ids = data.open_bin(synthetic_dir, split)
        info = meta["splits"][split]
        assert ids.dtype == np.uint16 and len(ids) == info["tokens"] > 0 and int(ids.max()) < enc.n_vocab
        docs = read_split_docs(synthetic_dir, split)
        assert len(docs) == info["documents"] and sum(len(d.split()) for d in docs) == info["words"]
        assert sum(len(enc.encode_ordinary(d)) + 1 for d in docs) == info["tokens"]
        assert abs(data.words_per_token(meta, split) - info["words"] / info["tokens"]) < 1e-12
    assert meta["splits"]["train"]["words"] <= 5000
    pairs = [json.loads(line) for f in sorted((synthetic_dir / "pairs").glob("*.jsonl")) for line in open(f)]
    assert len(pairs) == 20 * len(data.PHENOMENA) and {p["UID"] for p in pairs} == set(data.PHENOMENA)
    assert all(p["field"] and p["sentence_good"] != p["sentence_bad"] for p in pairs)
    assert (synthetic_dir / "readability.png").stat().st_size > 0
    assert "teaching" in (synthetic_dir / "report.md").read_text()


def test_tampered_or_truncated_files_are_refused(synthetic_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(synthetic_dir, out)
    data.load_meta(out)
    raw = bytearray((out / "train.bin").read_bytes())
    raw[10] ^= 1
    (out / "train.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train.bin: sha256"):
        data.load_meta(out)
    (out / "train.bin").write_bytes(bytes(raw[:-2]))
    with pytest.raises(ValueError, match="train.bin has"):
        data.open_bin(out, "train")
    shutil.copy(synthetic_dir / "train.bin", out / "train.bin")
    (out / data.TOKENIZER_FILE).write_text((out / data.TOKENIZER_FILE).read_text().replace(" 300\n", " 301\n", 1))
    with pytest.raises(ValueError, match="tokenizer.tiktoken"):
        data.load_tokenizer(out)
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        data.load_meta(out)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        data.prepare(tmp_path / "no/such/folder", tmp_path / "out", verbose=False)
    junk = tmp_path / "junk"
    write_source(junk / "s", ["***** 12345 ++++", "-- 99 --\n## 42 ##", "!!!!!!!!!!!!!!"])
    with pytest.raises(ValueError, match="empty after filtering"):
        data.prepare(junk, tmp_path / "out", verbose=False)
    with pytest.raises(ValueError, match="vocab_size=256"):
        data.prepare("synthetic", tmp_path / "out", budget_words=2000, vocab_size=256, verbose=False)
    with pytest.raises(ValueError, match="nosuch"):
        data.prepare(junk, tmp_path / "out", sources="nosuch", verbose=False)
    with pytest.raises(ValueError, match="tokenizer='wordpiece'"):
        data.prepare("synthetic", tmp_path / "out", tokenizer="wordpiece", verbose=False)
    with pytest.raises(ValueError, match="--nope=1"):
        data.parse_args(["--nope=1"])
    with pytest.raises(ValueError, match="--budget_words=ten"):
        data.parse_args(["--budget_words=ten"])
    assert data.parse_args(["--budget_words=1e7", "--curriculum=true"]).budget_words == 10_000_000
    assert not (tmp_path / "out").exists()


def test_failed_prepare_writes_nothing_and_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    data.prepare("synthetic", out, budget_words=2000, vocab_size=300, pairs_per_phenomenon=5, verbose=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="more than this text supports"):  # fails after curation, in BPE training
        data.prepare("synthetic", out, budget_words=2000, vocab_size=60000, verbose=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    data.load_meta(out)


# -----------------------------------------------------------------------------
# the synthetic grammar, checked by a recogniser written from the lexicon alone

PLURAL = {n.plural: s for s, n in data.NOUNS.items()}
WORD_FORMS = {}  # word -> [(lemma, "base" | "s3" | "past")]
for lemma, v in data.VERBS.items():
    for word, kind in ((lemma, "base"), (v.s3, "s3"), (v.past, "past")):
        WORD_FORMS.setdefault(word, []).append((lemma, kind))
SUBJECT = {"I": ("I", "myself"), "you": ("pl", "yourself"), "he": ("3sg", "himself"), "she": ("3sg", "herself"),
           "it": ("3sg", "itself"), "we": ("pl", "ourselves"), "they": ("pl", "themselves")}
OBJECT = {"me": "I", "you": "you", "him": "he", "her": "she", "it": "it", "us": "we", "them": "they"}
REFLEXIVES = {"myself", "yourself", "yourselves", "himself", "herself", "itself", "ourselves", "themselves"}
COP = {"am": ("I",), "is": ("3sg",), "are": ("pl",), "was": ("I", "3sg"), "were": ("pl",)}
DOES = {"do": ("I", "pl"), "does": ("3sg",), "did": ("I", "3sg", "pl")}


def base_form_with_frame(word, frame):
    return any(kind == "base" and frame in data.VERBS[lemma].frames for lemma, kind in WORD_FORMS.get(word, []))


class Recognizer:
    """Does a sentence belong to the grammar? Every function maps a start position to the set of positions
    where the constituent can end, so ambiguity (her = determiner or pronoun) costs nothing."""

    def __init__(self, sentence):
        self.punct, words = sentence[-1], sentence[:-1].split()
        if words and words[0] not in data.NAMES and words[0] != "I":
            words[0] = words[0][0].lower() + words[0][1:]
        self.w = words

    def at(self, i):
        return self.w[i] if i < len(self.w) else None

    def det_np(self, i):  # -> {(end, agreement, reflexive)}: Det (Adj) N, determiner and noun agree
        out, det = set(), self.at(i)
        if det not in data.DETERMINERS:
            return out
        for k in (i + 1, i + 2):
            if k == i + 2 and self.at(i + 1) not in data.ADJECTIVES:
                continue
            word = self.at(k)
            for noun, number in ((word, "sg"), (PLURAL.get(word), "pl")):
                if noun not in data.NOUNS or data.DETERMINERS[det] not in ("any", number):
                    continue
                if det in ("a", "an") and (det == "an") != (self.at(i + 1)[0] in "aeiou"):
                    continue
                animate = data.NOUNS[noun].kind in ("animal", "person")
                if k == i + 2 and not animate and data.ADJECTIVES[self.at(i + 1)] != "any":
                    continue
                refl = {"m": "himself", "f": "herself", "n": "itself"}[data.NOUNS[noun].gender]
                out.add((k + 1, "3sg" if number == "sg" else "pl", refl if number == "sg" else "themselves"))
        return out

    def pp(self, i):
        return {j for j, _, _ in self.det_np(i + 1)} if self.at(i) in data.PREPOSITIONS else set()

    def rc(self, i, agr):  # that + a finite VP agreeing with the head, with nothing to bind a reflexive
        if self.at(i) != "that":
            return set()
        out = self.vp(i + 1, agr, finite=True, refl=None, pron=None)
        if agr in COP.get(self.at(i + 1), ()):
            out |= self.predicate(i + 2)
        return out

    def subject(self, i):  # -> {(end, agreement, reflexive, pronoun)}
        w, out = self.at(i), set()
        if w in SUBJECT:
            out.add((i + 1, *SUBJECT[w], w))
        if w in data.NAMES:
            out.add((i + 1, "3sg", {"m": "himself", "f": "herself"}[data.NAMES[w]], None))
        for j, agr, refl in self.det_np(i):
            for k in {j} | self.pp(j):
                out |= {(m, agr, refl, None) for m in {k} | self.rc(k, agr)}
        return out

    def predicate(self, i):
        return ({i + 1} if self.at(i) in data.ADJECTIVES else set()) | self.pp(i)

    def obj(self, i, refl, pron):
        w, out = self.at(i), set()
        if w in OBJECT and not (OBJECT[w] == pron and pron in ("I", "we", "you")):  # no "I see me"
            out.add(i + 1)
        if w in data.NAMES:
            out.add(i + 1)
        if w in REFLEXIVES and refl is not None and (w == refl or (refl == "yourself" and w == "yourselves")):
            out.add(i + 1)
        for j, agr, _ in self.det_np(i):
            out |= {j} | self.rc(j, agr)
        return out

    def vp(self, i, agr, finite, refl, pron):
        out = set()
        for lemma, kind in WORD_FORMS.get(self.at(i), []):
            if finite and not (kind == "past" or (kind == "s3") == (agr == "3sg") and kind != "past"):
                continue
            if not finite and kind != "base":
                continue
            frames = data.VERBS[lemma].frames
            if "intr" in frames:
                out |= {i + 1} | self.pp(i + 1)
            if "tr" in frames:
                for j in self.obj(i + 1, refl, pron):
                    out |= {j} | self.pp(j)
            if "ditr" in frames:
                for j, _, _ in self.det_np(i + 1):
                    if self.at(j) == "to":
                        out |= self.obj(j + 1, None, None)
        return out

    def accepts(self):
        w, n, p, ends = self.w, len(self.w), self.punct, set()
        if not w:
            return False
        if p == ".":
            for j, agr, refl, pron in self.subject(0):
                ends |= self.vp(j, agr, True, refl, pron)
                if agr in COP.get(self.at(j), ()):
                    ends |= self.predicate(j + 1)
        if p in ".!":
            start = 1 if w[0] == "please" else 0
            ends |= self.vp(start, "pl", False, "yourself", "you")
            if self.at(start) == "be" and self.at(start + 1) in data.ADJECTIVES:
                ends.add(start + 2)
        if p == "?":
            if w[0] in DOES:
                for j, agr, refl, pron in self.subject(1):
                    if agr in DOES[w[0]]:
                        ends |= self.vp(j, agr, False, refl, pron)
            if w[0] in COP:
                for j, agr, _, _ in self.subject(1):
                    if agr in COP[w[0]]:
                        ends |= self.predicate(j)
            if w[0] == "what" and self.at(1) in DOES:
                for j, agr, _, _ in self.subject(2):
                    if agr in DOES[w[1]] and base_form_with_frame(self.at(j), "tr"):
                        ends.add(j + 1)
            if w[0] == "who":
                ends |= self.vp(1, "3sg", True, None, None)
            if w[0] == "where" and self.at(1) in COP:
                ends |= {j for j, agr, _, _ in self.subject(2) if agr in COP[w[1]]}
            if w[0] == "where" and self.at(1) in DOES:
                for j, agr, _, _ in self.subject(2):
                    if agr in DOES[w[1]] and base_form_with_frame(self.at(j), "intr"):
                        ends.add(j + 1)
        return n in ends


def only_difference(good, bad):
    g, b = Recognizer(good).w, Recognizer(bad).w
    diff = [i for i in range(len(g)) if len(g) == len(b) and g[i] != b[i]]
    assert len(g) == len(b) and len(diff) == 1, (good, bad)
    return diff[0], g[diff[0]], b[diff[0]], g


def check_pair(pair):
    uid, good, bad = pair["UID"], pair["sentence_good"], pair["sentence_bad"]
    assert Recognizer(good).accepts(), good
    assert not Recognizer(bad).accepts(), bad
    if uid == "question_formation":  # same words; only where a copula sits differs
        g, b = Recognizer(good).w, Recognizer(bad).w
        assert sorted(g) == sorted(b) and g[0] in COP and b[0] in COP and g != b
        assert [w for w in g if w not in COP] == [w for w in b if w not in COP]
        return
    i, gw, bw, words = only_difference(good, bad)
    if uid in ("subject_verb_agreement", "agreement_across_prepositional_phrase"):
        copulas = {frozenset(p) for p in (("is", "are"), ("was", "were"), ("am", "is"))}
        lexical = {(l1, frozenset((k1, k2))) for l1, k1 in WORD_FORMS.get(gw, []) for l2, k2 in WORD_FORMS.get(bw, []) if l1 == l2}
        assert frozenset((gw, bw)) in copulas or any(ks == {"base", "s3"} for _, ks in lexical), (good, bad)
        if uid == "agreement_across_prepositional_phrase":
            assert any(w in data.PREPOSITIONS for w in words[:i]), good
    elif uid == "determiner_noun_agreement":
        assert {gw, bw} in ({"this", "these"}, {"that", "those"}), (good, bad)
    elif uid == "irregular_past_tense":  # the rule-made past of the same verb: taked, eated, sitted
        lemma = [l for l, k in WORD_FORMS[gw] if k == "past"][0]
        assert bw not in WORD_FORMS and bw.endswith("d") and bw[: len(lemma)] == lemma and len(bw) - len(lemma) <= 3
    elif uid == "anaphor_agreement":
        assert gw in REFLEXIVES and bw in REFLEXIVES
    elif uid == "argument_structure":
        (gl, gk), (bl, bk) = WORD_FORMS[gw][0], WORD_FORMS[bw][0]
        assert gk == bk and "tr" in data.VERBS[gl].frames and data.VERBS[bl].frames == {"intr"}
    else:
        raise AssertionError(f"unknown phenomenon {uid}")


def test_synthetic_sentences_are_in_the_grammar_language():
    docs = data.synthetic_corpus(6000, seed=5)
    sentences = [s for d in docs for s in d.split("\n")]
    assert len(sentences) > 800 and all(Recognizer(s).accepts() for s in sentences), \
        [s for s in sentences if not Recognizer(s).accepts()][:5]
    kinds = Counter(s[-1] for s in sentences) + Counter(s.split()[0] for s in sentences if s.endswith("?"))
    assert kinds["."] and kinds["?"] and kinds["!"] and kinds["Who"] and kinds["What"] and kinds["Where"]
    assert any(" that " in s for s in sentences) and any(WORD_FORMS.get(w) == [(l, "past")] for s in sentences
                                                          for w in s[:-1].split() for l in data.IRREGULAR)
    assert Recognizer("The dog sleeps.").accepts() and not Recognizer("The dog sleep.").accepts()
    assert not Recognizer("I see me.").accepts() and Recognizer("I see myself.").accepts()


def test_synthetic_pairs_differ_only_in_their_phenomenon():
    pairs = data.synthetic_minimal_pairs(n_per_phenomenon=150, seed=7)
    assert Counter(p["UID"] for p in pairs) == {uid: 150 for uid in data.PHENOMENA}
    for pair in pairs:
        check_pair(pair)


def test_synthetic_corpus_is_deterministic_for_a_seed():
    a, b, c = data.synthetic_corpus(3000, seed=1), data.synthetic_corpus(3000, seed=1), data.synthetic_corpus(3000, seed=2)
    assert a == b and a != c and sum(len(d.split()) for d in a) >= 3000
    assert data.synthetic_minimal_pairs(5, seed=1) == data.synthetic_minimal_pairs(5, seed=1)


# -----------------------------------------------------------------------------
# batches


def test_get_batch_targets_are_inputs_shifted_by_one():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # with ids = arange, the next token is the id plus one


def test_epoch_batches_cover_each_target_once_per_epoch_and_resume_exactly():
    ids = np.arange(1 + 10 * 8 * 3, dtype=np.uint16)  # 10 batches of 8 windows of 3 tokens
    b = data.EpochBatches(ids, batch_size=8, block_size=3, seed=11)
    assert b.batches_per_epoch == 10 and b.tokens_per_epoch == 240
    seen = [b.next_batch() for _ in range(10)]
    targets = torch.cat([y.flatten() for _, y in seen])
    assert all(torch.equal(y[:, :-1], x[:, 1:]) for x, y in seen)
    assert sorted(targets.tolist()) == list(range(1, 241))  # ids = arange: every target exactly once
    first_order = [x[:, 0].tolist() for x, _ in seen]
    for _ in range(4):
        b.next_batch()
    assert b.epoch == 1 and b.step == 4
    state = b.state_dict()
    continued = [b.next_batch() for _ in range(12)]  # runs across the next epoch boundary
    resumed = data.EpochBatches(ids, batch_size=8, block_size=3, seed=11)
    resumed.load_state_dict(state)
    again = [resumed.next_batch() for _ in range(12)]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(continued, again))
    assert b.epoch == 2
    fresh = data.EpochBatches(ids, batch_size=8, block_size=3, seed=11)
    fresh.epoch = 1
    assert [fresh.next_batch()[0][:, 0].tolist() for _ in range(10)] != first_order  # a new order each epoch
    with pytest.raises(ValueError, match="block_size"):
        data.EpochBatches(ids, batch_size=8, block_size=4, seed=11).load_state_dict(state)


def test_epoch_batches_ranks_split_windows_without_overlap():
    ids = np.arange(1 + 12 * 4, dtype=np.uint16)
    ranks = [data.EpochBatches(ids, batch_size=3, block_size=4, seed=0, rank=r, world_size=2) for r in range(2)]
    starts = [x[:, 0].tolist() for b in ranks for x, _ in (b.next_batch() for _ in range(b.batches_per_epoch))]
    flat = sorted(s for batch in starts for s in batch)
    assert flat == list(range(0, 48, 4))  # both ranks together: every window once


# =============================================================================
# train.py: the training job

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

TINY_RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--swa_window=8",
            "--chunk_size=16", "--eval_iters=2", "--eval_max_pairs=5", "--log_interval=1", "--warmup_iters=2"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    import data
    out = tmp_path_factory.mktemp("data") / "synthetic"
    data.prepare("synthetic", out, budget_words=30_000, vocab_size=300, synthetic_words=40_000,
                 pairs_per_phenomenon=20, verbose=False)
    return str(out)


def run_train(args, tmp_path, name):
    out = tmp_path / name
    train.main(TINY_RUN + [f"--out_dir={out}"] + args)
    return out, train.read_checkpoint(str(out / "ckpt.pt"))


def test_tiny_model_trains_on_cpu_and_its_loss_falls(tiny_data, tmp_path):
    out, ckpt = run_train([f"--data={tiny_data}", "--max_iters=25", "--eval_interval=25"], tmp_path, "run")
    rows = [json.loads(l) for l in open(out / "log.jsonl")]
    train_losses = [r["loss"] for r in rows if r["kind"] == "train"]
    val = [r["val_loss"] for r in rows if r["kind"] == "eval"]
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.5, train_losses
    assert val[-1] < val[0] - 0.5, val
    assert ckpt["iter"] == 25 and ckpt["tokens_seen"] == 25 * 4 * 32
    assert ckpt["words_seen"] == pytest.approx(ckpt["tokens_seen"] * ckpt["data_meta"]["splits"]["train"]["words"]
                                               / ckpt["data_meta"]["splits"]["train"]["tokens"])
    assert (out / "loss.png").is_file()
    assert "pairs_macro" in rows[-1]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_continues_bit_identically(tiny_data, tmp_path, optimizer):
    common = [f"--data={tiny_data}", "--max_iters=8", "--eval_interval=4", f"--optimizer={optimizer}"]
    _, whole = run_train(common, tmp_path, "whole")
    run_train(common + ["--stop_iter=3"], tmp_path, "halves")
    _, halves = run_train(common + ["--resume=True"], tmp_path, "halves")
    assert whole["iter"] == halves["iter"] == 8
    for k, v in whole["model"].items():
        assert torch.equal(v, halves["model"][k]), k
    assert whole["batches"] == halves["batches"]
    flat = lambda sd: [t for s in sd["optimizer"]["adamw"]["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert all(torch.equal(a, b) for a, b in zip(flat(whole), flat(halves)))


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit):
        train.main(TINY_RUN + [f"--data={tiny_data}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=100",
                               "--optimizer=adamw", "--adam_lr=1e30", "--warmup_iters=1", "--grad_clip=0"])
    assert "loss is not finite at iter" in capsys.readouterr().out
    ckpt = train.read_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["iter"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_checkpoint_is_written_atomically_and_a_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint({"model": {}, "config": {}, "tokenizer": {}}, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]     # no temporary file left behind
    path.write_bytes(path.read_bytes()[:40])                          # a save cut short
    with pytest.raises(ValueError, match="corrupt"):
        train.read_checkpoint(str(path))


def test_a_checkpoint_trained_with_the_triton_kernel_loads_on_the_cpu_with_the_same_logits(tmp_path, capsys):
    import data
    cfg = dict(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, chunk_size=16)
    torch.manual_seed(0)
    reference = train.BLaLM(train.BLaLMConfig(**cfg)).eval()           # the default kernel, on the CPU
    enc = data.train_bpe(["a small text to train a tiny tokenizer on"] * 4, vocab_size=270)
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint({"model": reference.state_dict(), "tokenizer": data.tokenizer_to_dict(enc),
                           "config": train.BLaLMConfig(**cfg, mlstm_kernel="triton").to_dict()}, str(path))
    model, _, _ = train.load_checkpoint(str(path), "cpu")
    assert model.config.mlstm_kernel == "torch" and "mlstm_kernel='triton'" in capsys.readouterr().out
    idx = torch.randint(0, 64, (2, 27))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], reference(idx)[0])


@pytest.mark.parametrize("argv,message", [
    (["--not_a_flag=1"], "unknown option '--not_a_flag=1'; valid options: --data"),
    (["--max_iters=ten"], "--max_iters=ten: expected a value of type int"),
    (["--compile=maybe"], "expected True or False"),
    (["max_iters=3"], "malformed argument"),
    (["--preset=huge"], "unknown preset 'huge'"),
])
def test_bad_flags_are_refused_naming_them(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(argv, train.TrainConfig, train.PRESETS)


def test_bad_values_are_refused_naming_them():
    for argv, message in ((["--optimizer=sgd"], "--optimizer='sgd'"), (["--batch_size=0"], "--batch_size=0")):
        with pytest.raises(ValueError, match=message):
            train.check_config(train.parse_args(argv))
    with pytest.raises(ValueError, match="mixer='rnn'"):
        train.main(["--mixer=rnn", "--data=/nonexistent-dir-for-test"]) if False else train.BLaLMConfig(mixer="rnn")


def test_presets_set_the_babylm_budgets_and_flags_override_them():
    c = train.parse_args(["--preset=strict_small", "--n_layer=3"], train.TrainConfig, train.PRESETS)
    assert c.budget_words == 10_000_000 and c.max_epochs == 10 and c.n_layer == 3
    assert train.parse_args(["--preset=strict"], train.TrainConfig, train.PRESETS).budget_words == 100_000_000


def test_milestones_follow_the_babylm_schedule():
    crossed = train.milestone_words(0, 250_000_000)
    assert crossed[:10] == [m * 1_000_000 for m in range(1, 10)] + [10_000_000]
    assert 20_000_000 in crossed and 90_000_000 in crossed and 100_000_000 in crossed and 200_000_000 in crossed
    assert 11_000_000 not in crossed and 150_000_000 not in crossed
    assert train.milestone_words(1_500_000, 2_000_000) == [2_000_000]
    assert train.milestone_words(2_000_000, 2_500_000) == []


def test_schedules_warm_up_then_decay_to_the_floor():
    c = train.TrainConfig(warmup_iters=10, min_lr_ratio=0.1)
    assert train.lr_factor(0, c, 100) == pytest.approx(0.1) and train.lr_factor(9, c, 100) == pytest.approx(1.0)
    assert train.lr_factor(100, c, 100) == pytest.approx(0.1)
    c.schedule, c.decay_frac = "wsd", 0.2
    assert train.lr_factor(50, c, 100) == 1.0 and train.lr_factor(79, c, 100) == 1.0
    assert train.lr_factor(90, c, 100) == pytest.approx(0.55) and train.lr_factor(100, c, 100) == pytest.approx(0.1)


def test_budget_over_the_track_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="over --budget_words=1,000"):
        train.main(TINY_RUN + [f"--data={tiny_data}", f"--out_dir={tmp_path}", "--budget_words=1000"])


def test_plot_draws_several_runs(tiny_data, tmp_path):
    run_train([f"--data={tiny_data}", "--max_iters=2", "--eval_interval=1"], tmp_path, "a")
    run_train([f"--data={tiny_data}", "--max_iters=2", "--eval_interval=1", "--optimizer=adamw"], tmp_path, "b")
    train.main([f"--plot={tmp_path / 'a'},{tmp_path / 'b'}"])
    assert (tmp_path / "a" / "compare.png").stat().st_size > 1000


def test_default_train_command_runs(tmp_path):
    """`python train.py` with no data prepares the synthetic corpus and trains (shortened by flags for CI)."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--max_iters=2", "--eval_interval=2",
                        "--eval_max_pairs=5", "--eval_iters=1"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "synthetic corpus is a teaching corpus" in r.stdout and "done: 2 iters" in r.stdout
    assert (tmp_path / "out" / "ckpt.pt").is_file()


def test_train_help_lists_the_options():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max_iters=" in r.stdout and "--preset=" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--bogus=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option '--bogus=1'" in r.stderr


# =============================================================================
# eval.py and sample.py: minimal pairs, perplexity, generation

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
import torch
import torch.nn.functional as F

from blalm import BLaLM, BLaLMConfig
from eval import load_pairs, main as eval_main, perplexity, score_pairs, sentence_logprobs, Pair

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


def byte_tokenizer():
    """256 byte tokens and end-of-text = 256: every sentence tokenizes to its utf-8 bytes."""
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def tiny_model(mixer="mlstm", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=16, chunk_size=4, swa_window=4)
    model = BLaLM(BLaLMConfig(**{**cfg, "mixer": mixer, **kw}))
    for p in model.parameters():
        if p.dim() > 1:  # larger weights than GPT-2's init so that sentences score clearly apart
            p.data.normal_(0, 0.3)
    return model.to(dtype).eval()


@pytest.fixture
def ckpt_path(tmp_path):
    from data import tokenizer_to_dict
    from train import save_checkpoint
    model = tiny_model(dtype=torch.float32)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(dict(model=model.state_dict(), config=model.config.to_dict(), iter=0, tokens_seen=0,
                         words_seen=0, tokenizer=tokenizer_to_dict(byte_tokenizer())), str(path))
    return path


def loop_logprob(model, enc, sentence):
    """log P(sentence | eot), one token at a time: sum over t of log_softmax(logits at t-1)[token t]."""
    ids = [enc.eot_token] + enc.encode_ordinary(sentence)
    logits, _ = model(torch.tensor([ids]))
    total = 0.0
    for t in range(1, len(ids)):
        total += torch.log_softmax(logits[0, t - 1].double(), dim=-1)[ids[t]].item()
    return total


SENTENCES = ["The cat sleeps.", "a", "Dogs bark at night, loudly.", "She is here?", "hi there"]


@pytest.mark.parametrize("mixer", ["mlstm", "attn"])
def test_sentence_logprobs_match_per_token_loop_float64(mixer):
    model, enc = tiny_model(mixer), byte_tokenizer()
    got = sentence_logprobs(model, enc, SENTENCES, batch_size=3)
    want = torch.tensor([loop_logprob(model, enc, s) for s in SENTENCES], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert got.unique().numel() == len(SENTENCES)  # the model really tells them apart


def test_batching_and_padding_do_not_change_scores():
    model, enc = tiny_model(), byte_tokenizer()
    one_by_one = sentence_logprobs(model, enc, SENTENCES, batch_size=1)  # no padding at all
    for bs in (2, 4, len(SENTENCES)):
        torch.testing.assert_close(sentence_logprobs(model, enc, SENTENCES, batch_size=bs), one_by_one,
                                   rtol=0, atol=1e-10)


def test_tie_counts_as_wrong():
    # zero lm_head (tied to wte) -> every logit is 0 -> each token scores -log V whatever the input
    model, enc = tiny_model(), byte_tokenizer()
    model.lm_head.weight.data.zero_()
    tie = Pair("the cats sleep", "the cat sleeps", "syntax")  # same number of tokens -> equal scores
    lp = sentence_logprobs(model, enc, [tie.good, tie.bad])
    assert lp[0].item() == lp[1].item() == pytest.approx(-14 * math.log(257))
    res = score_pairs(model, enc, {"tie": [tie] * 3, "shorter_good": [Pair("a cat", "the cat", "syntax")]})
    assert res["paradigms"] == {"tie": 0.0, "shorter_good": 100.0}
    assert res["macro_average"] == 50.0 and res["fields"] == {"syntax": 25.0}


def test_score_pairs_accuracy_matches_direct_comparison():
    model, enc = tiny_model(), byte_tokenizer()
    pairs = {"p1": [Pair(a, b, "f") for a, b in zip(SENTENCES, SENTENCES[1:])],
             "p2": [Pair(b, a, None) for a, b in zip(SENTENCES, SENTENCES[1:])]}
    res = score_pairs(model, enc, pairs, max_pairs_per_paradigm=3)
    for name, ps in pairs.items():
        right = [loop_logprob(model, enc, p.good) > loop_logprob(model, enc, p.bad) for p in ps[:3]]
        assert res["paradigms"][name] == pytest.approx(100 * sum(right) / 3)
        assert res["n_pairs"][name] == 3
    assert res["macro_average"] == pytest.approx(sum(res["paradigms"].values()) / 2)
    assert res["fields"] == {"f": res["paradigms"]["p1"]}  # p2 has no field


def test_long_sentence_for_learned_positions_raises_naming_it():
    model, enc = tiny_model("attn"), byte_tokenizer()
    long = "x" * 40  # 40 tokens > block_size 32
    with pytest.raises(ValueError, match=r"'x{40}' is 40 tokens, longer than block_size=32"):
        sentence_logprobs(model, enc, ["ok", long])
    sentence_logprobs(tiny_model("mlstm"), enc, [long])  # the mLSTM has no positions: any length works


def test_text_perplexity_equals_exp_mean_nll():
    model, enc = tiny_model(), byte_tokenizer()
    text = "Once upon a time there was a small dog. It liked to run in the park every day."  # 3 windows of 32
    res = perplexity(model, enc, text, batch_size=2)
    ids = enc.encode_ordinary(text)
    nll = []
    for s in range(0, len(ids), 32):  # each window read from scratch after end-of-text
        w = ids[s:s + 32]
        logits, _ = model(torch.tensor([[enc.eot_token] + w[:-1]]))
        nll.append(F.cross_entropy(logits[0], torch.tensor(w), reduction="none"))
    nll = torch.cat(nll)
    assert res["tokens"] == len(ids) == nll.numel()
    assert res["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-10)
    assert res["bits_per_byte"] == pytest.approx(nll.sum().item() / math.log(2) / len(text.encode()), rel=1e-10)


def test_load_pairs_reads_blimp_and_zorro(tmp_path):
    blimp = tmp_path / "agr.jsonl"
    blimp.write_text(json.dumps(dict(sentence_good="A cat is.", sentence_bad="A cat are.", field="morphology",
                                     UID="agr", pairID="0", one_prefix_word_good="is")) + "\n"
                     + json.dumps(dict(sentence_good="Cats are.", sentence_bad="Cats is.")) + "\n")
    zorro = tmp_path / "filler-gap-wh_question.txt"
    zorro.write_text("what did she saw ?\nwhat did she see ?\nwho he is ?\nwho is he ?\n")
    (tmp_path / "LICENSE").write_text("not pairs")
    pairs = load_pairs(tmp_path)
    assert pairs == {"agr": [Pair("A cat is.", "A cat are.", "morphology"), Pair("Cats are.", "Cats is.", None)],
                     "filler-gap-wh_question": [Pair("what did she see ?", "what did she saw ?", "filler-gap"),
                                                Pair("who is he ?", "who he is ?", "filler-gap")]}
    assert load_pairs(zorro) == {k: v for k, v in pairs.items() if k != "agr"}


@pytest.mark.parametrize("name, text, line", [
    ("a.jsonl", '{"sentence_good": "A.", "sentence_bad": "B."}\n{"sentence_good": \n', 2),
    ("a.jsonl", '{"sentence_good": "A.", "sentence_bad": "B."}\n' * 2 + '{"sentence_good": "A."}\n', 3),
    ("a.txt", "bad one .\ngood one .\nbad two .\n", 3),
    ("a.txt", "bad one .\ngood one .\n\nbad two .\n", 3),
])
def test_malformed_lines_raise_with_file_and_line(tmp_path, name, text, line):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name} line {line}:")):
        load_pairs(tmp_path / name)


def test_unknown_key_and_corrupt_checkpoint_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--bogus=1.*--ckpt.*--batch_size"):
        eval_main(["--bogus=1"])
    garbage = tmp_path / "bad.pt"
    garbage.write_bytes(b"this is not a checkpoint \x00\x01\x02" * 10)
    with pytest.raises(ValueError, match=r"bad\.pt is corrupt or not a checkpoint"):
        eval_main([f"--ckpt={garbage}", "--pairs=builtin"])


def run(script, *args):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_eval_cli_prints_paradigms_fields_and_macro_average(ckpt_path, tmp_path):
    if not (SHARED_DATA / "zorro").is_dir() or not (SHARED_DATA / "blimp_dev").is_dir():
        pytest.skip("shared/data/zorro and blimp_dev are not present")
    out = run("eval.py", f"--ckpt={ckpt_path}", f"--blimp={SHARED_DATA / 'blimp_dev'}",
              f"--zorro={SHARED_DATA / 'zorro'}", "--max_pairs=3", "--batch_size=64", "--device=cpu",
              f"--json={tmp_path / 'res.json'}")
    lines = out.strip().splitlines()
    res = json.loads((tmp_path / "res.json").read_text())
    names = [p.stem for d in ("blimp_dev", "zorro") for p in (SHARED_DATA / d).iterdir() if p.suffix in (".jsonl", ".txt")]
    assert sorted(res["paradigms"]) == sorted(names) and len(names) == 35
    for name in names:  # one line per paradigm with its accuracy out of 3 pairs
        assert re.search(rf"^{name} +(0\.00|33\.33|66\.67|100\.00)  \(3 pairs\)$", out, re.M), name
    assert {"field syntax", "field morphology", "field filler-gap"} <= {l.split(":")[0] for l in lines}
    assert re.fullmatch(r"macro-average: \d+\.\d\d", lines[-1])
    assert float(lines[-1].split()[-1]) == pytest.approx(sum(res["paradigms"].values()) / 35, abs=0.005)


def test_sample_cli_prints_samples_separated_by_dashes(ckpt_path, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon")
    out = run("sample.py", f"--ckpt={ckpt_path}", f"--start=FILE:{prompt}", "--num_samples=2",
              "--max_new_tokens=8", "--device=cpu")
    samples = out.split("-" * 40 + "\n")
    assert len(samples) == 3 and samples[-1] == ""
    assert all(s.startswith("Once upon") and len(s) > len("Once upon\n") for s in samples[:2])


def test_sample_empty_start_prompts_with_eot_and_checks_block_size(tmp_path, capsys):
    from data import tokenizer_to_dict
    from sample import main as sample_main
    from train import save_checkpoint
    model = tiny_model("attn", dtype=torch.float32)
    path = tmp_path / "attn.pt"
    save_checkpoint(dict(model=model.state_dict(), config=model.config.to_dict(), iter=0, tokens_seen=0,
                         words_seen=0, tokenizer=tokenizer_to_dict(byte_tokenizer())), str(path))
    sample_main([f"--ckpt={path}", "--num_samples=1", "--max_new_tokens=31", "--temperature=0", "--device=cpu"])
    text = capsys.readouterr().out.removesuffix("\n" + "-" * 40 + "\n")
    want = model.generate(torch.tensor([[256]]), 31, temperature=0)[0, 1:].tolist()  # greedy, eot not printed
    assert text == byte_tokenizer().decode(want)
    with pytest.raises(ValueError, match=r"= 33 is longer than block_size=32"):
        sample_main([f"--ckpt={path}", "--start=hi", "--max_new_tokens=31", "--device=cpu"])


def test_builtin_pairs_in_process_end_with_macro_average(ckpt_path, capsys):
    from data import synthetic_minimal_pairs
    from eval import BUILTIN_PAIRS_PER_PHENOMENON, BUILTIN_SEED
    records = synthetic_minimal_pairs(BUILTIN_PAIRS_PER_PHENOMENON, BUILTIN_SEED)
    res = eval_main([f"--ckpt={ckpt_path}", "--pairs=builtin", "--max_pairs=2", "--device=cpu"])
    assert set(res["paradigms"]) == {r["UID"] for r in records} and set(res["n_pairs"].values()) == {2}
    assert set(res["fields"]) == {r["field"] for r in records}
    assert capsys.readouterr().out.splitlines()[-1] == f"macro-average: {res['macro_average']:.2f}"


# =============================================================================
# bench.py


def test_bench_runs_every_suite_at_tiny_sizes_on_the_cpu(tmp_path):
    import bench
    out = tmp_path / "bench.json"
    results = bench.main(["--suite=all", "--repeat=1", f"--json={out}", "--device=cpu"])
    saved = json.loads(out.read_text())
    assert saved["device"].startswith("cpu") and set(results) >= {"kernels", "optim", "decode"}
    assert all(r["ms"] > 0 for r in saved["kernels"] if r.get("ms") is not None)
    assert {r["model"] for r in saved["optim"]} == {"blalm", "softmax"}
    assert all(r["muon_ms"] > 0 and r["adamw_ms"] > 0 and r["tok_s"] > 0 for r in saved["optim"])
    with pytest.raises(ValueError, match="--suite='fast'"):
        bench.main(["--suite=fast"])


# =============================================================================
# notebooks/: executed in FAST mode by a real notebook runner

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_four_walkthrough_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_without_error_in_fast_mode(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BLALM_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    assert any(c.outputs for c in nb.cells if c.cell_type == "code"), "the committed notebook keeps its outputs"
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
