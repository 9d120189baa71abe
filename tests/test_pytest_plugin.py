"""`pytest --impl X` (golden/pytest_plugin.py): only X's checks, one test per golden x dtype x stage, X run once per
golden and dtype, a crash failing once, a missing model one line; run in-process with pytester, in a throwaway
project like a user's (tests/test_pytest_plugin_venv.py installs the package into a venv and runs it there)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "examples" / "my_llama.py").read_text()
TINY_FP32 = ("--golden", "tiny/fp32")
N_STAGES = 43  # tiny: 2 layers
# A golden with decode steps adds, for a prefill-only implementation (as the example), one skipped `decode` test
# ("decode: not run (prefill-only implementation)"); for a cached one, a test per step and stage.
NOT_RUN = 1
N_DECODE = 8 * 25  # tiny: 8 steps of 25 stages

BROKEN = EXAMPLE.replace("cfg.rope_theta", "10000.0")  # the classic: Llama 2's theta
CRASHING = EXAMPLE.replace('probs = put(L + "probs", scores.float().softmax(-1).type_as(x))',
                           'probs = put(L + "probs", scores.float().softmax(-1).type_as(x)[tokens[999]])')
PARTIAL = '''
from impl import model

KEEP = {"embeddings", "layers.0.q_rope", "layers.1.q_rope", "layers.0.probs", "layers.1.probs", "layers.0.out",
        "layers.1.out", "norm", "logits"}


def forward(tokens, w, cfg, trace):  # impl, reporting 9 of the 43 stages
    return model.forward(tokens, w, cfg, trace=lambda name, t: trace(name, t) if name in KEEP else None)
'''


def _line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


@pytest.fixture
def project(pytester, monkeypatch):
    """A user's project: their my_llama.py and nothing else. The plugin is named with -p, as in a checkout whose
    installed metadata predates the entry point (with it, -p is a no-op)."""
    monkeypatch.delitem(sys.modules, "my_llama", raising=False)  # a my_llama another test imported is not theirs
    pytester.makepyfile(my_llama=EXAMPLE)

    def run(*args, source: str | None = None):
        if source is not None:
            pytester.makepyfile(my_llama=source)
        return pytester.runpytest_inprocess("-p", "golden.pytest_plugin", "-p", "no:xdist", "-p", "no:cacheprovider",
                                            "-rfEs", *args)

    return run


def test_without_impl_the_plugin_collects_nothing(project, pytester):
    pytester.makepyfile(test_mine="def test_mine():\n    pass\n")
    result = project()
    result.assert_outcomes(passed=1)
    assert "test_mine.py ." in result.stdout.str()


def test_named_paths_run_only_those_tests(project, pytester):
    """`pytest PATH --impl X`: PATH's tests (which may read --impl), no golden checks."""
    pytester.makepyfile(test_mine="def test_mine(pytestconfig):\n    assert pytestconfig.getoption('impl')\n")
    project("test_mine.py", "--impl", "my_llama:forward").assert_outcomes(passed=1)


def test_impl_runs_only_its_checks_one_per_stage(project, pytester):
    pytester.makepyfile(test_mine="def test_mine():\n    raise AssertionError('a file was collected')\n")
    result = project("--impl", "my_llama:forward", *TINY_FP32, "-v")
    result.assert_outcomes(passed=N_STAGES, skipped=NOT_RUN)
    result.stdout.fnmatch_lines(["tiny/fp32::tokens PASSED*", "tiny/fp32::layers.0.q_rope PASSED*",
                                 "tiny/fp32::logprobs_last PASSED*",
                                 "tiny/fp32::decode SKIPPED (tiny/fp32: decode: not run (prefill-only *"])


def test_collects_goldens_by_dtype_fp32_first(project):
    result = project("--impl", "my_llama:forward", "--golden", "tiny", "--collect-only", "-q")
    ids = [line for line in result.stdout.lines if "::" in line]
    assert len(ids) == 2 * (N_STAGES + NOT_RUN) and ids[0] == "tiny/fp32::tokens" and ids[-1] == "tiny/bf16::decode"
    result = project("--impl", "my_llama:forward", "--golden", "tiny", "--golden-dtype", "bf16", "--collect-only", "-q")
    assert sum("::" in line for line in result.stdout.lines) == N_STAGES + NOT_RUN


def test_broken_implementation_fails_once_at_its_first_stage(project):
    result = project("--impl", "my_llama:forward", *TINY_FP32, source=BROKEN)
    result.assert_outcomes(passed=7, failed=1, skipped=N_STAGES - 8 + NOT_RUN)  # up to v in layer 0, then RoPE's
    result.stdout.fnmatch_lines([
        "FAILED tiny/fp32::rope_cos - Failed: rope_cos: rel *",
        "*consequence of the first failure at tiny/fp32::rope_cos*"])
    assert "WHY: rope.theta reproduces it" in result.stdout.str()
    assert "the whole table of tiny/fp32: python -m golden check tiny/fp32 --impl my_llama:forward --dtype fp32" in (
        result.stdout.str())


def test_crash_fails_one_test_naming_the_file_and_line(project):
    result = project("--impl", "my_llama:forward", *TINY_FP32, source=CRASHING)
    failed_at = "layers.0.probs"  # the stage it was computing when it raised
    result.assert_outcomes(failed=1, skipped=N_STAGES - 1 + NOT_RUN)  # the stages it did report are not judged
    result.stdout.fnmatch_lines([
        f"crashed before reporting {failed_at}: the implementation raised IndexError: index 999 is out of bounds *"
        f"at my_llama.py:{_line_of(CRASHING, 'tokens[999]')} (last stage traced: layers.0.scores)",
        f"FAILED tiny/fp32::{failed_at} - Failed: crashed before*",
        f"*implementation crashed, see tiny/fp32::{failed_at}"])


def test_crash_shows_on_a_selected_test_never_a_deselected_one(project):
    """-k layers.1: the crash in layer 0 fails the first selected test; no run passes by selecting around it."""
    result = project("--impl", "my_llama:forward", *TINY_FP32, "-k", "layers.1", source=CRASHING)
    result.assert_outcomes(failed=1, skipped=17, deselected=N_STAGES - 18 + NOT_RUN)
    result.stdout.fnmatch_lines(["crashed before reporting layers.0.probs: *",
                                 "FAILED tiny/fp32::layers.1.residual_in - Failed: crashed before*"])


def test_implementation_runs_once_per_golden_and_dtype(project, pytester):
    counted = EXAMPLE.replace("def forward(tokens, w, cfg, trace):",
                              "RUNS = []\n\n\ndef forward(tokens, w, cfg, trace):\n    RUNS.append(1)")
    pytester.makeconftest("def pytest_sessionfinish(session):\n    import my_llama\n"
                          "    print('runs:', len(my_llama.RUNS))\n")
    result = project("--impl", "my_llama:forward", *TINY_FP32, "-s", source=counted)
    result.assert_outcomes(passed=N_STAGES, skipped=NOT_RUN)
    assert "runs: 1" in result.stdout.str()


@pytest.mark.parametrize(("flag", "outcomes", "shown"), [
    ((), {"passed": 9, "failed": 34, "skipped": NOT_RUN},
     "NOT REPORTED: layers.0.q (tiny/fp32). INCOMPLETE: 9 of 43 stages reported"),
    (("--partial",), {"passed": 9, "skipped": 34 + NOT_RUN},
     "PARTIAL: 9 of 43 stages (tiny/fp32); layers.0.q not reported"),
], ids=["full-check-fails", "partial-passes"])
def test_unreported_stages_fail_unless_partial(project, flag, outcomes, shown):
    result = project("--impl", "my_llama:forward", *TINY_FP32, *flag, source=PARTIAL)
    result.assert_outcomes(**outcomes)
    assert shown in result.stdout.str()


@pytest.mark.slow
def test_qk_layout_hf_through_the_plugin(project):
    spec = ("--impl", "tests.alternatives:rotate_half_layout", *TINY_FP32)
    project(*spec, "--qk-layout", "hf").assert_outcomes(passed=N_STAGES, skipped=NOT_RUN)
    result = project(*spec)
    result.assert_outcomes(passed=N_STAGES - 8, failed=1, skipped=7 + NOT_RUN)  # q, k, q_rope, k_rope of both layers
    assert "HINT: q matches the golden in rotate-half layout: pass --qk-layout hf" in result.stdout.str()


@pytest.mark.parametrize(("args", "outcome"), [
    (("--golden", "smollm2-135m"), "failed"),  # asked for by name: its model must be there
    (("-k", "not-fetched"), "skipped"),  # the default set: checked when fetched
], ids=["named", "default-set"])
def test_unfetched_model_is_one_line_naming_the_fetch(project, monkeypatch, tmp_path, args, outcome):
    monkeypatch.setenv("LLAMA3_GOLDEN_CACHE", str(tmp_path / "empty-cache"))
    result = project("--impl", "my_llama:forward", *args)
    result.assert_outcomes(**{outcome: 1},
                           **({"deselected": 8 * (N_STAGES + NOT_RUN)} if outcome == "skipped" else {}))
    assert ("smollm2-135m: its model is not fetched here; run `python -m impl fetch smollm2-135m` to check its "
            "goldens too") in result.stdout.str()


# ---------------------------------------------------------------- decode steps (golden.decode)
CACHED = (ROOT / "examples" / "my_llama_cached.py").read_text()
ROPE_FROM_ZERO = CACHED.replace("positions = torch.arange(start_pos, start_pos + seq).float()",
                                "positions = torch.arange(seq).float()")  # each decoded token rotated as position 0


def test_cached_implementation_gets_a_test_per_decode_step_and_stage(project):
    result = project("--impl", "my_llama:forward", *TINY_FP32, "-v", source=CACHED)
    result.assert_outcomes(passed=N_STAGES + N_DECODE)
    result.stdout.fnmatch_lines(["tiny/fp32::logprobs_last PASSED*", "tiny/fp32::decode.1.tokens PASSED*",
                                 "tiny/fp32::decode.8.logprobs_last PASSED*"])


def test_decode_bug_fails_once_at_its_step_and_stage(project):
    result = project("--impl", "my_llama:forward", *TINY_FP32, source=ROPE_FROM_ZERO)
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= N_STAGES and outcomes["failed"] == 1, outcomes  # the prefill is right
    result.stdout.fnmatch_lines([
        "FAILED tiny/fp32::decode.1.rope_cos - Failed: step 1 (position 17), rope_cos*",
        "*consequence of the first failure at tiny/fp32::decode.1.rope_cos*"])
    assert "WHY: rope.decode_from_zero reproduces it (position 17 rotated as position 0" in result.stdout.str()


@pytest.mark.parametrize(("args", "says"), [
    (("--impl", "no_such_module:forward"), "ERROR: --impl 'no_such_module:forward': cannot import no_such_module "
                                           "(ModuleNotFoundError*); run from the folder that holds it, or give its "
                                           "file: path/to/no_such_module.py:forward"),
    (("--impl", "my_llama:forward", "--golden", "no/such/golden"), "ERROR: --golden: no/such/golden: not a golden "
                                                                   "folder*"),
    (("--impl", "my_llama:forward", "--qk-layout", "rotate"), "*--qk-layout: invalid choice: 'rotate'*"),
], ids=["unimportable-impl", "missing-golden", "bad-qk-layout"])
def test_bad_input_is_a_one_line_usage_error(project, args, says):
    result = project(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([says])


@pytest.mark.slow
def test_impl_by_file_path(project, pytester):
    sub = pytester.mkdir("notebooks")
    (sub / "export.py").write_text(BROKEN)
    result = project("--impl", "notebooks/export.py:forward", *TINY_FP32)
    result.assert_outcomes(passed=7, failed=1, skipped=N_STAGES - 8 + NOT_RUN)


@pytest.mark.parametrize(("impl", "where", "refused"), [
    ("my_llama:forward", "tests", True), (None, "tests", False), ("my_llama:forward", "benchmarks", False),
], ids=["tests-with-impl", "tests-alone", "benchmarks-with-impl"])
def test_the_repository_suite_refuses_impl(impl, where, refused):
    """In this repository, tests/ checks impl: naming it with --impl is a usage error, not impl's checks passed off
    as the user's; the benchmarks take --impl (they time it)."""
    from types import SimpleNamespace

    from tests import conftest

    config = SimpleNamespace(getoption=lambda name, default=None: impl if name == "impl" else default)
    items = [SimpleNamespace(path=ROOT / where / "test_x.py")]
    if refused:
        with pytest.raises(pytest.UsageError, match="tests/ checks this repository's impl, not --impl my_llama"):
            conftest.pytest_collection_modifyitems(config, items)
    else:
        conftest.pytest_collection_modifyitems(config, items)
