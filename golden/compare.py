"""The comparator: golden tensors vs any implementation's tensors, stage by stage, in forward order.

It knows nothing about impl: it takes plain mappings of stage key -> tensor (a golden's and an
implementation's) and returns a `Report`. Metrics per stage follow llama.cpp and TransformerLens:
max-abs, relative (Frobenius) error, NMSE, cosine, the worst element; on logits also KL divergence
and top-1 agreement. The first failing stage in forward order is *the* failure; later failures
are marked as its consequences; stages an implementation does not report are "not checked",
never "pass", and make the verdict INCOMPLETE (or PARTIAL, where the user asked for a partial check).
It computes; golden.report renders (text, JSON, PNG) in one number format.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from golden import sampling, tolerances
from impl import stages

PASS, FAIL, CONSEQUENCE, NOT_CHECKED = "pass", "FAIL", "consequence", "not checked"
# Verdicts. PASS: every stage the golden holds was reported and is within tolerance. INCOMPLETE: none
# failed, but stages are missing (exit 1). PARTIAL: the user asked for a partial check (--partial), logits
# were reported, and every reported stage passed (exit 0). FAIL: a stage or the logits check failed.
V_PASS, V_FAIL, V_INCOMPLETE, V_PARTIAL = "PASS", "FAIL", "INCOMPLETE", "PARTIAL"
MASKED_BELOW = sampling.MASKED_BELOW  # values at or below this count as masked (-inf)


@dataclass(frozen=True)
class Metrics:
    max_abs: float
    rel: float  # ||a - e|| / ||e|| over finite entries; inf if shapes or masks disagree
    nmse: float  # ||a - e||^2 / ||e||^2 (llama.cpp)
    cosine: float
    worst_index: tuple[int, ...]
    worst_actual: float
    worst_expected: float
    mask_mismatch: int = 0  # entries finite on one side only (e.g. a causal mask off by one)
    problem: str = ""  # shape mismatch and the like
    part: str = ""  # a sampled stage's part these metrics are of: "rows" or a summary ("logsumexp", ...)


def _bad(problem: str) -> Metrics:
    return Metrics(math.inf, math.inf, math.inf, math.nan, (), math.nan, math.nan, 0, problem)


def stage_metrics(actual: torch.Tensor, expected: torch.Tensor) -> Metrics:
    """Compare two tensors of one stage in float64. -inf on both sides (masked scores) is equal."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if tuple(actual.shape) != tuple(expected.shape):
        return _bad(f"shape {tuple(actual.shape)} != golden {tuple(expected.shape)}")
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    # Masks come as -inf, finfo(dtype).min (transformers), -1e9 or -1e4 (older code): all mean "masked".
    # No unmasked attention score of a working model comes near -1e4.
    a, e = a.masked_fill(a <= MASKED_BELOW, -math.inf), e.masked_fill(e <= MASKED_BELOW, -math.inf)
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    same_inf = (~fa) & (~fe) & (a == e)  # -inf == -inf; NaN never equal
    mismatch = int(((fa != fe) | ((~fa) & (~fe) & ~same_inf)).sum())
    both = fa & fe
    a_f, e_f = a[both], e[both]
    diff = (a_f - e_f).abs()
    if diff.numel() == 0:
        max_abs = rel = nmse = 0.0
        cosine, worst, wa, we = 1.0, (), math.nan, math.nan
    else:
        flat = int(diff.argmax())
        max_abs = float(diff[flat])
        norm_e = float(e_f.norm())
        err = float((a_f - e_f).norm())
        rel = err / norm_e if norm_e > 0 else (0.0 if err == 0 else math.inf)
        nmse = rel * rel
        denom = float(a_f.norm()) * norm_e
        cosine = float(a_f @ e_f) / denom if denom > 0 else (1.0 if err == 0 else 0.0)
        worst = tuple(int(i) for i in torch.nonzero(both)[flat].tolist())
        wa, we = float(a_f[flat]), float(e_f[flat])
    if mismatch:
        rel = nmse = math.inf
    return Metrics(max_abs, rel, nmse, cosine, worst, wa, we, mismatch)


@dataclass(frozen=True)
class ScaleBias:
    """bf16's second rule at the RMSNorm outputs (golden.tolerances): the implementation's scale bias beyond the
    reference's, B = <a - r, e> / <e, e>, against what bf16 rounding can produce, A; it fails when S = |B|/A > limit."""

    s: float  # |B| / A
    bias: float  # B: > 0 every row scaled up, < 0 scaled down (relative to the golden)
    allowance: float  # A = rel_r + U * sqrt(sum_i w_i^2)
    limit: float

    @property
    def ok(self) -> bool:
        return self.s <= self.limit


_ROWS_OVER_HEADS = frozenset({"scores", "probs"})  # (heads, queries, keys): a row is one query of one head


def _rows(t: torch.Tensor, stage: str) -> torch.Tensor:
    t = t.detach().to(torch.float64)
    if t.dim() <= 1:
        return t.reshape(1, -1)
    return t.reshape(-1, t.shape[-1]) if stage in _ROWS_OVER_HEADS else t.reshape(t.shape[0], -1)


def scale_bias(actual: torch.Tensor, expected: torch.Tensor, reference: torch.Tensor, stage: str = "",
               limit: float = tolerances.SCALE_BIAS_LIMIT) -> ScaleBias:
    """The scale-bias statistic of one bf16 stage (golden.tolerances explains it), in float64.

    actual: the implementation's bf16 output; expected: the fp32 golden's (e); reference: the reference's bf16
    golden (r). Rows are positions ((head, query) pairs for scores/probs); entries masked or non-finite on any
    side are left out. S = inf on a shape mismatch (the size rule reports that one).
    """
    actual, expected, reference = (torch.as_tensor(x) for x in (actual, expected, reference))
    if not (tuple(actual.shape) == tuple(expected.shape) == tuple(reference.shape)):
        return ScaleBias(math.inf, math.nan, math.nan, limit)
    a, e, r = _rows(actual, stage), _rows(expected, stage), _rows(reference, stage)
    keep = torch.ones_like(e, dtype=torch.bool)
    for x in (a, e, r):
        keep &= torch.isfinite(x) & (x > MASKED_BELOW)
    zero = torch.zeros((), dtype=torch.float64)
    a, e, r = (torch.where(keep, x, zero) for x in (a, e, r))
    row_ee = (e * e).sum(1)
    ee = float(row_ee.sum())
    if ee == 0.0:
        return ScaleBias(0.0, 0.0, 0.0, limit)
    bias = float(((a - r) * e).sum()) / ee
    rel_r = float((r - e).norm()) / math.sqrt(ee)
    allowance = rel_r + tolerances.SCALE_BIAS_UNIT * float((row_ee / ee).pow(2).sum().sqrt())
    s = abs(bias) / allowance if allowance > 0 else (0.0 if bias == 0 else math.inf)
    return ScaleBias(s, bias, allowance, limit)


@dataclass(frozen=True)
class LogitsCheck:
    kl: float  # KL(golden fp32 || implementation) at the last position
    kl_limit: float
    top1: int  # implementation's predicted token
    top1_golden: int
    top1_ok: bool
    ref_kl: float | None = None  # the reference's own bf16 KL (bf16 checks only)

    @property
    def ok(self) -> bool:
        return self.top1_ok and self.kl <= self.kl_limit


@dataclass
class StageResult:
    key: str
    layer: int | None
    stage: str
    status: str
    metrics: Metrics | None
    limit: float  # the bound on metrics.rel that was applied
    ref_metrics: Metrics | None = None  # bf16: the reference's own error against the fp32 golden
    note: str = ""
    scale_bias: ScaleBias | None = None  # bf16 at the RMSNorm outputs: the second rule
    rule: str = ""  # which rule failed the stage: "size", "scale bias" or "size, scale bias"; "" if none
    diagnosis: object = None  # golden.diagnose.Diagnosis, on the first failure (computed by golden.check)


@dataclass
class Report:
    dtype: str
    results: list[StageResult]
    logits: LogitsCheck | None = None
    not_recorded: list[str] = field(default_factory=list)  # in the implementation, not in the golden
    partial: bool = False  # the user asked to check only the stages the implementation reports
    hints: list[str] = field(default_factory=list)  # one-line advice the runner adds (golden.check: the q/k layout)

    @property
    def first_failure(self) -> StageResult | None:
        return next((r for r in self.results if r.status == FAIL), None)

    @property
    def missing(self) -> list[str]:
        """Stages the golden holds that the implementation did not report, in forward order."""
        return [r.key for r in self.results if r.status == NOT_CHECKED]

    @property
    def verdict(self) -> str:
        if self.first_failure is not None or (self.logits is not None and not self.logits.ok):
            return V_FAIL
        if not self.missing:
            return V_PASS
        if self.partial and self.checked and stages.LOGITS not in self.missing:
            return V_PARTIAL
        return V_INCOMPLETE

    @property
    def passed(self) -> bool:
        """PASS, or PARTIAL where the user asked for a partial check: exit 0."""
        return self.verdict in (V_PASS, V_PARTIAL)

    @property
    def checked(self) -> list[StageResult]:
        return [r for r in self.results if r.status != NOT_CHECKED]

    def result(self, key: str) -> StageResult:
        return next(r for r in self.results if r.key == key)


_ORDER = {s.name: i for i, s in enumerate(stages.STAGES)}


def forward_rank(key: str) -> tuple[int, int, int]:
    """A stage key's place in forward order (pre-stages, layer 0's stages, layer 1's, ..., post-stages)."""
    layer, stage = stages.parse(key)
    if layer is not None:
        return (1, layer, _ORDER[stage])
    return (0 if _ORDER[stage] < len(stages.PRE_STAGES) else 2, 0, _ORDER[stage])


def forward_order(keys) -> list[str]:
    """Sort stage keys in forward order (pre-stages, layer 0's stages, layer 1's, ..., post-stages)."""
    return sorted(keys, key=forward_rank)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(softmax(p) || softmax(q)) in float64."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def check_logits(expected: torch.Tensor, actual: torch.Tensor, reference: torch.Tensor | None = None) -> LogitsCheck:
    """llama.cpp's precision metrics on the last position's logits.

    Top-1 must match the fp32 golden's, unless the golden's logit for the implementation's
    pick is within the noise of the precision being checked (a near-tie).
    """
    expected, actual = expected.double(), actual.double()
    kl = _kl(expected, actual)
    top1, top1_golden = int(actual.argmax()), int(expected.argmax())
    if reference is None:
        noise, ref_kl = tolerances.DEFAULT.fp32_rel * float(expected.abs().max()), None
        kl_limit = tolerances.KL_FLOOR * 1e-2
    else:
        reference = reference.double()
        noise = 2 * float((reference - expected).abs().max())
        ref_kl = _kl(expected, reference)
        kl_limit = tolerances.KL_FACTOR * ref_kl + tolerances.KL_FLOOR
    gap = float(expected[top1_golden] - expected[top1]) if 0 <= top1 < expected.numel() else math.inf
    return LogitsCheck(kl, kl_limit, top1, top1_golden, top1 == top1_golden or gap <= noise, ref_kl)


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> Metrics:
    """Integer summaries (argmax keys) of two goldens: rel = the fraction of rows that differ."""
    differ = actual.reshape(-1) != expected.reshape(-1)
    n = int(differ.sum())
    if n == 0:
        return Metrics(0.0, 0.0, 0.0, 1.0, (), math.nan, math.nan)
    flat = int(differ.nonzero()[0])
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(expected.shape)))
    rel = n / differ.numel()
    return Metrics(math.inf, rel, rel * rel, math.nan, worst, float(actual.reshape(-1)[flat]),
                   float(expected.reshape(-1)[flat]))


def _at_positions(m: Metrics, rows: sampling.Rows) -> Metrics:
    """A metric of the sampled rows with its worst element's index on the stage's own axes (query 8191, not 11)."""
    if not m.worst_index:
        return m
    index = list(m.worst_index)
    index[rows.axis] = rows.positions[index[rows.axis]]
    return dataclasses.replace(m, worst_index=tuple(index))


def sampled_metrics(actual, expected: sampling.Sampled) -> dict[str, Metrics]:
    """A sampled stage, part by part: 'rows' (the full rows at the sampled positions) and each summary of every row.

    actual: the implementation's full tensor (reduced here with golden.sampling's one function) or another
    golden's sampled stage (a diff). The argmax key of `probs` is judged, from a full tensor, by how far the
    implementation's probability at the golden's argmax key falls short of its row maximum (0 where they agree or
    tie: a near-tie is no error); between two goldens by the fraction of rows whose argmax differs.
    """
    rows = expected.rows
    if isinstance(actual, sampling.Sampled):
        if actual.rows != rows:
            return {"rows": _bad("sampled at other positions than the golden")}
        a, full = actual, None
    else:
        if tuple(actual.shape) != expected.shape:
            return {"rows": _bad(f"shape {tuple(actual.shape)} != golden {expected.shape}")}
        a, full = sampling.reduce(actual, rows), actual
    parts = {"rows": _at_positions(stage_metrics(a.values, expected.values), rows)}
    for name in rows.summaries:
        if name == "argmax":
            parts[name] = (stage_metrics(*sampling.argmax_shortfall(full, expected.summaries[name]))
                           if full is not None else _exact(a.summaries[name], expected.summaries[name]))
        else:
            parts[name] = stage_metrics(a.summaries[name], expected.summaries[name])
    return {k: dataclasses.replace(m, part=k) for k, m in parts.items()}


@dataclass
class Judge:
    """Judges one stage at a time against the golden, so that a check can compare each stage as it is traced and
    drop it (golden.check); `assemble` then puts the results in forward order and names the first failure.

    limit_for(key, stage) -> (bound on rel, the reference's own metrics or None); for a sampled stage the bf16
    bound is computed per part from the reference's sampled stage. bias_for(key, stage, actual) -> the scale-bias
    rule's result where it applies (bf16 norm outputs), else None.
    """

    expected: Mapping[str, object]
    dtype: str
    limit_for: Callable[[str, str], tuple[float, Metrics | None]]
    bias_for: Callable[[str, str, torch.Tensor], ScaleBias | None] = lambda key, stage, actual: None
    reference: Mapping[str, object] | None = None

    def stage(self, key: str, actual) -> StageResult:
        """One reported stage's result (status PASS or FAIL on its own; `assemble` marks consequences)."""
        layer, stage = stages.parse(key)
        expected = self.expected[key]
        if isinstance(expected, sampling.Sampled):
            return self._sampled(key, layer, stage, actual, expected)
        if isinstance(actual, sampling.Sampled):  # a diff of a full golden against a sampled one
            return _result(key, layer, stage, _bad("sampled on one side only"), 0.0, None, None)
        m = stage_metrics(actual, expected)
        limit, ref_m = self.limit_for(key, stage)
        sb = self.bias_for(key, stage, actual) if not m.problem else None
        return _result(key, layer, stage, m, limit, ref_m, sb)

    def _sampled(self, key, layer, stage, actual, expected: sampling.Sampled) -> StageResult:
        """Every part within its own bound; the result shows the part furthest past (or nearest to) its bound."""
        parts = sampled_metrics(actual, expected)
        ref = self.reference.get(key) if self.reference is not None else None
        ref_parts = sampled_metrics(ref, expected) if isinstance(ref, sampling.Sampled) else {}
        base, _ = self.limit_for(key, stage)
        tol = tolerances.tolerance(stage)

        def bound(part: str) -> float:
            if self.dtype != "bf16" or not ref_parts:
                return base
            rp = ref_parts.get(part)
            return tol.bf16_factor * (rp.rel if rp is not None else 0.0) + tol.bf16_floor

        # bf16: a summary is judged within at least the bound of the rows it summarises (a row's norm, logsumexp or
        # max moves by no more than the row: |‖a‖ − ‖e‖| <= ‖a − e‖), and the argmax shortfall by that bound. The
        # reference's own error on a summary alone can be far below its rows' (rounding averages out in a norm), and
        # a correct bf16 implementation that rounds elsewhere was measured 6x past it (SmolLM2, split-K SwiGLU).
        rows_bound = bound("rows")
        limits = {part: rows_bound if part == "argmax" else max(bound(part), rows_bound) for part in parts}
        worst = max(parts, key=lambda p: _ratio(parts[p].rel, limits[p]))
        sb = None
        if not parts[worst].problem and not isinstance(actual, sampling.Sampled):
            sb = self.bias_for(key, stage, sampling.take(actual, expected.rows))
        fired = [p for p in parts if not parts[p].rel <= limits[p]]
        r = _result(key, layer, stage, parts[worst], limits[worst], ref_parts.get(worst), sb, fired_parts=fired)
        r.note = r.note or f"sampled: {expected.rows}"
        return r


def _ratio(rel: float, limit: float) -> float:
    if math.isnan(rel):
        return math.inf
    return rel / limit if limit > 0 else (math.inf if rel > 0 else 0.0)


def _result(key, layer, stage, m: Metrics, limit: float, ref_m, sb, fired_parts=None) -> StageResult:
    size_bad = bool(fired_parts) if fired_parts is not None else not m.rel <= limit
    fired = [name for name, bad in (("size", size_bad), ("scale bias", sb is not None and not sb.ok)) if bad]
    return StageResult(key, layer, stage, PASS if not fired else FAIL, m, limit, ref_m, m.problem, sb,
                       ", ".join(fired))


def assemble(expected_keys, judged: Mapping[str, StageResult], dtype: str, reported=()) -> Report:
    """Every stage the golden holds, in forward order: judged ones as judged (a failure after the first is its
    consequence), the others "not checked"."""
    results: list[StageResult] = []
    failed = False
    for key in forward_order(expected_keys):
        if key not in judged:
            layer, stage = stages.parse(key)
            results.append(StageResult(key, layer, stage, NOT_CHECKED, None, math.nan, note="not reported"))
            continue
        r = judged[key]
        if r.status == FAIL and failed:
            r = dataclasses.replace(r, status=CONSEQUENCE)
        failed = failed or r.status in (FAIL, CONSEQUENCE)
        results.append(r)
    known = set(expected_keys)
    return Report(dtype, results, None, sorted(k for k in reported if k not in known))


def _walk(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], judge: Judge) -> Report:
    judged = {k: judge.stage(k, actual[k]) for k in expected if k in actual}
    return assemble(list(expected), judged, judge.dtype, actual)


def judge_for(expected: Mapping[str, object], dtype: str = "fp32", reference: Mapping[str, object] | None = None,
              decode_step: bool = False) -> Judge:
    """The judge of a check: the fp32 bound, or in bf16 factor x the reference's own error (+ floor) and the
    scale-bias rule at the RMSNorm outputs (golden.tolerances); a decode step's (one row per stage): the decode
    factors and no scale-bias rule."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, not {dtype!r}")
    if dtype == "bf16" and reference is None:
        raise ValueError("a bf16 check needs the reference's bf16 golden")

    def limit_for(key: str, stage: str) -> tuple[float, Metrics | None]:
        tol = tolerances.tolerance(stage)
        if dtype == "fp32":
            return tol.fp32_rel, None
        ref, exp = reference.get(key), expected[key]
        if ref is None or isinstance(exp, sampling.Sampled):
            return tol.bf16_floor, None  # a sampled stage's bound is per part (Judge._sampled)
        ref_m = stage_metrics(ref, exp)
        factor = tolerances.decode_bf16_factor(stage) if decode_step else tol.bf16_factor
        return factor * ref_m.rel + tol.bf16_floor, ref_m

    def bias_for(key: str, stage: str, actual: torch.Tensor) -> ScaleBias | None:
        limit = tolerances.tolerance(stage).bf16_scale_bias
        if dtype != "bf16" or limit is None or key not in reference or decode_step:
            return None
        exp, ref = expected[key], reference[key]
        if isinstance(exp, sampling.Sampled):  # the sampled positions' rows
            exp, ref = exp.values, ref.values
        return scale_bias(actual, exp, ref, stage, limit)

    return Judge(expected, dtype, limit_for, bias_for, reference)


def compare(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], dtype: str = "fp32",
            reference: Mapping[str, torch.Tensor] | None = None, partial: bool = False,
            decode_step: bool = False) -> Report:
    """Check `actual` against the fp32 golden `expected`, every stage the golden holds.

    dtype "fp32": relative error within the fp32 bound. dtype "bf16": `reference` is the
    reference's bf16 golden of the same model and prompt; the implementation's error against
    the fp32 golden may be at most factor x the reference's own error (+ floor), and at the RMSNorm
    outputs its scale bias at most `bf16_scale_bias` x what rounding allows (golden.tolerances).
    A sampled stage (golden.sampling) is judged part by part: its sampled rows and each summary of every row.
    decode_step: the tensors are one decode step's, one position each (golden.decode): bf16 uses the decode
    factors of golden.tolerances and no scale-bias rule (it needs many rows).
    """
    judge = judge_for(expected, dtype, reference, decode_step)
    report = _walk(expected, actual, judge)
    report.partial = partial
    if "logits" in expected and "logits" in actual:
        report.logits = logits_check(expected, actual["logits"], reference)
    return report


def logits_check(expected: Mapping[str, object], actual: torch.Tensor,
                 reference: Mapping[str, object] | None) -> LogitsCheck | None:
    """check_logits where the implementation's logits have the golden's shape, else None (the stage fails)."""
    if actual.shape != expected["logits"].shape:
        return None
    ref_logits = reference["logits"] if reference is not None and "logits" in reference else None
    return check_logits(expected["logits"], actual, ref_logits)


def compare_goldens(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], dtype: str) -> Report:
    """Two goldens of one dtype (e.g. committed and re-recorded after an upgrade), b against a.

    fp32: the suite's fp32 table. bf16: no fp32 truth to judge against, so every stage gets
    `tolerances.DIFF_BF16_REL` (token ids stay exact).
    """
    if dtype == "fp32":
        return compare(a, b, "fp32")
    limit = lambda key, stage: (0.0 if stage == "tokens" else tolerances.DIFF_BF16_REL, None)  # noqa: E731
    return _walk(a, b, Judge(a, dtype, limit))
