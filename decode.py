"""
The decoding state and what decodes from it, for blalm.BLaLM: LayerCache and DecodeCache (tensors that grow,
positions as Python ints: forward(idx, cache=...)), StaticCache (the same state in tensors allocated once and
updated in place, positions as a device tensor: BLaLM.decode_step), the ring-buffer attention step both the SWA
branch and the softmax baseline's static KV cache use, sampling on the device, and CUDA-graph capture.
"""

import torch
import torch.nn.functional as F

from hedgehog import acc_dtype


def ring_attention_step(q, k, v, k_ring, v_ring, pos):
    """One query per row at position pos (a 0-dim int64 tensor) against keys kept in a ring buffer of S slots:
    q, k, v (B, NH, 1, D); k_ring, v_ring (B, NH, S, D), updated in place -> y (B, NH, 1, D).

    The new key and value go to slot pos % S; slot s then holds the key of position pos - (pos - s) % S, and
    has been written once s <= pos. With S = window this is the sliding window (query pos sees keys
    pos-window+1..pos); with S larger than every position, a plain static KV cache. Slot and mask come from the
    position tensor: fixed shapes, nothing read back to the host, so a CUDA graph can capture it."""
    S = k_ring.size(2)
    slot = (pos % S).view(1)
    k_ring.index_copy_(2, slot, k.to(k_ring.dtype))
    v_ring.index_copy_(2, slot, v.to(v_ring.dtype))
    written = torch.arange(S, device=q.device) <= pos                  # (S,)
    return F.scaled_dot_product_attention(q, k_ring, v_ring, attn_mask=written[None])


class LayerCache:
    """One block's decoding state; a field is None until the layer writes it. mlstm: the mLSTM state
    (C, n, m); conv: the short convolution's last K-1 inputs (B, K-1, 3C); k, v: the SWA branch's last
    window-1 rotary keys and values (B, NH, <window, D), or for "attn" all keys and values so far; state: the
    Hedgehog layer's linear-attention state (S, z). static: a StaticCache's layer, whose k, v are ring buffers
    that the layers update in place at a position given as a tensor (ring_attention_step)."""
    FIELDS = ("mlstm", "conv", "k", "v", "state")

    def __init__(self, static=False):
        self.static = static
        self.in_weights = None   # a StaticCache's copy of an mLSTM layer's stacked input projection (not state)
        for name in self.FIELDS:
            setattr(self, name, None)

    def update(self, name, value):
        """The layer's new state for a field (a tensor or a tuple of them, not views of anything larger). A
        StaticCache's layer copies it into the tensors it holds, so their memory stays where a CUDA graph reads it
        (compiled, the copy fuses into the kernel that computes the state); a DecodeCache's takes value itself."""
        if self.static:
            for mine, new in zip(_as_tuple(getattr(self, name)), _as_tuple(value), strict=True):
                mine.copy_(new)
        else:
            setattr(self, name, value)

    def tensors(self):
        """(field, tensor) for every tensor held (a state tuple gives several)."""
        for name in self.FIELDS:
            value = getattr(self, name)
            for t in value if isinstance(value, tuple) else (value,):
                if t is not None:
                    yield name, t


class DecodeCache:
    """The decoding state of a whole model (nanochat's KVCache, for a recurrent model): one LayerCache per
    block and one position, the number of tokens seen. BLaLM.forward(idx, cache=cache) reads and advances it."""

    def __init__(self, n_layer):
        self.pos = 0
        self.layers = [LayerCache() for _ in range(n_layer)]

    def tensors(self):
        """(layer index, field, tensor) for every tensor the cache holds."""
        return [(l, name, t) for l, layer in enumerate(self.layers) for name, t in layer.tensors()]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for _, _, t in self.tensors())


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


class StaticCache(DecodeCache):
    """A DecodeCache's state in tensors allocated once and updated in place, so that a decode step
    (BLaLM.decode_step) has fixed shapes and memory addresses and can be captured as a CUDA graph: the mLSTM
    state (C, n, m) in float32, the conv tail (B, K-1, 3C), the Hedgehog state (S, z), and keys/values in ring
    buffers (B, NH, S, D) -- S = window for the SWA branch (the last `window` rotary keys), S = max_len for
    "attn" (a static KV cache; max_len positions at most). pos: the position of the next token, a 0-dim int64
    tensor on the device, the same for every row (prompts are left-aligned and advance together).

    Built from a DecodeCache that has read the prompts (forward, in the chunkwise form): its fixed-size states
    are copied, its keys and values written to the slots of their positions. An mLSTM layer's stacked input
    weights are copied too, once (LayerCache.in_weights: constants, not state). tensors() and nbytes() are
    DecodeCache's: the state."""

    def __init__(self, model, cache, max_len):
        if cache.pos < 1 or max_len < cache.pos:
            raise ValueError(f"StaticCache needs a cache that has read 1..max_len={max_len} tokens, "
                             f"got one that has read {cache.pos}")
        device = model.lm_head.weight.device
        slots = model.config.swa_window if model.config.mixer == "mlstm" else max_len
        self.max_len = max_len
        self.pos = torch.tensor(cache.pos, device=device)
        self.layers = []
        # copies, contiguous: the fused decoding steps (mlstm_triton.py) update them in place
        copy = lambda t: t.clone(memory_format=torch.contiguous_format)
        for eager, block in zip(cache.layers, model.transformer.h, strict=True):
            layer = LayerCache(static=True)
            for name in ("mlstm", "conv", "state"):
                value = getattr(eager, name)
                if value is not None:
                    setattr(layer, name, tuple(map(copy, value)) if isinstance(value, tuple) else copy(value))
            if eager.k is not None:  # the keys of positions pos-n..pos-1 go to their slots
                B, NH, n, D = eager.k.shape
                slot = torch.arange(cache.pos - n, cache.pos, device=device) % slots
                layer.k = eager.k.new_zeros(B, NH, slots, D).index_copy_(2, slot, eager.k)
                layer.v = eager.v.new_zeros(B, NH, slots, D).index_copy_(2, slot, eager.v)
            # an mLSTM layer's input projections stacked once (MLSTMLayer.in_weights), not at every token: the
            # weights as they are now, for this cache's decoding
            if hasattr(block.mixer, "in_weights"):
                with torch.no_grad():
                    layer.in_weights = block.mixer.in_weights()
            self.layers.append(layer)


def kth_largest(x, k, chunk=1024):
    """x (B, V) -> (B, 1): the k-th largest value of each row. The k largest of a row are among the k largest of
    its chunks, so for a long row (V a multiple of chunk, k <= chunk) it takes the top k of each chunk, then the
    top k of those: one row of 16k split over 16 thread blocks instead of one (CUDA's top-k gives a row one block
    when there are few rows, 0.09 ms at batch 1 on an H100). Ties count once per element, as in torch.topk."""
    B, V = x.shape
    if V > chunk and V % chunk == 0 and k <= chunk:
        x = torch.topk(x.reshape(B, V // chunk, chunk), k, dim=-1, sorted=False).values.flatten(1)
    return torch.topk(x, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)


def sample_next(logits, temperature=1.0, top_k=None):
    """logits (B, V) -> token ids (B,): the argmax for temperature 0, else a draw from softmax(logits / temperature)
    over the top_k largest logits (all for None or top_k >= V).

    The draw is argmax_j p_j / E_j with E_j ~ Exp(1) independent: the exponential race, which token j wins with
    probability p_j. torch.multinomial computes the same for one sample but first checks the probabilities on
    the host (a device sync); written out, sampling runs inside a CUDA graph (CUDA's exponential never gives 0;
    on the CPU the chance is about 2^-53 per draw, as for torch.multinomial)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.to(acc_dtype(logits.dtype)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        logits = logits.masked_fill(logits < kth_largest(logits, top_k), float("-inf"))
    p = F.softmax(logits, dim=-1)
    return (p / torch.empty_like(p).exponential_()).argmax(dim=-1)


def cuda_graph(step, warmup=2):
    """Run step() `warmup` times on a side stream (first calls pick kernels and allocate workspaces, which a
    capture must not see), then capture one call as a CUDA graph -> its replay: the same kernels on the same
    memory in one launch, inputs read from where they lie when replayed. The warm-up calls are real calls (a
    decode step decodes a token; its position tensor advances), capturing runs nothing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
