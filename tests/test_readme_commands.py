"""Every command of the README's ```sh blocks runs through the real CLI, so a README that lies fails CI.

The commands are read from README.md itself; `HOW` says how each one runs. A command added to the README
without an entry here fails `test_every_readme_command_has_a_way_to_run`. Commands run in a subprocess
with `tmp_path` as the working directory (so what they write lands there), `golden/` and `examples/` linked into
it (so the README's relative paths like `golden/data/tiny/fp32` hold) and `examples/` on the path (so the README's
`my_llama:forward` is the example). Verbatim where they run offline on committed data or fetched assets;
with `--model tiny` where the README shows a big model, `--out` in `tmp_path` where it shows a real folder;
`tox`, `pytest` and the virtual-environment setup are exempt.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from golden.format import load_golden

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_commands() -> dict[str, list[str]]:
    """command -> the README's comments on it (a trailing `# ...`, then `# ...` lines right below it), for every
    command of every ```sh block; `a && b` is two commands; `.venv/bin/python` is `python`."""
    out: dict[str, list[str]] = {}
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        last = None
        for line in block.splitlines():
            if line.startswith("#"):
                if last is not None:
                    out[last].append(line.lstrip("# ").strip())
                continue
            text, _, comment = line.partition("  #")
            for cmd in (c.strip() for c in text.split(" && ")):
                cmd = cmd.removeprefix(".venv/bin/")
                out.setdefault(cmd, [])
                last = cmd
            if comment:
                out[last].append(comment.strip().lstrip("# ").strip())
    return out


@dataclass(frozen=True)
class How:
    """How one README command runs: exempt (why), or its argv rewritten, its exit code and what it must show."""

    exempt: str = ""
    rewrite: dict[str, str] = field(default_factory=dict)  # option -> value, {tmp} is tmp_path
    exit_code: int = 0
    shows: str = ""  # a string its stdout must contain; "README" = the README's comment on it
    needs_my_golden: bool = False  # the folder the README's `record ... --out my-golden` writes
    files: tuple[str, ...] = ()  # files it must write, relative to tmp_path
    xfail: str = ""  # a known bug, strict: the fix flips it
    slow: bool = False


HOW: dict[str, How] = {
    "python3 -m venv .venv": How(exempt="creates the environment these tests run in"),
    "pip install -q -e .": How(exempt="installs this package: the environment running these tests"),
    'pip install -q -e ".[test]"': How(exempt="installs this package with test extras: the environment running "
                                               "these tests"),
    "python -m pytest -n auto": How(exempt="pytest: this very suite"),
    "pytest --impl my_llama:forward": How(exempt="pytest: tests/test_pytest_plugin*.py run pytest --impl on a user "
                                                 "module, in-process and in a venv"),
    "pytest --impl my_llama:forward --golden tiny --golden-dtype fp32": How(
        exempt="pytest: tests/test_pytest_plugin.py runs --golden and --golden-dtype"),
    "pytest --impl my_llama:forward --qk-layout hf": How(exempt="pytest: tests/test_pytest_plugin.py runs --qk-layout"),
    # a file path (examples/ is linked into the working folder) and a committed golden by name
    "python -m golden check tiny --impl examples/my_llama.py:forward --dtype fp32": How(
        shows="PASS: 43/43 stages within tolerance"),
    "python -m golden check": How(shows="PASS: 43/43 stages within tolerance"),
    "python -m impl fetch llama3-tokenizer smollm2-135m": How(shows="llama3-golden/smollm2-135m"),
    # the example implements Llama 3 without 3.1's rope scaling: the default set says so, exit 1 (README)
    "python -m golden check --impl my_llama:forward": How(
        exit_code=1, shows="core: PASS; 3.1 rope scaling: FAIL at rope_cos; tied embeddings: PASS"),
    # the cached example passes prefill and decode on the default set (tests/test_decode.py checks it in-process)
    "python -m golden check --impl my_llama_cached:forward": How(
        shows="core: PASS; 3.1 rope scaling: PASS; tied embeddings: PASS; decode: PASS", slow=True),
    "python -m golden check golden/data/tiny/fp32 --impl tests.bugs:rope_from_zero_in_decode": How(
        exit_code=1, slow=True,
        shows="decode: FAIL at step 1, rope_cos: position 17 rotated as position 0 (rope.decode_from_zero)"),
    "python -m golden check golden/data/smollm2-135m --impl my_llama:forward --plot err.png --json err.json":
        How(shows="PASS: 547/547 stages within tolerance", files=("err.png", "err.json")),
    'python -m impl tokenize "This is a test sentence."': How(shows="README"),
    'python -m impl generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 16':
        How(shows="README"),
    'python -m impl generate --model path/to/Meta-Llama-3-8B/original --prompt "..." --dtype bf16':
        How(rewrite={"--model": "tiny"}),
    # The suite pins LLAMA3_GOLDEN_ENGINE: the command says so (and measures nothing into the user's cache).
    "python -m impl engines": How(shows="LLAMA3_GOLDEN_ENGINE="),
    'python -m golden record --model tiny --prompt "the answer to the ultimate question of life, the universe, and '
    'everything is " --dtype fp32 --out my-golden': How(shows="wrote my-golden", files=("my-golden/manifest.json",)),
    'python -m golden record --model meta-llama/Meta-Llama-3-8B --prompt "..." --dtype bf16 --out g8b --device-map '
    'auto --offload-folder /tmp/off': How(rewrite={"--model": "tiny", "--offload-folder": "{tmp}/off"},
                                          files=("g8b/manifest.json",)),
    "python -m golden diff golden/data/tiny/fp32 my-golden": How(shows="no drift beyond tolerance (43 stages)",
                                                                 needs_my_golden=True),
    "python -m golden record-baselines": How(rewrite={"--out": "{tmp}/baselines"}, shows="total in", slow=True),
    "python -m golden check-tokenizer --impl my_tok:encode": How(shows="PASS: 1,664/1,664 strings agree (11 of 11 "
                                                                     "groups)"),
    "pytest --impl-tokenizer my_tok:encode": How(exempt="pytest: tests/test_tokenizer_check.py runs the plugin "
                                                        "through pytester"),
    "python -m golden record-tokenizer": How(rewrite={"--out": "{tmp}/llama3.json"}, shows="wrote",
                                             files=("llama3.json",)),
}


def _argv(cmd: str, how: How, tmp_path: Path) -> list[str]:
    argv = shlex.split(cmd)
    argv[0] = sys.executable if argv[0] in ("python", "python3") else argv[0]
    for option, value in how.rewrite.items():
        value = value.replace("{tmp}", str(tmp_path))
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    return argv


def run_readme_command(cmd: str, how: How, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "golden").symlink_to(ROOT / "golden", target_is_directory=True)
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    if how.needs_my_golden:
        from golden.record import WALKTHROUGH_PROMPT, record

        record("tiny", WALKTHROUGH_PROMPT, "fp32", out=tmp_path / "my-golden", progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    return subprocess.run(_argv(cmd, how, tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_every_readme_command_has_a_way_to_run():
    assert set(readme_commands()) == set(HOW), "README commands without an entry in HOW (or stale entries)"


def _params():
    for cmd, how in HOW.items():
        if how.exempt:
            continue
        marks = [pytest.mark.slow] if how.slow else []
        if how.xfail:
            marks.append(pytest.mark.xfail(reason=how.xfail, strict=True))
        name = re.sub(r"[^\w.]+", "-", cmd.removeprefix("python -m ")).strip("-")[:48]
        yield pytest.param(cmd, how, marks=marks, id=name)


@pytest.mark.parametrize(("cmd", "how"), list(_params()))
def test_readme_command_runs_as_documented(tmp_path, cmd, how):
    proc = run_readme_command(cmd, how, tmp_path)
    said = f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    assert proc.returncode == how.exit_code, said
    shows = readme_commands()[cmd] if how.shows == "README" else [how.shows] if how.shows else []
    for text in shows:
        assert text in proc.stdout, said
    for f in how.files:
        assert (tmp_path / f).is_file(), f"{f} not written; {said}"


def test_readme_record_baselines_records_into_its_out(tmp_path):
    """The default suite's share of `record-baselines` (the whole command is `slow`): the tiny baselines."""
    how = How(rewrite={"--out": "{tmp}/baselines"}, shows="total in")
    proc = run_readme_command("python -m golden record-baselines --only tiny/fp32 tiny/bf16", how, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [load_golden(tmp_path / "baselines" / "tiny" / d).dtype for d in ("fp32", "bf16")] == ["fp32", "bf16"]


def test_readme_example_excerpt_is_the_example():
    """The README shows examples/my_llama.py's forward verbatim."""
    example = (ROOT / "examples" / "my_llama.py").read_text()
    body = example[example.index("def forward(tokens, w, cfg, trace):"):]
    assert f"```python\n{body}```" in README.read_text(encoding="utf-8")
