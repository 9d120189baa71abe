"""Which Llama feature a golden checks, and what to tell a port that fails one (the report and diagnosis use it).

A golden's model is Llama 3 "core" (RMSNorm, RoPE, GQA, SwiGLU), plus Llama 3.1 rope scaling where its config
has `rope_scaling`, plus tied embeddings (as in Llama 3.2) where `tie_embeddings` is set. The main job's summary
groups its goldens by these labels, so a correct Llama 3 port that never implemented 3.1 scaling reads
"core: PASS; 3.1 rope scaling: FAIL at rope_cos" and knows what it has not implemented.
"""

from __future__ import annotations

from impl.config import ModelConfig

CORE = "core"
ROPE_SCALING = "3.1 rope scaling"
TIED = "tied embeddings"
ROPE_STAGES = frozenset({"rope_cos", "rope_sin", "q_rope", "k_rope"})


def feature(config: ModelConfig) -> str:
    """The feature a golden of this model checks beyond the core: `core`, `3.1 rope scaling`, `tied embeddings`
    (both joined with ' + ' where a model has both)."""
    extra = [name for name, has in ((ROPE_SCALING, config.rope_scaling is not None), (TIED, config.tie_embeddings))
             if has]
    return " + ".join(extra) if extra else CORE


def describe_feature(label: str) -> str:
    """`3.1 rope scaling` -> `Llama 3.1 rope scaling`, for the golden's header line."""
    return {CORE: "Llama 3 core", ROPE_SCALING: "Llama 3.1 rope scaling",
            TIED: "tied embeddings as in Llama 3.2"}.get(label, label)


def rope_scaling_note(config: ModelConfig, stage: str) -> str | None:
    """Where a RoPE stage fails on a model with Llama 3.1 rope scaling: the sentence saying so, with the numbers
    and the formula's bands; None for other stages or models."""
    s = config.rope_scaling
    if s is None or stage not in ROPE_STAGES:
        return None
    orig = s.original_max_position_embeddings
    return (f"this model uses Llama 3.1 rope scaling: factor {s.factor:g}, original context {orig}, "
            f"low_freq_factor {s.low_freq_factor:g}, high_freq_factor {s.high_freq_factor:g} (theta "
            f"{config.rope_theta:g}): frequencies whose wavelength exceeds {orig / s.low_freq_factor:g} positions are "
            f"divided by {s.factor:g}, those under {orig / s.high_freq_factor:g} are kept, those between are "
            f"blended (Meta's apply_scaling in llama/model.py; config.rope_scaling). A Llama 3 (not 3.1) port fails "
            f"here until it applies it")
