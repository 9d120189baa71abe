"""The golden folder: `manifest.json` + `activations.safetensors`, written atomically, verified on load.

A golden is what the reference (transformers) computed for one model, one prompt and one dtype:
every stage of `impl.stages`, keyed `embeddings`, `layers.3.q_rope`, ... . The tensors live in
safetensors (never pickle); the manifest says what they are (model identity, dtype, attention
implementation, prompt and tokens, the stage list with shapes and dtypes, the layout
conventions), which software and CPU produced them, and the sha256 of the tensor file.

Loading verifies everything it can and refuses with one `GoldenError` whose message is one line
naming the file and the problem. Writing is deterministic (sorted keys, no timestamps), so the
same recording gives byte-identical files, and atomic (a temp folder next to the target, then a
rename), so a crash never leaves a half-written golden under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from impl import stages
from impl.config import ModelConfig
from impl.errors import Llama3GoldenError
from impl.layout import DTYPES  # a golden's dtype names: "fp32" | "bf16"

FORMAT = "llama3-golden"
VERSION = 1
MANIFEST = "manifest.json"
ACTIVATIONS = "activations.safetensors"

# What the tensors' layout means; stored in every manifest so a reader needs no other document.
LAYOUT = {
    "qk": "meta-interleaved (HF rotate-half undone per head)",
    "batch": "none",
    "scores": "masked entries are -inf",
    "logits": "last position",
}

_REQUIRED = ("model", "dtype", "attn_implementation", "prompt", "tokens", "stages", "activations_sha256")
# CPU features that change which kernels (and so which rounding) torch picks.
_NUMERIC_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                  "amx_bf16", "amx_fp16", "amx_int8", "amx_tile", "asimd", "sve", "bf16")


class GoldenError(Llama3GoldenError):
    """A golden folder that is missing, unreadable, tampered, of another version or of another model."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling used in the manifest's stage list)."""
    return str(dtype).removeprefix("torch.")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Golden:
    """A loaded, verified golden. `tensors` is in forward order (the manifest's stage order)."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"]["config"])

    @property
    def dtype(self) -> str:
        """'fp32' or 'bf16'."""
        return self.manifest["dtype"]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tokens(self) -> list[int]:
        return list(self.manifest["tokens"])

    @property
    def keys(self) -> list[str]:
        return [s["name"] for s in self.manifest["stages"]]

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def weights_sha256(self) -> str:
        return self.manifest["model"]["weights_sha256"]


def environment() -> dict[str, Any]:
    """Versions of everything that can change the numbers, and the CPU they ran on."""
    import safetensors
    import tokenizers
    import transformers

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name":
                model = value.strip()
            elif name in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "cpu": model,
        "cpu_flags": sorted(flags & set(_NUMERIC_FLAGS)),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    # The metadata is constant, so equal tensors give equal bytes.
    data = {k: v.detach().contiguous() for k, v in tensors.items()}
    # One metadata entry: safetensors keeps metadata in a hash map, so several would come out in any order.
    return st_save(data, metadata={"format": f"{FORMAT} {VERSION}"})


_NUMBER_LIST = re.compile(r"\[\s*(-?\d[\d.eE+-]*(?:,\s*-?\d[\d.eE+-]*)*)\s*\]")


def _dumps(manifest: Mapping[str, Any]) -> str:
    """Indented JSON with sorted keys; lists of numbers (shapes, token ids) on one line."""
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False, ensure_ascii=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def write_golden(folder: str | os.PathLike, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a golden folder atomically; returns its path.

    `manifest` holds the identity fields (model, dtype, attn_implementation, prompt, tokens,
    derived, versions); this function adds format, version, layout, the stage list (from
    `tensors`, in its order) and the tensor file's sha256. An existing golden at `folder` is
    replaced; an existing folder that is not a golden is refused.
    """
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / MANIFEST).exists())):
        raise GoldenError(f"{folder}: exists and is not a golden folder; refusing to overwrite it")
    blob = _tensor_bytes(tensors)
    full = {
        **manifest,
        "format": FORMAT,
        "version": VERSION,
        "layout": LAYOUT,
        "stages": [{"name": k, "shape": list(v.shape), "dtype": dtype_name(v.dtype)} for k, v in tensors.items()],
        "activations_sha256": hashlib.sha256(blob).hexdigest(),
    }
    text = _dumps(full)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a golden is data to share
        (tmp / ACTIVATIONS).write_bytes(blob)
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.rename(folder, old / folder.name)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GoldenError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GoldenError(f"{path}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise GoldenError(f"{path}: not a golden manifest (a JSON object expected)")
    if manifest.get("format") != FORMAT:
        raise GoldenError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise GoldenError(f"{path}: format version {manifest.get('version')!r}, this reader reads version {VERSION}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise GoldenError(f"{path}: missing {', '.join(missing)}")
    if manifest["dtype"] not in DTYPES:
        raise GoldenError(f"{path}: dtype {manifest['dtype']!r} is not fp32 or bf16")
    return manifest


def load_golden(folder: str | os.PathLike) -> Golden:
    """Load and verify a golden folder, or raise GoldenError naming the file and the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GoldenError(f"{folder}: no such golden folder")
    for name in (MANIFEST, ACTIVATIONS):
        if not (folder / name).is_file():
            raise GoldenError(f"{folder / name}: missing")
    manifest = _read_manifest(folder)
    path = folder / ACTIVATIONS
    blob = path.read_bytes()
    actual = hashlib.sha256(blob).hexdigest()
    if actual != manifest["activations_sha256"]:
        raise GoldenError(f"{path}: sha256 {actual[:12]}... does not match the manifest's "
                          f"{str(manifest['activations_sha256'])[:12]}... (tampered or truncated)")
    try:
        stored = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise GoldenError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        config = ModelConfig.from_dict(manifest["model"]["config"])
    except (KeyError, TypeError, Llama3GoldenError) as e:
        raise GoldenError(f"{folder / MANIFEST}: model config unreadable ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    for entry in manifest["stages"]:
        name = entry["name"]
        try:
            expected = stages.expected_shape(name, config, len(manifest["tokens"]))
        except KeyError:
            raise GoldenError(f"{folder / MANIFEST}: unknown stage {name!r}") from None
        if list(entry["shape"]) != list(expected):
            raise GoldenError(f"{folder / MANIFEST}: stage {name} has shape {list(entry['shape'])}, "
                              f"the model config gives {list(expected)}")
        if name not in stored:
            raise GoldenError(f"{path}: stage {name} is listed in the manifest but not in the file")
        t = stored.pop(name)
        if list(t.shape) != list(entry["shape"]) or dtype_name(t.dtype) != entry["dtype"]:
            raise GoldenError(f"{path}: stage {name} is {dtype_name(t.dtype)} {list(t.shape)}, "
                              f"the manifest says {entry['dtype']} {list(entry['shape'])}")
        tensors[name] = t
    if stored:
        raise GoldenError(f"{path}: {len(stored)} tensors not listed in the manifest (e.g. {sorted(stored)[0]})")
    return Golden(folder, manifest, tensors)


def check_same_model(golden: Golden, config: ModelConfig, weights_sha256: str, name: str | None = None) -> None:
    """Refuse to check an implementation's model against a golden recorded for another model."""
    if golden.manifest["model"].get("config") == config.to_dict() and golden.weights_sha256 == weights_sha256:
        return
    other = name or "the model given"
    raise GoldenError(f"{golden.path}: golden was recorded for model {golden.model_name} "
                      f"(weights sha {golden.weights_sha256[:12]}), not {other} (weights sha {weights_sha256[:12]})")
