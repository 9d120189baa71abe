"""Correct implementations that are not impl: they round in other places, or compute differently.

The suite must pass every one of them (no false alarms from tolerances fitted to impl alone).
Each is impl's forward with one function swapped for a correct alternative, or a separate
implementation (examples/my_llama.py).
"""

from __future__ import annotations

import contextlib

import torch

from impl import model


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


ALTERNATIVES = {
    "rope-like-transformers": rope_like_transformers,
    "norm-weight-in-fp32": norm_weight_in_fp32,
    "softmax-in-fp64": softmax_in_fp64,
    "fp32-compute": fp32_compute_from_given_weights,
    "fp64-compute": fp64_compute,
}
