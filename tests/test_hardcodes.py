"""The main job's default goldens catch what walk-throughs hard-code (issue 10).

A walk-through writes the 8B's constants literally: `k_layer[head//4]`, `torch.arange(17)`, theta 500000,
vocabulary 128256, eps 1e-05, no Llama 3.1 rope scaling. Each test takes the README's example
(examples/my_llama.py, a correct port that passes every core golden), writes one such literal into its source
(in tmp_path, never in the repository) and checks it: the golden of the default set where the literal is wrong
must fail at the first stage the port reports at or after the stage where the bug shows, or, where the literal
makes the port crash, stop the check with one line naming the port's file and line.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from golden import compare
from golden.check import DEFAULT_SET, ImplementationError
from golden.format import load_golden
from tests.conftest import GOLDEN_DATA

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_llama.py"
GQA_CORRECT = "k.repeat_interleave(rep, 1)", "v.repeat_interleave(rep, 1)"

# id -> (source replacements (old, new), the golden where the literal is wrong, the stage where it first shows)
DIVERGES = {
    # the walk-through's `k_layer[head//4]`, vectorised: right only where n_heads / n_kv_heads == 4
    "gqa-group-4": ((("k.repeat_interleave(rep, 1)", "k[:, torch.arange(cfg.n_heads) // 4]"),
                     ("v.repeat_interleave(rep, 1)", "v[:, torch.arange(cfg.n_heads) // 4]")),
                    "tiny-varied", "layers.0.scores"),
    "rope-theta-500000": ((("cfg.rope_theta", "500000.0"),), "tiny-varied", "rope_cos"),
    "norm-eps-1e-05": ((("cfg.norm_eps", "1e-05"),), "tiny-varied", "layers.0.attn_norm"),
}
CRASHES = {
    # `torch.arange(17)`: the walk-through's 17-token prompt; the port's angles no longer fit the prompt
    "prompt-length-17": ((("torch.arange(seq)", "torch.arange(17)"),), "tiny-varied"),
    # `torch.nn.Embedding(128256, dim)` filled with `copy_` from the checkpoint, as the walk-through does
    "vocab-128256": ((('w["tok_embeddings.weight"][tokens]',
                       'torch.nn.Embedding(128256, cfg.dim).weight.data.copy_(w["tok_embeddings.weight"])[tokens]'),),
                     "tiny-varied"),
}


def _port(tmp_path: Path, name: str, replacements) -> tuple[object, Path]:
    """The example with literals written in, as a module of its own in tmp_path: (its forward, its file)."""
    source = EXAMPLE.read_text()
    for old, new in replacements:
        assert old in source, f"examples/my_llama.py no longer contains {old!r}: update this test's replacement"
        source = source.replace(old, new)
    file = tmp_path / f"hardcoded_{name.replace('-', '_')}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.forward, file


def _first_reported_from(report: compare.Report, key: str) -> str:
    """The first stage the implementation reported at or after `key` in forward order (where a bug at `key`
    must first fail when the implementation does not report `key` itself)."""
    keys = [r.key for r in report.results]
    return next(r.key for r in report.results[keys.index(key):] if r.status != compare.NOT_CHECKED)


def test_default_set_holds_the_goldens_these_tests_use():
    assert {"tiny", "tiny-varied", "tiny-scaled", "tiny-tied"} <= set(DEFAULT_SET)


@pytest.mark.parametrize("model", ["tiny-varied", "tiny-tied"])
def test_example_passes_the_core_goldens_without_literals(check_against, model):
    """The base of these tests is correct: without a literal, the example passes where the literals fail."""
    from examples.my_llama import forward

    for dtype in ("fp32", "bf16"):
        report = check_against(forward, model, dtype)
        assert report.first_failure is None and report.logits.ok, f"{model} {dtype}: {report.first_failure}"


DIVERGE_CASES = [pytest.param(h, d, id=f"{h}-{d}") for h in DIVERGES for d in ("fp32", "bf16")]


@pytest.mark.parametrize(("hardcode", "dtype"), DIVERGE_CASES)
def test_hardcoded_constant_fails_its_default_golden(tmp_path, check_against, hardcode, dtype):
    replacements, model, shows_at = DIVERGES[hardcode]
    fn, _ = _port(tmp_path, hardcode, replacements)
    report = check_against(fn, model, dtype)
    first = report.first_failure
    assert first is not None, f"{hardcode} passed {model} {dtype}: a walk-through literal went unnoticed"
    assert first.key == _first_reported_from(report, shows_at)


@pytest.mark.parametrize("hardcode", list(CRASHES))
def test_hardcoded_constant_that_crashes_names_the_file(tmp_path, check_against, hardcode):
    replacements, model = CRASHES[hardcode]
    fn, file = _port(tmp_path, hardcode, replacements)
    with pytest.raises(ImplementationError) as info:
        check_against(fn, model, "fp32")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(rf"{re.escape(file.name)}:\d+", message), f"no file:line of the port in: {message}"


@pytest.mark.parametrize("hardcode", list(CRASHES))
def test_hardcoded_constant_that_crashes_stops_the_check(tmp_path, check_against, hardcode):
    """The crash is an ImplementationError (exit 2 at the CLI), never a pass."""
    replacements, model = CRASHES[hardcode]
    fn, _ = _port(tmp_path, hardcode, replacements)
    with pytest.raises(ImplementationError, match="RuntimeError"):
        check_against(fn, model, "fp32")


def test_hardcodes_pass_the_walkthrough_golden(tmp_path, check_against):
    """Why the default set needs more than `tiny`: on the walk-through's own golden every literal is right."""
    for name, (replacements, _, _) in DIVERGES.items():
        fn, _ = _port(tmp_path, name, replacements)
        assert check_against(fn, "tiny", "fp32").first_failure is None, name


def test_missing_rope_scaling_fails_the_scaled_default_golden(check_against):
    """The example implements Llama 3 without 3.1's scaling: tiny-scaled (in the default set) fails at RoPE."""
    from examples.my_llama import forward

    report = check_against(forward, "tiny-scaled", "fp32")
    assert report.first_failure.key == _first_reported_from(report, "rope_cos")
    assert load_golden(GOLDEN_DATA / "tiny-scaled" / "fp32").config.rope_scaling is not None


def test_main_job_names_the_feature_and_stage_of_a_hardcode(tmp_path):
    """Through the real CLI, on the default set: `k_layer[head//4]` fails core at scores; the summary says so."""
    _, file = _port(tmp_path, "gqa-group-4", DIVERGES["gqa-group-4"][0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "golden", "check", "--impl", f"{file.stem}:forward"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    summary = proc.stdout.splitlines()[-1]
    assert re.match(r"\s*core: FAIL at layers\.0\.(scores|probs); 3\.1 rope scaling: FAIL at .*; "
                    r"tied embeddings: PASS$", summary), summary
