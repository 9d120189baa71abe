"""`python -m golden` never loses a file, never leaves a half-written golden, never prints a traceback.

Each case checks the exit code, exactly one `error: ...` line on stderr (or `interrupted` / `terminated`), no
traceback, and that every file that was there before is still there, byte for byte. What crosses the process
boundary runs the real command line in a subprocess, as a user types it: a record and a diff, signals (sent for
real, to a recording held at a known point by a small driver that slows one `os.rename` of golden.format in the
subprocess only), a kill, a second writer, a write error after the report, undecodable arguments. The corpora of
refused destinations and unwritable outputs call `golden.cli.main` in-process (the same parser, checks and
one-line handler, without a fresh interpreter importing torch and transformers for each case).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from golden import format as gf
from golden import report
from golden.check import golden_set
from golden.cli import main
from golden.format import MANIFEST, GoldenError, load_golden
from golden.record import WALKTHROUGH_PROMPT
from tests.conftest import golden_dir

ROOT = Path(__file__).resolve().parent.parent
TINY_FP32 = golden_dir("tiny", "fp32")
RECORD = ["record", "--model", "tiny", "--prompt", "hello", "--dtype", "fp32", "--quiet"]


def golden_cli(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m golden ARGS` from the repository root (so this checkout's golden/ is the one run)."""
    return subprocess.run([sys.executable, "-m", "golden", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, errors="backslashreplace", env={**os.environ, **(env or {})}, timeout=timeout)


def golden_main(*args) -> subprocess.CompletedProcess:
    """`golden.cli.main(ARGS)` in this process, with what it printed: for cases that are not about the process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["golden", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int = 2, says: str = "") -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert says in proc.stderr, proc.stderr


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder, with the bytes of each file (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def copy_golden(dst: Path) -> Path:
    shutil.copytree(TINY_FP32, dst)
    return dst


# ---------------------------------------------------------------- 1. the documented record command works
def test_record_cli_writes_the_committed_golden(tmp_path):
    out = tmp_path / "my-golden"
    proc = golden_cli("record", "--model", "tiny", "--prompt", WALKTHROUGH_PROMPT, "--dtype", "fp32",
                      "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {out} (") and "Traceback" not in proc.stderr
    assert load_golden(out).manifest["prompt"] == WALKTHROUGH_PROMPT
    diff = golden_cli("diff", TINY_FP32, out)
    assert diff.returncode == 0, diff.stdout[-3000:] + diff.stderr[-3000:]
    assert "no drift beyond tolerance" in diff.stdout


# ---------------------------------------------------------------- 2. recording never deletes what is not a golden
def _site(folder: Path) -> Path:
    """Another tool's folder that happens to hold a manifest.json."""
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_text('{"name": "my-site", "version": 1}')
    (folder / "index.html").write_text("<html>keep me</html>")
    (folder / "src" / "app.js").write_text("keep me too")
    return folder


def _golden_with_notes(folder: Path) -> Path:
    copy_golden(folder)
    (folder / "NOTES.txt").write_text("why this golden was recorded")
    return folder


def _other_format(folder: Path) -> Path:
    copy_golden(folder)
    m = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**m, "format": "someone-elses-format"}))
    return folder


def _a_file(path: Path) -> Path:
    path.write_text("a file, not a folder")
    return path


def _under_a_file(path: Path) -> Path:
    path.write_text("a file, not a folder")
    return path / "golden"


def _symlink_to_golden(path: Path) -> Path:
    target = copy_golden(path.parent / "real-golden")
    path.symlink_to(target)
    return path


DESTINATIONS = {  # name -> (make the destination under tmp_path, command, what the error says)
    "site-with-manifest": (_site, "record", "exists and is not a golden folder; refusing to overwrite it"),
    "site-with-manifest-baselines": (_site, "record-baselines", "exists and is not a golden folder"),
    "golden-with-notes": (_golden_with_notes, "record", "a golden, but it also holds NOTES.txt; refusing"),
    "golden-of-another-format": (_other_format, "record", "exists and is not a golden folder"),
    "a-file": (_a_file, "record", "exists and is not a golden folder"),
    "under-a-file": (_under_a_file, "record", "cannot be created"),
    "symlink-to-a-golden": (_symlink_to_golden, "record", "exists and is not a golden folder"),
}


@pytest.mark.parametrize("make, command, says", list(DESTINATIONS.values()), ids=list(DESTINATIONS))
def test_record_refuses_a_destination_it_must_not_replace(tmp_path, make, command, says):
    root = tmp_path / "work"
    if command == "record":
        root.mkdir()
        out = make(root / "dest")
        args = [*RECORD, "--out", out]
    else:  # record-baselines --out ROOT writes ROOT/tiny/fp32
        out = make(root / "tiny" / "fp32")
        args = ["record-baselines", "--out", root, "--only", "tiny/fp32", "--quiet"]
    before = snapshot(tmp_path)
    assert_one_error_line(golden_main(*args), 2, says)
    assert snapshot(tmp_path) == before


def test_record_refuses_the_destination_before_loading_the_model(tmp_path):
    # With a model that does not exist, a refusal that came after loading would name the model instead.
    out = _site(tmp_path / "site")
    proc = golden_main("record", "--model", "no-such-model-anywhere", "--prompt", "hi", "--dtype", "fp32",
                       "--out", out)
    assert_one_error_line(proc, 2, f"{out}: exists and is not a golden folder")


def test_record_replaces_a_golden_and_leaves_nothing_beside_it(tmp_path):
    out = copy_golden(tmp_path / "fp32")
    proc = golden_main(*RECORD, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_golden(out).manifest["prompt"] == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32"]  # no temp, old or lock file


# ---------------------------------------------------------------- 2. signals, kills and concurrent writers
# Runs `python -m golden ARGS` in-process after slowing the first rename of golden.format's commit
# (the golden to replace moved away, or the new one moved in): "before" sleeps before it, "between"
# after it, i.e. between the two renames. It writes MARK when it gets there.
DRIVER = """
import os, sys, time
import golden.format as gf
real, mark, phase, fired = os.rename, sys.argv[1], sys.argv[2], []
def rename(src, dst):
    if not fired and (".old-" in str(dst) or ".tmp-" in str(src)):
        fired.append(1)
        if phase == "between":
            real(src, dst)
        open(mark, "w").close()
        time.sleep(300)
        if phase == "between":
            return
    real(src, dst)
gf.os.rename = rename
from golden.cli import main
sys.exit(main(sys.argv[3:]))
"""


def start_slowed_record(tmp_path: Path, out: Path, phase: str) -> subprocess.Popen:
    """A `record` into out, held in its commit at `phase`; TMPDIR is tmp_path/tmp, to watch its HF copy."""
    mark = tmp_path / "mark"
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(mark), phase, *RECORD, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not mark.exists():
        if proc.poll() is not None:
            pytest.fail(f"the record ended before writing: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert any(".tmp-" in n for n in leftovers) and any(".old-" in n for n in leftovers), leftovers
    assert [p.name for p in (tmp_path / "tmp").glob("golden-hf-*")], "the HF copy exists while recording"
    return proc


SIGNALS = {  # name -> (signal, where the record is held, exit code, stderr, slow)
    "sigterm-before-renames": (signal.SIGTERM, "before", 143, "terminated\n", True),
    "sigterm-between-renames": (signal.SIGTERM, "between", 143, "terminated\n", False),
    "sigint-before-renames": (signal.SIGINT, "before", 130, "interrupted\n", False),
    "sigint-between-renames": (signal.SIGINT, "between", 130, "interrupted\n", True),
}
# Each case is a recording in a fresh interpreter: the default suite sends each signal at one of the two points
# (both signals and both points are covered), the other two cases are `slow`.
SIGNAL_CASES = [pytest.param(*case[:4], id=name, marks=[pytest.mark.slow] if case[4] else [])
                for name, case in SIGNALS.items()]


@pytest.mark.parametrize("sig, phase, code, says", SIGNAL_CASES)
def test_record_signal_leaves_the_old_golden_and_no_temp_files(tmp_path, sig, phase, code, says):
    out = copy_golden(tmp_path / "goldens" / "fp32")
    before = snapshot(out.parent)
    proc = start_slowed_record(tmp_path, out, phase)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    finally:  # never leave a held recording behind (nor its pipes to a later test)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err) == (code, says)
    assert snapshot(out.parent) == before  # the old golden, byte for byte; no .fp32.tmp-*/.old-*/.lock
    assert list((tmp_path / "tmp").glob("golden-hf-*")) == []  # the temp HF copy of the weights is gone


def test_record_after_a_kill_between_renames_restores_and_sweeps(tmp_path):
    out = copy_golden(tmp_path / "goldens" / "fp32")
    proc = start_slowed_record(tmp_path, out, "between")
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate(timeout=60)
    assert not out.exists()  # the old golden sits in .fp32.old-*, the new one in .fp32.tmp-*
    with pytest.raises(GoldenError, match="not a golden folder"):  # the leftovers are not taken for goldens
        golden_set(out.parent)
    again = golden_main(*RECORD, "--out", out)  # in-process: the sweep is golden.format's, not the process's
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_golden(out).manifest["prompt"] == "hello"
    assert sorted(p.name for p in out.parent.iterdir()) == ["fp32"]


def test_record_refuses_a_second_writer_of_the_same_folder(tmp_path):
    out = copy_golden(tmp_path / "goldens" / "fp32")
    first = start_slowed_record(tmp_path, out, "before")
    try:
        second = golden_main(*RECORD, "--out", out)  # its own open of the lock file: flock refuses it as it would
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert_one_error_line(second, 2, f"{out}: another process is writing this golden")
    assert load_golden(out).manifest["prompt"] == WALKTHROUGH_PROMPT  # neither run replaced it


def test_recover_puts_back_a_golden_left_between_the_renames(tmp_path):
    out = tmp_path / "fp32"
    old = tmp_path / ".fp32.old-abc123"
    copy_golden(old / "fp32")
    copy_golden(tmp_path / ".fp32.tmp-def456")
    gf.recover(out)
    assert load_golden(out).manifest["prompt"] == WALKTHROUGH_PROMPT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32"]


def test_recover_keeps_a_dot_folder_holding_other_files(tmp_path):
    stray = tmp_path / ".fp32.tmp-mine"
    stray.mkdir()
    (stray / "diary.txt").write_text("not a golden")
    gf.recover(tmp_path / "fp32")
    assert (stray / "diary.txt").read_text() == "not a golden"


def test_golden_set_skips_a_writers_temp_folders(tmp_path):
    copy_golden(tmp_path / "fp32")
    copy_golden(tmp_path / ".fp32.tmp-k1ll3d")  # what a killed record leaves: a complete golden
    assert [g.path.name for g in golden_set(tmp_path)] == ["fp32"]


# ---------------------------------------------------------------- 3. output files: checked before the run
def _missing_folder(tmp_path: Path) -> str:
    return str(tmp_path / "no-such-folder" / "r.json")


def _a_folder(tmp_path: Path) -> str:
    (tmp_path / "reports").mkdir()
    return str(tmp_path / "reports")


def _file_under_a_file(tmp_path: Path) -> str:
    (tmp_path / "r.json").write_text("an earlier report, keep me")
    return str(tmp_path / "r.json" / "r.png")


OUTPUTS = {  # name -> (command line with {out} for the output path, make the output path, what the error says)
    "check-json-missing-folder": (["check", TINY_FP32, "--json", "{out}"], _missing_folder,
                                  "--json {out}: cannot be written (No such file or directory)"),
    "check-json-a-folder": (["check", TINY_FP32, "--json", "{out}"], _a_folder, "--json {out}: is a folder"),
    "check-plot-under-a-file": (["check", TINY_FP32, "--plot", "{out}"], _file_under_a_file,
                                "--plot {out}: cannot be written (Not a directory)"),
    "check-json-in-proc": (["check", TINY_FP32, "--json", "{out}"], lambda t: "/proc/llama3-golden.json",
                           "--json /proc/llama3-golden.json: cannot be written"),
    "check-plot-not-an-image": (["check", TINY_FP32, "--plot", "{out}"], lambda t: str(t / "r.json"),
                                "is not an image format this tool writes"),
    "diff-json-missing-folder": (["diff", TINY_FP32, TINY_FP32, "--json", "{out}"], _missing_folder,
                                 "--json {out}: cannot be written"),
    "diff-plot-a-folder": (["diff", TINY_FP32, TINY_FP32, "--plot", "{out}"], _a_folder, "is a folder"),
    "record-offload-folder-a-file": ([*RECORD, "--out", "{tmp}/g", "--offload-folder", "{out}"],
                                     lambda t: str(_a_file(t / "offload")), "exists and is not a folder"),
}


@pytest.mark.parametrize("args, make, says", list(OUTPUTS.values()), ids=list(OUTPUTS))
def test_unwritable_output_exits_2_before_running(tmp_path, args, make, says):
    out = make(tmp_path)
    before = snapshot(tmp_path)
    proc = golden_main(*[str(a).format(out=out, tmp=tmp_path) for a in args])
    assert_one_error_line(proc, 2, says.format(out=out))
    assert proc.stdout == ""  # refused before the check ran, not after its report
    assert snapshot(tmp_path) == before


def test_output_write_error_after_the_run_exits_2_in_one_line():
    proc = golden_cli("check", TINY_FP32, "--json", "/dev/full")  # writable, but every write fails (ENOSPC)
    assert_one_error_line(proc, 2, "--json /dev/full: cannot be written (No space left on device)")
    assert "PASS" in proc.stdout


def test_write_file_failure_keeps_the_previous_report(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text("the last good report")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(report.OutputError, match=r"--json .*r.json: cannot be written \(No space left on device\)$"):
        report.write_json({"passed": True}, tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert (tmp_path / "r.json").read_text() == "the last good report"


# ---------------------------------------------------------------- 4. Ctrl-C, SIGTERM, undecodable text
SLOW_IMPL = """
import time
def forward(tokens, weights, config, trace):
    open({mark!r}, "w").close()
    time.sleep(300)
"""


@pytest.mark.parametrize("sig, code, says", [(signal.SIGINT, 130, "interrupted\n"),
                                             (signal.SIGTERM, 143, "terminated\n")], ids=["ctrl-c", "sigterm"])
def test_check_interrupted_prints_one_line(tmp_path, sig, code, says):
    (tmp_path / "slow_impl.py").write_text(SLOW_IMPL.format(mark=str(tmp_path / "mark")))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "golden", "check", str(TINY_FP32), "--impl", "slow_impl:forward"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "mark").exists():
        if proc.poll() is not None:
            pytest.fail(f"the check ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err, out) == (code, says, "")


FF = os.fsdecode(b"\xff")  # a byte that is not UTF-8, as Python hands it over from the command line
STRICT = {"PYTHONIOENCODING": "utf-8:strict"}
UNDECODABLE = {  # name -> (arguments, {tmp} for tmp_path, exit code, what stderr says; None: stderr is empty)
    "record-prompt": ([*RECORD[:4], FF, *RECORD[5:], "--out", "{tmp}/g"], 2, "the prompt is not valid UTF-8 text"),
    "record-model": (["record", "--model", f"/nowhere/{FF}", "--prompt", "hi", "--dtype", "fp32", "--out",
                      "{tmp}/g"], 2, "the model name is not valid UTF-8 text"),
    "check-golden-path": (["check", f"{{tmp}}/{FF}"], 2, "not a golden folder"),
    "check-json-path": (["check", TINY_FP32, "--json", f"{{tmp}}/{FF}/r.json"], 2, "cannot be written"),
    "record-out-path": ([*RECORD, "--out", f"{{tmp}}/{FF}"], 0, None),
}


@pytest.mark.parametrize("args, code, says", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
def test_undecodable_argument_under_strict_output_encoding(tmp_path, args, code, says):
    proc = golden_cli(*[str(a).replace("{tmp}", str(tmp_path)) for a in args], env=STRICT)
    if says is None:
        assert (proc.returncode, proc.stderr) == (code, ""), proc.stderr[-3000:]
        assert proc.stdout.startswith("wrote ") and proc.stdout.count("\n") == 1
        assert load_golden(tmp_path / FF).manifest["prompt"] == "hello"
    else:
        assert_one_error_line(proc, code, says)
