"""KV-cache decoding: a golden's decode steps, recorded from transformers' cache and checked step by step.

A golden may hold, after its prompt, N steps of greedy decoding (golden format 2's optional `decode` section).
Step s (1..N) feeds one token at position `len(tokens) + s - 1` against the cache of every earlier position;
its stages (impl.stages.DECODE_STAGES, keyed `decode.<s>.<key>`) hold that position only. The manifest says
what was fed and which logits were kept:

    "decode": {
      "steps": 8,
      "greedy": [t1, ..., t9],      t1: argmax of the fp32 reference's prompt logits; t(s+1): its argmax after step s
      "logits_sample": {
        "top_k": 64, "stride": 128,
        "top_ids": [[...64 ids], ...],   per step: the fp32 reference's top_k ids, best first (top_ids[s-1][0]: t(s+1))
        "tail_logprob": [...]            per step: log of this golden's probability outside top_ids (float64)
      }
    }

Step s feeds t(s): the fp32 reference's greedy tokens, in every dtype (a bf16 golden is recorded on the fp32's
tokens, so that its steps are the same computation in another precision: its error against the fp32 steps is
the bf16 noise a check allows), and the checker feeds the same tokens to the implementation whatever it
predicted (teacher forcing: one disagreeing argmax does not derail every later step).

Why a sample of the logits. A full vector per step is vocab x 4 bytes (0.5 MB for Llama 3's 128256): 8 steps of
the 10 committed goldens would be 40 MB, the whole budget. A step's logits are a fixed linear map (the output
matrix, checked in full by every prefill) of its `norm`, which the step holds in full; the sample checks that
the implementation applies it, on the entries that decide the next token (the golden's top-k: the argmax and its
rivals) and on an even spread of the rest (every stride-th id). The next-token check uses the implementation's
full vector (its argmax against t(s+1), a near-tie allowed as in the prefill), and KL is measured over top-k + 1
bins (the top-k ids and everything else as one bin, whose golden mass is `tail_logprob`): merging outcomes never
increases KL, so this is a lower bound of the full KL (judged as golden.tolerances says for one row of a decode
step). Every decode bug of the
README's table shows at an upstream stage the step holds in full (rope_cos, q_rope, scores) long before the logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from golden import compare as cmp
from golden import tolerances
from impl import stages

if TYPE_CHECKING:
    from golden.format import Golden

DEFAULT_STEPS = 8  # decode steps a recording makes (python -m golden record --decode-steps)
TOP_K = 64  # logits sample: the golden's best ids
STRIDE = 128  # logits sample: every stride-th id (1,002 of Llama 3's 128256; 384 of SmolLM2's 49152)
NOT_RUN = "NOT RUN"
PREFILL_ONLY = "prefill-only implementation"


# ================================================================ the manifest's decode section
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def section_problem(section: Any, config: Mapping[str, Any], tokens: list[int]) -> str | None:
    """The first thing wrong with a manifest's decode section, as 'field: what is wrong', or None."""
    if not isinstance(section, dict):
        return f"a JSON object expected, got {type(section).__name__}"
    want = {"steps", "greedy", "logits_sample"}
    if set(section) != want:
        odd = sorted(want - set(section)) or sorted(set(section) - want)
        return f"{'missing' if want - set(section) else 'unknown field'} {odd[0][:40]!r}"
    steps, greedy, sample = section["steps"], section["greedy"], section["logits_sample"]
    vocab, context = config.get("vocab_size"), config.get("max_seq_len")
    if not (_is_int(steps) and steps >= 1):
        return f"steps: an integer >= 1 expected, got {steps!r}"[:120]
    if _is_int(context) and len(tokens) + steps > context:
        return f"{steps} steps after {len(tokens)} prompt tokens do not fit the model's context of {context}"
    in_vocab = (lambda t: _is_int(t) and 0 <= t < vocab) if _is_int(vocab) else _is_int
    if not (isinstance(greedy, list) and len(greedy) == steps + 1 and all(in_vocab(t) for t in greedy)):
        return f"greedy: {steps + 1} token ids (one per step and the one after the last) expected"
    if not isinstance(sample, dict) or set(sample) != {"top_k", "stride", "top_ids", "tail_logprob"}:
        return "logits_sample: a JSON object of top_k, stride, top_ids and tail_logprob expected"
    top_k, stride, top_ids, tails = sample["top_k"], sample["stride"], sample["top_ids"], sample["tail_logprob"]
    if not (_is_int(top_k) and top_k >= 1 and (not _is_int(vocab) or top_k < vocab)):
        return f"logits_sample.top_k: an integer in [1, vocab) expected, got {top_k!r}"[:120]
    if not (_is_int(stride) and stride >= 1):
        return f"logits_sample.stride: an integer >= 1 expected, got {stride!r}"[:120]
    if not (isinstance(top_ids, list) and len(top_ids) == steps):
        return f"logits_sample.top_ids: one list per step ({steps}) expected"
    for s, ids in enumerate(top_ids, 1):
        if not (isinstance(ids, list) and all(in_vocab(i) for i in ids) and len(set(ids)) == len(ids) == top_k):
            return f"logits_sample.top_ids[{s - 1}]: {top_k} distinct token ids expected"
        if ids[0] != greedy[s]:
            return f"logits_sample.top_ids[{s - 1}] starts with {ids[0]}, but greedy says step {s} picks {greedy[s]}"
    if not (isinstance(tails, list) and len(tails) == steps
            and all(isinstance(x, float) and math.isfinite(x) and x <= 0 for x in tails)):
        return f"logits_sample.tail_logprob: {steps} finite log-probabilities expected"
    return None


@dataclass(frozen=True)
class Plan:
    """What every dtype's decode steps feed and sample: the fp32 reference's greedy tokens and top ids."""

    prompt: tuple[int, ...]
    greedy: tuple[int, ...]  # steps + 1: step s feeds greedy[s - 1]; greedy[s] is the argmax after it
    top_ids: tuple[tuple[int, ...], ...]  # per step, best first
    top_k: int = TOP_K
    stride: int = STRIDE

    @property
    def steps(self) -> int:
        return len(self.top_ids)

    def position(self, step: int) -> int:
        """The position step s feeds its token at."""
        return len(self.prompt) + step - 1


def plan_of(golden: Golden) -> Plan | None:
    """The plan a golden's decode section records, or None if it has none."""
    section = golden.manifest.get("decode")
    if section is None:
        return None
    sample = section["logits_sample"]
    return Plan(tuple(golden.tokens), tuple(section["greedy"]), tuple(tuple(t) for t in sample["top_ids"]),
                sample["top_k"], sample["stride"])


def sample_ids(plan: Plan, step: int, config) -> torch.Tensor:
    """The vocabulary ids step s's logits sample holds (impl.stages.logits_sample_ids), int64."""
    return torch.tensor(stages.logits_sample_ids(config, plan.top_ids[step - 1], plan.stride), dtype=torch.long)


def _top(logits: torch.Tensor, k: int) -> tuple[int, ...]:
    """The k best ids, best first; ties to the lower id (as argmax)."""
    return tuple(int(i) for i in torch.sort(logits.float(), descending=True, stable=True).indices[:k])


def tail_logprob(logprobs: torch.Tensor, top_ids) -> float:
    """log of the probability outside top_ids, from a full (vocab,) log-softmax (summed in its dtype, fp32 or
    wider: the entries are all below the top ids')."""
    top = torch.as_tensor(list(top_ids), dtype=torch.long)
    return float(torch.logsumexp(logprobs.float().index_fill(0, top, -math.inf), 0))


# ================================================================ recording (transformers' DynamicCache)
def _run_cached(hf_model, ids: list[list[int]], cache=None):
    """One forward of transformers' model with its KV cache: (logits (1, seq, vocab), the cache). A fresh
    DynamicCache when cache is None; the cache argument is `cache` in transformers 5.x, `past_key_values` before."""
    import inspect

    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    kwargs = {name: cache} if cache is not None else {}
    out = hf_model(input_ids=torch.tensor(ids), use_cache=True, **kwargs)
    return out.logits, getattr(out, name)


@torch.inference_mode()
def greedy_plan(hf_model, tokens: list[int], steps: int = DEFAULT_STEPS, top_k: int = TOP_K,
                stride: int = STRIDE) -> Plan:
    """Greedy decoding of `steps` tokens after `tokens` with transformers' own KV cache, no hooks: the plan."""
    logits, cache = _run_cached(hf_model, [tokens])  # the prompt; fills a DynamicCache
    greedy, top_ids = [_top(logits[0, -1], 1)[0]], []
    for _ in range(steps):
        logits, cache = _run_cached(hf_model, [[greedy[-1]]], cache)
        top_ids.append(_top(logits[0, -1], top_k))
        greedy.append(top_ids[-1][0])
    return Plan(tuple(tokens), tuple(greedy), tuple(top_ids), top_k, stride)


@torch.inference_mode()
def capture_decode(hf_model, tokens: list[int], plan: Plan, attn: str, config, same_model: bool
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run the plan's steps through transformers' KV cache, recording each step's stages (the recorder's hooks).

    The prompt runs unobserved (its stages are the prefill golden's); each step then feeds the plan's token with
    `past_key_values`, as `generate` does. Returns the manifest's decode section and the `decode.<s>.*` tensors.
    same_model: the plan was made by this very model (an fp32 recording): its argmax must be the plan's.
    """
    from golden.record import _hook_model, _Recorder  # the recorder's own capture, one step at a time

    if tuple(tokens) != plan.prompt:
        raise ValueError("decode plan made for another prompt")
    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    _, cache = _run_cached(hf_model, [tokens])
    keys = stages.step_keys(cfg.num_hidden_layers)
    tensors: dict[str, torch.Tensor] = {}
    tails = []
    for step in range(1, plan.steps + 1):
        rec = _Recorder(attn, head_dim)
        ids = [[plan.greedy[step - 1]]]
        rec.put(stages.TOKENS, torch.tensor(ids[0]))
        with _hook_model(hf_model, rec):
            _, cache = _run_cached(hf_model, ids, cache)
        logits = rec.tensors[stages.LOGITS]
        if same_model and _top(logits, 1)[0] != plan.greedy[step]:
            raise RuntimeError(f"recorder bug: step {step}'s argmax differs from the plan's greedy token")
        rec.put(stages.LOGPROBS_LAST, F.log_softmax(logits.float(), dim=-1))
        tails.append(tail_logprob(rec.tensors[stages.LOGPROBS_LAST], plan.top_ids[step - 1]))
        picked = sample_ids(plan, step, config)
        for k in keys:
            t = rec.tensors[k]
            tensors[stages.decode_key(step, k)] = t[picked] if k in stages.SAMPLED_STAGES else t
    section = {"steps": plan.steps, "greedy": list(plan.greedy),
               "logits_sample": {"top_k": plan.top_k, "stride": plan.stride,
                                 "top_ids": [list(t) for t in plan.top_ids], "tail_logprob": tails}}
    return section, tensors


# ================================================================ checking
@dataclass
class StepResult:
    """One decode step's check: the comparator's Report over the stages the step holds (keys without the
    `decode.<s>.` prefix, as the prefill's)."""

    step: int
    position: int
    token: int  # the token fed
    report: cmp.Report

    def key(self, stage_key: str) -> str:
        """The stage's golden key: decode.<s>.<key>."""
        return stages.decode_key(self.step, stage_key)


@dataclass
class DecodeReport:
    """Every decode step's check, or why none ran. Its verdict is separate from the prefill's."""

    steps: list[StepResult] = field(default_factory=list)
    total: int = 0  # steps the golden holds
    not_run: str = ""  # why no step ran ("prefill-only implementation", "the golden holds no decode steps")
    partial: bool = False
    diverged: int | None = None  # diff only: the first step the two goldens feed or sample differently

    @property
    def verdict(self) -> str:
        """NOT RUN, else FAIL / INCOMPLETE / PARTIAL / PASS as the worst step's (golden.compare)."""
        if self.not_run:
            return NOT_RUN
        if self.diverged is not None:
            return cmp.V_FAIL
        verdicts = {s.report.verdict for s in self.steps}
        for v in (cmp.V_FAIL, cmp.V_INCOMPLETE, cmp.V_PARTIAL):
            if v in verdicts:
                return v
        return cmp.V_PASS if len(self.steps) == self.total else cmp.V_INCOMPLETE

    @property
    def passed(self) -> bool:
        """PASS, PARTIAL (asked for) or not run (nothing to run: never a failure)."""
        return self.verdict in (cmp.V_PASS, cmp.V_PARTIAL, NOT_RUN)

    @property
    def first_failing(self) -> StepResult | None:
        """The first step that fails: *the* decode failure (later steps read the cache it wrote)."""
        return next((s for s in self.steps if s.report.verdict == cmp.V_FAIL), None)

    def is_consequence(self, step: StepResult) -> bool:
        """A step after the first failing one: its failures may come from the cache the failing step wrote."""
        first = self.first_failing
        return first is not None and step.step > first.step

    def results(self) -> Iterator[tuple[str, StepResult, cmp.StageResult]]:
        """(golden key, step, stage result) for every stage of every step: one pytest item each."""
        for s in self.steps:
            for r in s.report.results:
                yield s.key(r.key), s, r


def not_run(why: str, golden: Golden) -> DecodeReport:
    return DecodeReport([], len(golden.decode_steps), why)


def why_not_run(takes_cache: bool, golden: Golden) -> str:
    """Why a check runs no decode step ('' when it runs them)."""
    if not golden.decode_steps:
        return "the golden holds no decode steps"
    return "" if takes_cache else PREFILL_ONLY


def check_same_plan(golden: Golden, truth: Golden) -> None:
    """A bf16 golden's steps must feed and sample what its fp32 truth's do."""
    from golden.format import GoldenError

    if golden is not truth and plan_of(golden) != plan_of(truth):
        raise GoldenError(f"{golden.path}: its decode steps feed or sample other tokens than its fp32 golden "
                          f"{truth.path}'s; re-record both (python -m golden record-baselines)")


def flat(tensors: Mapping[str, torch.Tensor], steps) -> dict[str, torch.Tensor]:
    """A prefill's tensors and its steps' under their golden keys (decode.<s>.*): what the diagnosis reads."""
    out = dict(tensors)
    for step, t in enumerate(steps, 1):
        out.update({stages.decode_key(step, k): v for k, v in t.items()})
    return out


def bucket_kl(p_top: torch.Tensor, p_tail: float, q_top: torch.Tensor, q_tail: float) -> float:
    """KL(P || Q) over top-k bins plus one bin for the rest, from log-probabilities: a lower bound of the full KL.

    Each side is renormalised over its k + 1 bins, so the stored values' rounding cannot make it negative."""
    lp = torch.cat([p_top.double().reshape(-1), torch.tensor([p_tail], dtype=torch.float64)])
    lq = torch.cat([q_top.double().reshape(-1), torch.tensor([q_tail], dtype=torch.float64)])
    lp, lq = lp - torch.logsumexp(lp, 0), lq - torch.logsumexp(lq, 0)
    p = lp.exp()
    return max(0.0, float(torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum()))


def sampled_logits_check(full: torch.Tensor, ids: torch.Tensor, top_k: int, truth: Mapping[str, torch.Tensor],
                         truth_tail: float, reference: Mapping[str, torch.Tensor] | None = None,
                         ref_tail: float | None = None) -> cmp.LogitsCheck:
    """The prefill's logits check on a step's sample: the implementation's full logits (vocab,) against the
    golden's sampled logits and log-probabilities (at `ids`, the first top_k the golden's best)."""
    top = ids[:top_k]
    lq = F.log_softmax(full.float(), -1)  # fp32: the KL is second order in its rounding (~1e-14)
    q_tail = tail_logprob(lq, top.tolist())
    expected = truth[stages.LOGITS].double()
    kl = bucket_kl(truth[stages.LOGPROBS_LAST][:top_k], truth_tail, lq[top], q_tail)
    top1, top1_golden = int(full.argmax()), int(ids[0])
    where = (ids == top1).nonzero()
    gap = float(expected[0] - expected[int(where[0, 0])]) if where.numel() else math.inf
    if reference is None:
        noise, ref_kl = tolerances.DEFAULT.fp32_rel * float(expected.abs().max()), None
        kl_limit = tolerances.KL_FLOOR * 1e-2
    else:
        noise = 2 * float((reference[stages.LOGITS].double() - expected).abs().max())
        ref_kl = bucket_kl(truth[stages.LOGPROBS_LAST][:top_k], truth_tail, reference[stages.LOGPROBS_LAST][:top_k],
                           ref_tail)
        kl_limit = tolerances.DECODE_KL_FACTOR * ref_kl + tolerances.KL_FLOOR  # one row's KL (golden.tolerances)
    return cmp.LogitsCheck(kl, kl_limit, top1, top1_golden, top1 == top1_golden or gap <= noise, ref_kl)


def _tails(golden: Golden) -> list[float]:
    return golden.manifest["decode"]["logits_sample"]["tail_logprob"]


def check_steps(actual_steps: list[dict[str, torch.Tensor]], golden: Golden, truth: Golden, config, weights,
                partial: bool = False) -> DecodeReport:
    """Compare what an implementation reported in each decode step with the golden's step, every stage it holds.

    actual_steps: per step, the stages reported (prefill keys; full logits). bf16: the reference's own bf16 steps
    set each stage's limit, as in the prefill. The first failing step's first failing stage is diagnosed
    (golden.diagnose) at its position, with the golden's keys and values of every earlier position.
    """
    from golden.check import diagnosis_limit
    from golden.diagnose import diagnose

    plan = plan_of(truth)
    steps, compared = [], []
    for step, (actual, expected) in enumerate(zip(actual_steps, truth.decode_steps, strict=False), 1):
        ids = sample_ids(plan, step, config)
        reference = golden.decode_steps[step - 1] if golden.dtype == "bf16" else None
        full = actual.get(stages.LOGITS)
        sampled = dict(actual)
        for k in stages.SAMPLED_STAGES:
            if k in sampled and tuple(sampled[k].shape) == (config.vocab_size,):
                sampled[k] = sampled[k][ids]
        compared.append(sampled)
        report = cmp.compare(expected, sampled, golden.dtype, reference, partial=partial, decode_step=True)
        report.not_recorded = []  # a step may report every stage; the golden holds the documented subset
        if full is not None and tuple(full.shape) == (config.vocab_size,):
            report.logits = sampled_logits_check(full, ids, plan.top_k, expected, _tails(truth)[step - 1], reference,
                                                 _tails(golden)[step - 1] if reference is not None else None)
        steps.append(StepResult(step, plan.position(step), plan.greedy[step - 1], report))
    result = DecodeReport(steps, len(truth.decode_steps), partial=partial)
    first = result.first_failing
    if first is not None and first.report.first_failure is not None:
        r = first.report.first_failure
        reported = {first.key(k): v for k, v in compared[first.step - 1].items()}
        r.diagnosis = diagnose(first.key(r.key), reported, flat(truth.tensors, truth.decode_steps), config, weights,
                               diagnosis_limit(r), start_pos=first.position, prefix=first.key(""))
    return result


# ================================================================ diff (two goldens of one model, prompt and dtype)
def diff_steps(a: Golden, b: Golden) -> DecodeReport:
    """b's decode steps against a's, stage by stage (golden.compare.compare_goldens); not run where either has none.
    Steps fed or sampled differently (the greedy tokens changed, e.g. after an upgrade) are a drift in themselves:
    the steps compared are the ones before the first difference, and the verdict is FAIL."""
    pa, pb = plan_of(a), plan_of(b)
    if pa is None or pb is None:
        return DecodeReport([], len(a.decode_steps), "the goldens do not both hold decode steps")
    same = next((s for s in range(1, min(pa.steps, pb.steps) + 1)
                 if (pa.greedy[s - 1], pa.top_ids[s - 1]) != (pb.greedy[s - 1], pb.top_ids[s - 1])), None)
    upto = (same - 1) if same is not None else min(pa.steps, pb.steps)
    steps = [StepResult(s, pa.position(s), pa.greedy[s - 1],
                        cmp.compare_goldens(a.decode_steps[s - 1], b.decode_steps[s - 1], a.dtype))
             for s in range(1, upto + 1)]
    return DecodeReport(steps, pa.steps, diverged=None if same is None and pa.steps == pb.steps else upto + 1)
