"""Correct implementations other than impl pass every golden; the README's example passes every stage."""

import pytest

from examples.my_llama import forward as sketch_forward
from golden import compare
from golden.check import impl_forward
from impl.config import PRESETS
from tests.alternatives import ALTERNATIVES, BF16_ONLY
from tests.conftest import DTYPES, GOLDEN_MODELS, SWEEP_DEFAULT_GOLDENS

SMOLLM2 = "smollm2-135m"


def cases(names, smollm2_default: str, dtypes=None, smollm2_dtype=None):
    """(name, model[, dtype]) for every name and golden model: SWEEP_DEFAULT_GOLDENS in the default suite, and
    SmolLM2 for `smollm2_default` (in `smollm2_dtype` only, where given); every other case is `slow`."""
    for name in names:
        for model in GOLDEN_MODELS:
            for dtype in dtypes or [None]:
                default = model in SWEEP_DEFAULT_GOLDENS or (
                    model == SMOLLM2 and name == smollm2_default and smollm2_dtype in (None, dtype))
                marks = [] if default else [pytest.mark.slow]
                values, id_ = ((name, model), f"{name}-{model}") if dtype is None else \
                    ((name, model, dtype), f"{name}-{model}-{dtype}")
                yield pytest.param(*values, marks=marks, id=id_)


@pytest.mark.parametrize(("alternative", "model", "dtype"),
                         list(cases(ALTERNATIVES, "rope-like-transformers", DTYPES, smollm2_dtype="fp32")))
def test_correct_alternative_passes_every_stage(check_against, alternative, model, dtype):
    report = check_against(ALTERNATIVES[alternative], model, dtype)
    first = report.first_failure
    assert first is None, f"false alarm at {first.key}: rel {first.metrics.rel:.3e} > {first.limit:.3e}"
    assert report.logits.ok, f"false alarm on logits: {report.logits}"
    assert report.missing == [] and report.verdict == compare.V_PASS


@pytest.mark.parametrize("dtype", DTYPES)
# On SmolLM2 the README's own command runs the example (tests/test_readme_commands.py): slow here.
@pytest.mark.parametrize("model", ["tiny", pytest.param(SMOLLM2, marks=pytest.mark.slow)])
def test_readme_example_reports_and_passes_every_stage(check_against, model, dtype):
    report = check_against(sketch_forward, model, dtype)
    assert report.verdict == compare.V_PASS and report.missing == []


def test_readme_example_without_rope_scaling_fails_on_the_scaled_model(check_against):
    report = check_against(sketch_forward, "tiny-scaled", "fp32")
    assert report.first_failure.key == "rope_cos"


BF16_ONLY_NAMES = list(BF16_ONLY)


@pytest.mark.parametrize(("alternative", "model"), list(cases(BF16_ONLY_NAMES, "walkthrough-bf16")))
def test_bf16_only_alternative_passes_bf16(check_against, alternative, model):
    report = check_against(BF16_ONLY[alternative][0], model, "bf16")
    first = report.first_failure
    assert first is None, f"false alarm in bf16 at {first.key} ({first.rule})"
    assert report.logits.ok, f"false alarm on logits: {report.logits}"


@pytest.mark.parametrize(("alternative", "model"), list(cases(BF16_ONLY_NAMES, "")))
def test_bf16_only_alternative_fails_fp32_at_its_stage(check_against, alternative, model):
    """A bf16 cast inside an fp32 computation is a bug in an fp32 run."""
    fn, first_key = BF16_ONLY[alternative]
    first = check_against(fn, model, "fp32").first_failure
    assert first is not None, f"{alternative} passed fp32 on {model}"
    assert first.key == first_key


MARGIN_IMPLS = {"impl": impl_forward, **ALTERNATIVES, **{k: fn for k, (fn, _) in BF16_ONLY.items()}}


# On SmolLM2 the default suite runs the tightest margin (the walk-through's precision: S at 0.499 of the limit).
@pytest.mark.parametrize(("alternative", "model"), list(cases(MARGIN_IMPLS, "walkthrough-bf16")))
def test_correct_bf16_stays_within_half_the_scale_bias_limit(check_against, alternative, model):
    """The margin on the correct side: at every RMSNorm output, S <= limit / 2 (bugs: >= 2x, test_mutations.py)."""
    report = check_against(MARGIN_IMPLS[alternative], model, "bf16")
    rows = [r for r in report.results if r.scale_bias is not None]
    assert len(rows) == 2 * PRESETS[model].n_layers + 1, "the rule must run at every norm output"
    worst = max(rows, key=lambda r: r.scale_bias.s / r.scale_bias.limit)
    assert worst.scale_bias.s <= 0.5 * worst.scale_bias.limit, (
        f"{worst.key}: S {worst.scale_bias.s:.3f} > half the limit {worst.scale_bias.limit}")
