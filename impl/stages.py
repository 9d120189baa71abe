"""The one stage vocabulary: names, forward order, layouts and shapes of every traced tensor, and `Trace`.

impl's reference forward, golden's recorder, the comparator, the report and the tests all take their
stage names from here (impl by the constants below, `key(Q_ROPE, 3)`); a new stage is added in this
file only. `Trace` is the one callback type of the trace protocol. Tensors carry no batch dimension
(one prompt of `seq` tokens). q and k are in Meta's layout: the two numbers that RoPE rotates
together sit side by side (interleaved pairs), as complex-number RoPE expects.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from impl.config import ModelConfig

# The trace protocol: the callback that impl.model.forward and user implementations call once per stage,
# with the stage's key (`key(stage, layer)`) and its tensor.
Trace = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class Stage:
    name: str
    per_layer: bool
    shape: Callable[[ModelConfig, int], tuple[int, ...]]  # (config, seq) -> shape
    what: str


def _s(name: str, per_layer: bool, shape, what: str) -> Stage:
    return Stage(name, per_layer, shape, what)


# Every stage name once, as a constant: code names a stage `stages.Q_ROPE`, never by a string literal.
TOKENS = "tokens"
EMBEDDINGS = "embeddings"
ROPE_COS = "rope_cos"
ROPE_SIN = "rope_sin"
RESIDUAL_IN = "residual_in"
ATTN_NORM = "attn_norm"
Q = "q"
K = "k"
V = "v"
Q_ROPE = "q_rope"
K_ROPE = "k_rope"
SCORES = "scores"
PROBS = "probs"
ATTN_HEADS = "attn_heads"
ATTN_OUT = "attn_out"
RESIDUAL_ATTN = "residual_attn"
FFN_NORM = "ffn_norm"
FFN_GATE = "ffn_gate"
FFN_UP = "ffn_up"
FFN_HIDDEN = "ffn_hidden"
FFN_OUT = "ffn_out"
OUT = "out"
NORM = "norm"
LOGITS = "logits"
LOGPROBS_LAST = "logprobs_last"

# Forward order. `seq` is the prompt length; h = n_heads, kv = n_kv_heads, d = head_dim.
STAGES: tuple[Stage, ...] = (
    _s(TOKENS, False, lambda c, s: (s,), "token ids, int64"),
    _s(EMBEDDINGS, False, lambda c, s: (s, c.dim), "tok_embeddings[tokens]"),
    _s(ROPE_COS, False, lambda c, s: (s, c.head_dim // 2), "cos of the RoPE angle per position and pair"),
    _s(ROPE_SIN, False, lambda c, s: (s, c.head_dim // 2), "sin of the RoPE angle per position and pair"),
    _s(RESIDUAL_IN, True, lambda c, s: (s, c.dim), "the layer's input (residual stream)"),
    _s(ATTN_NORM, True, lambda c, s: (s, c.dim), "rms_norm(residual_in) * attention_norm.weight"),
    _s(Q, True, lambda c, s: (s, c.n_heads, c.head_dim), "x @ wq.T per head, interleaved pairs"),
    _s(K, True, lambda c, s: (s, c.n_kv_heads, c.head_dim), "x @ wk.T per kv head, interleaved pairs"),
    _s(V, True, lambda c, s: (s, c.n_kv_heads, c.head_dim), "x @ wv.T per kv head"),
    _s(Q_ROPE, True, lambda c, s: (s, c.n_heads, c.head_dim), "q after RoPE"),
    _s(K_ROPE, True, lambda c, s: (s, c.n_kv_heads, c.head_dim), "k after RoPE"),
    _s(SCORES, True, lambda c, s: (c.n_heads, s, s), "q.k / sqrt(d) with the causal mask; masked = -inf"),
    _s(PROBS, True, lambda c, s: (c.n_heads, s, s), "softmax(scores) over keys"),
    _s(ATTN_HEADS, True, lambda c, s: (s, c.n_heads, c.head_dim), "probs @ v per head, before wo"),
    _s(ATTN_OUT, True, lambda c, s: (s, c.dim), "attn_heads flattened @ wo.T"),
    _s(RESIDUAL_ATTN, True, lambda c, s: (s, c.dim), "residual_in + attn_out"),
    _s(FFN_NORM, True, lambda c, s: (s, c.dim), "rms_norm(residual_attn) * ffn_norm.weight"),
    _s(FFN_GATE, True, lambda c, s: (s, c.hidden_dim), "silu(x @ w1.T)"),
    _s(FFN_UP, True, lambda c, s: (s, c.hidden_dim), "x @ w3.T"),
    _s(FFN_HIDDEN, True, lambda c, s: (s, c.hidden_dim), "ffn_gate * ffn_up"),
    _s(FFN_OUT, True, lambda c, s: (s, c.dim), "ffn_hidden @ w2.T"),
    _s(OUT, True, lambda c, s: (s, c.dim), "residual_attn + ffn_out: the layer's output"),
    _s(NORM, False, lambda c, s: (s, c.dim), "final rms_norm * norm.weight"),
    _s(LOGITS, False, lambda c, s: (c.vocab_size,), "logits of the last position (output or tied embedding)"),
    _s(LOGPROBS_LAST, False, lambda c, s: (c.vocab_size,), "log_softmax(logits) in fp32"),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
LAYER_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.per_layer)
_FIRST_LAYER = STAGES.index(BY_NAME[LAYER_STAGES[0]])
_AFTER_LAYERS = STAGES.index(BY_NAME[LAYER_STAGES[-1]]) + 1
PRE_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES[:_FIRST_LAYER])
POST_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES[_AFTER_LAYERS:])

# Stages in the q/k layout that differs between Meta (interleaved pairs) and HF (rotate-half).
QK_STAGES = frozenset({Q, K, Q_ROPE, K_ROPE})
# Attention-matrix stages: the causal mask puts -inf above the diagonal.
MASKED_STAGES = frozenset({SCORES})

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(\w+)$")


def key(stage: str, layer: int | None = None) -> str:
    """The trace / golden key of a stage: `embeddings`, `layers.3.q_rope`."""
    if stage not in BY_NAME:
        raise KeyError(f"unknown stage {stage!r}")
    if BY_NAME[stage].per_layer != (layer is not None):
        raise KeyError(f"stage {stage!r} {'needs' if BY_NAME[stage].per_layer else 'takes no'} layer number")
    return stage if layer is None else f"layers.{layer}.{stage}"


def parse(name: str) -> tuple[int | None, str]:
    """`layers.3.q_rope` -> (3, 'q_rope'); `logits` -> (None, 'logits'). KeyError for unknown names."""
    m = _LAYER_RE.match(name)
    layer, stage = (int(m.group(1)), m.group(2)) if m else (None, name)
    key(stage, layer)  # validates
    return layer, stage


def all_keys(n_layers: int) -> list[str]:
    """Every key in forward order for a model of n_layers."""
    out = list(PRE_STAGES)
    for i in range(n_layers):
        out += [f"layers.{i}.{s}" for s in LAYER_STAGES]
    return out + list(POST_STAGES)


def every_stage(config: ModelConfig, seq: int, options: Mapping[str, Any] | None = None) -> list[str]:
    """Every stage key a golden holds, in forward order: what "every stage" means, defined once.

    A golden of `config` on a prompt of `seq` tokens with `options` (its manifest's optional
    sections) holds exactly these keys; a check passes only when an implementation reported all of
    them (or the user asked for `--partial`), and the recorder records exactly these. A plain prefill
    golden has no options: all_keys(n_layers). The options reserved in golden format 2 extend the set
    here and nowhere else: `decode` (decode steps: `decode.<step>.layers.<i>.k_rope`, ...) and a
    stage's `rows` (sampled positions: which rows a stage holds, not which stages there are).
    ValueError for a prompt of no tokens or an option this version does not know how to expand.
    """
    if not isinstance(seq, int) or seq < 1:
        raise ValueError(f"a golden's prompt has at least one token, not {seq!r}")
    for option, value in (options or {}).items():
        if value is not None:
            raise ValueError(f"golden option {option!r} is not supported by this version (only plain prefill goldens)")
    return all_keys(config.n_layers)


def layer_ranges(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in sorted(set(layers)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def summarize(keys: Iterable[str]) -> str:
    """Stage keys, compactly by stage kind and layers, in forward order:
    'tokens, rope_cos; q, k in layers 0-1; scores in layer 1; logprobs_last'."""
    keys = list(keys)
    order = {s.name: i for i, s in enumerate(STAGES)}
    layers_of: dict[str, list[int]] = {}
    plain: list[str] = []
    for k in keys:
        layer, stage = parse(k)
        if layer is None:
            plain.append(stage)
        else:
            layers_of.setdefault(stage, []).append(layer)
    groups: dict[str, list[str]] = {}  # layer ranges -> stages missing in exactly those layers
    for stage in sorted(layers_of, key=order.__getitem__):
        groups.setdefault(layer_ranges(layers_of[stage]), []).append(stage)
    pre = [s for s in plain if s in PRE_STAGES]
    post = [s for s in plain if s not in PRE_STAGES]
    parts = [", ".join(pre)] if pre else []
    parts += [f"{', '.join(names)} in layer{'s' if ('-' in r or ',' in r) else ''} {r}" for r, names in groups.items()]
    parts += [", ".join(post)] if post else []
    return "; ".join(parts)


def expected_shape(name: str, config: ModelConfig, seq: int) -> tuple[int, ...]:
    _, stage = parse(name)
    return BY_NAME[stage].shape(config, seq)
