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
