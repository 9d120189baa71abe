"""One module per checkpoint format, each reading and writing it: `meta` (.pth), `hf` (safetensors), `gguf`.

Every reader returns an `impl.layout.Checkpoint` in the one internal layout of `impl.layout`; every writer
takes that layout and writes what the format's own tools (Meta's reference, transformers, llama.cpp) read.
`impl.weights.load_path` picks the reader. The few file helpers the readers share live here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from impl.errors import AssetError, ShapeError


def cast(t: torch.Tensor, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """t in dtype; None keeps the stored dtype. .to() with the same dtype returns t itself: no copy.

    The dtype is checked before the cast: an int or bool tensor cast to float would pass `validate`.
    """
    if not t.is_floating_point():
        raise ShapeError(f"checkpoint: tensor {name} has dtype {t.dtype}, expected floating point")
    return t if dtype is None else t.to(dtype)


def one_line(e: BaseException) -> str:
    """The exception's first line, first sentence: torch's zip errors run on for a paragraph."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_json(path: Path) -> dict:
    """A JSON file, or AssetError naming it."""
    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise AssetError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise AssetError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
