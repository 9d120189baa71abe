"""Model hyper-parameters: one frozen dataclass, presets in one dict, readers for the three formats.

Meta's `params.json` (llama/model.py `ModelArgs`), Hugging Face `config.json` (transformers 4.x
`rope_theta`/`rope_scaling` and transformers 5.x `rope_parameters`) and GGUF metadata all become
the same `ModelConfig`. Derived sizes are properties, so no caller hard-codes 128 or `n_heads // 4`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from impl.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (`use_scaled_rope` / `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # FFN width; see ffn_hidden_dim() for Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (the GQA group size)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule (llama/model.py FeedForward): 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _require(d: Mapping[str, Any], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}")


def from_meta_params(params: Mapping[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """Meta `params.json`. vocab_size may be -1 there (older releases): then pass it explicitly."""
    _require(params, ("dim", "n_layers", "n_heads"), "params.json")
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        vocab = vocab_size
    if vocab is None:
        raise ConfigError("params.json: vocab_size is missing and was not given")
    scaling = None
    if params.get("use_scaled_rope"):
        # Meta's reference hard-codes these four numbers in apply_scaling(); params.json may carry a factor.
        scaling = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
    return ModelConfig(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=vocab,
        hidden_dim=ffn_hidden_dim(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(params.get("max_seq_len", 8192)),
        tie_embeddings=False,
    )


def _scaling_from_hf(rope: Mapping[str, Any] | None) -> RopeScaling | None:
    if not rope:
        return None
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"config.json: rope_type {kind!r} is not supported (only 'default' and 'llama3')")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def from_hf_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """Hugging Face `config.json` for LlamaForCausalLM (transformers 4.x and 5.x spellings)."""
    _require(cfg, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
             "config.json")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ConfigError("config.json: head_dim * num_attention_heads != hidden_size is not supported")
    return ModelConfig(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=_scaling_from_hf(rope),
        max_seq_len=int(cfg.get("max_position_embeddings", 8192)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def to_hf_config(config: ModelConfig, bos_id: int = 128000, eos_id: int | list[int] = 128001) -> dict[str, Any]:
    """The config.json that transformers' LlamaForCausalLM reads (transformers 5 spelling, 4.x keys too)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, **dataclasses.asdict(config.rope_scaling)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if config.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


# Named presets (gpt-fast style). Real shapes for the Meta checkpoints; `tiny` models are
# Llama-3-shaped (real vocabulary, GQA 4:1, theta 500000) but small enough for CI.
PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                              hidden_dim=14336, norm_eps=1e-5, rope_theta=500000.0),
    "llama-3.1-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                hidden_dim=14336, norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=RopeScaling(), max_seq_len=131072),
    "llama-3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                hidden_dim=8192, norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=RopeScaling(factor=32.0), max_seq_len=131072, tie_embeddings=True),
    "smollm2-135m": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                hidden_dim=1536, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
                                tie_embeddings=True),
    "tiny": ModelConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, hidden_dim=384,
                        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=256),
    # Llama 3.1 scaling with a short original context (32), so that the scaling visibly changes
    # the angles on a 17-token prompt; with 8192 it would only touch frequencies too slow to matter there.
    "tiny-scaled": ModelConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, hidden_dim=384,
                               norm_eps=1e-5, rope_theta=500000.0, max_seq_len=256,
                               rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=32)),
}

assert PRESETS["llama-3-8b"].hidden_dim == ffn_hidden_dim(4096, 1024, 1.3) == 14336
assert math.isclose(PRESETS["llama-3-8b"].head_dim, 128)
