"""impl's fast forward (SDPA, stacked weights, matmul_t): what generate and the benchmarks run.

On a small random model it must compute what the reference forward computes: tightly in fp32, loosely
in bf16 (where the two paths round in different places).
"""

import pytest
import torch

from impl import model
from impl.config import PRESETS
from impl.weights import random_weights

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

