"""Every stage of every layer of impl against the reference's goldens.

One test per (model, dtype, stage key), in forward order, with ids like
`smollm2-135m-bf16-layer07-q_rope`. The first failing stage fails; later failures are reported
as its consequences (xfail), so the output points at one place. A stage impl does not report fails
(INCOMPLETE). A user's implementation gets the same checks from `pytest --impl X` (golden/pytest_plugin.py).
"""

import pytest

from golden import compare
from golden.check import Outcome
from golden.report import failure_message, format_report, verdict_line
from impl import stages
from impl.config import PRESETS
from tests.conftest import DTYPES, GOLDEN_MODELS


def _id(model: str, dtype: str, key: str) -> str:
    layer, stage = stages.parse(key)
    return f"{model}-{dtype}-" + (f"layer{layer:02d}-{stage}" if layer is not None else stage)


CASES = [(m, d, k) for m in GOLDEN_MODELS for d in DTYPES for k in stages.all_keys(PRESETS[m].n_layers)]


@pytest.mark.parametrize(("model", "dtype", "key"), CASES, ids=[_id(*c) for c in CASES])
def test_stage_matches_golden(reports, model, dtype, key):
    report = reports(model, dtype)
    r = report.result(key)
    if r.status == compare.NOT_CHECKED:
        pytest.fail(f"NOT REPORTED: {key} ({model} {dtype}). {verdict_line(report)}", pytrace=False)
    if r.status == compare.CONSEQUENCE:
        pytest.xfail(f"consequence of the first failure at {report.first_failure.key}")
    assert r.status == compare.PASS, "FIRST FAILING STAGE " + failure_message(r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", GOLDEN_MODELS)
def test_logits_agree_with_golden(reports, goldens, model, dtype):
    report = reports(model, dtype)
    lg = report.logits
    assert lg is not None, "the implementation reported no logits"
    assert lg.top1_ok, f"next token {lg.top1} != golden's {lg.top1_golden}"
    assert lg.kl <= lg.kl_limit, f"KL {lg.kl:.3e} > limit {lg.kl_limit:.3e}\n" + format_report(
        Outcome(goldens(model, dtype), report))


def test_impl_reports_every_stage(check_against):
    """impl itself reports every stage (a full PASS, not a partial one), so no stage of ours is ever unchecked."""
    from golden.check import impl_forward

    report = check_against(impl_forward, "tiny", "fp32")
    assert report.missing == [] and report.verdict == compare.V_PASS
