"""llama.cpp's format: one GGUF file (llama.* metadata + tensors, quantised or not), read and written.

Names map through impl.layout.GGUF_NAMES; q/k rows need no permutation, since llama.cpp's converter stores
them in Meta's interleaved order (see impl.layout). Quantised tensors are dequantised on reading.

Llama 3.1 RoPE scaling: llama.cpp stores it only as a tensor of per-frequency divisors, `rope_freqs.weight`.
Those divisors are derived here from the one scaling formula, impl.model.rope_frequencies (unscaled / scaled
frequency), and our writer adds the four numbers of the scaling under its own keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from impl.config import ModelConfig, RopeScaling
from impl.errors import AssetError, ConfigError, ShapeError
from impl.formats import cast, one_line
from impl.layout import GGUF_NAMES, Checkpoint, Weights, cut_layers, keeps_layer, name_map, validate
from impl.model import rope_frequencies

_GOLDEN_NS = "llama3_golden"  # our own GGUF keys: the Llama 3.1 rope numbers llama.cpp only stores as a tensor


def _f32(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. Take the shortest decimal that
    rounds to the same float32, which is what the converter was given."""
    return float(str(np.float32(x)))


def llama3_rope_factors(config: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors, as llama.cpp's convert_hf_to_gguf.py stores them in `rope_freqs.weight`:
    unscaled / scaled frequency. fp32, (d/2,). Equal to llama.cpp's own loop within 2 float32 ulps."""
    assert config.rope_scaling is not None
    return rope_frequencies(config.replace(rope_scaling=None)) / rope_frequencies(config)


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
    if not torch.allclose(llama3_rope_factors(config.replace(rope_scaling=scaling)), factors, rtol=1e-5, atol=0):
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
        raise AssetError(f"{path}: not a readable GGUF file ({one_line(e)})") from None
    config = cut_layers(_gguf_config(reader, path), n_layers)
    names = {gg: meta for meta, gg in name_map(GGUF_NAMES, config.n_layers).items()}
    weights = {}
    for t in reader.tensors:
        # rope_freqs is read into the config above; tensors of layers past config.n_layers are skipped.
        if t.name == "rope_freqs.weight" or not keeps_layer(t.name, config.n_layers, "gguf"):
            continue
        if t.name not in names:
            raise ShapeError(f"{path}: unexpected tensor {t.name}")
        weights[names[t.name]] = cast(_gguf_tensor(t), dtype, t.name)
    validate(weights, config)
    return Checkpoint(config, weights, path, f"gguf {path}")


def save_gguf(path: str | Path, weights: Weights, config: ModelConfig,
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
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(config).numpy())
    names = name_map(GGUF_NAMES, config.n_layers)
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


