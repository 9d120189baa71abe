"""impl's fast forward (SDPA, stacked or packed weights, measured GEMM engines): what generate and benchmarks run.

Two kinds of check. On a small random model, through every GEMM engine (pinned with LLAMA3_GOLDEN_ENGINE) and
every weight preparation, it must compute what the reference forward computes: tightly in fp32, loosely in bf16
(where the two paths round in different places). And on the committed
goldens it must pass the golden comparator where it can be observed without a trace: the last
position's logits, the KV cache after a prefill (keys after RoPE, values), and the logits of a decode
step against that cache, each within the comparator's own tolerances.
"""

import functools
import os

import pytest
import torch

from golden import compare
from impl import engines, model, stages
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


ENGINE_NAMES = [name for name, e in engines.ENGINES.items() if not e.second_copy]
PREPARATIONS = ("plain", "fused", "generation")  # as loaded; fuse_weights; prepare_for_generation (packed or not)


@pytest.fixture(params=ENGINE_NAMES)
def engine(request, monkeypatch):
    """The GEMM engine pinned for this test (LLAMA3_GOLDEN_ENGINE), as a user pins one."""
    monkeypatch.setenv(engines.ENV, request.param)
    return request.param


def prepared(weights, how: str):
    if how == "plain":
        return weights
    if how == "fused":
        return model.fuse_weights(weights, CONFIG)
    return model.prepare_for_generation(dict(weights), CONFIG)  # packed when the pinned engine is a packed one


@pytest.fixture(params=engines.CORES)
def core(request, monkeypatch):
    """The attention core pinned for this test (LLAMA3_GOLDEN_ATTENTION)."""
    monkeypatch.setenv(engines.CORE_ENV, request.param)
    return request.param


@pytest.mark.parametrize("how", PREPARATIONS)
def test_fastpath_prefill_logits_equal_traced(weights, engine, core, how):
    dtype = weights["norm.weight"].dtype
    got = model.forward_fast(TOKENS, prepared(weights, how), CONFIG)
    torch.testing.assert_close(got, traced_logits(weights), **TOL[dtype],
                               msg=lambda m: f"{dtype} {engine} {core} {how} fast path: {m}")


@pytest.mark.parametrize("how", PREPARATIONS)
def test_fastpath_decode_with_cache_equals_traced(weights, engine, core, how):
    dtype = weights["norm.weight"].dtype
    w = prepared(weights, how)
    cache = model.KVCache.empty(CONFIG, 32, dtype)
    model.forward_fast(TOKENS[:-2], w, CONFIG, cache=cache)
    model.forward_fast(TOKENS[-2:-1], w, CONFIG, start_pos=len(TOKENS) - 2, cache=cache)
    last = model.forward_fast(TOKENS[-1:], w, CONFIG, start_pos=len(TOKENS) - 1, cache=cache, all_logits=False)
    torch.testing.assert_close(last, traced_logits(weights)[-1], **TOL[dtype],
                               msg=lambda m: f"{dtype} {engine} {core} {how} decode step: {m}")


def test_fastpath_long_prompt_logits_equal_traced(weights, engine, core):
    """160 tokens: the long-prompt row class, where another engine may be the fastest."""
    dtype = weights["norm.weight"].dtype
    tokens = torch.randint(0, CONFIG.vocab_size, (160,), generator=torch.Generator().manual_seed(2))
    got = model.forward_fast(tokens, prepared(weights, "generation"), CONFIG)
    torch.testing.assert_close(got, traced_logits(weights, tokens), **TOL[dtype],
                               msg=lambda m: f"{dtype} {engine} {core}: {m}")


def test_choose_engines_runs_the_pinned_engine(weights, engine):
    dtype = "fp32" if weights["norm.weight"].dtype == torch.float32 else "bf16"
    e = engines.ENGINES[engine]
    w = prepared(weights, "generation")
    want = engine if dtype in e.dtypes else "torch"
    assert model.choose_engines(w, CONFIG, 17).engine == want
    assert model.weights_layout(w) == (e.layout if dtype in e.dtypes else engines.PLAIN)


def test_prepare_for_generation_holds_one_copy(weights, engine):
    """Its input is consumed; packed weights replace the plain matrices and their row views (no second copy)."""
    given = dict(weights)
    w = model.prepare_for_generation(given, CONFIG)
    assert given == {}
    packed = model.weights_layout(w) == engines.PACKED
    for i in range(CONFIG.n_layers):
        p = f"layers.{i}."
        assert (p + "attention.wq.weight" in w) != packed and (p + "feed_forward.w1.weight" in w) != packed
        assert w[p + "feed_forward.w2.weight"].is_mkldnn == packed


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


@pytest.mark.parametrize("rows", [1, 17, 300])
@pytest.mark.parametrize(("name", "dtype"), [(n, d) for n, e in engines.ENGINES.items() for d in e.dtypes],
                         ids=lambda v: v)
def test_engine_matmul_equals_exact_product(name, dtype, rows, monkeypatch):
    e = engines.ENGINES[name]
    monkeypatch.setattr(engines, "_BLOCK_ELEMENTS", 96 * 700)  # bf16-via-fp32: blocks of 700 rows, the last partial
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(5000, 96, generator=g)
    x, w = x.to(engines.DTYPES[dtype]), w.to(engines.DTYPES[dtype])
    want = (x.double() @ w.double().T).to(x.dtype)  # exact products and sums, one rounding
    got = e.matmul(x, e.prepare(w) if e.prepare else w)
    assert got.dtype == x.dtype and got.shape == (rows, 5000)
    tol = dict(rtol=2 ** -7, atol=1e-3) if dtype == "bf16" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_choose_engines_stacks_only_fused_weights(weights):
    assert model.choose_engines(weights, CONFIG).qkv_rope is model.qkv_rope_separate
    assert model.choose_engines(model.fuse_weights(weights, CONFIG), CONFIG).qkv_rope is model.qkv_rope_stacked


# ---------------------------------------------------------------- the fast forward against the goldens
GOLDEN_CASES = [(m, d) for m in GOLDEN_MODELS for d in DTYPES]
GOLDEN_IDS = [f"{m}-{d}" for m, d in GOLDEN_CASES]
# How a cache test runs: the fast forward on the loaded weights, on fuse_weights' stacked ones or on
# prepare_for_generation's packed ones (oneDNN's layout, whatever engine is pinned), or the reference forward
# (whose stages the goldens check elsewhere, but not its decode against a cache).
RUNS = ("fast", "fast-fused", "fast-packed", "fast-matmul", "reference")  # fast-matmul: the matmul-64 attention core
# Found by these tests: torch's CPU SDPA kernel in bf16 moved SmolLM2's last logits further from the fp32 golden
# than the reference's explicit attention (KL 3.0e-3 against the comparator's bound 2.2e-3; the reference 1.2e-3).
# The fast forward now runs SDPA in fp32 on bf16 inputs (grouped_query_attention_sdpa): no case is expected to fail.
KNOWN_KL_GAP: set[tuple[str, str, str]] = set()


def golden_runs(runs):
    """(model, dtype, run) params: every run on the tiny goldens; on SmolLM2 the default suite runs what generate
    runs (`fast`, `fast-packed`), its `fast-fused` and `reference` runs are `slow`."""
    for (name, dtype), case_id in zip(GOLDEN_CASES, GOLDEN_IDS, strict=True):
        for run in runs:
            slow = name == "smollm2-135m" and run in ("fast-fused", "reference", "fast-matmul")
            yield pytest.param(name, dtype, run, id=f"{case_id}-{run}", marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="module")
def golden_model(models):
    """(model, dtype, run) -> (config, weights, forward) for one of RUNS; stacked weights made once per module."""
    stacked = {}

    def get(name: str, dtype: str, run: str):
        ckpt, weights = models(name, dtype)
        if run in ("fast-fused", "fast-packed"):
            if (name, dtype, run) not in stacked:
                stacked[name, dtype, run] = (model.fuse_weights(weights, ckpt.config) if run == "fast-fused" else
                                             model.prepare_for_generation(dict(weights), ckpt.config, engines.PACKED))
            weights = stacked[name, dtype, run]
        if run == "fast-matmul":
            return ckpt.config, weights, functools.partial(_with_core, "matmul-64")
        return ckpt.config, weights, model.forward if run == "reference" else model.forward_fast

    return get


def _with_core(core: str, *args, **kwargs):
    """forward_fast with LLAMA3_GOLDEN_ATTENTION=core for this one call."""
    before = os.environ.get(engines.CORE_ENV)
    os.environ[engines.CORE_ENV] = core
    try:
        return model.forward_fast(*args, **kwargs)
    finally:
        if before is None:
            del os.environ[engines.CORE_ENV]
        else:
            os.environ[engines.CORE_ENV] = before


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


@pytest.mark.parametrize(("name", "dtype", "run"), list(golden_runs(RUNS[:4])))
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


@pytest.mark.parametrize(("name", "dtype", "run"), list(golden_runs(RUNS)))
def test_kv_cache_after_prefill_passes_the_golden(goldens, golden_model, judge, name, dtype, run):
    """Keys after RoPE and values, layer by layer. Catches what logits cannot: RoPE at positions shifted by a
    constant leaves every q.k, hence the logits, unchanged, but not the cached keys that later steps read."""
    config, _, _, tokens, cache = _prefill(goldens, golden_model, name, dtype, run)
    actual = {}
    for i in range(config.n_layers):  # the cache holds (kv, positions, d) per layer; the golden (positions, kv, d)
        actual[stages.key(stages.K_ROPE, i)] = cache.k[i].transpose(0, 1)
        actual[stages.key(stages.V, i)] = cache.v[i].transpose(0, 1)
    _assert_passes(judge(name, dtype, actual), f"{run} {name} {dtype} KV cache")


@pytest.mark.parametrize(("name", "dtype", "run"), list(golden_runs(RUNS)))
def test_decode_step_with_cache_passes_the_golden(goldens, golden_model, judge, name, dtype, run):
    """Prefill all but the last token, then decode the last one against the cache: its logits are the golden's."""
    config, weights, forward, tokens, cache = _prefill(goldens, golden_model, name, dtype, run, n_tokens=-1)
    logits = forward(tokens[-1:], weights, config, start_pos=len(tokens) - 1, cache=cache, all_logits=False)
    _assert_passes(judge(name, dtype, {stages.LOGITS: logits}), f"{run} {name} {dtype} decode step",
                   (name, dtype, run) in KNOWN_KL_GAP)
