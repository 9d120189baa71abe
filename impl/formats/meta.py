"""Meta's release format: params.json + consolidated.NN.pth (+ tokenizer.model), read and written.

The tensors already carry Meta's names and q/k order (the internal layout of impl.layout); reading only
joins model-parallel shards and maps params.json to a ModelConfig (impl.config.from_meta_params).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from impl.config import ModelConfig, ffn_hidden_dim, from_meta_params
from impl.errors import AssetError, ConfigError, ShapeError
from impl.formats import cast, one_line, read_json
from impl.layout import Checkpoint, Weights, cut_layers, keeps_layer, validate

# Meta's model-parallel split (fairscale): Column-parallel layers are cut along dim 0, Row-parallel
# layers and the parallel embedding along dim 1; norms are replicated in every shard.
_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def meta_folder(folder: Path) -> Path:
    """Where Meta's files are: a Hub repository keeps them under original/."""
    if not (folder / "params.json").is_file() and (folder / "original" / "params.json").is_file():
        return folder / "original"
    return folder


def load_meta(folder: str | Path, dtype: torch.dtype | None = None, n_layers: int | None = None) -> Checkpoint:
    """Meta's release: params.json + consolidated.NN.pth (+ tokenizer.model); memory-mapped, no copy when dtype
    is None."""
    folder = meta_folder(Path(folder))
    params = read_json(folder / "params.json")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise AssetError(f"{folder / 'consolidated.00.pth'}: file not found")
    loaded = []
    for path in shards:
        try:
            loaded.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # truncated zip, pickle error, ...: all mean a bad file
            raise AssetError(f"{path}: not a readable PyTorch checkpoint ({one_line(e)})") from None
    if "tok_embeddings.weight" not in loaded[0]:
        raise ShapeError("checkpoint: tensor tok_embeddings.weight is missing")
    config = from_meta_params(params, vocab_size=loaded[0]["tok_embeddings.weight"].shape[0])
    config = config.replace(tie_embeddings="output.weight" not in loaded[0])
    config = cut_layers(config, n_layers)
    weights = {}
    for name in loaded[0]:
        if name == "rope.freqs" or not keeps_layer(name, n_layers):  # rope.freqs: a buffer in Llama 2 checkpoints
            continue
        parts = [shard[name] for shard in loaded]
        if len(parts) == 1:
            t = parts[0]
        else:
            kind = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
            t = torch.cat(parts, dim=_SHARD_DIM[kind]) if kind in _SHARD_DIM else parts[0]
        weights[name] = cast(t, dtype, name)
    validate(weights, config)
    tokenizer = folder / "tokenizer.model"
    return Checkpoint(config, weights, tokenizer if tokenizer.is_file() else None, f"meta {folder}")


def meta_params(config: ModelConfig) -> dict:
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


def save_meta(folder: str | Path, weights: Weights, config: ModelConfig,
              tokenizer_path: str | Path | None = None) -> Path:
    """Write consolidated.00.pth + params.json (+ tokenizer.model): Meta's one-shard layout."""
    validate(weights, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = meta_params(config)
    torch.save({k: t.contiguous() for k, t in weights.items()}, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    return folder
