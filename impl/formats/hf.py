"""Hugging Face's format: a transformers LlamaForCausalLM folder (config.json + safetensors), read and written.

Names map through impl.layout.HF_NAMES, and q/k rows are permuted into and out of transformers' rotate-half
order exactly as its `convert_llama_weights_to_hf.py` does (impl.layout.permute_qk / unpermute_qk).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from impl.config import ModelConfig, from_hf_config, to_hf_config
from impl.errors import AssetError, ShapeError
from impl.formats import cast, one_line, read_json
from impl.layout import (
    HF_NAMES,
    Checkpoint,
    Weights,
    cut_layers,
    keeps_layer,
    name_map,
    permute_qk,
    unpermute_qk,
    validate,
)


def to_hf_state_dict(weights: Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Meta names/layout -> transformers LlamaForCausalLM state dict (q/k rows permuted)."""
    names = name_map(HF_NAMES, config.n_layers)
    sd = {}
    for name, t in weights.items():
        if name.endswith("attention.wq.weight"):
            t = permute_qk(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_qk(t, config.n_kv_heads)
        sd[names[name]] = t.contiguous()
    return sd


def from_hf_state_dict(sd: Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers LlamaForCausalLM state dict -> Meta names/layout. A tied lm_head is dropped."""
    names = {hf: meta for meta, hf in name_map(HF_NAMES, config.n_layers).items()}
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


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise AssetError(f"{index}: no weight_map")
        for f in weight_map.values():  # shards are plain file names beside the index
            if not isinstance(f, str) or f in ("", ".", "..") or "\\" in f or Path(f).name != f:
                raise AssetError(f"{index}: weight_map names {f!r}, which is not a file in the model folder")
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
            raise AssetError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def load_hf(folder: str | Path, dtype: torch.dtype | None = None, n_layers: int | None = None) -> Checkpoint:
    """A transformers LlamaForCausalLM folder: config.json + model.safetensors (or a sharded index)."""
    folder = Path(folder)
    config = from_hf_config(read_json(folder / "config.json"))
    config = cut_layers(config, n_layers)
    sd = {name: cast(t, dtype, name) for name, t in _safetensors_tensors(_safetensors_files(folder))
          if keeps_layer(name, n_layers, "hf")}
    weights = from_hf_state_dict(sd, config)
    validate(weights, config)
    tokenizer = next((p for p in (folder / "tokenizer.json", folder / "original" / "tokenizer.model") if p.is_file()),
                     None)
    return Checkpoint(config, weights, tokenizer, f"hf {folder}")


def save_hf(folder: str | Path, weights: Weights, config: ModelConfig) -> Path:
    """Write config.json + model.safetensors that transformers' LlamaForCausalLM.from_pretrained reads."""
    from safetensors.torch import save_file

    validate(weights, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(weights, config), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(to_hf_config(config), indent=2) + "\n")
    return folder
