"""`--qk-layout hf`: q/k stages in transformers' rotate-half layout are converted before comparing; undeclared, the
report names the flag only where q AND q_rope match in that layout (q alone is a bug: HF-ordered wq/wk rows with
interleaved RoPE)."""

import pytest

from golden import cli
from tests.alternatives import rotate_half_layout
from tests.bugs import hf_rows_complex_rope
from tests.conftest import DTYPES, golden_dir

TO_HF = "q matches the golden in rotate-half layout: pass --qk-layout hf"
TO_META = "q matches the golden in Meta's interleaved layout as reported: drop --qk-layout hf"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_half_port_passes_with_qk_layout_hf(check_against, dtype):
    report = check_against(rotate_half_layout, "tiny", dtype, qk_layout="hf")
    assert report.verdict == "PASS" and report.hints == []


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["tiny-varied", "tiny-scaled", "tiny-tied", "smollm2-135m"])
def test_rotate_half_port_passes_every_golden_with_qk_layout_hf(check_against, model, dtype):
    assert check_against(rotate_half_layout, model, dtype, qk_layout="hf").verdict == "PASS"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_half_port_undeclared_fails_at_q_with_the_hint(check_against, dtype):
    report = check_against(rotate_half_layout, "tiny", dtype)
    assert report.first_failure.key == "layers.0.q"
    assert len(report.hints) == 1 and report.hints[0].startswith(TO_HF)


@pytest.mark.parametrize("qk_layout", ["meta", "hf"])
def test_unconverted_rows_are_a_bug_not_a_layout(check_against, qk_layout):
    """HF rows with complex RoPE: q matches after the permutation, q_rope matches in neither layout: no hint."""
    report = check_against(hf_rows_complex_rope, "tiny", "fp32", qk_layout=qk_layout)
    first = {"meta": "layers.0.q", "hf": "layers.0.q_rope"}[qk_layout]
    assert report.first_failure.key == first and report.hints == []


def test_meta_layout_declared_hf_gets_the_hint_to_drop_the_flag(check_against):
    from golden.check import impl_forward

    report = check_against(impl_forward, "tiny", "fp32", qk_layout="hf")
    assert report.first_failure.key == "layers.0.q" and report.hints[0].startswith(TO_META)


@pytest.mark.parametrize(("flags", "exit_code", "shown"), [
    ((), 1, f"  HINT: {TO_HF}"),
    (("--qk-layout", "hf"), 0, "PASS: 43/43 stages within tolerance"),
], ids=["undeclared", "declared"])
def test_check_cli_qk_layout(capsys, flags, exit_code, shown):
    argv = ["check", str(golden_dir("tiny", "fp32")), "--impl", "tests.alternatives:rotate_half_layout", *flags]
    assert cli.main(argv) == exit_code
    assert shown in capsys.readouterr().out


def test_check_cli_bad_qk_layout_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--qk-layout", "rotate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--qk-layout" in err
