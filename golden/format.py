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

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from golden import sampling
from golden.sampling import Sampled
from impl import stages
from impl.config import ModelConfig
from impl.errors import Llama3GoldenError
from impl.layout import DTYPES  # a golden's dtype names: "fp32" | "bf16"

FORMAT = "llama3-golden"
VERSION = 2  # 2: manifest_sha256, exactly every stage of the model, reserved decode, sampled rows (golden.sampling)
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
    """A loaded, verified golden. `tensors`: the prefill's stages in forward order (the manifest's stage order); a
    stage of a long prompt is a `golden.sampling.Sampled` (its manifest entry has `rows`), every other a full tensor.
    `decode_steps`: step s's stages at index s - 1, keyed as the prefill's (`layers.0.k_rope`), where the golden
    has a decode section (golden.decode), else empty."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor | Sampled]
    decode_steps: tuple[dict[str, torch.Tensor], ...] = ()

    def stored(self) -> dict[str, torch.Tensor | Sampled]:
        """Every stage under the key it is stored under (`decode.1.layers.0.k_rope` for a decode step's): what
        write_golden takes."""
        out = dict(self.tensors)
        for step, tensors in enumerate(self.decode_steps, 1):
            out.update({stages.decode_key(step, k): t for k, t in tensors.items()})
        return out

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
        """The prefill's stage keys, in forward order (a decode step's: `decode_steps`)."""
        return list(self.tensors)

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


def _stored(tensors: Mapping[str, torch.Tensor | Sampled]) -> dict[str, torch.Tensor]:
    """The file's tensors: a full stage under its key; a sampled one's rows under its key (attention rows up to
    their query: golden.sampling.pack) and each summary of every row under `<key>/<summary>` (e.g.
    `layers.0.scores/logsumexp`)."""
    out = {}
    for k, v in tensors.items():
        if isinstance(v, Sampled):
            out[k] = sampling.pack(stages.parse(k)[1], v)
            out.update({f"{k}/{name}": t for name, t in v.summaries.items()})
        else:
            out[k] = v
    return out


def _entry(k: str, v: torch.Tensor | Sampled) -> dict[str, Any]:
    entry = {"name": k, "shape": list(v.shape), "dtype": dtype_name(v.dtype)}
    if isinstance(v, Sampled):
        entry["rows"] = v.rows.to_json()
    return entry


def _tensor_bytes(tensors: Mapping[str, torch.Tensor | Sampled]) -> bytes:
    # The metadata is constant, so equal tensors give equal bytes.
    data = {k: v.detach().contiguous() for k, v in _stored(tensors).items()}
    # One metadata entry: safetensors keeps metadata in a hash map, so several would come out in any order.
    return st_save(data, metadata={"format": f"{FORMAT} {VERSION}"})


_NUMBER_LIST = re.compile(r"\[\s*(-?\d[\d.eE+-]*(?:,\s*-?\d[\d.eE+-]*)*)\s*\]")


def _dumps(manifest: Mapping[str, Any]) -> str:
    """Indented JSON with sorted keys; lists of numbers (shapes, token ids) on one line."""
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False, ensure_ascii=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


# ---------------------------------------------------------------- writing: the destination
# A write goes through a temp folder `.<name>.tmp-*` beside the target; a golden it replaces is first
# moved into `.<name>.old-*`. A run killed in between (SIGKILL, power) leaves those behind: the next
# write into the same folder, under the lock, restores or removes them (`recover`). Readers skip
# dot-folders (golden.check.golden_set), so a leftover is never taken for a golden.
_HELD: set[Path] = set()  # destinations this process holds the lock of (the lock is re-entrant)


def _has_golden_manifest(folder: Path) -> bool:
    """True if folder/manifest.json is a manifest of this format (any version: re-recording is how an older
    golden is upgraded), whatever else lies beside it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _others(folder: Path) -> list[str]:
    """What folder holds besides a golden's two files."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, ACTIVATIONS))


def _is_golden_content(folder: Path) -> bool:
    """True if `folder` is a golden of this format and holds nothing else: the only kind of folder a write
    may replace."""
    try:
        return folder.is_dir() and not _others(folder) and _has_golden_manifest(folder)
    except OSError:
        return False


def _leftovers(folder: Path, kind: str) -> list[Path]:
    """The `.<name>.tmp-*` or `.<name>.old-*` folders beside folder."""
    prefix = f".{folder.name}.{kind}-"
    return sorted(p for p in folder.parent.iterdir()
                  if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink())


def check_destination(folder: str | os.PathLike) -> Path:
    """Refuse, in one line and before any work, a destination that a write could not or must not replace.

    A write replaces `folder` only if it is missing, empty, or a golden of this format holding nothing
    else; anything else (a file, another tool's folder, a golden with the user's notes beside it) is
    refused, never deleted. The nearest existing parent must be a folder this process can write in.
    """
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise GoldenError(f"{folder}: exists and is not a golden folder; refusing to overwrite it")
    if folder.is_dir():
        try:
            empty = not any(folder.iterdir())
        except OSError as e:
            raise GoldenError(f"{folder}: cannot read it ({e.strerror})") from None
        if not empty and not _is_golden_content(folder):
            others = _others(folder)
            if others and _has_golden_manifest(folder):
                raise GoldenError(f"{folder}: a golden, but it also holds {', '.join(others[:3])}"
                                  f"{', ...' if len(others) > 3 else ''}; refusing to overwrite it (move them away)")
            raise GoldenError(f"{folder}: exists and is not a golden folder; refusing to overwrite it")
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise GoldenError(f"{folder}: cannot be created ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GoldenError(f"{folder}: cannot be created ({parent} is not writable)")
    return folder


def recover(folder: str | os.PathLike) -> None:
    """Clean up after a write into `folder` that was killed: put back a golden left as `.<name>.old-*/<name>`
    when `folder` is missing, then remove the leftover temp and old folders. Only folders holding what a
    write puts there are removed. Call it only while holding the destination's lock (`destination`)."""
    folder = Path(folder)
    olds = _leftovers(folder, "old")
    if not folder.exists():
        for old in olds:
            if _is_golden_content(old / folder.name):
                os.rename(old / folder.name, folder)
                break
    for tmp in _leftovers(folder, "tmp"):
        if {p.name for p in tmp.iterdir()} <= {MANIFEST, ACTIVATIONS}:  # what a write puts there, nothing else
            shutil.rmtree(tmp)
    for old in olds:
        inside = list(old.iterdir())
        if not inside or (len(inside) == 1 and inside[0].name == folder.name and _is_golden_content(inside[0])):
            shutil.rmtree(old)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p folder's parent; returns the folders it created, deepest first."""
    made, p = [], folder.parent
    while not p.exists():
        made.append(p)
        p = p.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    return made


@contextlib.contextmanager
def destination(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder` for writing: checked (`check_destination`), locked against a concurrent writer
    (flock on `.<name>.lock` beside it), and cleaned of a killed run's leftovers (`recover`).

    A second writer of the same folder, in this or another process, is refused in one line. Re-entrant
    within a process, so `record` can hold it across the forward pass and `write_golden` inside it.
    """
    folder = Path(os.path.abspath(folder))
    if folder in _HELD:
        yield folder
        return
    check_destination(folder)
    made = _make_parents(folder)
    lock_path = folder.parent / f".{folder.name}.lock"
    try:
        fd = _lock(lock_path, folder)
    except BaseException:
        _remove_empty(made)
        raise
    _HELD.add(folder)
    ok = False
    try:
        recover(folder)
        check_destination(folder)  # again: what recover put back, or what appeared before the lock was taken
        yield folder
        ok = True
    finally:
        _HELD.discard(folder)
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # before closing: a writer that opened the old file then finds it unlinked
        os.close(fd)
        if not ok:
            _remove_empty(made)


def _lock(lock_path: Path, folder: Path) -> int:
    """An exclusive flock on lock_path, or GoldenError if another process holds it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GoldenError(f"{folder}: another process is writing this golden (it holds {lock_path}); "
                              f"wait for it to finish") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder unlinked it as we locked it: take the new file


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:
        with contextlib.suppress(OSError):
            p.rmdir()


def write_golden(folder: str | os.PathLike, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a golden folder atomically; returns its path.

    `manifest` holds the identity fields (model, dtype, attn_implementation, prompt, tokens,
    derived, versions); this function adds format, version, layout, the stage list (from
    `tensors`, in its order) and the tensor file's sha256. An existing golden at `folder` is
    replaced; anything else there is refused (`check_destination`). A concurrent writer of the same
    folder is refused; an interrupted write (any exception, SIGINT/SIGTERM turned into one) leaves the
    folder as it was and no temp folder behind.
    """
    folder = Path(folder)
    try:
        blob = _tensor_bytes(tensors)
    except ValueError as e:  # a sampled attention row that is not causal cannot be stored by its prefix
        raise GoldenError(f"{folder}: cannot write golden: {e}") from None
    full = {
        **manifest,
        "format": FORMAT,
        "version": VERSION,
        "layout": LAYOUT,
        "stages": [_entry(k, v) for k, v in tensors.items()],
        "activations_sha256": hashlib.sha256(blob).hexdigest(),
    }
    full["manifest_sha256"] = manifest_digest(full)
    _check_writable(folder, full, tensors)
    try:
        text = _dumps(full).encode("utf-8")
    except UnicodeEncodeError as e:
        raise GoldenError(f"{folder}: the manifest holds text that is not valid Unicode "
                          f"({e.object[e.start:e.end]!a}); refusing to write it") from None
    with destination(folder):
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a golden is data to share
            (tmp / ACTIVATIONS).write_bytes(blob)
            (tmp / MANIFEST).write_bytes(text)
            _commit(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a commit; the half-written folder otherwise
    return folder


def _commit(tmp: Path, folder: Path) -> None:
    """Put the complete golden `tmp` in place of `folder`: two renames; the old golden comes back if the
    second never happens (an exception here; a SIGKILL is repaired by the next write's `recover`)."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    try:
        if old is not None:
            os.rename(folder, old / folder.name)
        os.rename(tmp, folder)
    except BaseException:
        if old is not None and not folder.exists() and (old / folder.name).exists():
            os.rename(old / folder.name, folder)
        raise
    finally:
        if old is not None and folder.exists():  # else it holds the only copy: the next write restores it
            shutil.rmtree(old, ignore_errors=True)


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
            problem = _rows_problem(entry["rows"], name, len(manifest["tokens"]))
            if problem:
                return f"stages[{i}] ({name}).rows: {problem}"
        unknown = sorted(set(entry) - {"name", "shape", "dtype", "rows"})
        if unknown:
            return f"stages[{i}] ({name}): unknown field {unknown[0]!r}"
    if manifest.get("decode") is not None:
        from golden.decode import section_problem  # the decode section's home (imports this module)

        problem = section_problem(manifest["decode"], manifest["model"]["config"], manifest["tokens"])
        if problem:
            return f"decode: {problem}"
    if manifest["derived"] != list(ATTN_DERIVED[manifest["attn_implementation"]]):
        return (f"derived: {manifest['derived']} does not go with attention {manifest['attn_implementation']} "
                f"(which derives {list(ATTN_DERIVED[manifest['attn_implementation']])})")
    return None


def _rows_problem(rows: Any, name: str, seq: int) -> str | None:
    try:
        step, key = stages.split_step(name)
        _, stage = stages.parse(key)
    except KeyError:
        return None  # an unknown stage: the stage-set check refuses it
    if step is not None:
        return "a decode step holds one position: sampled rows are for a prompt's stages (null expected)"
    return sampling.rows_problem(rows, stage, seq)


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
    _check_decode_tokens(where, manifest, tensors)


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


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """A golden folder's manifest, verified against its own digest, without reading the tensors (what a test
    collector needs: the model, dtype and stage list). load_golden verifies the rest."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise GoldenError(f"{folder / MANIFEST}: missing")
    return _read_manifest(folder)


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
            layer, _ = stages.parse(stages.split_step(name)[1])
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
                          f"{stages.summarize(missing, config.n_layers)}")
    extra = [n for n in names if n not in set(expected)]
    if extra:
        raise GoldenError(f"{where}: holds {stages.summarize(extra, config.n_layers)}, which its manifest's "
                          f"decode section does not have")
    if names != expected:
        raise GoldenError(f"{where}: stages are not in forward order")


def _check_decode_tokens(where: str, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Each decode step's tokens tensor holds the token the decode section says it fed."""
    section = manifest.get("decode")
    for step, token in enumerate((section or {}).get("greedy", [])[:-1], 1):
        t = tensors.get(stages.decode_key(step, stages.TOKENS))
        if t is not None and (t.dtype != torch.int64 or t.tolist() != [token]):
            raise GoldenError(f"{where}: decode step {step}'s tokens tensor does not hold the token the decode "
                              f"section feeds there ({token})")


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
        expected = stages.expected_shape(name, config, seq, _options(manifest))
        if list(entry["shape"]) != list(expected):
            raise GoldenError(f"{where}: stage {name} has shape {list(entry['shape'])}, "
                              f"the model config gives {list(expected)}")
        if name not in stored:
            raise GoldenError(f"{path}: stage {name} is listed in the manifest but not in the file")
        t = stored.pop(name)
        rows = sampling.rows_from_json(entry["rows"]) if entry.get("rows") is not None else None
        full, stage = tuple(entry["shape"]), stages.parse(stages.split_step(name)[1])[1]
        shape = list(full) if rows is None else list(sampling.packed_shape(stage, rows, full))
        if list(t.shape) != shape or dtype_name(t.dtype) != entry["dtype"]:
            raise GoldenError(f"{path}: stage {name} is {dtype_name(t.dtype)} {list(t.shape)}, "
                              f"the manifest says {entry['dtype']} {shape}")
        tensors[name] = t if rows is None else Sampled(rows, full, sampling.unpack(stage, t, rows, full),
                                                       _summaries(path, name, rows, full, stored))
    if stored:
        raise GoldenError(f"{path}: {len(stored)} tensors not listed in the manifest (e.g. {sorted(stored)[0]})")
    if tensors["tokens"].dtype != torch.int64 or tensors["tokens"].tolist() != manifest["tokens"]:
        raise GoldenError(f"{where}: tokens do not agree with the golden's `tokens` tensor (edited token ids?)")
    _check_decode_tokens(where, manifest, tensors)
    prefill = {k: t for k, t in tensors.items() if stages.split_step(k)[0] is None}
    steps: list[dict[str, torch.Tensor]] = []
    for k, t in tensors.items():
        step, rest = stages.split_step(k)
        if step is not None:
            if step > len(steps):
                steps.append({})
            steps[step - 1][rest] = t
    return Golden(folder, manifest, prefill, tuple(steps))


def _summaries(path: Path, name: str, rows: sampling.Rows, shape: tuple[int, ...], stored: dict) -> dict:
    """A sampled stage's summaries of every row, taken out of `stored`, each checked for its shape and dtype."""
    out = {}
    for summary in rows.summaries:
        k = f"{name}/{summary}"
        if k not in stored:
            raise GoldenError(f"{path}: stage {name} is sampled but its {summary} of every row is not in the file")
        t = stored.pop(k)
        want, dtype = sampling.summary_shape(rows, shape), sampling.SUMMARY_DTYPES.get(summary, torch.float32)
        if tuple(t.shape) != want or t.dtype != dtype:
            raise GoldenError(f"{path}: {k} is {dtype_name(t.dtype)} {list(t.shape)}, a sampled {name} holds "
                              f"{dtype_name(dtype)} {list(want)}")
        out[summary] = t
    return out


def check_same_model(golden: Golden, config: ModelConfig, weights_sha256: str, name: str | None = None) -> None:
    """Refuse to check an implementation's model against a golden recorded for another model."""
    if golden.manifest["model"].get("config") == config.to_dict() and golden.weights_sha256 == weights_sha256:
        return
    other = name or "the model given"
    raise GoldenError(f"{golden.path}: golden was recorded for model {golden.model_name} "
                      f"(weights sha {golden.weights_sha256[:12]}), not {other} (weights sha {weights_sha256[:12]})")
