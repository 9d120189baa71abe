"""The one internal weight layout: Meta's names and q/k order, and how the other formats map onto it.

Every reader in `impl.formats` returns `Weights` under Meta's names (llama/model.py): `tok_embeddings.weight`,
`layers.{i}.attention.wq.weight`, ..., `norm.weight`, `output.weight` (absent when the embeddings are tied).
q and k rows are in Meta's order, where the two numbers RoPE rotates together sit side by side
(interleaved pairs, as complex-number RoPE expects).

The two other formats reorder the q/k rows, and the conversions here are the exact index permutations
the reference converters apply, so round trips are bit-exact:

- Hugging Face: transformers' `convert_llama_weights_to_hf.py` applies `permute` (here: `permute_qk`),
  which moves each head's pairs into rotate-half order (first halves, then second halves).
  Loading applies the inverse, `unpermute_qk`.
- GGUF: llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) applies the inverse of HF's permute
  to HF weights, because ggml's default ("normal", not NEOX) RoPE rotates adjacent pairs. So GGUF q/k
  rows are in Meta's order already and need no permutation. (transformers' GGUF loader,
  `LlamaTensorProcessor._reverse_permute_weights`, permutes them back into HF's order.)

The same per-head reordering applies to activations (q, k and their RoPE'd forms, one head on the last
axis): the golden recorder reads transformers' rotate-half activations back into Meta's order with it.

Also here, because every reader and every caller needs them: `Checkpoint` (what a reader returns), the
one layer filter (`keeps_layer`, for loading the first n layers) and the one dtype-name map (`DTYPES`:
"fp32"/"bf16" on command lines and in goldens). This module imports neither impl.model nor impl.weights
nor impl.formats: they all import it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from impl.config import ModelConfig
from impl.errors import ConfigError, ShapeError

Weights = Mapping[str, torch.Tensor]  # Meta names -> tensors, q/k rows in Meta's interleaved order

# The dtypes a golden, a benchmark or a command line names: "fp32" | "bf16".
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Checkpoint:
    """What every reader in impl.formats returns (here, below the readers, so that they need not import
    impl.weights, which imports them)."""

    config: ModelConfig
    weights: Weights  # Meta names and layout
    tokenizer: str | Path | None  # what to pass to impl.tokenizer.load_tokenizer (an asset name or a path)
    source: str  # one line for reports: "gguf /path/model.gguf", "random tiny"


# ----------------------------------------------------------------------------- names and shapes

# Meta name templates -> Hugging Face / GGUF names; `{i}` is the layer number.
_LAYER_KEYS = ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}
GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
}


def name_map(templates: Mapping[str, str], n_layers: int) -> dict[str, str]:
    """Meta name -> the format's name, for every tensor of an n_layers model (templates: HF_NAMES, GGUF_NAMES)."""
    out = {}
    for meta, other in templates.items():
        if "{i}" in meta:
            out.update({meta.format(i=i): other.format(i=i) for i in range(n_layers)})
        else:
            out[meta] = other
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies, in a fixed order (the order random_weights draws in)."""
    c, hd = config, config.head_dim
    per_layer = {
        "attention_norm": (c.dim,),
        "attention.wq": (c.n_heads * hd, c.dim),
        "attention.wk": (c.n_kv_heads * hd, c.dim),
        "attention.wv": (c.n_kv_heads * hd, c.dim),
        "attention.wo": (c.dim, c.n_heads * hd),
        "ffn_norm": (c.dim,),
        "feed_forward.w1": (c.hidden_dim, c.dim),
        "feed_forward.w2": (c.dim, c.hidden_dim),
        "feed_forward.w3": (c.hidden_dim, c.dim),
    }
    shapes = {"tok_embeddings.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        shapes.update({f"layers.{i}.{k}.weight": per_layer[k] for k in _LAYER_KEYS})
    shapes["norm.weight"] = (c.dim,)
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    return shapes


def validate(weights: Weights, config: ModelConfig) -> None:
    """Raise ShapeError naming the first tensor that is missing, unexpected or of the wrong shape."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in weights:
            raise ShapeError(f"checkpoint: tensor {name} is missing (expected shape {shape})")
        actual = tuple(weights[name].shape)
        if actual != shape:
            raise ShapeError(f"checkpoint: tensor {name} has shape {actual}, the config implies {shape}")
        if not weights[name].is_floating_point():
            raise ShapeError(f"checkpoint: tensor {name} has dtype {weights[name].dtype}, expected floating point")
    extra = sorted(set(weights) - set(expected))
    if extra:
        why = " (the config ties the embeddings)" if extra == ["output.weight"] else ""
        raise ShapeError(f"checkpoint: unexpected tensor {extra[0]}{why} ({len(extra)} unexpected in all)")


# ----------------------------------------------------------------------------- the layer filter

# Where each format's tensor names carry the layer number: `layers.3.`, `model.layers.3.`, `blk.3.`.
_LAYER_RE = {
    "meta": re.compile(r"^layers\.(\d+)\."),
    "hf": re.compile(r"^model\.layers\.(\d+)\."),
    "gguf": re.compile(r"^blk\.(\d+)\."),
}


def layer_of(name: str, fmt: str = "meta") -> int | None:
    """The layer a tensor name (in format `fmt`: meta, hf or gguf) belongs to; None for the embedding, final norm
    and output."""
    m = _LAYER_RE[fmt].match(name)
    return int(m.group(1)) if m else None


def keeps_layer(name: str, n_layers: int | None, fmt: str = "meta") -> bool:
    """Whether loading the first n_layers layers keeps this tensor (n_layers None keeps every one)."""
    layer = layer_of(name, fmt)
    return n_layers is None or layer is None or layer < n_layers


def cut_layers(config: ModelConfig, n_layers: int | None) -> ModelConfig:
    """The config of the model's first n_layers layers (None: the whole model)."""
    if n_layers is None:
        return config
    if not 0 < n_layers <= config.n_layers:
        raise ConfigError(f"n_layers must be between 1 and {config.n_layers}, got {n_layers}")
    return config.replace(n_layers=n_layers)


# ----------------------------------------------------------------------------- the q/k permutation

def rotate_half_positions(head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """For each Meta position, the position of the same number in rotate-half order: (d,) int64.

    RoPE's partners are (2j, 2j + 1) in Meta's interleaved order and (j, j + d/2) in rotate-half order,
    so Meta's 2j + p sits at j + p * d/2: [0, d/2, 1, d/2 + 1, ...]. Its inverse is argsort.
    """
    return torch.arange(head_dim, device=device).view(2, head_dim // 2).T.reshape(head_dim)


def rotate_half_to_interleaved(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """HF -> Meta order along `dim`, which holds one head: (..., d, ...) -> same shape."""
    return x.index_select(dim, rotate_half_positions(x.shape[dim], x.device))


def interleaved_to_rotate_half(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Meta -> HF order along `dim`, which holds one head: the inverse of rotate_half_to_interleaved."""
    return x.index_select(dim, torch.argsort(rotate_half_positions(x.shape[dim], x.device)))


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF rows: transformers' convert_llama_weights_to_hf.py `permute` (interleaved -> rotate-half).
    w: (n_heads * d, cols) -> same shape."""
    rows, cols = w.shape
    return interleaved_to_rotate_half(w.view(n_heads, rows // n_heads, cols), dim=1).reshape(rows, cols)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta rows: the inverse of permute_qk (and the same map as llama.cpp's LlamaModel.permute).
    w: (n_heads * d, cols) -> same shape."""
    rows, cols = w.shape
    return rotate_half_to_interleaved(w.view(n_heads, rows // n_heads, cols), dim=1).reshape(rows, cols)
