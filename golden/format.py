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
import shlex
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
VERSION = 2  # 2: manifest_sha256, exactly every stage of the model, reserved decode/rows
MANIFEST = "manifest.json"
ACTIVATIONS = "activations.safetensors"

# What the tensors' layout means; stored in every manifest so a reader needs no other document.
LAYOUT = {
    "qk": "meta-interleaved (HF rotate-half undone per head)",
    "batch": "none",
    "scores": "masked entries are -inf",
    "logits": "last position",
}

_REQUIRED = ("format", "version", "model", "dtype", "attn_implementation", "prompt", "tokens", "derived", "layout",
             "versions", "stages", "activations_sha256", "manifest_sha256")
# Reserved in version 2 for decode steps (issue 12); absent or null in a plain prefill golden.
_OPTIONAL = frozenset({"decode"})
# Attention implementation -> the stages the recorder computes itself rather than reading from transformers.
ATTN_DERIVED = {"eager": ("scores",), "sdpa": ("scores", "probs")}
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
    full["manifest_sha256"] = manifest_digest(full)
    _check_writable(folder, full, tensors)
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


RERECORD = ("re-record it with `python -m golden record --model MODEL --prompt PROMPT --dtype DTYPE --out FOLDER` "
            "(the committed baselines: `python -m golden record-baselines`)")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every manifest field but `manifest_sha256` itself."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _rerecord_hint(manifest: Mapping[str, Any], folder: Path) -> str:
    """The record command for this golden, spelled out where the old manifest says what it was."""
    model, prompt, dtype = manifest.get("model"), manifest.get("prompt"), manifest.get("dtype")
    name = model.get("name") if isinstance(model, dict) else None
    if isinstance(name, str) and isinstance(prompt, str) and dtype in DTYPES and "\n" not in prompt + name:
        return (f"re-record it with `python -m golden record --model {shlex.quote(name)} "
                f"--prompt {shlex.quote(prompt)} --dtype {dtype} --out {shlex.quote(str(folder))}` "
                f"(the committed baselines: `python -m golden record-baselines`)")
    return RERECORD


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_sha(x: Any) -> bool:
    return isinstance(x, str) and re.fullmatch(r"[0-9a-f]{64}", x) is not None


def _field_problem(manifest: Mapping[str, Any]) -> str | None:
    """The first malformed field, as 'field: what is wrong', or None."""
    def kind(x: Any) -> str:
        return "null" if x is None else type(x).__name__

    model = manifest["model"]
    if not isinstance(model, dict):
        return f"model: a JSON object expected, got {kind(model)}"
    for k, ok, what in (("name", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
                        ("config", lambda v: isinstance(v, dict), "a JSON object"),
                        ("weights_sha256", _is_sha, "64 lowercase hex digits"),
                        ("source", lambda v: isinstance(v, str), "a string")):
        if not ok(model.get(k)):
            return f"model.{k}: {what} expected, got {kind(model.get(k))}"
    checks = (
        ("attn_implementation", lambda v: v in ATTN_DERIVED, f"one of {', '.join(ATTN_DERIVED)}"),
        ("prompt", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        ("tokens", lambda v: isinstance(v, list) and v != [] and all(_is_int(t) for t in v),
         "a non-empty list of integers"),
        ("stages", lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list of objects"),
        ("derived", lambda v: isinstance(v, list) and all(isinstance(e, str) for e in v), "a list of strings"),
        ("layout", lambda v: v == LAYOUT, f"{LAYOUT}"),
        ("versions", lambda v: isinstance(v, dict), "a JSON object"),
        ("activations_sha256", _is_sha, "64 lowercase hex digits"),
        ("manifest_sha256", _is_sha, "64 lowercase hex digits"),
    )
    for k, ok, what in checks:
        if not ok(manifest[k]):
            value = manifest[k]
            return f"{k}: {what} expected, got " + (repr(value) if k in ("attn_implementation", "layout")
                                                     else kind(value))
    for i, entry in enumerate(manifest["stages"]):
        name, shape, dtype = entry.get("name"), entry.get("shape"), entry.get("dtype")
        if not isinstance(name, str):
            return f"stages[{i}].name: a string expected, got {kind(name)}"
        if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
            return f"stages[{i}] ({name}).shape: a list of sizes expected, got {shape!r}"[:200]
        if not isinstance(dtype, str):
            return f"stages[{i}] ({name}).dtype: a string expected, got {kind(dtype)}"
        if entry.get("rows") is not None:
            return f"stages[{i}] ({name}).rows: sampled rows are not supported by this version (null expected)"
        unknown = sorted(set(entry) - {"name", "shape", "dtype", "rows"})
        if unknown:
            return f"stages[{i}] ({name}): unknown field {unknown[0]!r}"
    if manifest["derived"] != list(ATTN_DERIVED[manifest["attn_implementation"]]):
        return (f"derived: {manifest['derived']} does not go with attention {manifest['attn_implementation']} "
                f"(which derives {list(ATTN_DERIVED[manifest['attn_implementation']])})")
    return None


def _check_writable(folder: Path, manifest: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """The writer refuses what the reader would refuse: a golden is whole or not written."""
    missing = [k for k in _REQUIRED if k not in manifest]
    problem = f"missing {', '.join(missing)}" if missing else _field_problem(manifest)
    if problem:
        raise GoldenError(f"{folder}: cannot write golden: {problem}")
    config = ModelConfig.from_dict(manifest["model"]["config"])
    where = f"{folder}: cannot write golden"
    _check_tokens(where, manifest, config)
    _check_stage_set(where, list(tensors), config, len(manifest["tokens"]), _options(manifest))
    if tensors["tokens"].tolist() != manifest["tokens"]:
        raise GoldenError(f"{where}: the tokens tensor does not hold the manifest's tokens")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GoldenError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise GoldenError(f"{path}: not a golden manifest (JSON nested too deeply)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GoldenError(f"{path}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise GoldenError(f"{path}: not a golden manifest (a JSON object expected)")
    if manifest.get("format") != FORMAT:
        raise GoldenError(f"{path}: format {str(manifest.get('format'))[:40]!r} is not {FORMAT!r}")
    version = manifest.get("version")
    if version != VERSION:
        if _is_int(version) and version < VERSION:
            raise GoldenError(f"{path}: golden format version {version} is older than this reader's {VERSION}; "
                              + _rerecord_hint(manifest, folder))
        raise GoldenError(f"{path}: format version {str(version)[:20]}, this reader reads version {VERSION}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise GoldenError(f"{path}: missing {', '.join(missing)}")
    unknown = sorted(set(manifest) - set(_REQUIRED) - _OPTIONAL)
    if unknown:
        raise GoldenError(f"{path}: unknown field {unknown[0][:40]!r}")
    if manifest["dtype"] not in DTYPES:
        raise GoldenError(f"{path}: dtype {str(manifest['dtype'])[:20]!r} is not fp32 or bf16")
    problem = _field_problem(manifest)
    if problem:
        raise GoldenError(f"{path}: {problem}")
    try:
        digest = manifest_digest(manifest)
    except ValueError:  # NaN or infinity somewhere: not what the writer writes
        raise GoldenError(f"{path}: holds a NaN or infinite number") from None
    if digest != manifest["manifest_sha256"]:
        raise GoldenError(f"{path}: content does not match its manifest_sha256 (edited after recording); "
                          + _rerecord_hint(manifest, folder))
    return manifest


def _options(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in _OPTIONAL}


def _check_stage_set(where: str, names: list[str], config: ModelConfig, seq: int, options: Mapping[str, Any]) -> None:
    """A golden holds exactly every stage of its model (impl.stages.every_stage), in forward order."""
    try:
        expected = stages.every_stage(config, seq, options)
    except ValueError as e:
        raise GoldenError(f"{where}: {e}") from None
    for name in names:
        try:
            layer, _ = stages.parse(name)
        except KeyError:
            raise GoldenError(f"{where}: unknown stage {name[:60]!r}") from None
        if layer is not None and layer >= config.n_layers:
            raise GoldenError(f"{where}: stage {name} is outside the model ({config.n_layers} layers)")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise GoldenError(f"{where}: stage {twice} is listed twice")
    missing = [k for k in expected if k not in set(names)]
    if missing:
        raise GoldenError(f"{where}: holds {len(names)} of the model's {len(expected)} stages; missing "
                          f"{stages.summarize(missing)}")
    if names != expected:
        raise GoldenError(f"{where}: stages are not in forward order")


def _check_tokens(where: str, manifest: Mapping[str, Any], config: ModelConfig) -> None:
    bad = next((t for t in manifest["tokens"] if not 0 <= t < config.vocab_size), None)
    if bad is not None:
        raise GoldenError(f"{where}: token id {bad} is outside the vocabulary [0, {config.vocab_size})")


def load_golden(folder: str | os.PathLike) -> Golden:
    """Load and verify a golden folder, or raise GoldenError naming the file and the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GoldenError(f"{folder}: no such golden folder")
    for name in (MANIFEST, ACTIVATIONS):
        if not (folder / name).is_file():
            raise GoldenError(f"{folder / name}: missing")
    manifest = _read_manifest(folder)
    where = str(folder / MANIFEST)
    try:
        config = ModelConfig.from_dict(manifest["model"]["config"])
    except (KeyError, TypeError, ValueError, Llama3GoldenError) as e:
        why = str(e).splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise GoldenError(f"{where}: model config unreadable ({why})") from None
    seq = len(manifest["tokens"])
    _check_tokens(where, manifest, config)
    _check_stage_set(where, [e["name"] for e in manifest["stages"]], config, seq, _options(manifest))
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
    tensors: dict[str, torch.Tensor] = {}
    for entry in manifest["stages"]:
        name = entry["name"]
        expected = stages.expected_shape(name, config, seq)
        if list(entry["shape"]) != list(expected):
            raise GoldenError(f"{where}: stage {name} has shape {list(entry['shape'])}, "
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
    if tensors["tokens"].dtype != torch.int64 or tensors["tokens"].tolist() != manifest["tokens"]:
        raise GoldenError(f"{where}: tokens do not agree with the golden's `tokens` tensor (edited token ids?)")
    return Golden(folder, manifest, tensors)


def check_same_model(golden: Golden, config: ModelConfig, weights_sha256: str, name: str | None = None) -> None:
    """Refuse to check an implementation's model against a golden recorded for another model."""
    if golden.manifest["model"].get("config") == config.to_dict() and golden.weights_sha256 == weights_sha256:
        return
    other = name or "the model given"
    raise GoldenError(f"{golden.path}: golden was recorded for model {golden.model_name} "
                      f"(weights sha {golden.weights_sha256[:12]}), not {other} (weights sha {weights_sha256[:12]})")
