"""The diagnosis of the first failure (golden.diagnose): the right hypothesis for every bug that can be recomputed
from the golden's inputs, never a hypothesis for a correct implementation, the signatures, and where it is shown."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from golden import compare, diagnose, report
from golden.check import Outcome, run_implementation
from impl import model, stages
from impl.layout import interleaved_to_rotate_half
from tests import test_mutations as mut
from tests.alternatives import ALTERNATIVES
from tests.conftest import GOLDEN_MODELS, SWEEP_DEFAULT_GOLDENS

ROOT = Path(__file__).resolve().parent.parent

# mutation -> the catalogue ids that count as its right diagnosis (two where they are the same number on a golden:
# on tiny, sqrt(dim) is sqrt(128)). None: the bug cannot be recomputed from the golden's inputs.
EXPECTED = {
    # eps 0 and a tiny wrong eps (1e-8) are the same numbers within bf16's noise: the report lists both as a tie
    "rmsnorm-no-eps": {"norm.eps_missing", "norm.eps_wrong"},
    "rmsnorm-in-bf16": {"precision.norm_bf16"},
    "rope-wrong-pairing": {"rope.pairing"},
    "rope-theta-10000": {"rope.theta"},
    "rope-positions-off-by-one": {"rope.positions_offset"},
    "rope-scaling-ignored": {"rope.scaling_missing"},
    "gqa-head-modulo": {"attention.kv_head_modulo"},
    "softmax-wrong-axis": {"attention.softmax_axis"},
    "mask-off-by-one": {"attention.mask_offset"},
    "scale-by-dim": {"attention.scale_dim", "attention.scale_128"},
    "swiglu-w1-w3-swapped": {"ffn.gate_up_swapped"},
    "missing-residual": {"residual.missing"},
    "final-norm-skipped": {"norm.skipped"},
    "tied-output-ignored": None,  # a randomly initialised output matrix: nothing in the golden holds it
    "softmax-bf16-before-max": {"precision.softmax_bf16"},
    "rmsnorm-no-eps-fp32": {"norm.eps_missing"},
    "rmsnorm-eps-1e-6-on-1e-5-model": {"norm.eps_wrong"},
    "rmsnorm-eps-1e-6-on-smollm2": {"norm.eps_wrong"},
    "rmsnorm-eps-1e-5-on-1e-6-model": {"norm.eps_wrong"},
    "rope-scaling-low-freq-factor-2": {"rope.scaling_wrong"},
    "rope-scaling-high-freq-factor-2": {"rope.scaling_wrong"},
    "rope-scaling-factor-16": {"rope.scaling_wrong"},
    "rope-scaling-original-context-32": {"rope.scaling_wrong"},
    "rope-scaling-meta-constants": {"rope.scaling_wrong"},  # on tiny-scaled only the original context differs
}
# The first fifteen mutations are also tried on every golden of the first three models (where a bug does not
# show, NOT_SHOWN says so and a test asserts that the check passes); the others, and those the mutation table
# gives several goldens, on the goldens the mutation table names.
SWEPT = ("tiny", "tiny-scaled", "smollm2-135m")
ORIGINAL = {"rope-wrong-pairing", "rope-theta-10000", "rope-positions-off-by-one", "rope-scaling-ignored",
            "gqa-head-modulo", "softmax-wrong-axis", "mask-off-by-one", "scale-by-dim", "swiglu-w1-w3-swapped",
            "missing-residual", "final-norm-skipped", "tied-output-ignored", "softmax-bf16-before-max",
            "rmsnorm-in-bf16"}
# (mutation, model): goldens where the bug does not show (the check passes), asserted below, so no case is dropped
# silently: rope scaling needs a model that scales; an output matrix ignored needs a tied model.
NOT_SHOWN = {("rope-scaling-ignored", "tiny"), ("rope-scaling-ignored", "smollm2-135m"),
             ("tied-output-ignored", "tiny"), ("tied-output-ignored", "tiny-scaled")}
CASES = [(m, g, d) for m, spec in mut.MUTATIONS.items()
         for g in (SWEPT if m in ORIGINAL else mut._goldens(spec)) for d in spec[4] if (m, g) not in NOT_SHOWN]


def _param(m, g, d):
    """Each bug on its own tiny golden in the default suite; the sweep onto other goldens and SmolLM2 are `slow`."""
    default = g in mut._goldens(mut.MUTATIONS[m]) and g != "smollm2-135m"
    return pytest.param(m, g, d, id=f"{m}-{g}-{d}", marks=[] if default else [pytest.mark.slow])


def _mutant_report(monkeypatch, models, check_against, mutation, golden_model, dtype):
    spec = mut.MUTATIONS[mutation]
    with monkeypatch.context() as mp:
        mut.MUTATIONS[mutation] = (*spec[:2], golden_model, *spec[3:])  # the same bug on another golden
        try:
            return mut._run_mutant(mp, models, check_against, mutation, dtype)
        finally:
            mut.MUTATIONS[mutation] = spec


def test_every_mutation_has_an_expected_diagnosis():
    assert set(EXPECTED) == set(mut.MUTATIONS), "a new mutation needs its expected catalogue ids in EXPECTED"
    assert all(ids is None or ids <= set(diagnose.CATALOGUE) for ids in EXPECTED.values())


@pytest.mark.parametrize(("mutation", "golden_model", "dtype"), [_param(*c) for c in CASES])
def test_diagnosis_top_hypothesis_names_the_bug(monkeypatch, models, check_against, mutation, golden_model, dtype):
    rep = _mutant_report(monkeypatch, models, check_against, mutation, golden_model, dtype)
    first = rep.first_failure
    assert first is not None, f"{mutation} does not show on {golden_model} {dtype}: list it in NOT_SHOWN"
    d = first.diagnosis
    expected = EXPECTED[mutation]
    if expected is None:
        assert not d.matches, f"a hypothesis claims a bug the golden cannot recompute: {d.matches}"
        return
    assert d.top is not None and d.top.id in expected, f"{mutation}: top {d.top}, expected {expected}\n{d.headline()}"
    assert d.top.reproduces, f"{mutation}: {d.top.id} is top but does not reproduce the tensor: rel {d.top.rel}"
    tied = {f.id for f in d.matches if f.rel <= d.top.rel * 1.01 + 1e-12}
    assert tied <= expected or len(tied) == 1, f"{mutation}: other hypotheses tie with the right one: {tied}"


@pytest.mark.parametrize(("mutation", "golden_model"), sorted(NOT_SHOWN),
                         ids=[f"{m}-{g}" for m, g in sorted(NOT_SHOWN)])
def test_not_shown_mutations_really_pass(monkeypatch, models, check_against, mutation, golden_model):
    rep = _mutant_report(monkeypatch, models, check_against, mutation, golden_model, "fp32")
    assert rep.first_failure is None


def test_scale_by_dim_on_tiny_lists_both_equal_ids(monkeypatch, models, check_against):
    d = _mutant_report(monkeypatch, models, check_against, "scale-by-dim", "tiny", "fp32").first_failure.diagnosis
    assert {"attention.scale_dim", "attention.scale_128"} <= {f.id for f in d.matches}
    assert "attention.scale_dim = attention.scale_128" in d.headline()


# ---------------------------------------------------------------- no hypothesis claims a correct implementation
def _forced(goldens, models, fn, golden_model, dtype, layers=None):
    """Diagnose every stage (of the given layers) of fn's run, as if each had failed."""
    ckpt, weights = models(golden_model, dtype)
    truth, g = goldens(golden_model, "fp32"), goldens(golden_model, dtype)
    actual = run_implementation(fn, g.tokens, weights, ckpt.config)
    rep = compare.compare(truth.tensors, actual, dtype, g.tensors if dtype == "bf16" else None)
    for r in rep.results:
        if layers is None or r.layer is None or r.layer in layers:
            yield r, diagnose.diagnose(r.key, actual, truth.tensors, ckpt.config, weights, r.limit)


ALT_CASES = [pytest.param(a, g, d, id=f"{a}-{g}-{d}", marks=[] if g in SWEEP_DEFAULT_GOLDENS else [pytest.mark.slow])
             for a in ALTERNATIVES for g in GOLDEN_MODELS for d in ("fp32", "bf16")]


@pytest.mark.parametrize(("alternative", "golden_model", "dtype"), ALT_CASES)
def test_correct_computation_explains_every_stage_of_a_correct_alternative_best(goldens, models, alternative,
                                                                                golden_model, dtype):
    worse = []
    for r, d in _forced(goldens, models, ALTERNATIVES[alternative], golden_model, dtype):
        if d.top is not None and d.top.rel <= d.correct_rel:
            worse.append(f"{r.key}: {d.top.id} ({d.top.detail}) rel {d.top.rel:.2e} <= correct {d.correct_rel:.2e}")
        assert not d.matches or d.correct_rel < d.matches[0].rel, f"{r.key}: {d.matches[0].id} claims it"
    assert not worse, "a hypothesis explains a correct implementation as well as the truth:\n" + "\n".join(worse)


@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_correct_computation_explains_smollm2_first_and_last_layers_best(goldens, models, dtype):
    """The default suite's share of the SmolLM2 sweep above (marked slow): impl itself, layers 0, 1 and 29."""
    from golden.check import impl_forward

    for r, d in _forced(goldens, models, impl_forward, "smollm2-135m", dtype, layers={0, 1, 29}):
        assert d.top is None or d.correct_rel < d.top.rel, f"{r.key}: {d.top.id} ({d.top.detail})"


# ---------------------------------------------------------------- signatures and labelled axes
def test_head_by_4_on_smollm2_names_heads_3_6_7_and_labels_the_worst_element(check_against):
    from tests.bugs import kv_head_by_4

    first = check_against(kv_head_by_4, "smollm2-135m", "fp32").first_failure
    assert first.key == "layers.0.scores"
    assert "heads 3, 6, 7 wrong" in first.diagnosis.signatures[0] or any(
        "heads 3, 6, 7 wrong" in s for s in first.diagnosis.signatures), first.diagnosis.signatures
    assert first.diagnosis.top.id == "attention.kv_head_group"
    assert re.search(r"worst at head \d+, query \d+, key \d+", report.describe(first))


def test_pure_scale_signature_names_the_simple_form():
    from impl.config import PRESETS

    cfg = PRESETS["tiny"]
    g = torch.randn(8, 17, 17)
    sigs = diagnose.signatures(stages.PROBS, g / 8 ** 0.5, g, 1e-4, cfg)
    assert any(s.startswith("pure scale: impl = 0.3536 x golden (= 1/sqrt(8)") for s in sigs), sigs


def test_position_signature_says_position_dependent():
    from impl.config import PRESETS

    g = torch.randn(17, 8, 16)
    a = g.clone()
    a[1:] *= 1.5
    sigs = diagnose.signatures(stages.Q_ROPE, a, g, 1e-4, PRESETS["tiny"])
    assert "positions 1-16 wrong, positions 0 right: position-dependent (e.g. RoPE or the mask)" in sigs


def test_last_axis_permutation_signature_and_qk_layout():
    from impl.config import PRESETS

    g = torch.randn(17, 8, 16)
    a = interleaved_to_rotate_half(g)
    sigs = diagnose.signatures(stages.Q, a, g, 1e-4, PRESETS["tiny"])
    assert any("permutation of the last axis (dim) makes it match: interleaved -> rotate-half" in s for s in sigs)
    assert diagnose.qk_layout(a, g, 1e-4) == "rotate_half"
    assert diagnose.qk_layout(g, g, 1e-4) == "interleaved"
    assert diagnose.qk_layout(torch.randn_like(g), g, 1e-4) is None


def test_label_index_names_the_axes():
    assert diagnose.label_index(stages.SCORES, (3, 1, 1)) == "head 3, query 1, key 1"
    assert diagnose.label_index(stages.Q_ROPE, (0, 2, 5)) == "position 0, head 2, dim 5"


# ---------------------------------------------------------------- missing inputs
def test_hypotheses_without_their_inputs_are_listed_as_not_tried(goldens, models):
    from tests.bugs import scale_by_sqrt_128

    ckpt, weights = models("tiny", "fp32")
    truth = goldens("tiny", "fp32")
    actual = run_implementation(scale_by_sqrt_128, truth.tokens, weights, ckpt.config)
    partial = {k: v for k, v in truth.tensors.items() if k not in ("layers.0.q_rope", "layers.0.k_rope")}
    d = diagnose.diagnose("layers.0.scores", actual, partial, ckpt.config, weights, 1e-4)
    assert "attention.scale_128 (needs layers.0.q_rope)" in d.not_tried
    assert all(not f.id.startswith("attention.scale") for f in d.findings)
    assert "not tried (the golden lacks their inputs): " in "\n".join(report.diagnosis_lines(d))


# ---------------------------------------------------------------- where it is shown
@pytest.fixture(scope="module")
def scale_outcomes(goldens, check_against):
    from tests.bugs import scale_by_sqrt_128

    name = "tests.bugs:scale_by_sqrt_128"
    return [Outcome(goldens("tiny", d), check_against(scale_by_sqrt_128, "tiny", d), None, impl=name)
            for d in ("fp32", "bf16")]


def test_text_report_and_pytest_message_carry_the_diagnosis(scale_outcomes):
    text = report.format_report(scale_outcomes[0])
    assert "  WHY: attention.scale_dim = attention.scale_128 reproduces it" in text
    msg = report.failure_message(scale_outcomes[0].report.first_failure)
    assert msg.startswith("layers.0.scores: rel") and "WHY: attention.scale_dim" in msg and "fix: " in msg


def test_figure_has_title_cells_first_failure_mark_and_diagnosis(scale_outcomes):
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    fig = report.check_figure(scale_outcomes)
    try:
        titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
        assert titles == [f"tests.bugs:scale_by_sqrt_128 vs golden {o.golden.path} (tiny, {o.golden.dtype})"
                          for o in scale_outcomes]
        grids = [ax.images[0].get_array().shape for ax in fig.axes if ax.images]
        n_layers = scale_outcomes[0].golden.config.n_layers
        assert grids == [(len(stages.LAYER_STAGES), n_layers), (len(report.PRE_POST), 1)] * 2
        marks = [p for ax in fig.axes for p in ax.patches if p.get_gid() == "first-failure"]
        row = stages.LAYER_STAGES.index(stages.SCORES)
        assert len(marks) == 2 and all(isinstance(p, patches.Rectangle) and p.get_xy() == (-0.5, row - 0.5)
                                       for p in marks)
        text = [t.get_text() for t in fig.texts if t.get_gid() == "diagnosis"]
        assert len(text) == 1 and "fp32: first failure layers.0.scores. Why: attention.scale_dim" in text[0]
        assert "bf16: first failure layers.0.scores" in text[0]
    finally:
        plt.close(fig)


def test_cli_check_writes_the_diagnosis_to_json_text_and_png(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run([sys.executable, "-m", "golden", "check", "golden/data/tiny", "--dtype", "fp32", "--impl",
                           "tests.bugs:scale_by_sqrt_128", "--json", str(out), "--plot", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "WHY: attention.scale_dim = attention.scale_128 reproduces it" in proc.stdout
    data = json.loads(out.read_text())[0]
    assert data["first_failure"] == "layers.0.scores"
    top = data["diagnosis"][0]
    assert top["id"] in ("attention.scale_dim", "attention.scale_128") and top["reproduces"] is True
    assert top["detail"]
    stage = next(s for s in data["stages"] if s["key"] == "layers.0.scores")
    assert stage["diagnosis"]["findings"][0]["id"] == top["id"]
    assert png.stat().st_size > 10_000


# ---------------------------------------------------------------- the catalogue
def test_catalogue_entries_are_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for h in diagnose.CATALOGUE.values():
        assert re.fullmatch(r"[a-z]+\.[a-z0-9_]+", h.id), h.id
        assert h.what and h.hint and h.origin
        assert f"| `{h.id}` |" in readme, f"{h.id} is not in the README's catalogue table"


def test_hypotheses_use_impl_functions_out_of_reach_of_a_monkeypatch(monkeypatch):
    monkeypatch.setattr(model, "attention_scores", lambda *a, **k: None)
    assert diagnose.model.attention_scores is not model.attention_scores
    assert diagnose.model.__file__ == model.__file__
