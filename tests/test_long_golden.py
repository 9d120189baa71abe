"""The long-context golden: Llama 3.1's real rope scaling on a prompt longer than its original context.

`golden/data/tiny-long/fp32` is a tiny model (2 layers, 2 heads sharing one kv head, head_dim 16) with Meta's
scaling constants (factor 8, low 1, high 4, original context 8,192) on an 8,361-token prompt: every stage with a
position axis is sampled (golden.sampling). The RoPE checks here run impl's real forward and stop it after the
RoPE tables (a RoPE bug fails there, before any layer), so each costs a second, not a whole long check.
"""

from __future__ import annotations

import pytest
import torch

from golden import compare, sampling
from golden.check import Stream, impl_forward
from golden.sampling import Sampled
from impl import model, stages
from impl.config import RopeScaling
from tests.conftest import golden_dir
from tests.test_mutations import _ORIG, _rope_scaling_meta_constants

LONG = "tiny-long"


def test_long_golden_is_sampled_long_and_small(goldens):
    g = goldens(LONG, "fp32")
    assert len(g.tokens) > g.config.rope_scaling.original_max_position_embeddings == 8192
    assert g.config.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=8192)
    for key, t in g.tensors.items():
        sampled = sampling.position_axis(stages.parse(key)[1]) is not None
        assert isinstance(t, Sampled) == sampled, key
    size = sum(p.stat().st_size for p in golden_dir(LONG, "fp32").iterdir())
    assert size <= 5e6, f"{size / 1e6:.1f} MB"


class _Stop(Exception):
    pass


def _rope_stages(goldens, models) -> compare.Report:
    """impl's forward (with whatever seam a test patched) judged on the long golden up to rope_sin."""
    g = goldens(LONG, "fp32")
    ckpt, weights = models(LONG, "fp32")
    stream = Stream(g.tensors, "fp32")

    def trace(key, t):
        stream(key, t)
        if key == stages.ROPE_SIN:
            raise _Stop

    with pytest.raises(_Stop):
        model.forward(torch.tensor(g.tokens), weights, ckpt.config, trace=trace)
    return stream.report(partial=True)


ROPE_BUGS = {
    "scaling-ignored": lambda f, s: f,
    "llama-3.2-factor-32": lambda f, s: _ORIG["scale_rope_frequencies"](f, RopeScaling(factor=32.0)),
    "low-freq-factor-2": lambda f, s: _ORIG["scale_rope_frequencies"](f, RopeScaling(low_freq_factor=2.0)),
    "tiny-scaled-context-64": lambda f, s: _ORIG["scale_rope_frequencies"](
        f, RopeScaling(original_max_position_embeddings=64)),
}


@pytest.mark.parametrize("bug", list(ROPE_BUGS))
def test_long_golden_catches_a_rope_scaling_bug_at_rope_cos(monkeypatch, goldens, models, bug):
    monkeypatch.setattr(model, "scale_rope_frequencies", ROPE_BUGS[bug])
    first = _rope_stages(goldens, models).first_failure
    assert first is not None and first.key == stages.ROPE_COS


def test_meta_constants_are_right_on_the_long_golden(monkeypatch, goldens, models):
    """Meta's constants as literals fail tiny-scaled (tests/test_mutations.py) but are the long golden's own."""
    monkeypatch.setattr(model, "scale_rope_frequencies", _rope_scaling_meta_constants)
    report = _rope_stages(goldens, models)
    assert report.first_failure is None and len(report.checked) == 4  # tokens, embeddings, rope_cos, rope_sin


def test_impl_passes_the_long_golden_in_fp32(check_against):
    """The whole check: ~17 s of CPU (impl's own 8,361-token forward is most of it)."""
    report = check_against(impl_forward, LONG, "fp32")
    assert report.verdict == compare.V_PASS, report.first_failure


@pytest.mark.slow
def test_rope_scaling_ignored_fails_the_whole_long_check_at_rope_cos(monkeypatch, check_against):
    monkeypatch.setattr(model, "scale_rope_frequencies", ROPE_BUGS["scaling-ignored"])
    report = check_against(model.forward, LONG, "fp32")
    assert report.first_failure.key == stages.ROPE_COS and not report.passed
    assert report.first_failure.diagnosis.findings[0].id == "rope.scaling_missing"
