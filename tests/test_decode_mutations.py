"""KV-cache bugs, put into impl's decode on purpose, are caught at the right decode step and stage, and named.

Each is a mistake that a prefill forward cannot show: impl's forward in the decode protocol
(golden.check.impl_forward) with one documented seam of impl.model swapped (tests/test_mutations.py's way),
where the bug is in the decode path only (start_pos > 0), as in a port whose prefill and decode paths differ.
The prefill must still pass; the decode check must fail at the expected step and stage with the expected
diagnosis. `tiny` fp32 in the default suite; `tiny` bf16 and SmolLM2 (fp32, bf16) `slow`.
"""

from __future__ import annotations

import pytest
import torch

from golden import compare as cmp
from golden.check import check_with_decode, impl_forward
from impl import model
from tests.test_mutations import documented_seams

_ORIG = {name: getattr(model, name) for name in (
    "precompute_freqs_cis", "causal_mask", "cache_keys_values", "apply_rope")}


def _rope_from_zero(config, seq_len, start=0):
    return _ORIG["precompute_freqs_cis"](config, seq_len, 0)  # bug: the new token rotated as position 0


def _read(cache, i, end):
    return cache.k[i, :, :end].transpose(0, 1), cache.v[i, :, :end].transpose(0, 1)


def _cache_written_early(cache, i, start_pos, k, v):
    if start_pos == 0:
        return _ORIG["cache_keys_values"](cache, i, start_pos, k, v)
    cache.update(i, start_pos - 1, k, v)  # bug: `cache_len - 1`, one slot early, over the previous token's
    return _read(cache, i, start_pos + k.shape[0])


def _cache_not_written(cache, i, start_pos, k, v):
    if start_pos == 0:
        return _ORIG["cache_keys_values"](cache, i, start_pos, k, v)
    return _read(cache, i, start_pos + k.shape[0])  # bug: the decode path reads the cache, never writes it


def _keys_rotated_again(cache, i, start_pos, k, v):
    keys, values = _ORIG["cache_keys_values"](cache, i, start_pos, k, v)
    if start_pos == 0:
        return keys, values
    # bug: the decode path rotates what it reads from the cache, which already holds keys after RoPE
    config = _CONFIG[0]
    return _ORIG["apply_rope"](keys, _ORIG["precompute_freqs_cis"](config, keys.shape[0], 0)), values


def _cached_keys_unrotated(cache, i, start_pos, k, v):
    keys, values = _ORIG["cache_keys_values"](cache, i, start_pos, k, v)
    if start_pos == 0:
        return keys, values
    # bug: the cache holds keys before RoPE, and the decode path reads them so (only the new key is rotated)
    cis = _ORIG["precompute_freqs_cis"](_CONFIG[0], start_pos, 0)
    return torch.cat([_ORIG["apply_rope"](keys[:start_pos], cis.conj()), keys[start_pos:]]), values


def _mask_from_zero(q_len, k_len, start_pos, dtype=None):
    return _ORIG["causal_mask"](q_len, k_len, 0, *(() if dtype is None else (dtype,)))  # bug: start_pos ignored


_CONFIG: list = [None]  # the config of the model under test, for the seam that rotates cached keys


def _start_pos_plus_one(tokens, weights, config, trace, start_pos=0, cache=None):
    """The decode call one position late (a loop that counts the new token before feeding it)."""
    return impl_forward(tokens, weights, config, trace, start_pos + 1 if start_pos else 0, cache)


# id -> (seam patched in impl.model or None, replacement (a seam's or the protocol function), first failing step,
#        its first failing stage, the diagnosis that must reproduce it, words of its detail)
MUTATIONS = {
    "rope-at-position-0": ("precompute_freqs_cis", _rope_from_zero, 1, "rope_cos", "rope.decode_from_zero",
                           "position {p} rotated as position 0"),
    "cache-written-at-wrong-index": ("cache_keys_values", _cache_written_early, 1, "layers.0.scores",
                                     "cache.wrong_index", "written at {p1} instead of {p}"),
    "cache-not-written": ("cache_keys_values", _cache_not_written, 1, "layers.0.scores", "cache.not_written",
                          "position {p}'s key and value missing"),
    "cached-keys-rotated-again": ("cache_keys_values", _keys_rotated_again, 1, "layers.0.scores",
                                  "cache.keys_rotated_twice", "every key rotated again"),
    "cached-keys-before-rope": ("cache_keys_values", _cached_keys_unrotated, 1, "layers.0.scores",
                                "cache.keys_unrotated", "the cached keys before RoPE, the new one rotated"),
    "mask-ignores-start-pos": ("causal_mask", _mask_from_zero, 1, "layers.0.scores", "attention.mask_from_zero",
                               "queries at positions from 0 instead of {p}"),
    "start-pos-off-by-one": (None, _start_pos_plus_one, 1, "rope_cos", "rope.positions_offset",
                             "position {p} rotated as position {p2}"),
}
TINY = [(m, "tiny", "fp32") for m in MUTATIONS]  # the default suite; bf16 and SmolLM2 in the slow set
SLOW = [(m, g, d) for m in MUTATIONS for g, d in (("tiny", "bf16"), ("smollm2-135m", "fp32"), ("smollm2-135m", "bf16"))]


def run_mutant(monkeypatch, goldens, models, name, golden_model, dtype):
    target, replacement = MUTATIONS[name][:2]
    ckpt, weights = models(golden_model, dtype)
    _CONFIG[0] = ckpt.config
    fn = impl_forward
    if target is None:
        fn = replacement
    else:
        monkeypatch.setattr(model, target, replacement)
    return check_with_decode(fn, goldens(golden_model, dtype), goldens(golden_model, "fp32"), ckpt.config, weights)


def _assert_caught(monkeypatch, goldens, models, name, golden_model, dtype):
    _, _, step, stage, hypothesis, words = MUTATIONS[name]
    prefill, decode = run_mutant(monkeypatch, goldens, models, name, golden_model, dtype)
    assert prefill.passed, f"{name}: a decode-only bug failed the prefill at {prefill.first_failure}"
    assert decode.verdict == cmp.V_FAIL, f"{name} ({golden_model} {dtype}): decode {decode.verdict}"
    first = decode.first_failing
    assert (first.step, first.report.first_failure.key) == (step, stage), \
        f"{name}: first failure at step {first.step}, {first.report.first_failure.key}"
    d = first.report.first_failure.diagnosis
    assert d is not None and d.matches and hypothesis in [f.id for f in d.matches], \
        f"{name}: diagnosis {d.headline() if d else None}"
    p = first.position
    detail = next(f.detail for f in d.matches if f.id == hypothesis)
    assert words.format(p=p, p1=p - 1, p2=p + 1) in detail, detail


@pytest.mark.parametrize(("mutation", "golden", "dtype"), TINY, ids=[f"{m}-{d}" for m, _, d in TINY])
def test_decode_bug_is_caught_at_its_step_and_stage(monkeypatch, goldens, models, mutation, golden, dtype):
    _assert_caught(monkeypatch, goldens, models, mutation, golden, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(("mutation", "golden", "dtype"), SLOW, ids=[f"{m}-{g}-{d}" for m, g, d in SLOW])
def test_decode_bug_is_caught_in_bf16_and_on_smollm2(monkeypatch, goldens, models, mutation, golden, dtype):
    _assert_caught(monkeypatch, goldens, models, mutation, golden, dtype)


def test_decode_mutations_patch_documented_seams_only():
    targets = {spec[0] for spec in MUTATIONS.values() if spec[0] is not None}
    assert targets <= documented_seams(), f"undocumented seams: {sorted(targets - documented_seams())}"


@pytest.mark.slow
def test_decode_kl_limit_fails_a_bug(monkeypatch, goldens, models):
    """The decode steps' KL limit (golden.tolerances.DECODE_KL_FACTOR, 40x the reference's own) can fail: RoPE at
    position 0 puts SmolLM2's first step at ~28x that limit in bf16 (its first failure is upstream, at rope_cos)."""
    _, decode = run_mutant(monkeypatch, goldens, models, "rope-at-position-0", "smollm2-135m", "bf16")
    lg = decode.steps[0].report.logits
    assert lg.kl >= 2 * lg.kl_limit, f"KL {lg.kl:.2e}, limit {lg.kl_limit:.2e}"
