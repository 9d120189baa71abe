"""What the hot-path benchmarks run: shapes, layers with random weights, and every competing implementation.

One layer of Llama-3-8B or SmolLM2-135M with random weights (std 0.02, never a checkpoint), an input of
`seq` new tokens after `past` cached ones, and for each implementation a zero-argument callable that
returns the block's output (seq, dim): the attention block, the FFN, or the whole decoder layer. The roofs
they are measured against are the machine's (benchmarks/roofs.py), not per-block `torch.mm` runs.
Whole models (the `forward` and `generate` groups) are in benchmarks/models.py.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import walkthrough
from impl import model
from impl.config import PRESETS, ModelConfig
from impl.layout import DTYPES, interleaved_to_rotate_half, permute_qk

MODELS = ("llama-3-8b", "smollm2-135m")
# impl's fast path on prepare_for_generation's weights (`impl-generate`: what `impl generate` holds, packed where
# that is faster here; the targets' "hot" variant), on fused plain weights (`impl-fused`: a checking process's
# layout, which the reference forward also reads) and on plain ones (`impl`), beside transformers' modules.
IMPLEMENTATIONS = {
    "attention": ("impl-generate", "impl-fused", "impl", "walkthrough", "hf-eager", "hf-sdpa"),
    "ffn": ("impl-generate", "impl-fused", "impl", "walkthrough", "hf"),
    "layer": ("impl-generate", "impl-fused", "hf-eager", "hf-sdpa"),
}
REFERENCE = {"attention": "hf-eager", "ffn": "hf", "layer": "hf-eager"}  # what every implementation is checked against
# Relative error ||out - ref|| / ||ref|| allowed against the transformers result in the same dtype.
# bf16 rounds every matmul output to 8 bits of mantissa (2^-8 = 0.4%), in a different order per implementation.
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


@dataclass(frozen=True)
class Shape:
    model: str
    seq: int  # new tokens
    past: int = 0  # cached positions before them (the decode step)

    @property
    def label(self) -> str:
        return f"decode-{self.past}" if self.past else f"prefill-{self.seq}"

    @property
    def config(self) -> ModelConfig:
        return PRESETS[self.model].replace(n_layers=1)

    @property
    def kv_len(self) -> int:
        return self.past + self.seq


SHAPES = tuple(Shape(m, s, p) for m in MODELS for s, p in ((17, 0), (128, 0), (512, 0), (1, 512)))


# ------------------------------------------------------------------------------------------- work and bytes
def flops(op: str, shape: Shape) -> int:
    """Useful FLOPs (2 per multiply-add): the projections, and attention over the causal pairs only."""
    c, s = shape.config, shape.seq
    if op == "layer":
        return flops("attention", shape) + flops("ffn", shape)
    if op == "ffn":
        return 2 * s * c.dim * c.hidden_dim * 3
    projections = 2 * s * c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)  # q, k, v, o
    pairs = sum(shape.past + i + 1 for i in range(s))  # (query, key) pairs the causal mask keeps
    return projections + 4 * c.n_heads * c.head_dim * pairs  # q.k and p@v


def weight_count(op: str, config: ModelConfig) -> int:
    if op == "layer":
        return weight_count("attention", config) + weight_count("ffn", config) + 2 * config.dim
    if op == "ffn":
        return 3 * config.dim * config.hidden_dim
    return config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)


def bytes_moved(op: str, shape: Shape, dtype: torch.dtype) -> int:
    """The least memory traffic: every weight once, the input and output once, the cached keys and values once."""
    c, size = shape.config, dtype.itemsize
    cached = 2 * shape.past * c.n_kv_heads * c.head_dim if op in ("attention", "layer") else 0
    return size * (weight_count(op, c) + 2 * shape.seq * c.dim + cached)


def products(op: str, config: ModelConfig) -> list[tuple[int, int]]:
    """The block's weight products as impl's fast path runs them (wq|wk|wv and w1|w3 stacked): (out, in) each."""
    c = config
    attention = [((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim), (c.dim, c.n_heads * c.head_dim)]
    ffn = [(2 * c.hidden_dim, c.dim), (c.dim, c.hidden_dim)]
    return {"attention": attention, "ffn": ffn, "layer": attention + ffn}[op]


def _fastest(seconds: dict[str, float | None]) -> tuple[float, str]:
    """(seconds, name) of the fastest correct one of a timing row (None: wrong or unavailable)."""
    return min((t, n) for n, t in seconds.items() if t is not None)


@functools.cache
def engine_bound_seconds(op: str, shape: Shape, dtype_name: str, repeats: int = 5) -> dict[str, float | str]:
    """What the machine's best engines need for this block's own weight products and attention core alone (no
    norms, RoPE, SiLU or residuals): per product the fastest correct engine impl may hold (no second copy; plain
    or packed), timed between torch's parallel ops as in the forward (impl.engines.in_the_forward), plus the
    fastest correct attention core on the block's heads, queries and cached keys (impl.engines.time_cores),
    summed. A lower bound on the block's time with today's engines: where even it misses a roof target, the
    target is beyond the machine's best engines for this block's shapes (small matrices, one-row products and a
    few small heads' attention pay per-call costs a large GEMM does not). {"seconds", "engines": the fastest
    engine of each product, then "core <name>"}."""
    from impl import engines

    g = torch.Generator().manual_seed(2)
    dtype = DTYPES[dtype_name]
    x = torch.randn(shape.seq, shape.config.dim, generator=g).to(dtype)
    between = engines.torch_parallel_op()
    total, names = 0.0, []
    with torch.inference_mode():
        for out_features, in_features in products(op, shape.config):
            w = (torch.randn(out_features, in_features, generator=g) * 0.02).to(dtype)
            xi = x if in_features == x.shape[1] else torch.randn(shape.seq, in_features, generator=g).to(dtype)
            prepared = {n: pw for n, pw in engines.prepare_all(w, dtype_name).items()
                        if not engines.ENGINES[n].second_copy}
            seconds = engines.time_products(xi, w, prepared, dtype_name,
                                            lambda fn: engines.in_the_forward(fn, between, repeats))
            t, name = _fastest(seconds)
            total += t
            names.append(name)
    if op in ("attention", "layer"):  # and its attention core, at the fastest correct one on this block's heads
        c = shape.config
        cores = engines.time_cores((c.n_heads, c.n_kv_heads, c.head_dim), shape.seq, shape.past + shape.seq,
                                   dtype_name, repeats, g)
        t, name = _fastest(cores)
        total += t
        names.append(f"core {name}")
    return {"seconds": total, "engines": ",".join(names)}


# ------------------------------------------------------------------------------------------- the layer
def _normal(shape: tuple[int, ...], generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


@functools.cache
def layer_weights(model_name: str, dtype_name: str) -> dict[str, torch.Tensor]:
    """One layer's matrices in impl's layout (Meta names, `layers.0.` prefix). Cached: 0.9 GB for 8B in fp32."""
    if dtype_name != "fp32":
        return {k: v.to(DTYPES[dtype_name]) for k, v in layer_weights(model_name, "fp32").items()}
    c, g = PRESETS[model_name], torch.Generator().manual_seed(0)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"attention.wq.weight": (q, c.dim), "attention.wk.weight": (kv, c.dim),
              "attention.wv.weight": (kv, c.dim), "attention.wo.weight": (c.dim, q),
              "feed_forward.w1.weight": (c.hidden_dim, c.dim), "feed_forward.w2.weight": (c.dim, c.hidden_dim),
              "feed_forward.w3.weight": (c.hidden_dim, c.dim)}
    w = {f"layers.0.{name}": _normal(s, g) for name, s in shapes.items()}
    for norm in ("attention_norm", "ffn_norm"):  # the whole-layer group's: near 1, as trained norms are
        w[f"layers.0.{norm}.weight"] = 1 + _normal((c.dim,), g, 0.1)
    return w


@dataclass
class Inputs:
    x: torch.Tensor  # (seq, dim): the normed input of the block
    past_k: torch.Tensor  # (past, kv_heads, d): cached keys after RoPE, Meta's interleaved layout
    past_v: torch.Tensor  # (past, kv_heads, d)


@functools.cache
def inputs(shape: Shape, dtype_name: str) -> Inputs:
    c, g = shape.config, torch.Generator().manual_seed(1)
    dtype = DTYPES[dtype_name]
    x = torch.randn((shape.seq, c.dim), generator=g).to(dtype)
    kv = (shape.past, c.n_kv_heads, c.head_dim)
    return Inputs(x, torch.randn(kv, generator=g).to(dtype), torch.randn(kv, generator=g).to(dtype))


def _unprefixed(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("layers.0."): v for k, v in w.items()}


# ------------------------------------------------------------------------------------------- implementations
@functools.cache
def fused_weights(model_name: str, dtype_name: str) -> dict[str, torch.Tensor]:
    """impl's prepared weights (wq|wk|wv and w1|w3 stacked), as a program would make them once after loading."""
    return model.fuse_weights(layer_weights(model_name, dtype_name), PRESETS[model_name].replace(n_layers=1))


@functools.cache
def generation_weights(model_name: str, dtype_name: str) -> dict[str, torch.Tensor]:
    """impl's weights as `impl generate` holds them (prepare_for_generation: fused, packed where faster here)."""
    return model.prepare_for_generation(dict(layer_weights(model_name, dtype_name)),
                                        PRESETS[model_name].replace(n_layers=1))


def _impl(op: str, shape: Shape, dtype_name: str, prepared: str = "plain") -> Callable[[], torch.Tensor]:
    """impl's fast forward, one block of it: its engines chosen from the weights once, as forward_fast does."""
    c, inp = shape.config, inputs(shape, dtype_name)
    w = {"plain": layer_weights, "fused": fused_weights, "generate": generation_weights}[prepared](
        shape.model, dtype_name)
    engines = model.choose_engines(w, c, shape.seq)  # stacked or not, and the GEMM engine measured fastest here
    if op == "ffn":
        return lambda: engines.feed_forward(inp.x, w, 0, engines.matmul)
    freqs_cis = model.precompute_freqs_cis(c, shape.seq, shape.past)
    cache = None
    if shape.past:
        cache = model.KVCache.empty(c, shape.kv_len, DTYPES[dtype_name])
        cache.update(0, 0, inp.past_k, inp.past_v)
    if op == "layer":
        return lambda: model.transformer_block_fast(inp.x, w, 0, c, freqs_cis, shape.past, cache, engines)
    return lambda: model.attention_fast(inp.x, w, 0, c, freqs_cis, shape.past, cache, engines)


def _walkthrough(op: str, shape: Shape, dtype_name: str) -> Callable[[], torch.Tensor]:
    c, w, inp = shape.config, _unprefixed(layer_weights(shape.model, dtype_name)), inputs(shape, dtype_name)
    if op == "ffn":
        return lambda: walkthrough.feed_forward(inp.x, w)
    freqs_cis = model.precompute_freqs_cis(c, shape.seq, shape.past)
    past = (inp.past_k.transpose(0, 1), inp.past_v.transpose(0, 1)) if shape.past else None  # (kv, past, d)
    return lambda: walkthrough.attention(inp.x, w, c, freqs_cis, past)


def hf_config(config: ModelConfig, attn_implementation: str = "eager"):
    from transformers import LlamaConfig

    from impl.config import to_hf_config

    hf = LlamaConfig(**to_hf_config(config, bos_id=0, eos_id=0))
    hf._attn_implementation = attn_implementation
    return hf


class _StaticKV:
    """The smallest cache transformers' attention accepts: preallocated, written in place (like StaticCache)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, past: int):
        self.k, self.v, self.past = k, v, past  # (1, kv_heads, past + seq, d)

    def update(self, key, value, layer_idx, **kwargs):
        self.k[:, :, self.past:self.past + key.shape[2]] = key
        self.v[:, :, self.past:self.past + value.shape[2]] = value
        return self.k, self.v


def hf_layer_state_dict(w: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer's weights (unprefixed Meta names) under LlamaDecoderLayer's names, q/k in its rotate-half order."""
    return {"self_attn.q_proj.weight": permute_qk(w["attention.wq.weight"], config.n_heads),
            "self_attn.k_proj.weight": permute_qk(w["attention.wk.weight"], config.n_kv_heads),
            "self_attn.v_proj.weight": w["attention.wv.weight"], "self_attn.o_proj.weight": w["attention.wo.weight"],
            "mlp.gate_proj.weight": w["feed_forward.w1.weight"], "mlp.up_proj.weight": w["feed_forward.w3.weight"],
            "mlp.down_proj.weight": w["feed_forward.w2.weight"],
            "input_layernorm.weight": w["attention_norm.weight"],
            "post_attention_layernorm.weight": w["ffn_norm.weight"]}


def _hf(op: str, shape: Shape, dtype_name: str, attn: str = "eager") -> Callable[[], torch.Tensor]:
    from transformers.models.llama.modeling_llama import (
        LlamaAttention,
        LlamaDecoderLayer,
        LlamaMLP,
        LlamaRotaryEmbedding,
    )

    c, w, inp = shape.config, _unprefixed(layer_weights(shape.model, dtype_name)), inputs(shape, dtype_name)
    hf_cfg = hf_config(c, attn)
    x = inp.x[None]  # (1, seq, dim)
    if op == "ffn":
        with torch.device("meta"):
            mlp = LlamaMLP(hf_cfg)
        mlp.load_state_dict({"gate_proj.weight": w["feed_forward.w1.weight"],
                             "up_proj.weight": w["feed_forward.w3.weight"],
                             "down_proj.weight": w["feed_forward.w2.weight"]}, assign=True)
        mlp.requires_grad_(False)
        return lambda: mlp(x)[0]
    sd = hf_layer_state_dict(w, c)
    with torch.device("meta"):
        module = LlamaDecoderLayer(hf_cfg, layer_idx=0) if op == "layer" else LlamaAttention(hf_cfg, layer_idx=0)
    if op != "layer":
        sd = {k.removeprefix("self_attn."): v for k, v in sd.items() if k.startswith("self_attn.")}
    module.load_state_dict(sd, assign=True)
    module.requires_grad_(False)
    positions = torch.arange(shape.past, shape.kv_len)[None]
    cos_sin = LlamaRotaryEmbedding(hf_cfg)(x, positions)
    mask = None  # sdpa: is_causal for a prompt, nothing to mask for one query (what LlamaModel passes)
    if attn == "eager" and shape.seq > 1:
        mask = torch.full((shape.seq, shape.kv_len), torch.finfo(x.dtype).min, dtype=x.dtype)
        mask = mask.triu(shape.past + 1)[None, None]  # (1, 1, seq, kv_len)
    cache = None
    if shape.past:
        d = c.head_dim
        past_k = interleaved_to_rotate_half(inp.past_k)  # cached keys in transformers' layout, per head
        k = torch.zeros(1, c.n_kv_heads, shape.kv_len, d, dtype=x.dtype)
        v = torch.zeros_like(k)
        k[0, :, :shape.past], v[0, :, :shape.past] = past_k.transpose(0, 1), inp.past_v.transpose(0, 1)
        cache = _StaticKV(k, v, shape.past)
    # transformers >= 5.2x names the argument `cache`; earlier 5.x (the newest on Python 3.10) `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"
    if op == "layer":  # LlamaDecoderLayer returns the hidden states (a tuple in some 4.x/5.x versions)
        def run_layer() -> torch.Tensor:
            out = module(x, position_embeddings=cos_sin, attention_mask=mask, **{cache_kw: cache})
            return (out[0] if isinstance(out, tuple) else out)[0]

        return run_layer
    return lambda: module(x, position_embeddings=cos_sin, attention_mask=mask, **{cache_kw: cache})[0][0]


def implementation(op: str, name: str, shape: Shape, dtype_name: str) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running `name` on this shape and dtype, ready to time (set-up already done)."""
    build = {
        "impl": _impl,
        "impl-fused": functools.partial(_impl, prepared="fused"),
        "impl-generate": functools.partial(_impl, prepared="generate"),
        "walkthrough": _walkthrough,
        "hf": _hf,
        "hf-eager": functools.partial(_hf, attn="eager"),
        "hf-sdpa": functools.partial(_hf, attn="sdpa"),
    }[name]
    fn = build(op, shape, dtype_name)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return fn()

    return call


@functools.cache
def reference(op: str, shape: Shape, dtype_name: str) -> torch.Tensor:
    """transformers' output for this block, shape and dtype: what every implementation must match."""
    return implementation(op, REFERENCE[op], shape, dtype_name)()


def release() -> None:
    """Let go of every cached weight, input and reference output (rebuilt when asked again): before a whole
    model needs the room (benchmarks.models.held)."""
    for cached in (layer_weights, fused_weights, generation_weights, inputs, reference):
        cached.cache_clear()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (NMSE's square root, as llama.cpp compares matmul-like ops)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def estimated_seconds(op: str, shape: Shape, dtype_name: str) -> float:
    """A pessimistic guess (40 GFLOP/s, 5 GB/s) to pick single-shot rounds for the slow cases."""
    return flops(op, shape) / 40e9 + bytes_moved(op, shape, DTYPES[dtype_name]) / 5e9


def is_heavy(op: str, shape: Shape) -> bool:
    """8B shapes: 0.9 GB of fp32 weights per layer, up to 180 GFLOP per call. Marked slow."""
    return shape.model == "llama-3-8b"


assert math.isclose(flops("ffn", Shape("llama-3-8b", 512)) / 1e9, 180.4, rel_tol=1e-3)
