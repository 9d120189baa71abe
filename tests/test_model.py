"""Each stage function of impl.model against an independent formula, on small random tensors."""

import functools
import math

import pytest
import torch

from impl import model
from impl.config import PRESETS, RopeScaling

torch.manual_seed(0)
SEQ, HEADS, KV, D = 7, 8, 2, 16


def rope_reference(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Real-valued 2x2 rotation of each interleaved pair, written out element by element."""
    out = torch.empty_like(x)
    for t, pos in enumerate(positions.tolist()):
        for i, f in enumerate(freqs.tolist()):
            c, s = math.cos(pos * f), math.sin(pos * f)
            a, b = x[t, :, 2 * i], x[t, :, 2 * i + 1]
            out[t, :, 2 * i] = a * c - b * s
            out[t, :, 2 * i + 1] = a * s + b * c
    return out


@pytest.fixture
def cfg():
    return PRESETS["tiny"].replace(dim=HEADS * D, n_heads=HEADS, n_kv_heads=KV)


def test_rms_norm_matches_formula():
    x, w = torch.randn(5, 32), torch.randn(32)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(model.rms_norm(x, w, 1e-5), expected)


def test_rms_norm_eps_matters_for_small_inputs():
    x, w = torch.full((1, 4), 1e-3), torch.ones(4)
    assert model.rms_norm(x, w, 1e-5)[0, 0] < 0.995  # sqrt(1e-6 / (1e-6 + 1e-5)) ~ 0.30


def test_rope_frequencies_follow_theta(cfg):
    i = torch.arange(D // 2, dtype=torch.float64)
    torch.testing.assert_close(model.rope_frequencies(cfg).double(), cfg.rope_theta ** (-2 * i / D), rtol=1e-6,
                               atol=0)


def test_apply_rope_matches_pairwise_rotation(cfg):
    x = torch.randn(SEQ, HEADS, D)
    got = model.apply_rope(x, model.precompute_freqs_cis(cfg, SEQ, start=3))
    want = rope_reference(x, torch.arange(3, 3 + SEQ), model.rope_frequencies(cfg))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_apply_rope_preserves_norms(cfg):
    x = torch.randn(SEQ, HEADS, D)
    got = model.apply_rope(x, model.precompute_freqs_cis(cfg, SEQ))
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))


def test_apply_rope_dot_product_depends_on_relative_position_only(cfg):
    q, k = torch.randn(1, 1, D), torch.randn(1, 1, D)

    def score(pq: int, pk: int) -> float:
        rq = model.apply_rope(q, model.precompute_freqs_cis(cfg, 1, start=pq))
        rk = model.apply_rope(k, model.precompute_freqs_cis(cfg, 1, start=pk))
        return float((rq * rk).sum())

    assert score(5, 2) == pytest.approx(score(103, 100), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-4)


def test_scaled_rope_matches_meta_apply_scaling():
    s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    expected = []
    for f in freqs.tolist():  # Meta's llama/model.py apply_scaling, as a loop
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            expected.append(f)
        elif wavelen > 8192 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    torch.testing.assert_close(model.scale_rope_frequencies(freqs, s), torch.tensor(expected), rtol=1e-6, atol=0)


def test_causal_mask_hides_future_keys_only():
    m = model.causal_mask(3, 5, start_pos=2)
    assert torch.isinf(m).tolist() == [[False, False, False, True, True],
                                      [False, False, False, False, True],
                                      [False, False, False, False, False]]


def test_kv_head_mapping_groups_consecutive_heads():
    assert model.kv_head_of(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("attend", ["grouped_query_attention_sdpa", "grouped_query_attention",
                                    "grouped_query_attention_matmul"], ids=["sdpa", "explicit", "matmul"])
def test_grouped_query_attention_equals_mha_with_repeated_kv(attend):
    q, k, v = torch.randn(SEQ, HEADS, D), torch.randn(SEQ, KV, D), torch.randn(SEQ, KV, D)
    k_rep, v_rep = k.repeat_interleave(HEADS // KV, dim=1), v.repeat_interleave(HEADS // KV, dim=1)
    expected = torch.empty(SEQ, HEADS, D)
    for h in range(HEADS):  # plain per-head causal attention
        s = q[:, h] @ k_rep[:, h].T / math.sqrt(D)
        s = s.masked_fill(torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1), float("-inf"))
        expected[:, h] = torch.softmax(s, -1) @ v_rep[:, h]
    torch.testing.assert_close(getattr(model, attend)(q, k, v, 0), expected, rtol=1e-5, atol=1e-5)


FAST_CORES = {**model.ATTENTION_CORES,  # and query blocks small enough to split these few queries
              "matmul-blocks-of-2": functools.partial(model.grouped_query_attention_matmul, block=2)}


@pytest.mark.parametrize("core", FAST_CORES)
@pytest.mark.parametrize(("q_len", "start_pos"), [(1, 6), (3, 4), (5, 0), (5, 3)],
                         ids=["decode", "chunk-after-4", "prompt-5", "chunk-5-after-3"])
def test_fast_attention_cores_equal_explicit_after_cached_keys(core, q_len, start_pos):
    """Queries after start_pos cached positions (a decode step, a prompt chunk): the mask starts at start_pos, and
    each query block sees the keys up to its own last row."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(q_len, HEADS, D, generator=g)
    k, v = torch.randn(start_pos + q_len, KV, D, generator=g), torch.randn(start_pos + q_len, KV, D, generator=g)
    torch.testing.assert_close(FAST_CORES[core](q, k, v, start_pos),
                               model.grouped_query_attention(q, k, v, start_pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [None, 2], ids=["whole", "blocks-of-2"])
def test_matmul_core_masks_keys_beyond_the_queries(block):
    """Keys past the last query's position (a cache read whole) are masked too, not only the diagonal block."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, HEADS, D, generator=g)
    k, v = torch.randn(9, KV, D, generator=g), torch.randn(9, KV, D, generator=g)
    torch.testing.assert_close(model.grouped_query_attention_matmul(q, k, v, 2, block=block),
                               model.grouped_query_attention(q, k, v, 2), rtol=1e-5, atol=1e-5)


def test_matmul_core_gives_way_to_sdpa_where_its_score_block_would_not_fit():
    blocked = model.ATTENTION_CORES["matmul-128"]
    assert model.attention_core("matmul-128", 32, 8192, 8192) is blocked  # (32, 128, 8192) fp32: 128 MB a block
    keys = model.ATTENTION_MATMUL_BYTES // (4 * 32 * 128) + 1  # keys whose (32, 128, keys) fp32 block overflows it
    assert model.attention_core("matmul-128", 32, 8192, keys) is model.grouped_query_attention_sdpa
    assert model.attention_core("matmul-128", 32, 1, keys) is blocked  # one query row's scores are small
    assert model.attention_core("sdpa", 32, 1, 1) is model.grouped_query_attention_sdpa


def test_swiglu_matches_formula():
    x, w1, w3, w2 = torch.randn(3, 8), torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 12)
    a = x @ w1.T
    expected = (a / (1 + torch.exp(-a)) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(model.swiglu(x, w1, w3, w2), expected, rtol=1e-5, atol=1e-5)
