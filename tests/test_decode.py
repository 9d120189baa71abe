"""KV-cache decoding: the goldens' decode steps, the decode protocol, decode's own verdict, and bad input.

The bugs a decode check must name are in tests/test_decode_mutations.py.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from golden import cli
from golden import compare as cmp
from golden import report as rpt
from golden.check import check_with_decode, impl_forward, run_decode, takes_cache
from golden.decode import DEFAULT_STEPS, bucket_kl, check_steps, plan_of
from golden.format import MANIFEST, GoldenError, load_golden, manifest_digest, write_golden
from impl import stages
from tests.alternatives import ALTERNATIVES, BF16_ONLY, cached
from tests.conftest import GOLDEN_DATA, GOLDEN_MODELS, golden_dir
from tests.test_golden_files import assert_one_error_line, golden_cli

DECODE_BUDGET_MB = 10  # issue 12: the decode steps of every committed golden together
TINY_FP32 = golden_dir("tiny", "fp32")


# ---------------------------------------------------------------- the vocabulary
def test_decode_key_names_step_and_stage():
    key = stages.decode_key(3, "layers.1.k_rope")
    assert key == "decode.3.layers.1.k_rope" and stages.split_step(key) == (3, "layers.1.k_rope")
    assert stages.split_step("layers.1.k_rope") == (None, "layers.1.k_rope")
    with pytest.raises(KeyError):
        stages.split_step("decode.1.layers.0.ffn_up")  # a stage no step holds


def test_decode_step_scores_span_every_key_so_far(goldens):
    g = goldens("tiny", "fp32")
    seq = len(g.tokens)
    for step, tensors in enumerate(g.decode_steps, 1):
        assert tensors["layers.0.scores"].shape == (g.config.n_heads, 1, seq + step)
        assert tensors["layers.0.k_rope"].shape == (1, g.config.n_kv_heads, g.config.head_dim)


# ---------------------------------------------------------------- the committed goldens
@pytest.mark.parametrize("model", GOLDEN_MODELS)
def test_committed_goldens_hold_decode_steps_on_the_fp32_greedy_tokens(goldens, model):
    fp32, bf16 = goldens(model, "fp32"), goldens(model, "bf16")
    plan = plan_of(fp32)
    assert plan is not None and plan.steps == DEFAULT_STEPS and plan_of(bf16) == plan
    for g in (fp32, bf16):
        assert len(g.decode_steps) == DEFAULT_STEPS
        assert [int(s["tokens"]) for s in g.decode_steps] == list(plan.greedy[:-1])
        assert list(g.decode_steps[0]) == stages.step_keys(g.config.n_layers)
    # greedy: each step's fed token is the fp32 golden's argmax before it (the top of its logits sample)
    for step, tensors in enumerate(fp32.decode_steps, 1):
        assert int(tensors["logits"][:plan.top_k].argmax()) == 0
        assert plan.top_ids[step - 1][0] == plan.greedy[step]


def test_committed_decode_steps_fit_their_budget():
    size = 0
    for manifest in GOLDEN_DATA.rglob(MANIFEST):
        for entry in json.loads(manifest.read_text())["stages"]:
            if stages.split_step(entry["name"])[0] is not None:
                size += math.prod(entry["shape"]) * {"float32": 4, "bfloat16": 2, "int64": 8}[entry["dtype"]]
    assert 0 < size <= DECODE_BUDGET_MB * 1e6, f"decode steps hold {size / 1e6:.1f} MB"


# ---------------------------------------------------------------- the check
@pytest.fixture(scope="module")
def impl_on_tiny(goldens, models):
    """dtype -> impl's (prefill report, decode report) on tiny, checked once per module."""
    done = {}

    def get(dtype):
        if dtype not in done:
            ckpt, weights = models("tiny", dtype)
            done[dtype] = check_with_decode(impl_forward, goldens("tiny", dtype), goldens("tiny", "fp32"),
                                            ckpt.config, weights)
        return done[dtype]

    return get


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_impl_passes_every_decode_step(impl_on_tiny, dtype):
    prefill, decode = impl_on_tiny(dtype)
    assert prefill.verdict == cmp.V_PASS
    assert decode.verdict == cmp.V_PASS and len(decode.steps) == DEFAULT_STEPS, rpt.decode_verdict_line(decode)
    assert all(s.report.logits.top1_ok and not s.report.missing for s in decode.steps)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_impl_passes_every_decode_step_on_smollm2(goldens, models, dtype):
    ckpt, weights = models("smollm2-135m", dtype)
    _, decode = check_with_decode(impl_forward, goldens("smollm2-135m", dtype), goldens("smollm2-135m", "fp32"),
                                  ckpt.config, weights)
    assert decode.verdict == cmp.V_PASS, rpt.decode_verdict_line(decode)


CORRECT = {"impl": impl_forward, **{name: cached(fn) for name, fn in ALTERNATIVES.items()}}
BF16_ONLY_CACHED = {name: cached(fn) for name, (fn, _) in BF16_ONLY.items()}


def _margins(decode) -> tuple[float, float]:
    """(worst size error, worst KL) of a decode check, each as a fraction of its limit."""
    size = max(r.metrics.rel / r.limit for s in decode.steps for r in s.report.checked if r.limit > 0
               and r.stage not in ("embeddings",))  # a lookup: 1/1.5 of its limit by construction
    return size, max(s.report.logits.kl / s.report.logits.kl_limit for s in decode.steps)


def test_walkthrough_bf16_precision_passes_decode(goldens, models):
    """No false alarm from the decode steps' tolerances: the walk-through's all-bf16 precision (the widest of the
    correct ones on SmolLM2; every one on every golden in the slow set below) passes every step of tiny in bf16."""
    fn = BF16_ONLY_CACHED["walkthrough-bf16"]
    ckpt, weights = models("tiny", "bf16")
    _, decode = check_with_decode(fn, goldens("tiny", "bf16"), goldens("tiny", "fp32"), ckpt.config, weights)
    assert decode.verdict == cmp.V_PASS, rpt.decode_verdict_line(decode)


# every correct implementation in both dtypes; the bf16-only precisions in bf16 (in fp32 they are bugs)
MARGIN_CASES = [(n, m, d) for n in [*CORRECT, *BF16_ONLY_CACHED] for m in GOLDEN_MODELS for d in ("fp32", "bf16")
                if d == "bf16" or n in CORRECT]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "model", "dtype"), MARGIN_CASES, ids=["-".join(c) for c in MARGIN_CASES])
def test_correct_implementation_passes_decode_with_margin(goldens, models, name, model, dtype):
    """Every correct implementation passes every decode step of every golden within half of each limit (the
    calibration of golden.tolerances' DECODE_* factors: worst 0.36 and 0.19 on SmolLM2); the bf16-only precisions
    pass bf16 (worst 0.51 and 0.46)."""
    fn = BF16_ONLY_CACHED.get(name) or CORRECT[name]
    ckpt, weights = models(model, dtype)
    _, decode = check_with_decode(fn, goldens(model, dtype), goldens(model, "fp32"), ckpt.config, weights)
    assert decode.verdict == cmp.V_PASS, rpt.decode_verdict_line(decode)
    if name in CORRECT:
        size, kl = _margins(decode)
        assert size <= 0.5 and kl <= 0.5, f"{name} {model} {dtype}: size {size:.2f}, KL {kl:.2f} of the limit"


def test_cached_example_follows_the_protocol_and_passes_decode(goldens, models):
    from examples.my_llama_cached import forward

    assert takes_cache(forward) and takes_cache(impl_forward)
    ckpt, weights = models("tiny-scaled", "fp32")
    prefill, decode = check_with_decode(forward, goldens("tiny-scaled", "fp32"), goldens("tiny-scaled", "fp32"),
                                        ckpt.config, weights)
    assert prefill.verdict == decode.verdict == cmp.V_PASS


def test_decode_results_are_per_step_stage_results(impl_on_tiny):
    """What `pytest --impl` makes one item of each: (golden key, step, stage result) per stage of every step."""
    _, decode = impl_on_tiny("fp32")
    results = list(decode.results())
    assert len(results) == DEFAULT_STEPS * len(stages.step_keys(2))
    key, step, r = results[0]
    assert (key, step.step, r.key, r.status) == ("decode.1.tokens", 1, "tokens", cmp.PASS)


def test_prefill_only_implementation_is_not_run_and_passes(capsys):
    assert cli.main(["check", str(TINY_FP32), "--impl", "examples.my_llama:forward"]) == 0
    out = capsys.readouterr().out
    assert "\n  decode: not run (prefill-only implementation)\n" in out and "INCOMPLETE" not in out


def _fields(g):
    """A loaded golden's manifest as write_golden takes it (without what the writer adds)."""
    return {k: v for k, v in g.manifest.items() if k not in ("format", "version", "layout", "stages",
                                                             "activations_sha256", "manifest_sha256")}


def test_golden_without_decode_steps_is_not_run(tmp_path, capsys):
    g = load_golden(TINY_FP32)
    write_golden(tmp_path / "g", {k: v for k, v in _fields(g).items() if k != "decode"}, g.tensors)
    assert cli.main(["check", str(tmp_path / "g")]) == 0
    assert "\n  decode: not run (the golden holds no decode steps)\n" in capsys.readouterr().out


def test_check_names_the_first_failing_step_stage_and_why(tmp_path, capsys):
    code = cli.main(["check", str(TINY_FP32), "--impl", "tests.bugs:rope_from_zero_in_decode", "--json",
                     str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 1 and "  PASS: 43/43 stages within tolerance" in out  # the prefill is right
    assert ("  decode: FAIL at step 1, rope_cos: position 17 rotated as position 0 (rope.decode_from_zero); "
            "0/8 steps pass") in out
    assert "  DECODE FIRST FAILURE: step 1 (position 17), rope_cos: rel" in out
    d = json.loads((tmp_path / "r.json").read_text())[0]["decode"]
    assert d["verdict"] == "FAIL" and d["first_failure"]["key"] == "decode.1.rope_cos"
    assert d["steps"][0]["diagnosis"][0]["id"] == "rope.decode_from_zero"


def _report_only(skip):
    """impl in the decode protocol, leaving out the stages `skip(name, start_pos)` picks."""
    def forward(tokens, weights, config, trace, start_pos=0, cache=None):
        return impl_forward(tokens, weights, config, lambda k, t: None if skip(k, start_pos) else trace(k, t),
                            start_pos, cache)

    return forward


def test_decode_steps_not_reported_are_incomplete_or_partial(goldens, models):
    ckpt, weights = models("tiny", "fp32")
    g = goldens("tiny", "fp32")
    fn = _report_only(lambda name, start_pos: start_pos > 0 and name.endswith("k_rope"))
    _, steps = run_decode(fn, g, weights, ckpt.config)
    decode = check_steps(steps, g, g, ckpt.config, weights)
    assert decode.verdict == cmp.V_INCOMPLETE
    assert "missing in decode steps 1-8: k_rope in layers 0-1;" in rpt.decode_verdict_line(decode)
    decode = check_steps(steps, g, g, ckpt.config, weights, partial=True)
    assert decode.verdict == cmp.V_PARTIAL and decode.passed


# ---------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize(("impl", "says"), [
    ("tests.bugs:logits_only", "error: the prefill: a cached implementation (it takes start_pos and cache) returns "
                               "(logits, cache), not a Tensor"),
    ("tests.bugs:crashes_in_step_2", "error: the implementation raised IndexError: index 18 is out of bounds for "
                                     "dimension 0 with size 18 at tests/bugs.py:"),
], ids=["returns-logits-only", "crashes-in-step-2"])
def test_protocol_mistakes_are_one_line(capsys, impl, says):
    assert cli.main(["check", str(TINY_FP32), "--impl", impl]) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and err.count("\n") == 1, err
    if "crashes" in impl:
        assert "(decode step 2 at position 18, last stage traced: none)" in err


def _edit_decode(change):
    def edit(folder):
        m = json.loads((folder / MANIFEST).read_text())
        change(m["decode"])
        m["manifest_sha256"] = manifest_digest(m)
        (folder / MANIFEST).write_text(json.dumps(m))
    return edit


def _set(path, value):
    def change(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        d[last] = value(d[last]) if callable(value) else value
    return change


def _one_more_step(d):
    """A ninth step in the section (consistent in itself) that the tensors do not hold."""
    ls = d["logits_sample"]
    ls["top_ids"].append(ls["top_ids"][-1])
    ls["tail_logprob"].append(ls["tail_logprob"][-1])
    d.update(steps=9, greedy=d["greedy"] + [ls["top_ids"][-1][0]])


DAMAGES = {
    "more-steps-than-held": (_one_more_step, "missing in decode step 9: every stage"),
    "fewer-steps-than-held": (lambda d: (d.update(steps=7, greedy=d["greedy"][:8]), d["logits_sample"].update(
        top_ids=d["logits_sample"]["top_ids"][:7], tail_logprob=d["logits_sample"]["tail_logprob"][:7])),
        "holds in decode step 8: every stage, which its manifest's decode section does not have"),
    "greedy-short": (_set(["greedy"], lambda g: g[:-1]), "decode: greedy: 9 token ids (one per step and the one after "
                                                        "the last) expected"),
    "greedy-not-top": (_set(["greedy", 2], 5), "decode: logits_sample.top_ids[1] starts with"),
    "fed-token-edited": (_set(["greedy", 0], 5), "decode step 1's tokens tensor does not hold the token the decode "
                                                 "section feeds there (5)"),
    "tail-positive": (_set(["logits_sample", "tail_logprob", 0], 0.5), "decode: logits_sample.tail_logprob: 8 finite "
                                                                       "log-probabilities expected"),
    "unknown-field": (_set(["positions"], [17]), "decode: unknown field 'positions'"),
    "not-an-object": (None, "decode: a JSON object expected, got list"),
}


@pytest.mark.parametrize(("damage", "says"), list(DAMAGES.values()), ids=list(DAMAGES))
def test_bad_decode_section_is_one_line_exit_2(tmp_path, damage, says):
    folder = tmp_path / "g"
    shutil.copytree(TINY_FP32, folder)
    if damage is None:
        m = json.loads((folder / MANIFEST).read_text())
        m["decode"] = [1, 2]
        m["manifest_sha256"] = manifest_digest(m)
        (folder / MANIFEST).write_text(json.dumps(m))
    else:
        _edit_decode(damage)(folder)
    with pytest.raises(GoldenError, match="^" + str(folder)):
        load_golden(folder)
    if damage is DAMAGES["more-steps-than-held"][0]:  # once through the real command line
        assert_one_error_line(golden_cli("check", folder), 2, says)
    else:
        with pytest.raises(GoldenError) as info:
            load_golden(folder)
        assert says in str(info.value) and "\n" not in str(info.value)


def test_bf16_golden_fed_other_tokens_than_its_fp32_is_refused(tmp_path, capsys):
    for dtype in ("fp32", "bf16"):
        shutil.copytree(golden_dir("tiny", dtype), tmp_path / dtype)
    bf16 = load_golden(tmp_path / "bf16")
    m = _fields(bf16)
    ls = m["decode"]["logits_sample"]
    ls["top_ids"][-1] = ls["top_ids"][-1][1:] + ls["top_ids"][-1][:1]  # the last step sampled otherwise
    m["decode"]["greedy"][-1] = ls["top_ids"][-1][0]
    write_golden(tmp_path / "bf16", m, bf16.stored())
    assert cli.main(["check", str(tmp_path), "--dtype", "bf16"]) == 2
    assert "its decode steps feed or sample other tokens than its fp32 golden" in capsys.readouterr().err


# ---------------------------------------------------------------- the logits sample's KL
def test_bucket_kl_is_a_lower_bound_of_the_full_kl():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.randn(1000, generator=g, dtype=torch.float64) * 3
        q = p + torch.randn(1000, generator=g, dtype=torch.float64) * 0.3
        lp, lq = p.log_softmax(-1), q.log_softmax(-1)
        full = float((lp.exp() * (lp - lq)).sum())
        top = torch.sort(p, descending=True, stable=True).indices[:64]
        rest = torch.ones(1000, dtype=torch.bool)
        rest[top] = False
        kl = bucket_kl(lp[top], float(lp[rest].logsumexp(0)), lq[top], float(lq[rest].logsumexp(0)))
        assert 0 < kl <= full + 1e-12


def test_bucket_kl_of_a_distribution_with_itself_is_zero():
    lp = torch.randn(500, dtype=torch.float64).log_softmax(-1)
    assert bucket_kl(lp[:64], float(lp[64:].logsumexp(0)), lp[:64], float(lp[64:].logsumexp(0))) == 0.0


# ---------------------------------------------------------------- diff
def test_diff_names_a_perturbed_decode_stage(tmp_path, capsys):
    g = load_golden(TINY_FP32)
    tensors = g.stored()
    tensors["decode.3.layers.1.out"] = tensors["decode.3.layers.1.out"] * 1.001
    write_golden(tmp_path / "b", _fields(g), tensors)
    assert cli.main(["diff", str(TINY_FP32), str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "no drift beyond tolerance (43 stages)" in out  # the prefill
    assert "decode: first drift at step 3 (position 19), layers.1.out: rel" in out


def test_diff_says_when_the_greedy_tokens_changed(tmp_path, capsys):
    """Re-recorded after an upgrade whose numerics change an argmax: the steps from there on are not comparable."""
    g = load_golden(TINY_FP32)
    fields = _fields(g)
    ls = fields["decode"]["logits_sample"]
    ls["top_ids"][5] = ls["top_ids"][5][1:] + ls["top_ids"][5][:1]  # step 6 picked its runner-up
    fields["decode"]["greedy"][6] = ls["top_ids"][5][0]
    tensors = g.stored()
    tensors["decode.7.tokens"] = torch.tensor([fields["decode"]["greedy"][6]])
    write_golden(tmp_path / "b", fields, tensors)
    assert cli.main(["diff", str(TINY_FP32), str(tmp_path / "b"), "--json", str(tmp_path / "d.json")]) == 1
    assert "decode: the two goldens feed or sample other tokens from step 6 on" in capsys.readouterr().out
    assert json.loads((tmp_path / "d.json").read_text())["decode"]["verdict"] == "FAIL"
