"""Correct implementations that are not impl: they round in other places, or compute differently.

The suite must pass every one of them (no false alarms from tolerances fitted to impl alone).
Each is impl's forward with one function swapped for a correct alternative, or a separate
implementation (examples/my_llama.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from impl import model
from impl.layout import permute_qk


@contextlib.contextmanager
def _swapped(name, replacement):
    original = getattr(model, name)
    setattr(model, name, replacement)
    try:
        yield
    finally:
        setattr(model, name, original)


def _rope_in_activation_dtype(x, freqs_cis):
    """transformers' precision: cos/sin rounded to the activation dtype, the rotation done in it."""
    cos, sin = freqs_cis.real.to(x.dtype)[:, None, :], freqs_cis.imag.to(x.dtype)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


def _rms_norm_weight_in_fp32(x, weight, eps):
    """One rounding at the end: the norm weight applied in fp32 too."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _attention_fp64_softmax(scores):
    return torch.softmax(scores.double(), dim=-1).to(scores.dtype)


def rope_like_transformers(tokens, weights, config, trace):
    with _swapped("apply_rope", _rope_in_activation_dtype):
        return model.forward(tokens, weights, config, trace=trace)


def norm_weight_in_fp32(tokens, weights, config, trace):
    with _swapped("rms_norm", _rms_norm_weight_in_fp32):
        return model.forward(tokens, weights, config, trace=trace)


def softmax_in_fp64(tokens, weights, config, trace):
    with _swapped("attention_probs", _attention_fp64_softmax):
        return model.forward(tokens, weights, config, trace=trace)


def fp32_compute_from_given_weights(tokens, weights, config, trace):
    """Upcast whatever weights it is given and compute everything in fp32 (more precise than bf16)."""
    return model.forward(tokens, {k: v.float() for k, v in weights.items()}, config, trace=trace)


def fp64_compute(tokens, weights, config, trace):
    """Everything in float64, reported as such: the most precise answer there is."""
    return model.forward(tokens, {k: v.double() for k, v in weights.items()}, config, trace=trace)


def _rms_norm_torch(x, weight, eps):
    """torch.nn.functional.rms_norm in the activation dtype (torch >= 2.4)."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def _probs_manual(scores):
    """A softmax written out: max, exp and the row sum in the activation dtype (fp32 in an fp32 run)."""
    ex = torch.exp(scores - scores.amax(-1, keepdim=True))
    return ex / ex.sum(-1, keepdim=True)


def _swiglu_splitk(x, w1, w3):
    """Projections accumulated in 4 chunks of the input dimension, each partial sum rounded to the activation
    dtype (a split-K kernel with low-precision accumulation)."""
    def mm(x, w):
        parts = [(xc.float() @ wc.float().T).to(x.dtype) for xc, wc in zip(x.chunk(4, -1), w.chunk(4, -1),
                                                                               strict=True)]
        return sum(parts[1:], parts[0])

    return F.silu(mm(x, w1)), mm(x, w3)


def _with(**replacements):
    """impl's forward with seams of impl.model swapped for the duration of the call."""
    def forward(tokens, weights, config, trace):
        with contextlib.ExitStack() as stack:
            for name, fn in replacements.items():
                stack.enter_context(_swapped(name, fn))
            return model.forward(tokens, weights, config, trace=trace)

    return forward


# ---------------------------------------------------------------- bf16-only: the user's precision, not a bug
def _rms_norm_all_bf16(x, weight, eps):
    """The walk-through's RMSNorm: mean of squares, eps and rsqrt all in bf16."""
    xb = x.to(torch.bfloat16)
    return (xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _probs_bf16_scores(scores):
    """softmax over scores rounded to bf16 (the walk-through's `torch.nn.functional.softmax(scores, dim=1)` on bf16)."""
    return F.softmax(scores.to(torch.bfloat16), dim=-1).type_as(scores)


ALTERNATIVES = {
    "rope-like-transformers": rope_like_transformers,
    "norm-weight-in-fp32": norm_weight_in_fp32,
    "softmax-in-fp64": softmax_in_fp64,
    "fp32-compute": fp32_compute_from_given_weights,
    "fp64-compute": fp64_compute,
    "norm-torch-rms_norm": _with(rms_norm=_rms_norm_torch),
    "softmax-manual": _with(attention_probs=_probs_manual),
    "swiglu-splitk": _with(swiglu_parts=_swiglu_splitk),
}

# Correct in a bf16 run (each step within bf16's own rounding: doing it in the requested precision is the user's
# choice), real bugs in an fp32 run (a bf16 cast inside an fp32 computation). They must pass bf16 and fail fp32.
# name -> (forward, the first stage an fp32 check names)
BF16_ONLY = {
    "norm-all-bf16": (_with(rms_norm=_rms_norm_all_bf16), "layers.0.attn_norm"),
    "softmax-bf16-scores": (_with(attention_probs=_probs_bf16_scores), "layers.0.probs"),
    "walkthrough-bf16": (_with(rms_norm=_rms_norm_all_bf16, attention_probs=_probs_bf16_scores,
                               apply_rope=_rope_in_activation_dtype), "layers.0.attn_norm"),
}


# ---------------------------------------------------------------- the other q/k layout: correct under --qk-layout hf
def _rope_rotate_half(x, freqs_cis):
    """transformers' apply_rotary_pos_emb: pairs (j, j + d/2), x * cos + rotate_half(x) * sin. x: (seq, heads, d) in
    rotate-half order."""
    cos, sin = freqs_cis.real[:, None, :], freqs_cis.imag[:, None, :]  # (seq, 1, d/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def _hf_rows(weights, config):
    """wq/wk rows in transformers' order: convert_llama_weights_to_hf.py's permute, as an HF port loads them."""
    out = dict(weights)
    for i in range(config.n_layers):
        p = f"layers.{i}.attention."
        out[p + "wq.weight"] = permute_qk(weights[p + "wq.weight"], config.n_heads)
        out[p + "wk.weight"] = permute_qk(weights[p + "wk.weight"], config.n_kv_heads)
    return out


def rotate_half_layout(tokens, weights, config, trace):
    """A port of transformers' modeling_llama (or Sebastian Raschka's Llama 3): the Meta weights converted to HF's
    q/k row order, RoPE by rotate_half; q, k, q_rope and k_rope are reported in that layout. Correct: it passes
    with --qk-layout hf, and fails at layers.0.q without it, with the hint to pass the flag."""
    with _swapped("apply_rope", _rope_rotate_half):
        return model.forward(tokens, _hf_rows(weights, config), config, trace=trace)


# ---------------------------------------------------------------- the same, in the decode protocol
def cached(fn):
    """A prefill-only forward above (it calls impl.model.forward) in the decode protocol (golden.check.takes_cache):
    the same computation, over impl's KV cache, at the position the checker gives."""
    def forward(tokens, weights, config, trace, start_pos=0, cache=None):
        made = {}
        plain = model.forward

        def with_cache(tokens, weights, config, trace=None):
            dtype = weights["tok_embeddings.weight"].dtype  # the weights it computes in (fp32 / fp64 upcasts too)
            made["cache"] = model.KVCache.with_room(cache, config, start_pos + len(tokens), dtype)
            return plain(tokens, weights, config, trace=trace, start_pos=start_pos, cache=made["cache"],
                         all_logits=False)

        with _swapped("forward", with_cache):
            logits = fn(tokens, weights, config, trace)
        return logits, made["cache"]

    return forward
