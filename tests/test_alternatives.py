"""Correct implementations other than impl pass every golden; the README's sketch passes what it reports."""

import pytest

from examples.my_llama import forward as sketch_forward
from golden import compare
from tests.alternatives import ALTERNATIVES
from tests.conftest import DTYPES, GOLDEN_MODELS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", GOLDEN_MODELS)
@pytest.mark.parametrize("alternative", list(ALTERNATIVES))
def test_correct_alternative_passes_every_stage(check_against, alternative, model, dtype):
    report = check_against(ALTERNATIVES[alternative], model, dtype)
    first = report.first_failure
    assert first is None, f"false alarm at {first.key}: rel {first.metrics.rel:.3e} > {first.limit:.3e}"
    assert report.logits.ok, f"false alarm on logits: {report.logits}"
    assert not [r.key for r in report.results if r.status == compare.NOT_CHECKED]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["tiny", "smollm2-135m"])
def test_readme_sketch_passes_and_lists_unreported_stages(check_against, model, dtype):
    report = check_against(sketch_forward, model, dtype)
    assert report.passed
    not_checked = {r.stage for r in report.results if r.status == compare.NOT_CHECKED}
    assert {"q", "scores", "ffn_gate", "logprobs_last"} <= not_checked
    assert {"q_rope", "probs", "out", "logits"}.isdisjoint(not_checked)


def test_readme_sketch_without_rope_scaling_fails_on_the_scaled_model(check_against):
    report = check_against(sketch_forward, "tiny-scaled", "fp32")
    assert report.first_failure.key == "layers.0.q_rope"
