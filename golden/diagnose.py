"""Say why, not only where: recompute the first failing stage under known wrong conventions.

A golden holds every stage's inputs. For the first failing stage, each hypothesis of the catalogue
(`CATALOGUE`: an id such as `rope.theta`, one line on what it is, a fix hint) recomputes that stage
from the *golden's own inputs* to it (q_rope from the golden's q, scores from its q_rope and k_rope,
probs from its scores, attn_norm from its residual_in, ffn_gate from its ffn_norm and the weights,
rope_cos from the config) with impl's own stage functions, under a wrong convention, and measures how
close the implementation's tensor is to that prediction. A hypothesis *reproduces* the tensor when
it is within the stage's limit; findings are ranked by closeness, best first.

- A hypothesis whose prediction equals the correct computation on this golden (within the limit) cannot
  be told apart from a correct implementation there: it is listed under `same_as_correct`, never claimed.
- A hypothesis that needs an input the golden does not hold (a stage, a weight) is listed under
  `not_tried`, with what it needed.
- Only the families that can produce the failing stage run: a hypothesis runs at the stage where its
  bug first shows, and at later stages of the same block only when the implementation did not report
  the stages between (the README sketch reports q_rope and probs, not scores).
- Cheap signatures come with every diagnosis, matched or not: a pure scale and its simple form, the
  heads or positions that are wrong, a permutation of the last axis that makes the tensor match.

golden.report renders a `Diagnosis` (text, JSON, PNG, the pytest message); golden.check computes one for
the first failure of every check. `qk_layout` is the q/k layout test that `--qk-layout` detection reuses.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from golden import compare as cmp
from golden import sampling
from golden.sampling import Sampled
from impl import model as _impl_model
from impl import stages
from impl.config import ModelConfig, RopeScaling
from impl.layout import interleaved_to_rotate_half, rotate_half_to_interleaved
from impl.stages import (
    ATTN_HEADS,
    ATTN_NORM,
    ATTN_OUT,
    EMBEDDINGS,
    FFN_GATE,
    FFN_HIDDEN,
    FFN_NORM,
    FFN_OUT,
    FFN_UP,
    K_ROPE,
    LOGITS,
    LOGPROBS_LAST,
    NORM,
    OUT,
    PROBS,
    Q_ROPE,
    RESIDUAL_ATTN,
    RESIDUAL_IN,
    ROPE_COS,
    ROPE_SIN,
    SCORES,
    TOKENS,
    K,
    Q,
    V,
)


def _private_copy(module):
    """A private instance of impl.model: impl's own stage functions, out of reach of a monkeypatch on impl.model.

    The reference forward calls its seams through module globals so that tests can swap them; the hypotheses must
    compute with the real ones even while a test (or a user's notebook) has swapped a seam in impl.model.
    """
    spec = importlib.util.spec_from_file_location("golden._diagnose_impl_model", module.__file__)
    copy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = copy  # dataclasses look their module up there
    spec.loader.exec_module(copy)
    return copy


model = _private_copy(_impl_model)

# ================================================================ labelled axes
_ROWS = ("position", "channel")
AXES: dict[str, tuple[str, ...]] = {
    TOKENS: ("position",), EMBEDDINGS: _ROWS, ROPE_COS: ("position", "pair"), ROPE_SIN: ("position", "pair"),
    RESIDUAL_IN: _ROWS, ATTN_NORM: _ROWS, Q: ("position", "head", "dim"), K: ("position", "kv head", "dim"),
    V: ("position", "kv head", "dim"), Q_ROPE: ("position", "head", "dim"), K_ROPE: ("position", "kv head", "dim"),
    SCORES: ("head", "query", "key"), PROBS: ("head", "query", "key"), ATTN_HEADS: ("position", "head", "dim"),
    ATTN_OUT: _ROWS, RESIDUAL_ATTN: _ROWS, FFN_NORM: _ROWS, FFN_GATE: ("position", "hidden"),
    FFN_UP: ("position", "hidden"), FFN_HIDDEN: ("position", "hidden"), FFN_OUT: _ROWS, OUT: _ROWS, NORM: _ROWS,
    LOGITS: ("token",), LOGPROBS_LAST: ("token",),
}


def label_index(stage: str, index: tuple[int, ...]) -> str:
    """(3, 1, 1) at scores -> 'head 3, query 1, key 1'; an index of another rank stays a list."""
    names = AXES.get(stage, ())[: len(index)]  # a summary of every row: the leading axes (head, query)
    if len(names) != len(index):
        return str(list(index))
    return ", ".join(f"{n} {i}" for n, i in zip(names, index, strict=True))


# ================================================================ the catalogue
class Missing(Exception):
    """A hypothesis needs a golden stage or a weight that is not there."""


@dataclass
class Ctx:
    """What a hypothesis computes from: the golden's tensors and the weights, at one stage of one layer."""

    stage: str
    layer: int | None
    golden: Mapping[str, torch.Tensor]
    config: ModelConfig
    weights: Mapping[str, torch.Tensor] | None
    reported: frozenset[str]  # every key the implementation reported
    start_pos: int = 0
    prefix: str = ""  # key prefix of a golden's decode step (issue 12: `decode.<step>.`)
    _cache: dict = field(default_factory=dict)

    @property
    def seq(self) -> int:
        cos = self.golden.get(self.prefix + ROPE_COS)
        return cos.shape[0] if cos is not None else int(self.g(TOKENS).numel())

    def key(self, stage: str, layer: int | None = -1) -> str:
        layer = self.layer if layer == -1 else layer
        per_layer = stages.BY_NAME[stage].per_layer
        return self.prefix + stages.key(stage, layer if per_layer else None)

    def g(self, stage: str, layer: int | None = -1) -> torch.Tensor:
        """The golden's tensor of a stage (this layer's by default), as fp32."""
        k = self.key(stage, layer)
        if k not in self.golden:
            raise Missing(k)
        if isinstance(self.golden[k], Sampled):  # a long prompt's golden keeps a few rows of each stage
            raise Missing(f"{k} in full; a golden of a prompt of at most {sampling.THRESHOLD} tokens has it")
        return self.golden[k].float()

    def w(self, name: str) -> torch.Tensor:
        """A weight by its Meta name, `attention.wq.weight` meaning this layer's; fp32."""
        top = ("tok_embeddings.weight", "norm.weight", "output.weight")
        full = name if name in top else f"layers.{self.layer}.{name}"
        if self.weights is None or full not in self.weights:
            raise Missing(f"weight {full}")
        if full not in self._cache:
            self._cache[full] = self.weights[full].float()
        return self._cache[full]

    def reported_here(self, stage: str) -> bool:
        return self.key(stage) in self.reported

    @property
    def step(self) -> int:
        """The decode step this stage belongs to (golden.decode), 0 for the prefill."""
        return int(self.prefix.split(".")[1]) if self.prefix else 0

    def past(self, stage: str) -> torch.Tensor:
        """A decode step's per-position stage (k_rope, v, k) at every earlier position [0, start_pos): the prefill's
        rows, then each earlier step's; (start_pos, kv, d), fp32. Empty for the prefill."""
        if not self.prefix:
            return self.g(stage)[:0]
        here = stages.key(stage, self.layer)
        return torch.cat([self._plain(k) for k in [here] + [stages.decode_key(j, here) for j in range(1, self.step)]])

    def _plain(self, k: str) -> torch.Tensor:
        if k not in self.golden:
            raise Missing(k)
        return self.golden[k].float()


Prediction = Iterator[tuple[str, torch.Tensor]]  # (variant, predicted tensor of ctx.stage)


@dataclass(frozen=True)
class Hypothesis:
    id: str
    what: str  # one line: the wrong convention
    hint: str  # how to fix it
    origin: frozenset[str]  # stages where the bug first shows
    predict: Callable[[Ctx], Prediction]
    reach: frozenset[str] = frozenset()  # later stages it also explains when the ones between were not reported
    needs: str = ""  # the golden inputs it reads, for the README and `not_tried`

    def applies(self, ctx: Ctx) -> bool:
        if ctx.stage in self.origin:
            return True
        if ctx.stage not in self.reach:
            return False
        here = [s for s in self.origin if stages.BY_NAME[s].per_layer == (ctx.layer is not None)]
        return not any(ctx.reported_here(s) for s in here)


CATALOGUE: dict[str, Hypothesis] = {}


def _hyp(id: str, what: str, hint: str, origin, needs: str, reach=()):
    def register(fn: Callable[[Ctx], Prediction]):
        CATALOGUE[id] = Hypothesis(id, what, hint, frozenset(origin), fn, frozenset(reach), needs)
        return fn

    return register


# ---------------------------------------------------------------- RoPE
_ROPE_TABLES = (ROPE_COS, ROPE_SIN)
_ROPED = (Q_ROPE, K_ROPE)
_ATTN_CHAIN = (SCORES, PROBS, ATTN_HEADS, ATTN_OUT)
_ROPE_REACH = _ROPED + _ATTN_CHAIN
_THETAS = (10000.0, 500000.0, 100000.0, 1000000.0, 50000.0)
_LLAMA31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _cis(freqs: torch.Tensor, seq: int, start: int) -> torch.Tensor:
    """e^(i pos freq) for positions [start, start+seq) from given frequencies (impl's polar form)."""
    positions = torch.arange(start, start + seq, dtype=torch.float32)
    angles = torch.outer(positions, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def _rope_stage(ctx: Ctx, cis: torch.Tensor | None, rope: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """ctx.stage computed with the frequencies `cis` (or the rotation `rope`), from the golden's q and k onwards."""
    if ctx.stage == ROPE_COS:
        return cis.real
    if ctx.stage == ROPE_SIN:
        return cis.imag
    rot = rope or (lambda x: model.apply_rope(x, cis))
    if ctx.stage == Q_ROPE:
        return rot(ctx.g(Q))
    if ctx.stage == K_ROPE:
        return rot(ctx.g(K))
    return _attend(ctx, q=rot(ctx.g(Q)), k=rot(ctx.g(K)))


def _freq_variants(ctx: Ctx, freqs_of: Callable[[ModelConfig], Iterator[tuple[str, torch.Tensor]]],
                   start: int | None = None) -> Prediction:
    seq, start = ctx.seq, ctx.start_pos if start is None else start
    for detail, freqs in freqs_of(ctx.config):
        yield detail, _rope_stage(ctx, _cis(freqs, seq, start))


@_hyp("rope.theta", "RoPE base theta other than the model's (e.g. 10000, Llama 2's)",
      "read rope_theta from the config (Llama 3: 500000; SmolLM2: 100000)", _ROPE_TABLES + _ROPED,
      "config; q, k", _ATTN_CHAIN)
def _rope_theta(ctx: Ctx) -> Prediction:
    def freqs(c: ModelConfig):
        for theta in _THETAS:
            if theta != c.rope_theta:
                yield f"theta {theta:g} (the model's is {c.rope_theta:g})", model.rope_frequencies(
                    c.replace(rope_theta=theta))
    return _freq_variants(ctx, freqs)


@_hyp("rope.positions_offset", "RoPE positions shifted: starting at 1 (or -1) instead of 0",
      "rotate the token at index i by angle i * freq: positions = arange(start_pos, start_pos + seq)",
      _ROPE_TABLES + _ROPED, "config; q, k", _ATTN_CHAIN)
def _rope_offset(ctx: Ctx) -> Prediction:
    freqs = model.rope_frequencies(ctx.config)
    for shift in (1, -1):
        yield _positions_as(ctx, ctx.start_pos + shift), _rope_stage(ctx, _cis(freqs, ctx.seq, ctx.start_pos + shift))


def _positions_as(ctx: Ctx, start: int) -> str:
    """'positions start at 1', or in a decode step 'position 17 rotated as position 0'."""
    if ctx.prefix and ctx.seq == 1:
        return f"position {ctx.start_pos} rotated as position {start}"
    return f"positions start at {start}"


@_hyp("rope.decode_from_zero", "in decode, RoPE positions start from a fixed 0 instead of the token's position",
      "rotate a decoded token by its position in the sequence (start_pos + i), not by i",
      _ROPE_TABLES + _ROPED, "config; q, k; a golden with start_pos > 0", _ATTN_CHAIN)
def _rope_from_zero(ctx: Ctx) -> Prediction:
    if ctx.start_pos > 0:
        yield _positions_as(ctx, 0) if ctx.prefix else "positions from 0", _rope_stage(
            ctx, _cis(model.rope_frequencies(ctx.config), ctx.seq, 0))


@_hyp("rope.scaling_missing", "Llama 3.1 rope scaling not applied (a Llama 3 port on a Llama 3.1 model)",
      "apply Llama 3.1's apply_scaling to the frequencies (config.rope_scaling: factor, low/high_freq_factor, "
      "original_max_position_embeddings)", _ROPE_TABLES + _ROPED, "config; q, k", _ATTN_CHAIN)
def _rope_scaling_missing(ctx: Ctx) -> Prediction:
    s = ctx.config.rope_scaling
    if s is not None:
        yield (f"no scaling (the model scales by factor {s.factor:g}, original context "
               f"{s.original_max_position_embeddings})"), _rope_stage(ctx, _cis(
                   model.rope_frequencies(ctx.config.replace(rope_scaling=None)), ctx.seq, ctx.start_pos))


@_hyp("rope.scaling_applied", "Llama 3.1 rope scaling applied to a model that has none",
      "scale the frequencies only when config.rope_scaling is set", _ROPE_TABLES + _ROPED, "config; q, k",
      _ATTN_CHAIN)
def _rope_scaling_applied(ctx: Ctx) -> Prediction:
    c = ctx.config
    if c.rope_scaling is None:
        for orig in (8192, ctx.seq // 2 or 1):
            s = RopeScaling(_LLAMA31.factor, _LLAMA31.low_freq_factor, _LLAMA31.high_freq_factor, orig)
            yield f"Llama 3.1 scaling (factor 8, original context {orig})", _rope_stage(
                ctx, _cis(model.scale_rope_frequencies(model.rope_frequencies(c), s), ctx.seq, ctx.start_pos))


@_hyp("rope.scaling_wrong", "Llama 3.1 rope scaling with one wrong constant",
      "take factor, low_freq_factor, high_freq_factor and original_max_position_embeddings from the config",
      _ROPE_TABLES + _ROPED, "config; q, k", _ATTN_CHAIN)
def _rope_scaling_wrong(ctx: Ctx) -> Prediction:
    s = ctx.config.rope_scaling
    if s is None:
        return
    base = model.rope_frequencies(ctx.config.replace(rope_scaling=None))
    options = {"factor": (8.0, 32.0, 16.0, 4.0, 2.0), "low_freq_factor": (1.0, 2.0, 4.0),
               "high_freq_factor": (4.0, 1.0, 2.0, 8.0), "original_max_position_embeddings": (8192, 4096, 2048, 32)}
    for name, values in options.items():
        for v in values:
            if v == getattr(s, name):
                continue
            fields = {**vars(s), name: v}
            if fields["low_freq_factor"] >= fields["high_freq_factor"]:
                continue
            wrong = RopeScaling(**fields)
            yield f"{name} {v:g} (the model's is {getattr(s, name):g})", _rope_stage(
                ctx, _cis(model.scale_rope_frequencies(base, wrong), ctx.seq, ctx.start_pos))


@_hyp("rope.freq_length", "RoPE frequencies built for another head size (the walk-through's range(64)/64)",
      "freqs = theta ** -(arange(0, head_dim, 2) / head_dim): head_dim/2 of them, from the config",
      _ROPE_TABLES + _ROPED, "config; q, k", _ATTN_CHAIN)
def _rope_freq_length(ctx: Ctx) -> Prediction:
    c, d = ctx.config, ctx.config.head_dim
    theta = c.rope_theta
    variants = {"exponents range(d/2)/64 (written for head_dim 128)": torch.arange(d // 2) / 64,
                "exponents range(d/2)/d (the factor 2 forgotten)": torch.arange(d // 2) / d,
                "exponents range(d/2)/(d/4)": torch.arange(d // 2) / max(d // 4, 1)}
    for detail, exps in variants.items():
        freqs = 1.0 / theta ** exps.float()
        if c.rope_scaling is not None:
            freqs = model.scale_rope_frequencies(freqs, c.rope_scaling)
        yield detail, _rope_stage(ctx, _cis(freqs, ctx.seq, ctx.start_pos))
    if ctx.stage in _ROPE_TABLES and d // 2 != 64:  # 64 frequencies: only a table can hold them
        yield "range(64)/64: 64 frequencies", _rope_stage(ctx, _cis(1.0 / theta ** (torch.arange(64) / 64), ctx.seq,
                                                                  ctx.start_pos))


@_hyp("rope.direction", "RoPE rotating the wrong way (sin with the wrong sign)",
      "rotate by +angle: x * e^(i pos freq), (a cos - b sin, a sin + b cos)", _ROPE_TABLES + _ROPED,
      "config; q, k", _ATTN_CHAIN)
def _rope_direction(ctx: Ctx) -> Prediction:
    yield "rotation by -angle", _rope_stage(ctx, model.precompute_freqs_cis(ctx.config, ctx.seq, ctx.start_pos).conj())


def _rope_as_rotate_half(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """RoPE pairing (j, j + d/2) (transformers' rotate_half) applied to a tensor in interleaved layout."""
    return interleaved_to_rotate_half(model.apply_rope(rotate_half_to_interleaved(x), cis))


@_hyp("rope.pairing", "q/k pairs in the other layout: interleaved (2j, 2j+1) vs rotate-half (j, j+d/2)",
      "if q, k, q_rope and k_rope all match after the permutation and scores pass, your q/k are consistently in "
      "transformers' rotate-half layout: pass --qk-layout hf (or report them in Meta's interleaved layout: "
      "rotate_half_to_interleaved); "
      "otherwise your wq/wk rows are in HF order with complex (interleaved) RoPE: unpermute them",
      (Q, K) + _ROPED, "q, k (and config)", _ATTN_CHAIN)
def _rope_pairing(ctx: Ctx) -> Prediction:
    if ctx.stage in (Q, K, Q_ROPE, K_ROPE):
        g = ctx.g(ctx.stage)
        yield "reported in rotate-half layout (interleaved_to_rotate_half of the golden)", interleaved_to_rotate_half(g)
        yield "reported in a layout that rotate_half_to_interleaved gives", rotate_half_to_interleaved(g)
    if ctx.stage not in (Q, K):
        cis = model.precompute_freqs_cis(ctx.config, ctx.seq, ctx.start_pos)
        yield "rotate-half RoPE on interleaved q/k", _rope_stage(ctx, cis, lambda x: _rope_as_rotate_half(x, cis))


@_hyp("rope.not_applied", "RoPE not applied (q_rope is q)", "rotate q and k with RoPE before the scores",
      _ROPED, "q, k", _ATTN_CHAIN)
def _rope_not_applied(ctx: Ctx) -> Prediction:
    yield "no rotation", _rope_stage(ctx, None, lambda x: x)


@_hyp("rope.applied_twice", "RoPE applied twice (e.g. to keys already rotated in the cache)",
      "rotate each q and k once; cache keys after RoPE and do not rotate them again", _ROPED, "config; q, k",
      _ATTN_CHAIN)
def _rope_twice(ctx: Ctx) -> Prediction:
    cis = model.precompute_freqs_cis(ctx.config, ctx.seq, ctx.start_pos)
    yield "rotated twice", _rope_stage(ctx, cis, lambda x: model.apply_rope(model.apply_rope(x, cis), cis))


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


@_hyp("precision.rope_bf16", "RoPE computed in bf16 inside an fp32 run (angles, cos/sin or the rotation)",
      "compute the angles, cos/sin and the rotation in fp32 (Meta: freqs_cis in fp32, x.float())",
      _ROPE_TABLES + _ROPED, "config; q, k", _ATTN_CHAIN)
def _rope_bf16(ctx: Ctx) -> Prediction:
    c = ctx.config
    cis = model.precompute_freqs_cis(c, ctx.seq, ctx.start_pos)
    angles = _bf16(torch.arange(ctx.start_pos, ctx.start_pos + ctx.seq, dtype=torch.float32)[:, None]
                   * _bf16(model.rope_frequencies(c))[None, :])
    yield "angles in bf16", _rope_stage(ctx, torch.polar(torch.ones_like(angles), angles))
    rounded = torch.complex(_bf16(cis.real), _bf16(cis.imag))
    if ctx.stage in _ROPE_TABLES:
        yield "cos/sin rounded to bf16", _rope_stage(ctx, rounded)
    else:
        def rot(x):
            cos, sin = _bf16(cis.real)[:, None, :], _bf16(cis.imag)[:, None, :]
            a, b = _bf16(x)[..., 0::2], _bf16(x)[..., 1::2]
            return _bf16(torch.stack((_bf16(a * cos) - _bf16(b * sin), _bf16(a * sin) + _bf16(b * cos)), -1)
                         .flatten(-2))
        yield "rotation in bf16", _rope_stage(ctx, cis, rot)


# ---------------------------------------------------------------- attention
def _attend(ctx: Ctx, q: torch.Tensor | None = None, k: torch.Tensor | None = None, *, scale: float | None = None,
            start: int | None = None, mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
            kv_idx: torch.Tensor | None = None, softmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
            scores: torch.Tensor | None = None, heads_flat: Callable[[torch.Tensor], torch.Tensor] | None = None,
            cached: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
            ) -> torch.Tensor:
    """ctx.stage (scores, probs, attn_heads or attn_out) with impl's attention functions, some convention swapped.

    q, k default to the golden's q_rope and k_rope; `scores` given skips to the softmax (the golden's scores). In a
    decode step the keys and values of every earlier position (the golden's: `Ctx.past`) come before the new
    position's, as a correct cache holds them; `cached(keys, values)` -> what a wrong cache hands the attention.
    """
    c = ctx.config
    idx = model.kv_head_of(c.n_heads, c.n_kv_heads) if kv_idx is None else kv_idx
    def values() -> torch.Tensor:  # (kv_len, kv, d)
        return torch.cat([ctx.past(V), ctx.g(V)]) if ctx.prefix else ctx.g(V)

    v = None
    if scores is None:
        q = ctx.g(Q_ROPE) if q is None else q
        k = ctx.g(K_ROPE) if k is None else k
        if ctx.prefix:
            k = torch.cat([ctx.past(K_ROPE), k])
        if cached is not None:
            k, v = cached(k, values())
        if scale is not None:
            q = q * (math.sqrt(q.shape[-1]) / scale)
        s = model.attention_scores(q, k[:, idx], ctx.start_pos if start is None else start)
        if mask is not None:
            s = mask(s)
        if ctx.stage == SCORES:
            return s
    else:
        s = scores
    probs = (softmax or model.attention_probs)(s)
    if ctx.stage == PROBS:
        return probs
    v = values() if v is None else v
    heads = torch.einsum("hqk,khd->qhd", probs, v[:, idx])
    if ctx.stage == ATTN_HEADS:
        return heads
    flat = heads_flat(heads) if heads_flat is not None else heads.reshape(heads.shape[0], -1)
    return flat @ ctx.w("attention.wo.weight").T


@_hyp("attention.scale_dim", "scores divided by sqrt(dim) (the model width) instead of sqrt(head_dim)",
      "divide q.k by sqrt(head_dim)", (SCORES,), "q_rope, k_rope (v, wo downstream)", _ATTN_CHAIN[1:])
def _scale_dim(ctx: Ctx) -> Prediction:
    c = ctx.config
    yield f"sqrt(n_heads * head_dim) = sqrt({c.n_heads * c.head_dim})", _attend(
        ctx, scale=math.sqrt(c.n_heads * c.head_dim))
    if c.dim != c.n_heads * c.head_dim:
        yield f"sqrt(dim) = sqrt({c.dim})", _attend(ctx, scale=math.sqrt(c.dim))


@_hyp("attention.scale_128", "scores divided by sqrt(128) (an 8B constant) instead of sqrt(head_dim)",
      "divide q.k by sqrt(config.head_dim), not a literal", (SCORES,), "q_rope, k_rope (v, wo downstream)",
      _ATTN_CHAIN[1:])
def _scale_128(ctx: Ctx) -> Prediction:
    yield "sqrt(128)", _attend(ctx, scale=math.sqrt(128))


@_hyp("attention.scale_1", "scores not scaled (q.k without / sqrt(head_dim))", "divide q.k by sqrt(head_dim)",
      (SCORES,), "q_rope, k_rope (v, wo downstream)", _ATTN_CHAIN[1:])
def _scale_1(ctx: Ctx) -> Prediction:
    yield "no scale", _attend(ctx, scale=1.0)


@_hyp("attention.scale_d", "scores divided by head_dim (or scaled twice) instead of sqrt(head_dim)",
      "divide q.k by sqrt(head_dim) once", (SCORES,), "q_rope, k_rope (v, wo downstream)", _ATTN_CHAIN[1:])
def _scale_d(ctx: Ctx) -> Prediction:
    d = ctx.config.head_dim
    yield f"/ head_dim = / {d}", _attend(ctx, scale=float(d))
    yield f"* sqrt(head_dim) = * sqrt({d})", _attend(ctx, scale=1 / math.sqrt(d))


@_hyp("attention.mask_offset", "causal mask off by one: a query sees the next key, or not itself",
      "mask key j for query i where j > start_pos + i (torch.triu(..., diagonal=1))", (SCORES,),
      "q_rope, k_rope (v, wo downstream)", _ATTN_CHAIN[1:])
def _mask_offset(ctx: Ctx) -> Prediction:
    yield "each query sees one key ahead", _attend(ctx, start=ctx.start_pos + 1)
    yield "each query's own key masked (diagonal=0)", _attend(ctx, start=ctx.start_pos - 1)


@_hyp("attention.mask_from_zero", "in decode, the causal mask built as if the queries started at position 0 "
      "(start_pos ignored): a new token sees only the first keys", "mask key j for the query at position "
      "start_pos + i where j > start_pos + i: causal_mask(q_len, kv_len, start_pos)", (SCORES,),
      "q_rope, k_rope of every position (v, wo downstream); a decode step", _ATTN_CHAIN[1:])
def _mask_from_zero(ctx: Ctx) -> Prediction:
    if ctx.start_pos > 0:
        yield f"queries at positions from 0 instead of {ctx.start_pos}", _attend(ctx, start=0)


# ---------------------------------------------------------------- the KV cache (decode steps)
_CACHE_WHY = "q_rope, k_rope and v of every position (wo downstream); a decode step"


def _new_slot(ctx: Ctx, write: int | None, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache a step reads when its key and value went to slot `write` (None: nowhere) instead of start_pos,
    over a cache of zeros: keys and values of positions [0, start_pos] as handed to the attention."""
    n = ctx.seq
    k2, v2 = k.clone(), v.clone()
    new_k, new_v = k[-n:].clone(), v[-n:].clone()
    k2[-n:], v2[-n:] = 0.0, 0.0
    if write is not None and 0 <= write and write + n <= k2.shape[0]:
        k2[write:write + n], v2[write:write + n] = new_k, new_v
    return k2, v2


@_hyp("cache.not_written", "the step's key and value never written into the KV cache: attention reads what the slot "
      "held before (zeros in a fresh cache)", "write k (after RoPE) and v into the cache at start_pos before "
      "attending: cache_k[start_pos : start_pos + seq] = k", (SCORES,), _CACHE_WHY, _ATTN_CHAIN[1:])
def _cache_not_written(ctx: Ctx) -> Prediction:
    if ctx.prefix:
        yield f"position {ctx.start_pos}'s key and value missing (zeros)", _attend(
            ctx, cached=lambda k, v: _new_slot(ctx, None, k, v))


@_hyp("cache.wrong_index", "the step's key and value written at another index of the KV cache than start_pos",
      "write at start_pos (the position of the first new token): cache_k[start_pos : start_pos + seq] = k",
      (SCORES,), _CACHE_WHY, _ATTN_CHAIN[1:])
def _cache_wrong_index(ctx: Ctx) -> Prediction:
    if ctx.prefix:
        for shift in (-1, 1):
            yield f"written at {ctx.start_pos + shift} instead of {ctx.start_pos}", _attend(
                ctx, cached=lambda k, v, w=ctx.start_pos + shift: _new_slot(ctx, w, k, v))


def _rotate_cached(ctx: Ctx, k: torch.Tensor, times: int, new_too: bool) -> torch.Tensor:
    """Keys of positions [0, kv_len) as a cache read that rotates them `times` more (-1: undoes the rotation)."""
    cis = model.precompute_freqs_cis(ctx.config, k.shape[0], 0)
    cis = cis if times > 0 else cis.conj()
    out = k.clone()
    upto = k.shape[0] if new_too else k.shape[0] - ctx.seq
    for _ in range(abs(times)):
        out[:upto] = model.apply_rope(out[:upto], cis[:upto])
    return out


@_hyp("cache.keys_rotated_twice", "keys rotated again when read from the KV cache, which already holds them after "
      "RoPE", "rotate k once, before writing it to the cache; read the cached keys as they are", (SCORES,),
      _CACHE_WHY, _ATTN_CHAIN[1:])
def _cache_keys_twice(ctx: Ctx) -> Prediction:
    if ctx.prefix:
        yield "every key rotated again by its position", _attend(
            ctx, cached=lambda k, v: (_rotate_cached(ctx, k, 1, True), v))
        yield "the cached keys rotated again, the new one once", _attend(
            ctx, cached=lambda k, v: (_rotate_cached(ctx, k, 1, False), v))


@_hyp("cache.keys_unrotated", "keys cached before RoPE and read without it: the earlier positions' keys unrotated",
      "cache k after RoPE (or rotate every cached key by its own position when reading)", (SCORES,),
      _CACHE_WHY, _ATTN_CHAIN[1:])
def _cache_keys_unrotated(ctx: Ctx) -> Prediction:
    if ctx.prefix:
        yield "the cached keys before RoPE, the new one rotated", _attend(
            ctx, cached=lambda k, v: (_rotate_cached(ctx, k, -1, False), v))


def _flip_mask(s: torch.Tensor, start: int, transposed: bool = False, sign: float = 1.0) -> torch.Tensor:
    """Scores with the causal mask replaced: transposed (the past masked) or with +inf instead of -inf."""
    q_len, k_len = s.shape[-2:]
    future = torch.arange(k_len)[None, :] > torch.arange(start, start + q_len)[:, None]
    past = torch.arange(k_len)[None, :] < torch.arange(start, start + q_len)[:, None]
    raw = s.masked_fill(future, 0.0)  # the mask's entries are recomputed below
    return raw.masked_fill(past if transposed else future, sign * -math.inf)


@_hyp("attention.mask_missing", "no causal mask: every query sees every key",
      "add the causal mask (-inf above the diagonal) before the softmax", (SCORES,),
      "q_rope, k_rope (v, wo downstream)", _ATTN_CHAIN[1:])
def _mask_missing(ctx: Ctx) -> Prediction:
    yield "no mask", _attend(ctx, start=10 ** 9)


@_hyp("attention.mask_sign", "causal mask with the wrong sign or orientation (+inf, or the past masked)",
      "-inf where key j > query i, 0 elsewhere, added to the scores", (SCORES,), "q_rope, k_rope (v, wo downstream)",
      _ATTN_CHAIN[1:])
def _mask_sign(ctx: Ctx) -> Prediction:
    start = ctx.start_pos
    yield "the past masked instead of the future (tril instead of triu)", _attend(
        ctx, start=10 ** 9, mask=lambda s: _flip_mask(s, start, transposed=True))
    yield "+inf instead of -inf above the diagonal", _attend(ctx, mask=lambda s: _flip_mask(s, start, sign=-1.0))


@_hyp("attention.kv_head_modulo", "kv head chosen by head % n_kv_heads (k/v repeated, not repeat_interleaved)",
      "query head h reads kv head h // (n_heads // n_kv_heads): repeat_interleave(k, group, dim=heads)",
      (SCORES,), "q_rope, k_rope (v, wo downstream)", _ATTN_CHAIN[1:])
def _kv_modulo(ctx: Ctx) -> Prediction:
    c = ctx.config
    yield f"head % {c.n_kv_heads}", _attend(ctx, kv_idx=torch.arange(c.n_heads) % c.n_kv_heads)


@_hyp("attention.kv_head_group", "kv head chosen by head // g with the wrong group g (e.g. the 8B's head // 4)",
      "group = n_heads // n_kv_heads from the config", (SCORES,), "q_rope, k_rope (v, wo downstream)",
      _ATTN_CHAIN[1:])
def _kv_group(ctx: Ctx) -> Prediction:
    c = ctx.config
    for g in range(1, c.n_heads + 1):
        idx = torch.arange(c.n_heads) // g
        if g != c.n_rep and int(idx.max()) < c.n_kv_heads:
            yield f"head // {g} (the group is {c.n_rep})", _attend(ctx, kv_idx=idx)


@_hyp("attention.softmax_axis", "softmax over the wrong axis (queries or heads instead of keys)",
      "softmax over the last axis, the keys: softmax(scores, dim=-1)", (PROBS,), "scores (v, wo downstream)",
      _ATTN_CHAIN[2:])
def _softmax_axis(ctx: Ctx) -> Prediction:
    s = ctx.g(SCORES)
    for dim, name in ((-2, "queries"), (0, "heads")):
        yield f"over {name} (dim={dim})", _attend(
            ctx, scores=s, softmax=lambda x, dim=dim: F.softmax(x.float(), dim=dim).nan_to_num(0.0))


@_hyp("precision.softmax_bf16", "the softmax's input (or the softmax) in bf16 inside an fp32 run",
      "softmax the scores in fp32: F.softmax(scores.float(), dim=-1)", (PROBS,), "scores (v, wo downstream)",
      _ATTN_CHAIN[2:])
def _softmax_bf16(ctx: Ctx) -> Prediction:
    s = ctx.g(SCORES)
    yield "scores rounded to bf16 before the softmax", _attend(
        ctx, scores=s, softmax=lambda x: F.softmax(x.to(torch.bfloat16), dim=-1).float())
    yield "softmax in fp32, probs rounded to bf16", _attend(ctx, scores=s, softmax=lambda x: _bf16(F.softmax(x, -1)))


@_hyp("attention.v_head_modulo", "value heads chosen by head % n_kv_heads (keys right, values wrong)",
      "read values with the same head map as keys: h // group", (ATTN_HEADS,), "probs, v (wo downstream)",
      (ATTN_OUT,))
def _v_modulo(ctx: Ctx) -> Prediction:
    c = ctx.config
    p = ctx.g(PROBS)
    for detail, idx in ((f"head % {c.n_kv_heads}", torch.arange(c.n_heads) % c.n_kv_heads),
                        *((f"head // {g}", torch.arange(c.n_heads) // g) for g in range(1, c.n_heads + 1)
                          if g != c.n_rep and int((torch.arange(c.n_heads) // g).max()) < c.n_kv_heads)):
        yield detail, _attend(ctx, scores=torch.zeros(0), softmax=lambda _: p, kv_idx=idx)


@_hyp("attention.heads_flatten", "heads flattened in the wrong order before wo ((h, seq, d) viewed as (seq, h*d))",
      "attn_heads (seq, h, d) .reshape(seq, h * d): transpose (h, seq, d) back first", (ATTN_OUT,),
      "attn_heads, wo")
def _heads_flatten(ctx: Ctx) -> Prediction:
    heads = ctx.g(ATTN_HEADS)
    seq = heads.shape[0]
    yield "(h, seq, d).reshape(seq, -1)", heads.transpose(0, 1).reshape(seq, -1) @ ctx.w("attention.wo.weight").T
    yield "(seq, d, h) order", heads.transpose(1, 2).reshape(seq, -1) @ ctx.w("attention.wo.weight").T


# ---------------------------------------------------------------- projections
_PROJ = {Q: ("attn_norm", "attention.wq.weight"), K: ("attn_norm", "attention.wk.weight"),
         V: ("attn_norm", "attention.wv.weight"), ATTN_OUT: ("attn_heads", "attention.wo.weight"),
         FFN_GATE: ("ffn_norm", "feed_forward.w1.weight"), FFN_UP: ("ffn_norm", "feed_forward.w3.weight"),
         FFN_OUT: ("ffn_hidden", "feed_forward.w2.weight")}


@_hyp("projection.transposed", "a weight used untransposed (x @ W, or W.reshape(in, out) instead of W.T; e.g. w2)",
      "weights are (out, in) as in Meta's checkpoints: x @ W.T", tuple(_PROJ), "the stage's input and weight")
def _proj_transposed(ctx: Ctx) -> Prediction:
    src, wname = _PROJ[ctx.stage]
    x = ctx.g(src)
    x = x.reshape(x.shape[0], -1)
    w = ctx.w(wname)
    shape = stages.BY_NAME[ctx.stage].shape(ctx.config, x.shape[0])

    def finish(y):
        if ctx.stage == FFN_GATE:
            y = F.silu(y)
        return y.reshape(shape)
    if w.shape[0] == w.shape[1]:
        yield "x @ W", finish(x @ w)
    yield "x @ W.reshape(in, out)", finish(x @ w.reshape(w.shape[1], w.shape[0]))


# ---------------------------------------------------------------- norms
_NORMS = {ATTN_NORM: (RESIDUAL_IN, "attention_norm.weight"), FFN_NORM: (RESIDUAL_ATTN, "ffn_norm.weight"),
          NORM: (OUT, "norm.weight")}


def _norm_input(ctx: Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, weight) of the norm that ctx.stage is (or, at logits, of the final norm)."""
    stage = NORM if ctx.stage == LOGITS else ctx.stage
    src, wname = _NORMS[stage]
    x = ctx.g(src, ctx.config.n_layers - 1) if stage == NORM else ctx.g(src)
    return x, ctx.w(wname)


def _norm_stage(ctx: Ctx, normed: torch.Tensor) -> torch.Tensor:
    """ctx.stage from a (wrong) norm's output: the norm itself, or at logits the last row unembedded."""
    if ctx.stage == LOGITS:
        return normed[-1] @ _output_weight(ctx).T
    return normed


_NORM_REACH = (LOGITS,)  # the final norm's bugs show at the logits when norm was not reported


@_hyp("norm.eps_missing", "RMSNorm without eps: x / sqrt(mean(x^2))", "x * rsqrt(mean(x^2) + norm_eps)",
      tuple(_NORMS), "the norm's input and weight; config", _NORM_REACH)
def _eps_missing(ctx: Ctx) -> Prediction:
    x, w = _norm_input(ctx)
    yield "eps 0", _norm_stage(ctx, model.rms_norm(x, w, 0.0))


@_hyp("norm.eps_wrong", "RMSNorm with another eps than the model's (1e-6 vs 1e-5, eps outside the sqrt...)",
      "use config.norm_eps inside the square root", tuple(_NORMS), "the norm's input and weight; config",
      _NORM_REACH)
def _eps_wrong(ctx: Ctx) -> Prediction:
    x, w = _norm_input(ctx)
    eps = ctx.config.norm_eps
    for e in (1e-5, 1e-6, 1e-8, 1e-3):
        if e != eps:
            yield f"eps {e:g} (the model's is {eps:g})", _norm_stage(ctx, model.rms_norm(x, w, e))
    ms = x.pow(2).mean(-1, keepdim=True)
    yield "eps added outside the sqrt", _norm_stage(ctx, x / (ms.sqrt() + eps) * w)


@_hyp("norm.one_plus_weight", "norm weighted by (1 + w) (Gemma's convention) instead of w",
      "multiply by the weight itself (Llama's RMSNorm)", tuple(_NORMS), "the norm's input and weight", _NORM_REACH)
def _one_plus(ctx: Ctx) -> Prediction:
    x, w = _norm_input(ctx)
    yield "(1 + w)", _norm_stage(ctx, model.rms_norm(x, 1 + w, ctx.config.norm_eps))


@_hyp("norm.weight_missing", "norm without its weight (only x / rms)", "multiply the normalised x by the norm weight",
      tuple(_NORMS), "the norm's input and weight", _NORM_REACH)
def _weight_missing(ctx: Ctx) -> Prediction:
    x, w = _norm_input(ctx)
    yield "no weight", _norm_stage(ctx, model.rms_norm(x, torch.ones_like(w), ctx.config.norm_eps))


@_hyp("norm.wrong_weight", "a norm with another norm's weight (attention_norm vs ffn_norm, another layer's)",
      "attn_norm uses layers.i.attention_norm.weight, ffn_norm layers.i.ffn_norm.weight, the final norm norm.weight",
      tuple(_NORMS), "the norm's input; the weights", _NORM_REACH)
def _wrong_weight(ctx: Ctx) -> Prediction:
    x, w = _norm_input(ctx)
    stage = NORM if ctx.stage == LOGITS else ctx.stage
    names = ["norm.weight"] + [f"layers.{i}.{n}" for i in sorted({0, ctx.layer or 0, ctx.config.n_layers - 1})
                               for n in ("attention_norm.weight", "ffn_norm.weight")]
    own = _NORMS[stage][1] if stage == NORM else f"layers.{ctx.layer}.{_NORMS[stage][1]}"
    for name in names:
        if name != own and ctx.weights is not None and name in ctx.weights:
            yield name, _norm_stage(ctx, model.rms_norm(x, ctx.weights[name].float(), ctx.config.norm_eps))


@_hyp("norm.not_rms", "another normalisation than RMS: LayerNorm (mean subtracted), mean |x|, no square root",
      "x * rsqrt(mean(x^2) + eps) * w: no centring, the root of the mean of squares", tuple(_NORMS),
      "the norm's input and weight", _NORM_REACH)
def _not_rms(ctx: Ctx) -> Prediction:
    x, w = _norm_input(ctx)
    eps = ctx.config.norm_eps
    yield "LayerNorm (x - mean) / std", _norm_stage(ctx, F.layer_norm(x, x.shape[-1:], eps=eps) * w)
    yield "x / mean(|x|)", _norm_stage(ctx, x / (x.abs().mean(-1, keepdim=True) + eps) * w)
    yield "x / (mean(x^2) + eps) (no square root)", _norm_stage(ctx, x / (x.pow(2).mean(-1, keepdim=True) + eps) * w)
    yield "x / sqrt(sum(x^2)) (sum, not mean)", _norm_stage(ctx, x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True)
                                                                                   + eps) * w)


@_hyp("norm.skipped", "the norm not applied (its input passed on; e.g. the final norm skipped)",
      "apply RMSNorm: attention_norm before attention, ffn_norm before the FFN, norm before the output",
      tuple(_NORMS), "the norm's input", _NORM_REACH)
def _norm_skipped(ctx: Ctx) -> Prediction:
    x, _ = _norm_input(ctx)
    yield "input passed through", _norm_stage(ctx, x)


@_hyp("precision.norm_bf16", "RMSNorm computed in bf16 inside an fp32 run",
      "normalise in fp32: x.float() * rsqrt(mean(x^2) + eps), then cast (Meta's RMSNorm)", tuple(_NORMS),
      "the norm's input and weight", _NORM_REACH)
def _norm_bf16(ctx: Ctx) -> Prediction:
    x, w = _norm_input(ctx)
    eps = ctx.config.norm_eps
    xb = x.to(torch.bfloat16)
    yield "normalised in bf16", _norm_stage(ctx, (xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + eps)).float() * w)
    yield "normalised in fp32, rounded to bf16 before the weight", _norm_stage(ctx, _bf16(model.rms_norm(
        x, torch.ones_like(w), eps)) * w)


# ---------------------------------------------------------------- FFN
_FFN = (FFN_GATE, FFN_UP, FFN_HIDDEN, FFN_OUT)


def _ffn_stage(ctx: Ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if ctx.stage == FFN_GATE:
        return gate
    if ctx.stage == FFN_UP:
        return up
    hidden = gate * up
    if ctx.stage == FFN_HIDDEN:
        return hidden
    return hidden @ ctx.w("feed_forward.w2.weight").T


@_hyp("ffn.gate_up_swapped", "SwiGLU with w1 and w3 swapped (silu on the up projection)",
      "gate = silu(x @ w1.T), up = x @ w3.T", (FFN_GATE, FFN_UP), "ffn_norm, w1, w3 (w2 downstream)", _FFN[2:])
def _gate_up(ctx: Ctx) -> Prediction:
    x = ctx.g(FFN_NORM)
    gate, up = model.swiglu_parts(x, ctx.w("feed_forward.w3.weight"), ctx.w("feed_forward.w1.weight"))
    yield "w1 <-> w3", _ffn_stage(ctx, gate, up)


@_hyp("ffn.activation", "another activation than SiLU on the gate (GELU, ReLU, none)",
      "gate = silu(x @ w1.T) = x * sigmoid(x)", (FFN_GATE,), "ffn_norm, w1 (w3, w2 downstream)", _FFN[2:])
def _activation(ctx: Ctx) -> Prediction:
    x = ctx.g(FFN_NORM)
    pre = x @ ctx.w("feed_forward.w1.weight").T
    up = x @ ctx.w("feed_forward.w3.weight").T if ctx.stage != FFN_GATE else None
    for name, act in (("GELU", F.gelu), ("GELU (tanh)", lambda t: F.gelu(t, approximate="tanh")), ("ReLU", F.relu),
                      ("none", lambda t: t), ("sigmoid", torch.sigmoid), ("SiLU twice", lambda t: F.silu(F.silu(t)))):
        yield name, _ffn_stage(ctx, act(pre), up)


@_hyp("ffn.combine", "gate and up combined otherwise than gate * up (a sum, or silu applied again)",
      "ffn_hidden = silu(x @ w1.T) * (x @ w3.T)", (FFN_HIDDEN,), "ffn_gate, ffn_up (w2 downstream)", (FFN_OUT,))
def _combine(ctx: Ctx) -> Prediction:
    gate, up = ctx.g(FFN_GATE), ctx.g(FFN_UP)
    for name, hidden in (("gate + up", gate + up), ("silu(gate) * up", F.silu(gate) * up), ("gate * silu(up)",
                                                                                           gate * F.silu(up))):
        yield name, hidden if ctx.stage == FFN_HIDDEN else hidden @ ctx.w("feed_forward.w2.weight").T


# ---------------------------------------------------------------- residuals and layers
@_hyp("residual.missing", "a skip connection missing (h = attention(norm(x)) without + x)",
      "h = x + attention(norm(x)); out = h + feed_forward(norm(h))", (RESIDUAL_ATTN, OUT), "attn_out / ffn_out")
def _residual_missing(ctx: Ctx) -> Prediction:
    yield "sublayer output only", ctx.g(ATTN_OUT if ctx.stage == RESIDUAL_ATTN else FFN_OUT)


@_hyp("residual.from_norm", "the skip connection adds the normed input instead of the residual stream",
      "add the sublayer's output to x itself, not to norm(x)", (RESIDUAL_ATTN, OUT),
      "attn_norm, attn_out / ffn_norm, ffn_out")
def _residual_from_norm(ctx: Ctx) -> Prediction:
    if ctx.stage == RESIDUAL_ATTN:
        yield "attn_norm + attn_out", ctx.g(ATTN_NORM) + ctx.g(ATTN_OUT)
    else:
        yield "ffn_norm + ffn_out", ctx.g(FFN_NORM) + ctx.g(FFN_OUT)
        yield "residual_in + ffn_out (the attention's residual lost)", ctx.g(RESIDUAL_IN) + ctx.g(FFN_OUT)


def _block(ctx: Ctx, x: torch.Tensor, i: int) -> torch.Tensor:
    """One decoder layer with impl's transformer_block on the weights (fp32)."""
    names = [n for n in ctx.weights if n.startswith(f"layers.{i}.")] if ctx.weights is not None else []
    if not names:
        raise Missing(f"weights of layer {i}")
    w = {n: ctx.weights[n].float() for n in names}
    cis = model.precompute_freqs_cis(ctx.config, x.shape[0], ctx.start_pos)
    return model.transformer_block(x, w, i, ctx.config, cis, ctx.start_pos)


def _last_layer_input(ctx: Ctx) -> tuple[torch.Tensor, int]:
    """(the golden's input to the layer before this stage, that layer): residual_in -> layer i-1; norm -> last."""
    i = ctx.config.n_layers - 1 if ctx.stage == NORM else (ctx.layer or 0) - 1
    if i < 0:
        raise Missing("a previous layer")
    return ctx.g(RESIDUAL_IN, i), i


@_hyp("layer.skipped", "a layer skipped (the loop runs one layer short, or a layer's output is dropped)",
      "run every layer: for i in range(n_layers), x = block(x, i)", (RESIDUAL_IN, NORM),
      "the previous layer's residual_in (norm's weight)")
def _layer_skipped(ctx: Ctx) -> Prediction:
    x, i = _last_layer_input(ctx)
    if ctx.stage == NORM:
        yield f"layer {i} skipped", model.rms_norm(x, ctx.w("norm.weight"), ctx.config.norm_eps)
    else:
        yield f"layer {i} skipped", x


@_hyp("layer.applied_twice", "a layer applied twice (or its output fed through it again)",
      "apply each layer once, in order", (RESIDUAL_IN, NORM), "the previous layer's out and weights")
def _layer_twice(ctx: Ctx) -> Prediction:
    i = ctx.config.n_layers - 1 if ctx.stage == NORM else (ctx.layer or 0) - 1
    if i < 0:
        raise Missing("a previous layer")
    y = _block(ctx, ctx.g(OUT, i), i)
    yield f"layer {i} twice", model.rms_norm(y, ctx.w("norm.weight"), ctx.config.norm_eps) if ctx.stage == NORM else y


@_hyp("layer.wrong_index", "a stage reported under another layer's index, or computed with another layer's weights",
      "report layer i's tensors as layers.i.*; index the weights with the loop's layer", frozenset(
          stages.LAYER_STAGES), "the same stage of the other layers")
def _layer_wrong_index(ctx: Ctx) -> Prediction:
    for j in range(ctx.config.n_layers):
        if j != ctx.layer and ctx.key(ctx.stage, j) in ctx.golden:
            yield f"layer {j}'s {ctx.stage}", ctx.g(ctx.stage, j)


# ---------------------------------------------------------------- output
def _output_weight(ctx: Ctx) -> torch.Tensor:
    name = "output.weight" if ctx.weights is not None and "output.weight" in ctx.weights else "tok_embeddings.weight"
    return ctx.w(name)


@_hyp("output.tied_wrongly", "logits from the token embedding in a model with its own output.weight",
      "unembed with output.weight where the checkpoint has one; tok_embeddings only when tied", (LOGITS,),
      "norm, tok_embeddings, output.weight")
def _tied_wrongly(ctx: Ctx) -> Prediction:
    if ctx.weights is not None and "output.weight" in ctx.weights:
        yield "x @ tok_embeddings.T", ctx.g(NORM)[-1] @ ctx.w("tok_embeddings.weight").T


@_hyp("output.wrong_position", "logits of another position than the last", "the next token comes from x[-1] @ W.T",
      (LOGITS,), "norm, the output weight")
def _wrong_position(ctx: Ctx) -> Prediction:
    x = ctx.g(NORM)
    every = x[:-1] @ _output_weight(ctx).T  # (seq - 1, vocab)
    for p in range(x.shape[0] - 1):
        yield f"position {p}", every[p]


@_hyp("output.logprobs", "logprobs_last not log_softmax(logits): softmax, or the logits themselves",
      "log_softmax(logits.float(), dim=-1)", (LOGPROBS_LAST,), "logits")
def _logprobs(ctx: Ctx) -> Prediction:
    lg = ctx.g(LOGITS)
    yield "softmax", F.softmax(lg, -1)
    yield "the logits", lg


# ---------------------------------------------------------------- layout and precision (every stage)
_ALL = frozenset(s.name for s in stages.STAGES if s.name != TOKENS)


@_hyp("layout.axes", "the stage reported with its axes in another order (transposed; (h, seq, d) vs (seq, h, d))",
      "report the layout of impl.stages: (seq, h, d) for heads, (h, seq, seq) for scores", _ALL, "the stage itself")
def _layout_axes(ctx: Ctx) -> Prediction:
    g = ctx.g(ctx.stage)
    names = AXES.get(ctx.stage, ())
    for perm in itertools.permutations(range(g.dim())):
        if list(perm) != sorted(perm):
            yield ("(" + ", ".join(names[p] for p in perm) + ")" if len(names) == g.dim() else str(perm)), \
                g.permute(*perm)


@_hyp("layout.reshaped", "a reshape/view where a transpose was needed (axes mixed up, same shape)",
      "transpose (movedim) to the stage's layout before reshaping", _ALL - {ROPE_COS, ROPE_SIN, LOGITS, LOGPROBS_LAST},
      "the stage itself")
def _layout_reshaped(ctx: Ctx) -> Prediction:
    g = ctx.g(ctx.stage)
    names = AXES.get(ctx.stage, ())
    for perm in itertools.permutations(range(g.dim())):
        if list(perm) != sorted(perm):
            yield (("(" + ", ".join(names[p] for p in perm) + ")" if len(names) == g.dim() else str(perm))
                   + " viewed as " + ("(" + ", ".join(names) + ")")), g.permute(*perm).reshape(g.shape)


@_hyp("precision.bf16_output", "the stage's result rounded to bf16 inside an fp32 run",
      "keep fp32 activations in an fp32 run (no .bfloat16() / autocast)", _ALL, "the stage itself")
def _bf16_output(ctx: Ctx) -> Prediction:
    yield "rounded to bf16", _bf16(ctx.g(ctx.stage))


# ================================================================ the diagnosis
@dataclass(frozen=True)
class Finding:
    id: str
    reproduces: bool  # the implementation's tensor is within the stage's limit of this hypothesis
    rel: float  # relative error of the implementation's tensor against the hypothesis's prediction
    detail: str  # which variant, and how close
    what: str
    hint: str


@dataclass
class Diagnosis:
    key: str
    limit: float
    correct_rel: float  # the implementation's error against the golden (the correct computation)
    findings: list[Finding]  # best first; one per hypothesis id (its closest variant)
    same_as_correct: list[str]  # ids whose prediction equals the correct computation on this golden
    not_tried: list[str]  # "id (needs ...)"
    signatures: list[str]

    @property
    def matches(self) -> list[Finding]:
        """The hypotheses that reproduce the tensor within the limit, best first (ties listed together)."""
        return [f for f in self.findings if f.reproduces]

    @property
    def top(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    def headline(self) -> str:
        """One line: what reproduces the tensor, or the closest hypothesis and the strongest signature."""
        m = self.matches
        if m:
            tied = [f for f in m if f.rel <= max(m[0].rel * 1.01, m[0].rel + 1e-12)]
            ids = " = ".join(f.id for f in tied)
            return f"{ids} reproduces it ({m[0].detail}; rel {cmp_sci(m[0].rel)}): {m[0].what}"
        sig = self.signatures[0] if self.signatures else "no signature"
        if self.top is None:
            return f"no hypothesis applies here; {sig}"
        t = self.top
        return f"no hypothesis reproduces it (closest: {t.id}, {t.detail}, rel {cmp_sci(t.rel)}); {sig}"


def cmp_sci(x: float) -> str:
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.1e}")


def _rel(actual: torch.Tensor, predicted: torch.Tensor) -> float:
    """compare.stage_metrics' rel, without the other metrics: ||a - p|| / ||p|| over entries finite on both sides;
    inf when the shapes differ or an entry is masked (<= compare.MASKED_BELOW, -inf) or NaN on one side only."""
    if tuple(actual.shape) != tuple(predicted.shape):
        return math.inf
    a, p = actual.detach(), predicted.detach()
    ok_a, ok_p = torch.isfinite(a) & (a > cmp.MASKED_BELOW), torch.isfinite(p) & (p > cmp.MASKED_BELOW)
    if bool(ok_a.all()) and bool(ok_p.all()):
        a, p = a.double(), p.double()
    else:
        a = a.double().masked_fill(a <= cmp.MASKED_BELOW, -math.inf)
        p = p.double().masked_fill(p <= cmp.MASKED_BELOW, -math.inf)
        if bool((ok_a != ok_p).any()) or bool(((~ok_a) & (a != p)).any()):
            return math.inf
        a, p = a[ok_a], p[ok_a]
    err, norm = float((a - p).norm()), float(p.norm())
    return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)


def diagnose(key: str, actual: Mapping[str, torch.Tensor], golden: Mapping[str, torch.Tensor], config: ModelConfig,
             weights: Mapping[str, torch.Tensor] | None, limit: float, start_pos: int = 0,
             prefix: str = "") -> Diagnosis:
    """Every applicable hypothesis of the catalogue at `key`, ranked by how close `actual[key]` is to its prediction.

    actual: what the implementation reported (every key: which stages were reported decides which downstream
    hypotheses run); golden: the fp32 golden's tensors (the inputs); limit: the stage's bound on rel.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of small ops: one thread spares each OpenMP's start and sync (20x on 2 cores)
    try:
        return _diagnose(key, actual, golden, config, weights, limit, start_pos, prefix)
    finally:
        torch.set_num_threads(threads)


def _diagnose(key: str, actual: Mapping[str, torch.Tensor], golden: Mapping[str, torch.Tensor], config: ModelConfig,
              weights: Mapping[str, torch.Tensor] | None, limit: float, start_pos: int, prefix: str) -> Diagnosis:
    layer, stage = stages.parse(key[len(prefix):])
    a = actual[key].detach().float()
    stored = golden[key]

    def rows(t: torch.Tensor) -> torch.Tensor:  # a sampled golden: judge on its sampled rows (golden.sampling)
        sampled = isinstance(stored, Sampled) and tuple(t.shape) == stored.shape
        return sampling.take(t, stored.rows) if sampled else t

    a = rows(a)
    g = stored.values.float() if isinstance(stored, Sampled) else stored.float()
    ctx = Ctx(stage, layer, golden, config, weights, frozenset(actual), start_pos, prefix)
    best: dict[str, Finding] = {}
    same, not_tried = [], []
    for h in CATALOGUE.values():
        if not h.applies(ctx):
            continue
        try:
            variants = list(h.predict(ctx))
        except Missing as e:
            not_tried.append(f"{h.id} (needs {e})")
            continue
        for detail, pred in variants:
            pred = rows(pred.detach().float())
            if tuple(pred.shape) == tuple(g.shape) and _rel(pred, g) <= limit:
                if h.id not in same:
                    same.append(h.id)
                continue
            rel = _rel(a, pred)
            if h.id not in best or rel < best[h.id].rel:
                best[h.id] = Finding(h.id, rel <= limit, rel, detail, h.what, h.hint)
    findings = sorted(best.values(), key=lambda f: (f.rel, list(CATALOGUE).index(f.id)))
    same = [i for i in same if i not in best]
    return Diagnosis(key, limit, _rel(a, g), findings, same, not_tried, signatures(stage, a, g, limit, config))


# ================================================================ cheap signatures
def _simple_forms(config: ModelConfig) -> list[tuple[str, float]]:
    sizes = {"2": 2, "3": 3, "4": 4, "8": 8, "16": 16, "32": 32, "64": 64, "128": 128, "head_dim": config.head_dim,
             "dim": config.dim, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "group": config.n_rep}
    forms = [("1", 1.0)]
    for name, n in sizes.items():
        if n > 1:
            forms += [(name, float(n)), (f"1/{name}", 1.0 / n), (f"sqrt({name})", math.sqrt(n)),
                      (f"1/sqrt({name})", 1 / math.sqrt(n))]
    forms += [("sqrt(dim/head_dim)", math.sqrt(config.dim / config.head_dim)),
              ("sqrt(head_dim/dim)", math.sqrt(config.head_dim / config.dim)), ("-1", -1.0)]
    return forms


def nearest_simple_form(ratio: float, config: ModelConfig) -> str | None:
    """The simple expressions (sqrt(8), 2, 1/sqrt(head_dim), ...) within 1% of ratio, joined by ' = ', or None."""
    if ratio == 0 or not math.isfinite(ratio):
        return None
    close = [(abs(math.log(ratio / v)), name) for name, v in _simple_forms(config) if ratio * v > 0
             and abs(math.log(ratio / v)) < 0.01]
    if not close:
        return None
    names = sorted({name for _, name in close}, key=lambda n: [c[1] for c in close].index(n))
    return " = ".join(names[:3])


def _ranges(idx: list[int]) -> str:
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if j == i else (f"{idx[i]}, {idx[j]}" if j == i + 1 else f"{idx[i]}-{idx[j]}"))
        i = j + 1
    return ", ".join(out)


def _per_axis(a: torch.Tensor, g: torch.Tensor, axis: int, limit: float) -> list[bool]:
    """For each index along axis: is that slice wrong (rel > limit, or masked differently)?"""
    out = []
    for i in range(g.shape[axis]):
        out.append(_rel(a.select(axis, i), g.select(axis, i)) > limit)
    return out


def _named_permutations(n: int) -> list[tuple[str, torch.Tensor]]:
    ar = torch.arange(n)
    out = [("reversed", ar.flip(0))]
    if n % 2 == 0:
        out += [("rotate-half -> interleaved", rotate_half_to_interleaved(ar)),
                ("interleaved -> rotate-half", interleaved_to_rotate_half(ar)),
                ("halves swapped", torch.cat([ar[n // 2:], ar[:n // 2]]))]
    return out


def last_axis_permutation(a: torch.Tensor, g: torch.Tensor, limit: float, max_size: int = 2048
                          ) -> tuple[str, torch.Tensor] | None:
    """A permutation p of the last axis with a ≈ g[..., p] (within limit): its name, or the map itself."""
    n = g.shape[-1]
    if a.shape != g.shape or n < 2 or a.dim() < 2 or not bool(torch.isfinite(g).all()):
        return None
    for name, p in _named_permutations(n):
        if _rel(a, g[..., p]) <= limit:
            return name, p
    if n > max_size:
        return None
    cost = torch.cdist(a.reshape(-1, n).T.double(), g.reshape(-1, n).T.double())  # (n actual, n golden) columns
    p = cost.argmin(1)
    if len(set(p.tolist())) == n and not bool((p == torch.arange(n)).all()) and _rel(a, g[..., p]) <= limit:
        return f"columns {p[:8].tolist()}{'...' if n > 8 else ''}", p
    return None


def qk_layout(actual: torch.Tensor, golden: torch.Tensor, limit: float) -> str | None:
    """Which q/k layout a (seq, heads, d) tensor is in, judged against the golden's (Meta interleaved).

    'interleaved' when it matches as is, 'rotate_half' when it matches after interleaved_to_rotate_half, else None.
    The `--qk-layout` detection (issue 12) calls this on q and q_rope.
    """
    if _rel(actual, golden) <= limit:
        return "interleaved"
    if actual.shape == golden.shape and _rel(actual, interleaved_to_rotate_half(golden.float())) <= limit:
        return "rotate_half"
    return None


def signatures(stage: str, a: torch.Tensor, g: torch.Tensor, limit: float, config: ModelConfig) -> list[str]:
    """Cheap facts about the error that hold whether or not a hypothesis matched (none for a stage within its limit)."""
    out = []
    if a.shape != g.shape:
        return [f"shape {tuple(a.shape)} where the golden has {tuple(g.shape)} "
                f"({', '.join(AXES.get(stage, ()))})"]
    m = cmp.stage_metrics(a, g)
    if m.rel <= limit:
        return out
    if m.mask_mismatch:
        out.append(f"{m.mask_mismatch} entries masked (-inf) on one side only: the mask differs")
    fa, fg = a.double(), g.double()
    both = torch.isfinite(fa) & torch.isfinite(fg)
    if m.cosine > 0.9999 and m.rel > limit and both.any():
        fa_b, fg_b = fa[both], fg[both]
        ratio = float((fa_b @ fg_b) / (fg_b @ fg_b))
        if _rel(fa_b, fg_b * ratio) <= max(limit, 0.05 * m.rel):
            form = nearest_simple_form(ratio, config)
            out.append(f"pure scale: impl = {ratio:.4g} x golden" + (f" (= {form})" if form else "")
                       + f", cosine {m.cosine:.6f}")
        elif a.dim() >= 2 and both.all():
            rows_a, rows_g = fa.reshape(fa.shape[0], -1), fg.reshape(fg.shape[0], -1)
            ratios = (rows_a * rows_g).sum(1) / (rows_g * rows_g).sum(1).clamp_min(1e-300)
            if _rel(a, (rows_g * ratios[:, None]).reshape(g.shape)) <= max(limit, 0.05 * m.rel):
                out.append(f"a scale per {AXES.get(stage, ('row',))[0]} (each row right up to a factor "
                           f"{float(ratios.min()):.4g}..{float(ratios.max()):.4g}): e.g. a norm's eps or denominator")
    names = AXES.get(stage, ())
    if len(names) == a.dim():
        for axis_name, word in (("head", "heads"), ("kv head", "kv heads"), ("position", "positions"),
                                ("query", "queries")):
            if axis_name not in names:
                continue
            wrong = _per_axis(a, g, names.index(axis_name), limit)
            bad = [i for i, w in enumerate(wrong) if w]
            if 0 < len(bad) < len(wrong):
                good = [i for i, w in enumerate(wrong) if not w]
                line = f"{word} {_ranges(bad)} wrong, {word} {_ranges(good)} right"
                if word in ("positions", "queries"):
                    line += ": position-dependent (e.g. RoPE or the mask)"
                out.append(line)
            elif bad and word in ("heads", "kv heads") and len(wrong) > 1:
                out.append(f"every one of the {len(wrong)} {word} wrong")
    if stage not in (SCORES, PROBS, LOGITS, LOGPROBS_LAST):
        p = last_axis_permutation(a, g, limit)
        if p is not None:
            out.append(f"a permutation of the last axis ({names[-1] if names else 'last'}) makes it match: {p[0]}")
    if m.cosine < 0.1 and math.isfinite(m.cosine):
        out.append(f"cosine {m.cosine:.3f}: unrelated to the golden (another weight, another input)")
    return out
