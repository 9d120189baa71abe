"""Every stage of every layer of the implementation under test against the reference's goldens.

One test per (model, dtype, stage key), in forward order, with ids like
`smollm2-135m-bf16-layer07-q_rope`. The first failing stage fails; later failures are reported
as its consequences (xfail), so the output points at one place.
"""

import pytest

from golden import compare
from golden.check import Outcome
from golden.report import failure_message, format_report
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
        pytest.skip(f"NOT CHECKED: {key} is not reported by the implementation")
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


def test_impl_reports_every_stage(request, reports):
    """impl itself must report every stage, so that no stage of ours is ever silently unchecked."""
    if request.config.getoption("--impl"):
        pytest.skip("checking a user implementation: unreported stages are listed as not checked")
    report = reports("tiny", "fp32")
    assert [r.key for r in report.results if r.status == compare.NOT_CHECKED] == []
