"""Goldens that grow linearly with the prompt: which rows a long golden keeps, and what it keeps of every row.

A stage stored in full costs seq x (its width) bytes, and the attention matrices (`scores`, `probs`: heads x
seq x seq per layer) grow with the square of the prompt: SmolLM2-135M at 1,025 tokens is a 3.6 GB golden in full.
So on a prompt longer than `THRESHOLD` tokens every stage with a position axis is stored *sampled*:

- the full rows at a deterministic sample of positions (`sample_positions`: the first two, the last two -- the
  last query is the longest-range row, it sees every key -- and `SPREAD` evenly spaced between), all heads and
  all keys of each sampled query for the attention matrices;
- a summary of EVERY row (`SUMMARIES`): for `scores` the logsumexp and the max over the unmasked keys, for
  `probs` the entropy and the argmax key, for every per-position stage the L2 norm of the position's row.

Prompts of up to `THRESHOLD` tokens keep full tensors (every committed default golden does): diagnosing a
failure recomputes the failing stage from the golden's full inputs (golden.diagnose). `tokens` is stored in
full, and `logits` / `logprobs_last` have no position axis (they are the last position's).

`reduce` is the one sampling function: the recorder applies it to transformers' tensors as they are produced
(one layer's attention at a time), the checker to the implementation's tensors as they are traced, so both
sides sample the same rows and summarise them with the same arithmetic (in blocks of rows, so that summarising
an 8B model's 8,192-token attention does not copy it whole). The manifest's stage entry says what
it holds: `"rows": {"axis": 1, "positions": [0, 1, ...], "summaries": ["logsumexp", "max"]}` (golden.format).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from impl import stages

THRESHOLD = 64  # prompts of up to this many tokens are stored in full (the committed default goldens: <= 17)
SPREAD = 8  # evenly spaced positions sampled between the first two and the last two
MASKED_BELOW = -1e4  # attention scores at or below this count as masked (-inf): finfo.min, -1e9, -1e4
_BLOCK = 1 << 22  # elements summarised at a time (16 MB in float32)

# What a sampled stage keeps of every row. Rows of `scores`/`probs` are (head, query) pairs over the keys;
# rows of the other stages are positions over everything else.
SUMMARIES: dict[str, tuple[str, ...]] = {stages.SCORES: ("logsumexp", "max"), stages.PROBS: ("entropy", "argmax")}
PER_POSITION_SUMMARY = ("l2",)
_UNSAMPLED = frozenset({stages.TOKENS, stages.LOGITS, stages.LOGPROBS_LAST})  # the input; the last position only
SUMMARY_DTYPES = {"argmax": torch.int32}  # the others are float32


def position_axis(stage: str) -> int | None:
    """The axis of a stage's tensor that runs over positions (queries for the attention matrices), or None."""
    if stage in _UNSAMPLED:
        return None
    return 1 if stage in SUMMARIES else 0


def summaries_of(stage: str) -> tuple[str, ...]:
    return SUMMARIES.get(stage, PER_POSITION_SUMMARY)


def sample_positions(seq: int, threshold: int = THRESHOLD) -> tuple[int, ...] | None:
    """The positions a golden of a `seq`-token prompt keeps in full, sorted; None: every position (seq <= threshold).

    0, 1, seq-2, seq-1 and SPREAD evenly spaced positions round(i * (seq - 1) / (SPREAD + 1)), i = 1..SPREAD:
    at most 4 + SPREAD = 12 positions whatever the prompt's length.
    """
    if seq <= threshold:
        return None
    spread = (round(i * (seq - 1) / (SPREAD + 1)) for i in range(1, SPREAD + 1))
    return tuple(sorted({0, 1, seq - 2, seq - 1, *spread}))


@dataclass(frozen=True)
class Rows:
    """A manifest's `rows` of one stage: the axis sampled, the positions kept in full, the summaries of every row."""

    axis: int
    positions: tuple[int, ...]
    summaries: tuple[str, ...]

    @classmethod
    def of(cls, stage: str, positions: tuple[int, ...]) -> Rows:
        axis = position_axis(stage)
        if axis is None:
            raise ValueError(f"stage {stage} has no position axis to sample")
        return cls(axis, tuple(positions), summaries_of(stage))

    def to_json(self) -> dict[str, Any]:
        return {"axis": self.axis, "positions": list(self.positions), "summaries": list(self.summaries)}

    def __str__(self) -> str:
        return f"{len(self.positions)} sampled positions + {', '.join(self.summaries)} of every row"


def rows_problem(value: Any, stage: str, seq: int) -> str | None:
    """What is wrong with a manifest's `rows` value for `stage` of a `seq`-token golden, or None."""
    axis = position_axis(stage)
    if axis is None:
        return f"a {stage} stage is never sampled (null expected)"
    if not isinstance(value, dict) or set(value) != {"axis", "positions", "summaries"}:
        return "an object with axis, positions and summaries expected"
    if value["axis"] != axis or isinstance(value["axis"], bool):
        return f"axis {value['axis']!r}, the {stage} stage's positions run along axis {axis}"
    pos = value["positions"]
    if not (isinstance(pos, list) and pos and all(isinstance(p, int) and not isinstance(p, bool) for p in pos)):
        return "positions: a non-empty list of integers expected"
    if pos != sorted(set(pos)) or pos[0] < 0 or pos[-1] >= seq:
        return f"positions: sorted distinct positions in [0, {seq}) expected"
    if value["summaries"] != list(summaries_of(stage)):
        return f"summaries {value['summaries']!r}, a sampled {stage} stage holds {list(summaries_of(stage))}"
    return None


def rows_from_json(value: Mapping[str, Any]) -> Rows:
    return Rows(value["axis"], tuple(value["positions"]), tuple(value["summaries"]))


def summary_shape(rows: Rows, shape: tuple[int, ...]) -> tuple[int, ...]:
    """(h, seq, seq) sampled along axis 1 -> (h, seq): one summary per row; (seq, ...) along 0 -> (seq,)."""
    return tuple(shape[: rows.axis + 1])


def values_shape(rows: Rows, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored rows' shape: the stage's, with the sampled axis as long as the sample."""
    return tuple(len(rows.positions) if i == rows.axis else n for i, n in enumerate(shape))


@dataclass(frozen=True, eq=False)
class Sampled:
    """A stage as a sampled golden holds it: full rows at `rows.positions`, summaries of every row."""

    rows: Rows
    shape: tuple[int, ...]  # the stage's full shape (impl.stages)
    values: torch.Tensor  # values_shape(rows, shape), the stage's dtype
    summaries: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> summary_shape(rows, shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, *self.summaries.values()))


def _spans(shape: tuple[int, ...], axis: int):
    """(start, length) of consecutive slices along the position axis of at most _BLOCK elements (>= one row)."""
    row = max(1, math.prod(shape[axis + 1:]) * math.prod(shape[:axis]))
    step = max(1, _BLOCK // row)
    for start in range(0, shape[axis], step):
        yield start, min(step, shape[axis] - start)


def _blocks(t: torch.Tensor, axis: int):
    for start, n in _spans(tuple(t.shape), axis):
        yield t.narrow(axis, start, n)


def _summaries_of_block(names: tuple[str, ...], block: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each summary of each row of a block of rows. Computed in the block's float32 (exact for max and argmax;
    ~1e-7 relative for the others, 1,000x under the fp32 bound) and summed in float64: one pass over an 8B
    model's 8,192-token attention must not copy it in float64. Masked scores need no special case: a masked entry
    (-inf, finfo.min, -1e9 or -1e4) adds exp(masked - max) = 0 to the logsumexp and is never the max."""
    x = block.detach()
    x = x.float() if x.dtype != torch.float64 else x
    out = {}
    for name in names:
        if name == "l2":  # (n, ...) -> (n,)
            out[name] = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=torch.float64)
        elif name == "logsumexp":  # torch.logsumexp's formula, in place (faster on a block of rows)
            top = x.amax(dim=-1, keepdim=True)
            out[name] = (x - top).exp_().sum(-1, dtype=torch.float64).log_() + top.squeeze(-1)
        elif name == "max":
            out[name] = x.amax(dim=-1)
        elif name == "entropy":  # -sum p log p over the keys (0 log 0 = 0)
            out[name] = -torch.xlogy(x, x).sum(-1, dtype=torch.float64)
        elif name == "argmax":
            out[name] = x.argmax(dim=-1)
        else:
            raise KeyError(f"unknown summary {name!r}")
    return out


def summarize(t: torch.Tensor, rows: Rows) -> dict[str, torch.Tensor]:
    """Every summary of every row of a full stage tensor, block by block along the position axis."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in rows.summaries}
    for block in _blocks(t, rows.axis):
        for name, v in _summaries_of_block(rows.summaries, block).items():
            parts[name].append(v)
    return {name: torch.cat(v, dim=rows.axis).to(SUMMARY_DTYPES.get(name, torch.float32)) for name, v in parts.items()}


def take(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The full rows at the sampled positions (a contiguous copy)."""
    return t.detach().index_select(rows.axis, torch.tensor(rows.positions, dtype=torch.long)).contiguous()


def reduce(t: torch.Tensor, rows: Rows) -> Sampled:
    """A full stage tensor as a sampled golden holds it. The one sampling function of recorder and checker."""
    return Sampled(rows, tuple(t.shape), take(t, rows), summarize(t, rows))


def sample_stage(key: str, t: torch.Tensor, positions: tuple[int, ...] | None) -> torch.Tensor | Sampled:
    """A recorded stage as a golden stores it: in full without positions (a short prompt) or for a stage with no
    position axis, else reduced."""
    _, stage = stages.parse(key)
    if positions is None or position_axis(stage) is None:
        return t
    return reduce(t, Rows.of(stage, positions))


def sample_all(tensors: Mapping[str, torch.Tensor], positions: tuple[int, ...] | None) -> dict:
    """Every stage of a full golden's tensors sampled at `positions` (e.g. a short golden checked in sampled mode)."""
    return {k: sample_stage(k, t, positions) for k, t in tensors.items()}


# ---------------------------------------------------------------- on disk: the causal prefix of attention rows
# A sampled row of `scores` or `probs` is stored up to its query (keys 0..q): the rest is masked by the stage's
# definition (-inf in scores, 0 in probs), so the file holds sum(q + 1) entries per head, not len(positions) x seq.
MASKED_VALUE = {stages.SCORES: -math.inf, stages.PROBS: 0.0}


def packed_shape(stage: str, rows: Rows, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of a sampled stage's rows: (h, sum(q + 1)) for the attention matrices, else values_shape."""
    if stage not in MASKED_VALUE:
        return values_shape(rows, shape)
    return (shape[0], sum(p + 1 for p in rows.positions))


def pack(stage: str, s: Sampled) -> torch.Tensor:
    """A sampled stage's rows as stored; ValueError if a dropped entry is not the stage's masked value."""
    if stage not in MASKED_VALUE:
        return s.values
    fill = MASKED_VALUE[stage]
    for i, p in enumerate(s.rows.positions):
        rest = s.values[:, i, p + 1:]
        if not bool((rest == fill).all()):
            raise ValueError(f"{stage} row {p} holds values after its query (a causal mask expected)")
    return torch.cat([s.values[:, i, : p + 1] for i, p in enumerate(s.rows.positions)], dim=1).contiguous()


def unpack(stage: str, stored: torch.Tensor, rows: Rows, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack: the masked keys after each sampled query filled back in."""
    if stage not in MASKED_VALUE:
        return stored
    out = torch.full(values_shape(rows, shape), MASKED_VALUE[stage], dtype=stored.dtype)
    start = 0
    for i, p in enumerate(rows.positions):
        out[:, i, : p + 1] = stored[:, start: start + p + 1]
        start += p + 1
    return out


def argmax_shortfall(actual: torch.Tensor, golden_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the golden's argmax key falls short of the row's maximum in the implementation's probs:
    (actual[h, q, golden argmax], actual's row max), both (h, seq) float32. Equal where the argmax agrees (or the
    two keys tie); a wrong attention pattern makes the first smaller."""
    at, top = [], []
    for start, n in _spans(tuple(actual.shape), 1):
        x = actual.detach().narrow(1, start, n).float()
        idx = golden_argmax.long().narrow(1, start, n)
        at.append(x.gather(-1, idx.unsqueeze(-1)).squeeze(-1))
        top.append(x.amax(-1))
    return torch.cat(at, 1), torch.cat(top, 1)
