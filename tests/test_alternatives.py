"""Correct implementations other than impl pass every golden; the README's example passes every stage."""

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
    assert report.missing == [] and report.verdict == compare.V_PASS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["tiny", "smollm2-135m"])
def test_readme_example_reports_and_passes_every_stage(check_against, model, dtype):
    report = check_against(sketch_forward, model, dtype)
    assert report.verdict == compare.V_PASS and report.missing == []


def test_readme_example_without_rope_scaling_fails_on_the_scaled_model(check_against):
    report = check_against(sketch_forward, "tiny-scaled", "fp32")
    assert report.first_failure.key == "rope_cos"
