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
# (h, queries, keys): in a decode step one query row against every key so far.
ATTENTION_MATRICES = frozenset({SCORES, PROBS})

# ---------------------------------------------------------------- decode steps (KV-cache decoding)
# A golden's decode section (golden format 2's optional `decode`) holds N steps after the prompt. Step s (1..N)
# feeds one token at position seq + s - 1 against the cache of every earlier position; its stages are keyed
# `decode.<s>.<key>` (`decode.1.layers.0.k_rope`) and hold the new position only: (1, ...) where the prefill has
# (seq, ...), scores and probs (h, 1, seq + s). The stages a step holds, a subset of the prefill's that fits the
# committed budget and still names every cache bug (README, "Checking decoding"): the token, the RoPE tables of
# the new position, q/k/v before and after RoPE (the diagnosis recomputes from them), the attention of the new
# query over every key (where a cache bug first shows), the attention output, the layer output, the final norm
# and a sample of the logits.
DECODE = "decode"
DECODE_STAGES: tuple[str, ...] = (TOKENS, EMBEDDINGS, ROPE_COS, ROPE_SIN, Q, K, V, Q_ROPE, K_ROPE, SCORES, PROBS,
                                  ATTN_OUT, OUT, NORM, LOGITS, LOGPROBS_LAST)
# Stages a decode step holds as a sample of the vocabulary (the manifest's decode.logits_sample says which ids):
# the golden's top-k ids, then every stride-th id.
SAMPLED_STAGES = frozenset({LOGITS, LOGPROBS_LAST})
_DECODE_RE = re.compile(r"^decode\.(\d+)\.(.+)$")

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


def decode_key(step: int, key_: str) -> str:
    """A stage's key in decode step `step` (1..N): decode_key(1, 'layers.0.k_rope') -> 'decode.1.layers.0.k_rope'."""
    return f"{DECODE}.{step}.{key_}"


def split_step(name: str) -> tuple[int | None, str]:
    """'decode.3.layers.0.q' -> (3, 'layers.0.q'); a prefill key -> (None, key). KeyError for a decode key of a step
    below 1 or of a stage a step does not hold."""
    m = _DECODE_RE.match(name)
    if m is None:
        return None, name
    step, rest = int(m.group(1)), m.group(2)
    _, stage = parse(rest)
    if step < 1 or stage not in DECODE_STAGES or m.group(1) != str(step):
        raise KeyError(f"unknown decode stage {name!r}")
    return step, rest


def step_keys(n_layers: int) -> list[str]:
    """The keys one decode step holds, in forward order, without the `decode.<s>.` prefix."""
    return [k for k in all_keys(n_layers) if parse(k)[1] in DECODE_STAGES]


def decode_steps(section: Any) -> int:
    """How many decode steps a manifest's `decode` section records. ValueError if it does not say."""
    steps = section.get("steps") if isinstance(section, Mapping) else None
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"golden option 'decode': steps must be an integer >= 1, not {steps!r}"[:160])
    return steps


def logits_sample_size(config: ModelConfig, section: Any) -> int:
    """How many vocabulary entries a decode step's logits sample holds: top_k + ceil(vocab / stride)."""
    sample = section.get("logits_sample") if isinstance(section, Mapping) else None
    top_k, stride = (sample.get("top_k"), sample.get("stride")) if isinstance(sample, Mapping) else (None, None)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (top_k, stride)):
        raise ValueError("golden option 'decode': logits_sample needs integers top_k >= 1 and stride >= 1")
    return top_k + -(-config.vocab_size // stride)


def logits_sample_ids(config: ModelConfig, top_ids: Iterable[int], stride: int) -> list[int]:
    """The vocabulary ids a decode step's logits sample holds, in order: the golden's top-k ids (best first), then
    every stride-th id from 0 (an id can appear in both parts)."""
    return [int(i) for i in top_ids] + list(range(0, config.vocab_size, stride))


def every_stage(config: ModelConfig, seq: int, options: Mapping[str, Any] | None = None) -> list[str]:
    """Every stage key a golden holds, in forward order: what "every stage" means, defined once.

    A golden of `config` on a prompt of `seq` tokens with `options` (its manifest's optional
    sections) holds exactly these keys; a check passes only when an implementation reported all of
    them (or the user asked for `--partial`), and the recorder records exactly these. A plain prefill
    golden has no options: all_keys(n_layers). The options reserved in golden format 2 extend the set
    here and nowhere else: `decode` (decode steps: `decode.<step>.layers.<i>.k_rope`, ...: every key of
    `step_keys` for steps 1..N after the prefill's) and a stage's `rows` (sampled positions: which rows a stage
    holds, not which stages there are).
    ValueError for a prompt of no tokens or an option this version does not know how to expand.
    """
    if not isinstance(seq, int) or seq < 1:
        raise ValueError(f"a golden's prompt has at least one token, not {seq!r}")
    options = dict(options or {})
    decode = options.pop(DECODE, None)
    for option, value in options.items():
        if value is not None:
            raise ValueError(f"golden option {option!r} is not supported by this version (only plain prefill goldens)")
    keys = all_keys(config.n_layers)
    if decode is not None:
        one_step = step_keys(config.n_layers)
        keys += [decode_key(s, k) for s in range(1, decode_steps(decode) + 1) for k in one_step]
    return keys


def layer_ranges(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in sorted(set(layers)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def summarize(keys: Iterable[str], n_layers: int | None = None) -> str:
    """Stage keys, compactly by stage kind and layers, in forward order:
    'tokens, rope_cos; q, k in layers 0-1; scores in layer 1; logprobs_last'; decode keys after them, grouped by
    the steps that miss the same ones: '...; in decode steps 7-8: every stage' (given n_layers) or '...; in decode
    step 2: logits'."""
    keys = list(keys)
    by_step: dict[int, list[str]] = {}
    plain_keys = []
    for k in keys:
        step, rest = split_step(k)
        (by_step.setdefault(step, []) if step is not None else plain_keys).append(rest)
    if by_step:
        groups: dict[str, list[int]] = {}
        whole = len(step_keys(n_layers)) if n_layers is not None else -1
        for step, ks in sorted(by_step.items()):
            said = "every stage" if len(ks) == whole else summarize(ks)
            groups.setdefault(said, []).append(step)
        parts = [summarize(plain_keys)] if plain_keys else []
        parts += [f"in decode step{'s' if len(steps) > 1 else ''} {layer_ranges(steps)}: {said}"
                  for said, steps in groups.items()]
        return "; ".join(parts)
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


def step_shape(stage: str, config: ModelConfig, q_len: int, kv_len: int) -> tuple[int, ...]:
    """A stage's shape for q_len new positions against kv_len keys (a prefill: kv_len = q_len)."""
    shape = BY_NAME[stage].shape(config, q_len)
    return (*shape[:-1], kv_len) if stage in ATTENTION_MATRICES else shape


def expected_shape(name: str, config: ModelConfig, seq: int, options: Mapping[str, Any] | None = None
                   ) -> tuple[int, ...]:
    """The shape a golden of a `seq`-token prompt holds under key `name` (a decode key: of its step; a sampled
    stage's needs the golden's decode section in `options`)."""
    step, rest = split_step(name)
    _, stage = parse(rest)
    if step is None:
        return BY_NAME[stage].shape(config, seq)
    if stage in SAMPLED_STAGES:
        return (logits_sample_size(config, (options or {}).get(DECODE)),)
    return step_shape(stage, config, 1, seq + step)
