"""Reports: what a check or a diff found, as a text table, JSON, a PNG and the pytest failure message.

Everything a user reads about a `golden.compare.Report` is rendered here, in one number format
(`sci`: 1.2e-03, inf, nan); golden.compare computes the metrics and the verdict, golden.check runs,
golden.cli wires arguments. A check's table says, per stage, how many layers it checked out of how
many the golden holds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from golden import compare as cmp
from golden import features
from golden.check import Outcome
from golden.decode import NOT_RUN, DecodeReport, StepResult
from golden.diagnose import AXES, Diagnosis, label_index
from impl import stages
from impl.errors import Llama3GoldenError


def sci(x: float) -> str:
    """1.2e-03, inf, nan: how the reports print a metric."""
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.1e}")


def describe(r: cmp.StageResult, first_position: int = 0) -> str:
    """One line with every number: `layers.0.scores: rel 6.5e-01 > limit 1.0e-04, ..., worst at head 0, query 6,
    key 0: impl ... vs golden ...` (the worst element's axes named as in impl.stages; positions and queries
    counted from first_position: a decode step's).

    Where bf16's scale-bias rule failed the stage, the line says so first (the size rule may have passed)."""
    m = r.metrics
    axes = AXES.get(r.stage, ())
    worst = tuple(i + first_position if len(axes) == len(m.worst_index) and axes[n] in ("position", "query") else i
                  for n, i in enumerate(m.worst_index))
    sb = r.scale_bias
    size = f"rel {sci(m.rel)} {'<=' if m.rel <= r.limit else '>'} limit {sci(r.limit)}"
    head = f"{r.key}: {size}"
    if sb is not None and not sb.ok:
        head = f"{r.key}: {describe_scale_bias(sb)}; {size}"
    return (f"{head}, max-abs {sci(m.max_abs)}, "
            f"nmse {sci(m.nmse)}, cosine {m.cosine:.6f}"
            + (f", worst at {label_index(r.stage, worst)}{_part(m)}: impl {m.worst_actual:.6g} vs golden "
               f"{m.worst_expected:.6g}" if m.worst_index else "")
            + (f", {m.mask_mismatch} entries masked on one side only" if m.mask_mismatch else "")
            + (f" ({r.note})" if r.note else ""))


def _part(m: cmp.Metrics) -> str:
    """Which part of a sampled stage (golden.sampling) the worst element is in: ' (logsumexp of the row)'."""
    if not m.part:
        return ""
    if m.part == "argmax":
        return " (the golden's argmax key: impl's probability there vs impl's row max)"
    return " (sampled row)" if m.part == "rows" else f" ({m.part} of the row)"


def describe_scale_bias(sb: cmp.ScaleBias) -> str:
    """`scale bias 2.29 > limit 0.70 (rows scaled up by 1.2e-02 beyond the reference's, allowance 5.3e-03: ...)`."""
    way = "up" if sb.bias > 0 else "down"
    return (f"scale bias {sb.s:.2f} {'<=' if sb.ok else '>'} limit {sb.limit:.2f} (rows scaled {way} by "
            f"{sci(abs(sb.bias))} on average beyond the reference's bf16 scale, allowance {sci(sb.allowance)}: "
            f"a systematic error, e.g. RMSNorm's eps missing or wrong)")

# ---------------------------------------------------------------- the diagnosis of the first failure
def diagnosis_lines(d: Diagnosis | None, indent: str = "  ", others: int = 3) -> list[str]:
    """Why the first failure failed: what reproduces it (or the closest), signatures, what was not tried."""
    if d is None:
        return []
    lines = [f"{indent}WHY: {d.headline()}"]
    shown = d.matches or d.findings[:1]
    for f in shown:
        lines.append(f"{indent}  {f.id}: {f.detail} (rel {sci(f.rel)} against it, limit {sci(d.limit)}"
                     f"{'' if f.reproduces else ', not within'}); fix: {f.hint}")
    rest = [f for f in d.findings if f not in shown][:others]
    if rest:
        lines.append(f"{indent}  next closest: " + ", ".join(f"{f.id} ({f.detail}, rel {sci(f.rel)})" for f in rest))
    for sig in d.signatures:
        lines.append(f"{indent}  signature: {sig}")
    if d.not_tried:
        lines.append(f"{indent}  not tried (the golden lacks their inputs): {', '.join(d.not_tried)}")
    return lines


def failure_message(r: cmp.StageResult) -> str:
    """The pytest message of a failing stage: its numbers, then its diagnosis where one was made."""
    return "\n".join([describe(r), *diagnosis_lines(r.diagnosis)])


def failure_lines(report: cmp.Report, config, first_position: int = 0) -> list[str]:
    """The first failure: its numbers, the reference's own bf16 error there, the model's rope-scaling note, the
    runner's hints (the q/k layout) and the diagnosis. The table's FIRST FAILURE and pytest --impl's message.
    first_position: where the report's positions start (a decode step's position)."""
    first = report.first_failure
    if first is None:
        return []
    lines = [describe(first, first_position)]
    if first.ref_metrics is not None:
        lines.append(f"    (the reference's own bf16 error there: rel {sci(first.ref_metrics.rel)})")
    note = features.rope_scaling_note(config, first.stage)
    if note:
        lines.append(f"    NOTE: {note}")
    lines += [f"  HINT: {h}" for h in report.hints]
    return lines + diagnosis_lines(first.diagnosis, "  ")


def decode_failure_message(step: StepResult, config) -> list[str]:
    """The first failure of a decode step: `step 1 (position 17), rope_cos: rel ...`, then what failure_lines says
    (the diagnosis on the first failing step). The table's DECODE FIRST FAILURE and pytest --impl's message."""
    lines = failure_lines(step.report, config, step.position)
    return [f"{_step_where(step)}, {lines[0]}", *lines[1:]] if lines else []


def _by_stage(report: cmp.Report) -> dict[str, list[cmp.StageResult]]:
    """Results grouped by stage name (every layer's together), in forward order."""
    groups: dict[str, list[cmp.StageResult]] = {}
    for r in report.results:
        groups.setdefault(r.stage, []).append(r)
    return groups


# ---------------------------------------------------------------- check: the text table
def _decode(tokenizer, token: int) -> str:
    if tokenizer is None:
        return ""
    try:
        return repr(tokenizer.decode([token]))
    except Exception:  # the text is a nicety; the id is the fact
        return ""


def _worst_against_limit(rows: list[cmp.StageResult]) -> cmp.StageResult:
    return max(rows, key=lambda x: x.metrics.rel / x.limit if x.limit > 0 else math.inf * (x.metrics.rel > 0))


def _check_row(stage: str, rows: list[cmp.StageResult]) -> str:
    """`  q_rope   2/2   3.3e-07  L01   1.0e-04  pass`: the stage's worst layer measured against its limit."""
    checked = [x for x in rows if x.status != cmp.NOT_CHECKED]
    if not checked:
        return f"  {stage:<14}{'0/' + str(len(rows)):>9}  {'':>9} {'':>4}  {'':>8}  not reported"
    worst = _worst_against_limit(checked)
    at = f"L{worst.layer:02d}" if worst.layer is not None else "-"
    bad = [x for x in checked if x.status != cmp.PASS]
    rules = sorted({x.rule for x in bad if x.rule and x.rule != "size"})  # say so where not (only) the size rule
    notes = (["first"] if any(x.status == cmp.FAIL for x in bad) else []) + [f"rule: {r}" for r in rules]
    status = "pass" if not bad else f"{len(bad)} fail" + (f" ({'; '.join(notes)})" if notes else "")
    if len(checked) < len(rows):
        status += f", {len(rows) - len(checked)} not reported"
    return (f"  {stage:<14}{f'{len(checked)}/{len(rows)}':>9}  {sci(worst.metrics.rel):>9} {at:>4}  "
            f"{sci(worst.limit):>8}  {status}")


def _logits_line(lg: cmp.LogitsCheck, tokenizer) -> str:
    return (f"  logits: KL {sci(lg.kl)} (limit {sci(lg.kl_limit)}), next token: impl {lg.top1} "
            f"{_decode(tokenizer, lg.top1)}, golden {lg.top1_golden} "
            f"{_decode(tokenizer, lg.top1_golden)} -> {'agree' if lg.top1_ok else 'DISAGREE'}")


def verdict_line(r: cmp.Report) -> str:
    """`PASS: 43/43 stages within tolerance`, `FAIL: ...`, `INCOMPLETE: ...` or `PARTIAL: 10 of 43 stages ...`."""
    checked, total, missing = r.checked, len(r.results), r.missing
    n_pass = sum(x.status == cmp.PASS for x in checked)
    verdict = r.verdict
    if verdict == cmp.V_PASS:
        return f"PASS: {n_pass}/{total} stages within tolerance"
    if verdict == cmp.V_FAIL:
        return (f"FAIL: {n_pass}/{len(checked)} stages within tolerance"
                + (f", {len(missing)} of {total} not reported" if missing else ""))
    if verdict == cmp.V_PARTIAL:
        return (f"PARTIAL: {len(checked)} of {total} stages, all within tolerance (a partial check, as asked); "
                f"not reported: {stages.summarize(missing)}")
    need = ("; a partial check still needs logits" if r.partial and stages.LOGITS in missing
            else "; report every stage, or check only the reported ones with --partial")
    return (f"INCOMPLETE: {len(checked)} of {total} stages reported" + (", all within tolerance" if checked else "")
            + f"; missing {stages.summarize(missing)}" + need)


def format_report(o: Outcome) -> str:
    """The check of one golden: a header, one row per stage, the first failure, the logits, the verdict."""
    r, g = o.report, o.golden
    m = g.manifest
    lines = [f"{g.path}: {g.model_name}, {g.dtype}, {len(g.tokens)} tokens, attention {m['attn_implementation']}, "
             f"transformers {m.get('versions', {}).get('transformers', '?')}; checks "
             f"{features.describe_feature(features.feature(g.config))}"]
    if o.prompt_check:
        lines.append(f"  prompt: {o.prompt_check}")
    lines.append(f"  {'stage':<14}{'checked':>9}  {'worst rel':>9} {'at':>4}  {'limit':>8}  result")
    lines += [_check_row(stage, rows) for stage, rows in _by_stage(r).items()]
    if r.first_failure is not None:
        lines.append("  FIRST FAILURE: " + "\n".join(failure_lines(r, g.config)))
    if r.logits is not None:
        lines.append(_logits_line(r.logits, o.tokenizer))
    lines.append("  " + verdict_line(r))
    if o.decode is not None:
        lines += decode_lines(o)
    return "\n".join(lines)


# ---------------------------------------------------------------- decode steps (golden.decode)
def _step_where(st: StepResult) -> str:
    return f"step {st.step} (position {st.position})"


def _step_row(d: DecodeReport, st: StepResult, tokenizer) -> str:
    """`  step 1 (position 17, token 75691 ' overloaded'): FAIL at layers.0.scores, 27/31 stages within tolerance,
    next token agrees`."""
    r = st.report
    checked = r.checked
    n_pass = sum(x.status == cmp.PASS for x in checked)
    first = r.first_failure
    verdict = r.verdict + (f" at {first.key}" if first is not None else "")
    if d.is_consequence(st) and r.verdict == cmp.V_FAIL:
        verdict += " (after the first failing step)"
    lg = r.logits
    nxt = "" if lg is None else (", next token agrees" if lg.top1_ok else
                                 f", next token DISAGREES (impl {lg.top1} {_decode(tokenizer, lg.top1)}, golden "
                                 f"{lg.top1_golden} {_decode(tokenizer, lg.top1_golden)}; KL {sci(lg.kl)})")
    return (f"  step {st.step} (position {st.position}, token {st.token} {_decode(tokenizer, st.token)}".rstrip()
            + f"): {verdict}, {n_pass}/{len(r.results)} stages within tolerance{nxt}")


def decode_verdict_line(d: DecodeReport, prefill: cmp.Report | None = None) -> str:
    """`decode: PASS 8/8 steps`, `decode: not run (prefill-only implementation)`, `decode: FAIL at step 1,
    rope_cos: position 17 rotated as position 0 (rope.decode_from_zero); 0/8 steps pass`, INCOMPLETE, PARTIAL."""
    verdict, n = d.verdict, d.total
    if verdict == NOT_RUN:
        return f"decode: not run ({d.not_run})"
    n_pass = sum(st.report.verdict == cmp.V_PASS for st in d.steps)
    if verdict == cmp.V_PASS:
        return f"decode: PASS {n_pass}/{n} steps"
    missing = [st.key(k) for st in d.steps for k in st.report.missing]
    n_layers = max((x.layer or 0 for st in d.steps for x in st.report.results), default=0) + 1
    if verdict == cmp.V_FAIL and d.first_failing is None:  # a diff whose goldens fed other tokens (no step failed)
        return f"decode: FAIL: the goldens feed or sample other tokens from step {d.diverged} on"
    if verdict == cmp.V_FAIL:
        st = d.first_failing
        first = st.report.first_failure
        if first is not None:
            what = f"{first.key}"
            dg = first.diagnosis
            if dg is not None and dg.matches:
                what += f": {dg.matches[0].detail} ({' = '.join(f.id for f in dg.matches[:2])})"
        else:
            lg = st.report.logits
            what = f"logits (KL {sci(lg.kl)}, limit {sci(lg.kl_limit)}; next token {lg.top1} vs {lg.top1_golden})"
        line = f"decode: FAIL at step {st.step}, {what}; {n_pass}/{n} steps pass"
        if prefill is not None and not prefill.passed:
            line += "; the prefill fails too: fix it first"
        return line
    checked = sum(len(st.report.checked) for st in d.steps)
    total = sum(len(st.report.results) for st in d.steps)
    if verdict == cmp.V_PARTIAL:
        return (f"decode: PARTIAL: {checked} of {total} stages of {n} steps, all within tolerance (a partial check, "
                f"as asked); not reported: {stages.summarize(missing, n_layers)}")
    return (f"decode: INCOMPLETE: {checked} of {total} stages of {n} steps reported, all within tolerance; missing "
            f"{stages.summarize(missing, n_layers)}; report every stage in every call, or check only the reported "
            f"ones with --partial")


def decode_lines(o: Outcome) -> list[str]:
    """The decode part of a golden's check: one line when it passes or did not run; else a row per step, the first
    failure with its diagnosis, and the verdict."""
    d = o.decode
    if d.verdict == cmp.V_PASS:
        st = d.steps
        computed = [(x.metrics.rel / x.limit if x.limit > 0 else 0.0, s, x) for s in st for x in s.report.checked
                    if x.stage not in (stages.TOKENS, stages.EMBEDDINGS)]  # lookups: at a constant of their rule
        worst = max(computed, key=lambda t: t[0], default=None)
        at = f"; worst {100 * worst[0]:.0f}% of its limit, at step {worst[1].step} {worst[2].key}" if worst else ""
        each = len(st[0].report.results)
        return [f"  {decode_verdict_line(d)} (positions {st[0].position}-{st[-1].position}, {each} stages each{at}; "
                f"the next token agrees at every step)"]
    if d.verdict == NOT_RUN:
        return [f"  {decode_verdict_line(d)}"]
    lines = [f"  decode: {d.total} steps after the prompt, each feeding the golden's greedy token:"]
    lines += [_step_row(d, st, o.tokenizer) for st in d.steps]
    st = d.first_failing
    first = st.report.first_failure if st is not None else None
    if first is not None:
        lines.append("  DECODE FIRST FAILURE: " + "\n".join(decode_failure_message(st, o.golden.config)))
    elif st is not None and st.report.logits is not None:
        lines.append(f"  DECODE FIRST FAILURE: {_step_where(st)}, " + _logits_line(st.report.logits, o.tokenizer)
                     .strip())
    lines.append("  " + decode_verdict_line(d, o.report))
    return lines


def _failed_at(r: cmp.Report) -> str:
    first = r.first_failure
    if first is not None:
        return f"FAIL at {first.key}" + (f" ({r.dtype}, {first.rule})" if first.rule == "scale bias" else
                                         f" ({r.dtype})")
    if not r.passed:
        return f"FAIL at logits ({r.dtype})"
    return "PASS"


def summary(outcomes: list[Outcome]) -> list[tuple[str, str, str]]:
    """(feature, goldens, verdict) per feature, in the order first checked: `("core", "tiny, tiny-varied",
    "PASS")`, `("3.1 rope scaling", "tiny-scaled", "FAIL at rope_cos (fp32)")`. A feature fails at its first
    failing golden's first failing stage."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(features.feature(o.golden.config), []).append(o)
    rows = []
    for label, group in groups.items():
        names = list(dict.fromkeys(o.golden.model_name for o in group))
        failed = [o for o in group if not o.report.passed]
        verdict = "PASS" if not failed else _failed_at(failed[0].report) + (
            f" on {failed[0].golden.model_name}" if len(names) > 1 else "")
        rows.append((label, ", ".join(names), verdict))
    return rows


def decode_summary(outcomes: list[Outcome]) -> tuple[str, str] | None:
    """(which goldens, verdict) of the decode steps over a set: `("8 goldens, 8 steps each", "PASS")`, `("...",
    "FAIL at step 1, layers.0.scores (tiny fp32)")`, `("...", "not run (prefill-only implementation)")`."""
    ds = [(o, o.decode) for o in outcomes if o.decode is not None]
    if not ds:
        return None
    ran = [(o, d) for o, d in ds if d.verdict != NOT_RUN]
    if not ran:
        return f"{len(ds)} goldens", f"not run ({ds[0][1].not_run})"
    steps = sorted({d.total for _, d in ran})
    which = f"{len(ran)} goldens, {'/'.join(map(str, steps))} steps each"
    for v in (cmp.V_FAIL, cmp.V_INCOMPLETE):
        bad = [(o, d) for o, d in ran if d.verdict == v]
        if bad:
            o, d = bad[0]
            st = d.first_failing
            at = ""
            if st is not None:
                first = st.report.first_failure
                at = f" at step {st.step}, {first.key if first is not None else 'logits'}"
            return which, f"{v}{at} ({o.golden.model_name} {o.golden.dtype})"
    skipped = len(ds) - len(ran)
    verdict = cmp.V_PARTIAL if any(d.verdict == cmp.V_PARTIAL for _, d in ran) else cmp.V_PASS
    return which, verdict + (f" ({skipped} goldens without decode steps)" if skipped else "")


def format_summary(outcomes: list[Outcome]) -> str:
    """The main job's last lines: per feature, which goldens check it and the verdict, the decode steps, then one
    line for all."""
    rows = summary(outcomes)
    lines = ["summary by feature:"]
    lines += [f"  {features.describe_feature(label)} ({names}): {verdict}" for label, names, verdict in rows]
    decode = decode_summary(outcomes)
    parts = [f"{label}: {verdict.split(' (')[0]}" for label, _, verdict in rows]
    if decode is not None:
        lines.append(f"  KV-cache decoding ({decode[0]}): {decode[1]}")
        if not decode[1].startswith("not run"):  # the last line gives verdicts of what was checked
            parts.append(f"decode: {decode[1].split(' (')[0]}")
    lines.append("  " + "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------- diff: the text table
def _diff_row(stage: str, rows: list[cmp.StageResult]) -> str:
    """`q_rope  layers.1.q_rope  rel  max_abs  cosine  limit  ok`: the stage's worst layer."""
    worst = max(rows, key=lambda r: (r.metrics.rel, r.metrics.max_abs))
    bad = sum(r.status != cmp.PASS for r in rows)
    status = "ok" if not bad else f"{bad}/{len(rows)} over"
    return (f"{stage:<14} {worst.key:<22} {sci(worst.metrics.rel):>9} {sci(worst.metrics.max_abs):>9} "
            f"{worst.metrics.cosine:>10.7f} {sci(worst.limit):>9}  {status}")


def _drift_line(report: cmp.Report) -> str:
    first = report.first_failure
    if first is not None:
        return f"first drift: {describe(first)}"
    lg = report.logits
    if lg is not None and not lg.ok:
        return f"first drift: logits: KL {sci(lg.kl)} (limit {sci(lg.kl_limit)}), top-1 {lg.top1} vs {lg.top1_golden}"
    return f"no drift beyond tolerance ({len(report.checked)} stages)"


def decode_drift_line(d: DecodeReport | None) -> str | None:
    """`decode: no drift beyond tolerance in 8 steps`, `decode: first drift at step 3, layers.1.out: ...`, `decode:
    the greedy tokens differ from step 4 on`, or `decode: not compared (...)`."""
    if d is None:
        return None
    if d.verdict == NOT_RUN:
        return f"decode: not compared ({d.not_run})"
    for st in d.steps:
        if st.report.first_failure is not None:
            return f"decode: first drift at {_step_where(st)}, {describe(st.report.first_failure, st.position)}"
        lg = st.report.logits
        if lg is not None and not lg.ok:
            return f"decode: first drift at {_step_where(st)}, logits: KL {sci(lg.kl)} (limit {sci(lg.kl_limit)})"
    if d.diverged is not None:
        return (f"decode: the two goldens feed or sample other tokens from step {d.diverged} on (the greedy tokens "
                f"changed); steps before it: no drift")
    return f"decode: no drift beyond tolerance in {len(d.steps)} steps"


def format_diff(report: cmp.Report, a: Path, b: Path, prompt_check: str = "", decode: DecodeReport | None = None
                ) -> str:
    """One row per stage (worst layer), then the verdict naming the first drifting stage; the decode steps' line."""
    lines = [f"diff {b} against {a} ({report.dtype})"] + ([f"prompt: {prompt_check}"] if prompt_check else []) + [
             f"{'stage':<14} {'worst at':<22} {'rel':>9} {'max_abs':>9} {'cosine':>10} {'limit':>9}  status"]
    groups = _by_stage(report)
    for s in stages.STAGES:
        rows = [r for r in groups.get(s.name, []) if r.metrics is not None]
        if rows:
            lines.append(_diff_row(s.name, rows))
    lines.append(_drift_line(report))
    decode_line = decode_drift_line(decode)
    if decode_line:
        lines.append(decode_line)
    return "\n".join(lines)


# ---------------------------------------------------------------- check-tokenizer: the text report
def _token(token_id: int, vocab) -> str:
    """`4513 '123'`: an id and its piece in the reference vocabulary (bytes where it is part of a character)."""
    from golden.tokenizer_check import _piece_text

    return f"{token_id}" if vocab is None else f"{token_id} {_piece_text(vocab.piece(token_id))!r}"


def tokenizer_difference_lines(m, vocab, indent: str = "  ") -> list[str]:
    """The first difference of a tokenizer check: the string, where the ids part, both sides' tokens around it
    (positions in brackets), and why."""
    from golden.tokenizer_check import _escaped

    lo = max(0, m.position - 2)

    def window(ids) -> str:
        shown = "  ".join(f"[{i}] {_token(ids[i], vocab)}" for i in range(lo, min(len(ids), m.position + 3)))
        n = f"{len(ids)} token{'s' if len(ids) != 1 else ''}"
        more = f"  ... {n}" if len(ids) > m.position + 3 else f"  ({n})"
        return ("... " if lo else "") + (shown or "(none)") + more

    return [
        f"{indent}FIRST DIFFERENCE: {m.case.group} string {m.case.index}: {_escaped(m.case.text)}",
        f"{indent}  ids differ from token {m.position}:",
        f"{indent}    yours     {window(m.got)}",
        f"{indent}    expected  {window(m.case.ids)}",
        f"{indent}  WHY: {m.why}",
    ]


def _shown_path(path: Path) -> str:
    """A path relative to the working folder when it is below it (golden/data/...), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def tokenizer_group_line(g) -> str:
    return f"  {g.name:<14} {g.agree:>5}/{g.total:<5} {'pass' if g.agree == g.total else 'FAIL'}"


def format_tokenizer_report(r) -> str:
    """`python -m golden check-tokenizer`: agreement per case group, then the first difference explained."""
    lines = [f"{r.impl}: {r.total:,} strings of {_shown_path(r.expected.path)}",
             f"  expected ids: {r.expected.reference}",
             f"  {'group':<14} {'agree':>6}{'':5} result"]
    lines += [tokenizer_group_line(g) for g in r.groups]
    if r.first is not None:
        lines += tokenizer_difference_lines(r.first, r.vocab)
        lines.append("  differing strings by kind: " + ", ".join(f"{k} {n:,}" for k, n in r.kinds.items()))
    verdict = "PASS" if r.passed else "FAIL"
    lines.append(f"  {verdict}: {r.agree:,}/{r.total:,} strings agree ({sum(g.agree == g.total for g in r.groups)} of "
                 f"{len(r.groups)} groups)")
    return "\n".join(lines)


def tokenizer_failure_message(r) -> str:
    """A pytest failure for one case group: the count, then the first difference explained."""
    (g,) = r.groups
    return "\n".join([f"{g.name}: {g.agree:,}/{g.total:,} strings agree with {r.expected.path.name}",
                      *tokenizer_difference_lines(g.first, r.vocab, indent="")])


# ---------------------------------------------------------------- JSON
def _finite_or_text(x):
    """JSON has no inf or nan: they are written as the strings "inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_or_text(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_text(v) for v in x]
    return x


def report_dict(report: cmp.Report) -> dict:
    """The verdict, the first failure, the logits check and every stage's metrics, as plain JSON values."""
    first = report.first_failure
    d = first.diagnosis if first is not None else None
    return _finite_or_text({
        "dtype": report.dtype,
        "verdict": report.verdict,
        "summary": verdict_line(report),
        "passed": report.passed,
        "partial": report.partial,
        "stages_reported": len(report.checked),
        "stages_total": len(report.results),
        "missing": report.missing,
        "first_failure": first.key if first else None,
        "first_failure_rule": first.rule if first else None,
        # why the first failure failed (golden.diagnose): catalogue id, reproduces within the limit, detail line
        "diagnosis": [{"id": f.id, "reproduces": f.reproduces, "rel": f.rel, "detail": f.detail}
                      for f in d.findings] if d is not None else None,
        "logits": asdict(report.logits) if report.logits else None,
        "stages": [asdict(r) for r in report.results],
        "not_recorded": report.not_recorded,
        "hints": report.hints,
    })


def decode_dict(d: DecodeReport, prefill: cmp.Report | None = None) -> dict:
    """The decode steps' verdict, the first failing step and stage, and every step's report_dict."""
    st = d.first_failing
    first = st.report.first_failure if st is not None else None
    return _finite_or_text({
        "verdict": d.verdict,
        "summary": decode_verdict_line(d, prefill),
        "passed": d.passed,
        "not_run": d.not_run or None,
        "steps_total": d.total,
        "steps_checked": len(d.steps),
        "first_failure": None if st is None else {
            "step": st.step, "position": st.position, "token": st.token,
            "stage": first.key if first is not None else "logits",
            "key": st.key(first.key if first is not None else stages.LOGITS)},
        "steps": [{"step": x.step, "position": x.position, "token": x.token, **report_dict(x.report)} for x in d.steps],
    })


def check_json(outcomes: list[Outcome]) -> list[dict]:
    """One entry per checked golden: its path, its model, every stage's metrics, and its decode steps'."""
    out = []
    for o in outcomes:
        first = o.report.first_failure
        note = features.rope_scaling_note(o.golden.config, first.stage) if first is not None else None
        out.append({"golden": str(o.golden.path), "model": o.golden.model_name, "prompt_check": o.prompt_check,
                    "feature": features.feature(o.golden.config), "note": note, **report_dict(o.report),
                    "decode": decode_dict(o.decode, o.report) if o.decode is not None else None})
    return out


def diff_json(report: cmp.Report, a: Path, b: Path, decode: DecodeReport | None = None) -> dict:
    out = {"a": str(a), "b": str(b), **report_dict(report)}
    if decode is not None:
        out["decode"] = {**decode_dict(decode), "summary": decode_drift_line(decode)}
    return out


def write_json(data, file: str | Path) -> None:
    write_file(file, (json.dumps(data, indent=1) + "\n").encode(), "--json")


# ---------------------------------------------------------------- output files
class OutputError(Llama3GoldenError):
    """A report file (--json, --plot) that cannot be written."""


PLOT_FORMATS = ("png", "pdf", "svg")


def plot_format(file: str | Path) -> str:
    """The image format a plot file's suffix asks for (png without one)."""
    suffix = Path(file).suffix.lower().removeprefix(".") or "png"
    if suffix not in PLOT_FORMATS:
        raise OutputError(f"--plot {file}: .{suffix} is not an image format this tool writes "
                          f"({', '.join('.' + f for f in PLOT_FORMATS)})")
    return suffix


def check_writable(file: str | Path, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, a path under a missing
    folder or under a file, a folder that does not take new files. Probed for real (creating and removing
    the file), since permission bits say nothing to root or about /proc."""
    path = Path(file)
    if path.is_dir():
        raise OutputError(f"{option} {file}: is a folder, not a file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"{option} {file}: not writable")
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise OutputError(f"{option} {file}: cannot be written ({e.strerror})") from None
    os.close(fd)
    os.unlink(path)


def write_file(file: str | Path, data: bytes, option: str = "output") -> None:
    """Write a report file whole or not at all: a temp file beside it, then a rename, so a full disk or a kill
    never leaves a truncated report in place of the last good one. A file that is not a regular file
    (/dev/stdout, a pipe) is written directly. Any OSError is an OutputError (one line, exit 2)."""
    path = Path(file)
    try:
        if path.exists() and not path.is_file():
            with open(path, "wb") as f:
                f.write(data)
            return
        real = path.resolve()  # through a symlink: replace its target, not the link
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.tmp-", dir=real.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, real)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise OutputError(f"{option} {file}: cannot be written ({e.strerror or e})") from None


# ---------------------------------------------------------------- PNG
RATIO_RANGE = 1e3  # colours run from limit/1e3 (deep blue) through the limit (white) to 1e3 x limit (deep red)
PRE_POST = tuple(s.name for s in stages.STAGES if not s.per_layer)


def _ratio(r: cmp.StageResult) -> float:
    """The stage's error against its limit (1 = at the limit); nan where not checked."""
    if r.status == cmp.NOT_CHECKED or r.metrics is None:
        return math.nan
    rel = r.metrics.rel
    if r.limit > 0:
        return rel / r.limit
    return 1 / RATIO_RANGE if rel == 0 else math.inf


def _heatmap(fig, spec, title: str, report: cmp.Report, n_layers: int, norm, cmap):
    """One panel: per-layer stages x layers, and beside it the stages outside the layers; the first failure boxed."""
    import matplotlib.patches as patches
    import numpy as np

    grid = np.full((len(stages.LAYER_STAGES), n_layers), np.nan)
    side = np.full((len(PRE_POST), 1), np.nan)
    where: dict[str, tuple[object, int, int]] = {}
    sub = spec.subgridspec(1, 2, width_ratios=[max(n_layers, 8), max(n_layers, 8) / 10], wspace=0.1)
    ax, ax_side = fig.add_subplot(sub[0]), fig.add_subplot(sub[1])
    for r in report.results:
        if r.layer is not None and r.stage in stages.LAYER_STAGES and r.layer < n_layers:
            row, col = stages.LAYER_STAGES.index(r.stage), r.layer
            grid[row, col] = _ratio(r)
            where[r.key] = (ax, row, col)
        elif r.stage in PRE_POST:
            row = PRE_POST.index(r.stage)
            side[row, 0] = _ratio(r)
            where[r.key] = (ax_side, row, 0)
    lo, hi = 1 / RATIO_RANGE, RATIO_RANGE
    for a, data in ((ax, grid), (ax_side, side)):
        a.imshow(np.ma.masked_invalid(np.clip(data, lo, hi)), aspect="auto", cmap=cmap, norm=norm,
                 interpolation="nearest")
        a.set_yticks(range(data.shape[0]))
        a.set_xticks([])
    ax.set_yticklabels(stages.LAYER_STAGES, fontsize=8)
    ax_side.set_yticklabels(PRE_POST, fontsize=8)
    ax_side.yaxis.tick_right()
    step = max(1, n_layers // 15)
    ax.set_xticks(range(0, n_layers, step))
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=10, loc="left")
    first = report.first_failure
    if first is not None and first.key in where:
        a, row, col = where[first.key]
        a.add_patch(patches.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5,
                                      gid="first-failure"))
        a.annotate("first failure", (col, row), xytext=(col + 0.8, row - 0.9), fontsize=8, fontweight="bold",
                   arrowprops={"arrowstyle": "->"}, annotation_clip=False)
    return ax


def _figure(panels: list[tuple[str, cmp.Report, str]], n_layers: int):
    """The figure: one heatmap panel per (title, report, line under it), stacked; a shared colour bar."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")  # grey: not checked
    norm = LogNorm(1 / RATIO_RANGE, RATIO_RANGE)
    width = max(10.0, 0.28 * n_layers + 5)
    lines = [textwrap.fill(text, int(width * 14), subsequent_indent="  ") for _, _, text in panels]
    text_h = 0.16 * sum(t.count("\n") + 1 for t in lines) + 0.4
    height = 5.0 * len(panels) + text_h
    fig = plt.figure(figsize=(width, height))
    outer = fig.add_gridspec(len(panels), 1, hspace=0.3, bottom=(text_h + 0.3) / height, top=1 - 0.4 / height,
                             left=0.11, right=0.8)
    for i, (title, report, _) in enumerate(panels):
        _heatmap(fig, outer[i], title, report, n_layers, norm, cmap)
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    cax = fig.add_axes((0.91, (text_h + 0.3) / height, 0.015, 0.6 * (1 - (text_h + 0.7) / height)))
    bar = fig.colorbar(mappable, cax=cax)
    bar.set_label("error / the stage's limit (>1 fails; grey: not checked)", fontsize=8)
    fig.text(0.02, 0.01, "\n".join(lines), fontsize=8, family="monospace", va="bottom", gid="diagnosis")
    return fig


def _diagnosis_text(label: str, report: cmp.Report) -> str:
    first = report.first_failure
    if first is None:
        lg = report.logits
        return f"{label}: every checked stage within its limit" + (
            "" if lg is None or lg.ok else f"; logits: KL {sci(lg.kl)} > {sci(lg.kl_limit)}")
    d = first.diagnosis
    return f"{label}: first failure {first.key}" + (f". Why: {d.headline()}" if d is not None else "")


def check_figure(outcomes: list[Outcome]):
    """The check's picture: per golden checked, a stage x layer heatmap of each error against its stage's limit, the
    first failure boxed, its diagnosis written under the picture, the implementation and golden in the title."""
    panels = [(f"{o.impl} vs golden {o.golden.path} ({o.golden.model_name}, {o.golden.dtype})", o.report,
               _diagnosis_text(o.golden.dtype, o.report)) for o in outcomes]
    return _figure(panels, max(o.golden.config.n_layers for o in outcomes))


def _save(fig, file: str | Path) -> None:
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, format=plot_format(file), dpi=110)
    plt.close(fig)
    write_file(file, image.getvalue(), "--plot")


def plot_check(outcomes: list[Outcome], file: str | Path) -> None:
    """check_figure, written to a PNG."""
    _save(check_figure(outcomes), file)


def plot_diff(report: cmp.Report, a: Path, b: Path, file: str | Path) -> None:
    """One panel: b's error against a, per stage and layer, against the diff's limits."""
    def short(p: Path) -> str:
        return "/".join(Path(p).parts[-2:])  # tiny/fp32

    layers = [r.layer for r in report.results if r.layer is not None]
    first = report.first_failure
    text = f"first drift: {first.key}" if first is not None else "no drift beyond tolerance"
    _save(_figure([(f"{short(b)} against {short(a)} ({report.dtype})", report, text)],
                  max(layers) + 1 if layers else 1), file)
