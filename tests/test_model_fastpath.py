"""impl's fast forward (SDPA, stacked weights, matmul_t): what generate and the benchmarks run.

Two kinds of check. On a small random model it must compute what the reference forward computes:
tightly in fp32, loosely in bf16 (where the two paths round in different places). And on the committed
goldens it must pass the golden comparator where it can be observed without a trace: the last
position's logits, the KV cache after a prefill (keys after RoPE, values), and the logits of a decode
step against that cache, each within the comparator's own tolerances.
"""

import pytest
import torch

from golden import compare
from impl import model, stages
from impl.config import PRESETS
from impl.weights import random_weights
from tests.conftest import DTYPES, GOLDEN_MODELS

CONFIG = PRESETS["tiny"].replace(vocab_size=512)
TOKENS = torch.randint(0, CONFIG.vocab_size, (23,), generator=torch.Generator().manual_seed(0))
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=0.05, atol=0.05)}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def weights(request):
    return random_weights(CONFIG, seed=1, dtype=request.param)


def traced_logits(weights, tokens=TOKENS):
    return model.forward(tokens, weights, CONFIG, trace=lambda name, t: None)


@pytest.mark.parametrize("prepare", [False, True], ids=["plain", "fused"])
def test_fastpath_prefill_logits_equal_traced(weights, prepare):
    dtype = weights["norm.weight"].dtype
    w = model.fuse_weights(weights, CONFIG) if prepare else weights
    got = model.forward_fast(TOKENS, w, CONFIG)
    torch.testing.assert_close(got, traced_logits(weights), **TOL[dtype], msg=lambda m: f"{dtype} fast path: {m}")


@pytest.mark.parametrize("prepare", [False, True], ids=["plain", "fused"])
def test_fastpath_decode_with_cache_equals_traced(weights, prepare):
    dtype = weights["norm.weight"].dtype
    w = model.fuse_weights(weights, CONFIG) if prepare else weights
    cache = model.KVCache.empty(CONFIG, 32, dtype)
    model.forward_fast(TOKENS[:-2], w, CONFIG, cache=cache)
    model.forward_fast(TOKENS[-2:-1], w, CONFIG, start_pos=len(TOKENS) - 2, cache=cache)
    last = model.forward_fast(TOKENS[-1:], w, CONFIG, start_pos=len(TOKENS) - 1, cache=cache, all_logits=False)
    torch.testing.assert_close(last, traced_logits(weights)[-1], **TOL[dtype],
                               msg=lambda m: f"{dtype} decode step: {m}")


def test_fused_weights_share_memory_and_keep_meta_names(weights):
    fused = model.fuse_weights(weights, CONFIG)
    assert set(weights) <= set(fused)
    for i in range(CONFIG.n_layers):
        p = f"layers.{i}."
        torch.testing.assert_close(fused[p + "attention.wk.weight"], weights[p + "attention.wk.weight"], rtol=0, atol=0)
        torch.testing.assert_close(fused[p + "feed_forward.w3.weight"], weights[p + "feed_forward.w3.weight"],
                                   rtol=0, atol=0)
        # The separate matrices are views of the fused ones: fusing costs no second copy.
        assert fused[p + "attention.wk.weight"].untyped_storage().data_ptr() == \
            fused[p + "attention.wqkv.weight"].untyped_storage().data_ptr()


def test_fused_weights_traced_path_unchanged(weights):
    got = model.forward(TOKENS, model.fuse_weights(weights, CONFIG), CONFIG, trace=lambda name, t: None)
    torch.testing.assert_close(got, traced_logits(weights), rtol=0, atol=0)


def test_fastpath_long_prompt_logits_equal_traced(weights):
    """160 tokens: past BF16_VIA_FP32_MIN_ROWS, where bf16 projections may run in fp32 blocks."""
    dtype = weights["norm.weight"].dtype
    tokens = torch.randint(0, CONFIG.vocab_size, (160,), generator=torch.Generator().manual_seed(2))
    got = model.forward_fast(tokens, model.fuse_weights(weights, CONFIG), CONFIG)
    torch.testing.assert_close(got, traced_logits(weights, tokens), **TOL[dtype], msg=lambda m: f"{dtype}: {m}")


@pytest.mark.parametrize("rows", [1, 17, 300])
def test_matmul_t_equals_matmul(rows, monkeypatch):
    monkeypatch.setattr(model, "_BLOCK_ELEMENTS", 96 * 700)  # blocks of 700 rows of w, the last one partial
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(rows, 96, generator=g).bfloat16(), torch.randn(5000, 96, generator=g).bfloat16()
    want = (x.float() @ w.float().T).bfloat16()  # exact products, fp32 sums, one rounding
    got = model.matmul_t(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 5000)
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-3)


def test_choose_engines_stacks_only_fused_weights(weights):
    assert model.choose_engines(weights) is model.SEPARATE
    assert model.choose_engines(model.fuse_weights(weights, CONFIG)) is model.STACKED


# ---------------------------------------------------------------- the fast forward against the goldens
GOLDEN_CASES = [(m, d) for m in GOLDEN_MODELS for d in DTYPES]
GOLDEN_IDS = [f"{m}-{d}" for m, d in GOLDEN_CASES]
# How a cache test runs: the fast forward on the loaded weights or on fuse_weights' stacked ones, or the
# reference forward (whose stages the goldens check elsewhere, but not its decode against a cache).
RUNS = ("fast", "fast-fused", "reference")
# Found by these tests, not tuned away: torch's CPU SDPA kernel in bf16 moves SmolLM2's last logits further from the
# fp32 golden than the reference's explicit attention does. KL 3.0e-3 against the comparator's bound 2.2e-3 (4x
# transformers' own bf16 KL 5.3e-4, + 1e-4); the reference forward measures 1.2e-3, and so does the fast forward
# with explicit attention. The logits' relative error and the top-1 token pass. The same numbers as before the
# fast path had its own name. Which attention engine to run per shape and dtype is the performance issue's call.
KNOWN_KL_GAP = {("smollm2-135m", "bf16", "fast"), ("smollm2-135m", "bf16", "fast-fused")}


@pytest.fixture(scope="module")
def golden_model(models):
    """(model, dtype, run) -> (config, weights, forward) for one of RUNS; stacked weights made once per module."""
    stacked = {}

    def get(name: str, dtype: str, run: str):
        ckpt, weights = models(name, dtype)
        if run == "fast-fused":
            if (name, dtype) not in stacked:
                stacked[name, dtype] = model.fuse_weights(weights, ckpt.config)
            weights = stacked[name, dtype]
        return ckpt.config, weights, model.forward if run == "reference" else model.forward_fast

    return get


@pytest.fixture(scope="module")
def judge(goldens):
    """(model, dtype, reported stages) -> the comparator's Report on exactly those stages of the golden."""

    def run(name: str, dtype: str, actual: dict[str, torch.Tensor]) -> compare.Report:
        truth, g = goldens(name, "fp32"), goldens(name, dtype)
        expected = {k: truth.tensors[k] for k in actual}
        reference = {k: g.tensors[k] for k in actual} if dtype == "bf16" else None
        return compare.compare(expected, actual, dtype, reference)

    return run


def _assert_passes(report: compare.Report, what: str, known_kl_gap: bool = False) -> None:
    """Every reported stage within the comparator's tolerance; on logits also its top-1 and KL verdict."""
    first = report.first_failure
    assert first is None, f"{what}: {first.key} rel {first.metrics.rel:.3e} > {first.limit:.3e}"
    assert all(r.status == compare.PASS for r in report.results), f"{what}: a stage was not checked"
    if report.logits is None:
        return
    assert report.logits.top1_ok, f"{what}: {report.logits}"
    if known_kl_gap:  # checked to be still there, then reported as an expected failure
        assert not report.logits.ok, f"{what}: the KL gap is closed: remove the case from KNOWN_KL_GAP"
        pytest.xfail(f"{what}: KL {report.logits.kl:.2e} > {report.logits.kl_limit:.2e} (KNOWN_KL_GAP)")
    assert report.logits.ok, f"{what}: {report.logits}"


@pytest.mark.parametrize("run", RUNS[:2])
@pytest.mark.parametrize(("name", "dtype"), GOLDEN_CASES, ids=GOLDEN_IDS)
def test_fast_forward_last_logits_pass_the_golden(goldens, golden_model, judge, name, dtype, run):
    config, weights, forward = golden_model(name, dtype, run)
    logits = forward(torch.tensor(goldens(name, dtype).tokens), weights, config, all_logits=False)  # (vocab,)
    _assert_passes(judge(name, dtype, {stages.LOGITS: logits}), f"{run} {name} {dtype} logits",
                   (name, dtype, run) in KNOWN_KL_GAP)


def _prefill(goldens, golden_model, name, dtype, run, n_tokens=None):
    """Run a forward on the golden's first n_tokens (all by default) into a fresh cache of the golden's length."""
    config, weights, forward = golden_model(name, dtype, run)
    tokens = torch.tensor(goldens(name, dtype).tokens)
    cache = model.KVCache.empty(config, len(tokens), weights["norm.weight"].dtype)
    forward(tokens[:n_tokens], weights, config, cache=cache, all_logits=False)
    return config, weights, forward, tokens, cache


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize(("name", "dtype"), GOLDEN_CASES, ids=GOLDEN_IDS)
def test_kv_cache_after_prefill_passes_the_golden(goldens, golden_model, judge, name, dtype, run):
    """Keys after RoPE and values, layer by layer. Catches what logits cannot: RoPE at positions shifted by a
    constant leaves every q.k, hence the logits, unchanged, but not the cached keys that later steps read."""
    config, _, _, tokens, cache = _prefill(goldens, golden_model, name, dtype, run)
    actual = {}
    for i in range(config.n_layers):  # the cache holds (kv, positions, d) per layer; the golden (positions, kv, d)
        actual[stages.key(stages.K_ROPE, i)] = cache.k[i].transpose(0, 1)
        actual[stages.key(stages.V, i)] = cache.v[i].transpose(0, 1)
    _assert_passes(judge(name, dtype, actual), f"{run} {name} {dtype} KV cache")


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize(("name", "dtype"), GOLDEN_CASES, ids=GOLDEN_IDS)
def test_decode_step_with_cache_passes_the_golden(goldens, golden_model, judge, name, dtype, run):
    """Prefill all but the last token, then decode the last one against the cache: its logits are the golden's."""
    config, weights, forward, tokens, cache = _prefill(goldens, golden_model, name, dtype, run, n_tokens=-1)
    logits = forward(tokens[-1:], weights, config, start_pos=len(tokens) - 1, cache=cache, all_logits=False)
    _assert_passes(judge(name, dtype, {stages.LOGITS: logits}), f"{run} {name} {dtype} decode step",
                   (name, dtype, run) in KNOWN_KL_GAP)
