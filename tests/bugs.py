"""Buggy implementations as importable callables, for tests that go through the real CLI (`--impl tests.bugs:...`).

Each is impl's reference forward with one documented seam swapped for the duration of the call.
"""

from __future__ import annotations

import math

import torch

from impl import model
from tests.alternatives import _hf_rows, _swapped


def _scores_scaled_by_128(q, k, start_pos=0):
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(128)  # the 8B's head_dim, hard-coded
    return scores + model.causal_mask(q.shape[0], k.shape[0], start_pos, scores.dtype)


def scale_by_sqrt_128(tokens, weights, config, trace):
    """Scores divided by sqrt(128) instead of sqrt(head_dim): the issue's first example."""
    with _swapped("attention_scores", _scores_scaled_by_128):
        return model.forward(tokens, weights, config, trace=trace)


def kv_head_by_4(tokens, weights, config, trace):
    """The walk-through's `head // 4`: right only for a GQA group of 4."""
    with _swapped("kv_head_of", lambda n_heads, n_kv_heads: torch.arange(n_heads) // 4):
        return model.forward(tokens, weights, config, trace=trace)


def hf_rows_complex_rope(tokens, weights, config, trace):
    """wq/wk rows in HF's rotate-half order with Meta's complex (interleaved) RoPE: a conversion skipped. q matches
    the golden after the layout permutation, q_rope does not: a bug, not a layout (no --qk-layout hint)."""
    return model.forward(tokens, _hf_rows(weights, config), config, trace=trace)


# ---------------------------------------------------------------- in the decode protocol (golden.check.takes_cache)
def _positions_from_zero(config, seq_len, start=0):
    return _ORIG_FREQS(config, seq_len, 0)  # the new tokens rotated from position 0, whatever start_pos says


_ORIG_FREQS = model.precompute_freqs_cis


def rope_from_zero_in_decode(tokens, weights, config, trace, start_pos=0, cache=None):
    """A cached forward whose RoPE ignores start_pos: right in the prefill, each decoded token rotated as position 0."""
    from golden.check import impl_forward

    with _swapped("precompute_freqs_cis", _positions_from_zero):
        return impl_forward(tokens, weights, config, trace, start_pos, cache)


def logits_only(tokens, weights, config, trace, start_pos=0, cache=None):
    """Takes a cache but returns only the logits: not the decode protocol's (logits, cache)."""
    from golden.check import impl_forward

    return impl_forward(tokens, weights, config, trace, start_pos, cache)[0]


def crashes_in_step_2(tokens, weights, config, trace, start_pos=0, cache=None):
    """Runs the prefill and the first decode step, then fails in the second (as an index past its cache's end)."""
    from golden.check import impl_forward

    calls = 0 if cache is None else cache.calls
    if calls == 2:  # the prefill and step 1 came before
        raise IndexError("index 18 is out of bounds for dimension 0 with size 18")
    logits, cache = impl_forward(tokens, weights, config, trace, start_pos, cache)
    cache.calls = calls + 1
    return logits, cache
