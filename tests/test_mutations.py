"""Real bugs, introduced into impl on purpose (in the test, never in the source), must be caught.

Each mutation is a from-scratch mistake people really make. Applied with monkeypatch to one of the
reference forward's documented seams (impl.model's docstring lists them), the suite must fail and
name the right first stage. Precision mutations (a bf16 cast inside an fp32
computation) are checked in fp32, where they are bugs; in a bf16 run the same cast is the
precision the user asked for.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from impl import model
from impl.config import RopeScaling
from tests.alternatives import _hf_rows


def _rms_norm_no_eps(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True))).type_as(x) * weight


def _rms_norm_in_bf16(x, weight, eps):
    xb = x.to(torch.bfloat16)
    return (xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rms_norm_eps(fixed):
    """RMSNorm with a literal eps, whatever the model's config says (the walk-through writes 1e-05)."""
    def rms_norm(x, weight, eps):
        return _ORIG["rms_norm"](x, weight, fixed)

    return rms_norm


def _rope_scaling_with(**changes):
    """Llama 3.1 rope scaling with one constant wrong (e.g. low_freq_factor 2 instead of the config's 1)."""
    def scale(freqs, s):
        return _ORIG["scale_rope_frequencies"](freqs, dataclasses.replace(s, **changes))

    return scale


def _rope_scaling_meta_constants(freqs, s):
    """Meta's apply_scaling constants (factor 8, low 1, high 4, original context 8192) written as literals, whatever
    the model's config says (a port of Meta's llama/model.py)."""
    return _ORIG["scale_rope_frequencies"](freqs, RopeScaling())


def _rope_frequencies_theta_10000(config):
    return _ORIG["rope_frequencies"](config.replace(rope_theta=10000.0))


def _freqs_cis_off_by_one(config, seq_len, start=0):
    return _ORIG["precompute_freqs_cis"](config, seq_len, start + 1)


def _kv_head_modulo(n_heads, n_kv_heads):
    return torch.arange(n_heads) % n_kv_heads


def _probs_wrong_axis(scores):
    return F.softmax(scores.float(), dim=-2).nan_to_num(0.0).type_as(scores)


def _probs_bf16_before_max(scores):
    return F.softmax(scores.to(torch.bfloat16), dim=-1).type_as(scores)


def _mask_off_by_one(q_len, k_len, start_pos, dtype=torch.float32):
    return _ORIG["causal_mask"](q_len, k_len, start_pos + 1, dtype)


def _scores_scaled_by_dim(q, k, start_pos=0):
    dim = q.shape[1] * q.shape[2]  # n_heads * head_dim: the model width, not the head width
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim)
    return scores + model.causal_mask(q.shape[0], k.shape[0], start_pos, scores.dtype)


def _swiglu_swapped(x, w1, w3):
    return _ORIG["swiglu_parts"](x, w3, w1)


def _no_residual(x, sublayer_out):
    return sublayer_out  # bug: the skip connection dropped ("h = attention(norm(x))")


def _skip_final_norm(weights):
    final = weights["norm.weight"]

    def rms_norm(x, weight, eps):
        return x if weight is final else _ORIG["rms_norm"](x, weight, eps)

    return rms_norm


def _untied_output(w):
    if "output.weight" in w:
        return w["output.weight"]
    # bug: a loader that finds no output.weight and initialises one instead of tying
    g = torch.Generator().manual_seed(0)
    return torch.randn(w["tok_embeddings.weight"].shape, generator=g).to(w["tok_embeddings.weight"].dtype) * 0.02


_ORIG = {name: getattr(model, name) for name in (
    "rope_frequencies", "precompute_freqs_cis", "causal_mask", "swiglu_parts", "rms_norm", "scale_rope_frequencies")}

# id -> (seam patched in impl.model, or None where the weights are mutated; replacement, golden model(s),
#        expected first failing key, dtypes)
FP32, BOTH = ("fp32",), ("fp32", "bf16")
RANDOM_EPS_1E5 = ("tiny", "tiny-scaled", "tiny-tied")  # random embeddings (mean(x^2) ~ 4e-4), eps 1e-5
MUTATIONS = {
    # eps/mean(x^2) moves a random model's first norm by ~1.2%: 7x the fp32 bound but inside 5x the bf16 size
    # noise; bf16's scale-bias rule sees it (2.6x-3.3x its limit). On SmolLM2 (trained embeddings: 0.04% per row)
    # and on tiny-varied (eps 1e-6: 0.1%) only the fp32 check sees it (README, "How a check decides").
    "rmsnorm-no-eps": ("rms_norm", _rms_norm_no_eps, RANDOM_EPS_1E5, "layers.0.attn_norm", BOTH),
    "rmsnorm-no-eps-fp32": ("rms_norm", _rms_norm_no_eps, ("tiny-varied", "smollm2-135m"), "layers.0.attn_norm",
                            FP32),
    "rmsnorm-eps-1e-6-on-1e-5-model": ("rms_norm", _rms_norm_eps(1e-6), RANDOM_EPS_1E5, "layers.0.attn_norm", BOTH),
    "rmsnorm-eps-1e-6-on-smollm2": ("rms_norm", _rms_norm_eps(1e-6), "smollm2-135m", "layers.0.attn_norm", FP32),
    "rmsnorm-eps-1e-5-on-1e-6-model": ("rms_norm", _rms_norm_eps(1e-5), "tiny-varied", "layers.0.attn_norm", BOTH),
    # tiny-scaled puts a frequency in each band of the scaling, so each constant shows (in fp32 and bf16).
    "rope-scaling-low-freq-factor-2": ("scale_rope_frequencies", _rope_scaling_with(low_freq_factor=2.0),
                                       "tiny-scaled", "rope_cos", BOTH),
    "rope-scaling-high-freq-factor-2": ("scale_rope_frequencies", _rope_scaling_with(high_freq_factor=2.0),
                                        "tiny-scaled", "rope_cos", BOTH),
    "rope-scaling-factor-16": ("scale_rope_frequencies", _rope_scaling_with(factor=16.0), "tiny-scaled", "rope_cos",
                               BOTH),
    "rope-scaling-original-context-32": ("scale_rope_frequencies",
                                         _rope_scaling_with(original_max_position_embeddings=32), "tiny-scaled",
                                         "rope_cos", BOTH),
    # tiny-scaled's original context is 64: Meta's 8192 keeps all but the slowest frequencies out of the scaling.
    "rope-scaling-meta-constants": ("scale_rope_frequencies", _rope_scaling_meta_constants, "tiny-scaled",
                                    "rope_cos", BOTH),
    "rmsnorm-in-bf16": ("rms_norm", _rms_norm_in_bf16, "tiny", "layers.0.attn_norm", FP32),
    "rope-wrong-pairing": (None, _hf_rows, "tiny", "layers.0.q", BOTH),
    "rope-theta-10000": ("rope_frequencies", _rope_frequencies_theta_10000, "tiny", "rope_cos", BOTH),
    "rope-positions-off-by-one": ("precompute_freqs_cis", _freqs_cis_off_by_one, "tiny", "rope_cos", BOTH),
    "rope-scaling-ignored": ("scale_rope_frequencies", lambda f, s: f, "tiny-scaled", "rope_cos", BOTH),
    "gqa-head-modulo": ("kv_head_of", _kv_head_modulo, "tiny", "layers.0.scores", BOTH),
    "softmax-wrong-axis": ("attention_probs", _probs_wrong_axis, "tiny", "layers.0.probs", BOTH),
    "mask-off-by-one": ("causal_mask", _mask_off_by_one, "tiny", "layers.0.scores", BOTH),
    "scale-by-dim": ("attention_scores", _scores_scaled_by_dim, "tiny", "layers.0.scores", BOTH),
    "swiglu-w1-w3-swapped": ("swiglu_parts", _swiglu_swapped, "tiny", "layers.0.ffn_gate", BOTH),
    "missing-residual": ("residual", _no_residual, "tiny", "layers.0.residual_attn", BOTH),
    "final-norm-skipped": ("rms_norm", _skip_final_norm, "tiny", "norm", BOTH),
    "tied-output-ignored": ("output_weight", _untied_output, "smollm2-135m", "logits", BOTH),
    "softmax-bf16-before-max": ("attention_probs", _probs_bf16_before_max, "smollm2-135m", "layers.0.probs", FP32),
}
def _goldens(spec) -> tuple[str, ...]:
    return (spec[2],) if isinstance(spec[2], str) else spec[2]


CASES = [(m, g, d) for m, spec in MUTATIONS.items() for g in _goldens(spec) for d in spec[4]]
IDS = [f"{m}-{d}" if isinstance(MUTATIONS[m][2], str) else f"{m}-{g}-{d}" for m, g, d in CASES]


def _run_mutant(monkeypatch, models, check_against, name, dtype, golden_model=None):
    target, replacement, _, _, _ = MUTATIONS[name]
    golden_model = golden_model or _goldens(MUTATIONS[name])[0]
    ckpt, weights = models(golden_model, dtype)
    if target is None:
        mutated = replacement(weights, ckpt.config)
        weights_of = lambda w: mutated  # noqa: E731
    else:
        weights_of = lambda w: w  # noqa: E731
        monkeypatch.setattr(model, target, replacement)

    def mutant(tokens, w, config, trace):
        if replacement is _skip_final_norm:  # the final norm weight by identity: the copy this call was given
            monkeypatch.setattr(model, target, _skip_final_norm(w))
        return model.forward(tokens, weights_of(w), config, trace=trace)

    return check_against(mutant, golden_model, dtype)


@pytest.mark.parametrize(("mutation", "golden", "dtype"), CASES, ids=IDS)
def test_mutation_is_caught_at_its_first_stage(monkeypatch, models, check_against, mutation, golden, dtype):
    report = _run_mutant(monkeypatch, models, check_against, mutation, dtype, golden)
    first = report.first_failure
    assert first is not None, f"{mutation} ({golden}, {dtype}) passed every stage: the suite missed a real bug"
    assert first.key == MUTATIONS[mutation][3], f"{mutation}: first failure named {first.key}"
    assert not report.passed


def documented_seams() -> set[str]:
    """The seams impl.model's docstring lists: the names on the indented lines after "Seams."."""
    lines = model.__doc__.split("Seams.", 1)[1].splitlines()
    listed = [line.strip().split("  ")[0] for line in lines if line.startswith("    ")]  # names, then a comment
    return {name for names in listed for name in re.findall(r"\w+", names)}


def test_mutations_patch_documented_seams_only():
    seams = documented_seams()
    assert {"residual", "rms_norm", "attention_probs"} <= seams, f"the docstring's seam list did not parse: {seams}"
    assert all(callable(getattr(model, name, None)) for name in seams), f"a listed seam is not in impl.model: {seams}"
    targets = {spec[0] for spec in MUTATIONS.values() if spec[0] is not None}
    assert targets <= seams, f"mutations patch undocumented functions: {sorted(targets - seams)}"


BF16_CASES = [(m, g) for m, g, d in CASES if d == "bf16"]


def _excess(first) -> float:
    """How far past its limit the rule that failed the stage went (the larger where both failed)."""
    size = first.metrics.rel / first.limit if first.limit > 0 else math.inf
    bias = first.scale_bias.s / first.scale_bias.limit if first.scale_bias is not None else 0.0
    return max(size if "size" in first.rule else 0.0, bias if "scale bias" in first.rule else 0.0)


@pytest.mark.parametrize(("mutation", "golden"), BF16_CASES, ids=[f"{m}-{g}" for m, g in BF16_CASES])
def test_bf16_mutation_fails_at_twice_its_limit(monkeypatch, models, check_against, mutation, golden):
    """The margin on the bug side: a bug caught in bf16 is caught by at least 2x the limit of the rule that fired
    (the correct side, at most half, is in test_alternatives.py)."""
    first = _run_mutant(monkeypatch, models, check_against, mutation, "bf16", golden).first_failure
    assert first is not None and first.key == MUTATIONS[mutation][3]
    assert _excess(first) >= 2.0, f"{mutation} on {golden}: {first.rule} at only {_excess(first):.2f}x its limit"


def test_eps_bugs_are_caught_in_bf16_by_the_scale_bias_rule(monkeypatch, models, check_against):
    """RMSNorm without eps scales the rows by ~1.2%, inside bf16's size noise: the scale-bias rule is what fires."""
    first = _run_mutant(monkeypatch, models, check_against, "rmsnorm-no-eps", "bf16", "tiny").first_failure
    assert first.rule == "scale bias" and first.scale_bias.bias > 0  # every row scaled up
