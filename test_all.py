"""The whole test suite: python -m pytest -q test_all.py

Grouped by file in the order of the design: blalm.py, hedgehog.py, muon.py, data.py, train/eval/sample,
bench.py, notebooks. Each test's name states the property it proves."""

import math
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
    probe = torch.sin(torch.arange(h.numel(), dtype=torch.float64)).view_as(h).to(h.dtype)  # a generic cotangent
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
    q, k, v, i, f = [x.detach().to(torch.bfloat16) for x in random_mlstm_inputs(T=20, dtype=torch.float32)]
    for fn in (lambda **kw: mlstm_chunkwise(q, k, v, i, f, chunk_size=8, **kw),
               lambda **kw: mlstm_recurrent(q, k, v, i, f, **kw)):
        h, (C, n, m) = fn(return_state=True)
        assert h.dtype == torch.bfloat16
        assert C.dtype == n.dtype == m.dtype == torch.float32
    ref = mlstm_parallel(*(x.double() for x in (q, k, v, i, f)))
    assert rel_err(mlstm_chunkwise(q, k, v, i, f, chunk_size=8), ref) < 2e-2


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


def cache_numel(cache):
    return sum(t.numel() for layer in cache["layers"] for v in layer.values()
               for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor))


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
