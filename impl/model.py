"""The Llama 3 forward pass, from scratch: small pure functions named for the math, in two forwards.

Follows Meta's reference `llama/model.py` and the "LLaMA 3 from scratch" walk-through
(complex-number RoPE, grouped-query attention, SwiGLU), vectorised over heads, with every size
read from the config. Tensors have no batch dimension: one prompt of `seq` tokens.

- `forward` is the reference: it reads top to bottom like Meta's `Transformer.forward`
  (`transformer_block` -> `attention`, `feed_forward`) and reports every intermediate to
  `trace(key, tensor)` under the stage names of `impl.stages`. It is what the goldens check, stage
  by stage. The trace only observes: with none, the same computation runs unobserved.
- `forward_fast` is what `impl.generate` and the benchmarks run: the same math with no trace, through
  fused kernels (SDPA; stacked q|k|v and w1|w3 matrices from `fuse_weights`; `matmul_t`). Which of its
  engines to use is decided once per call (`choose_engines`). The goldens check it at the logits and
  the KV cache (tests/test_model_fastpath.py).

Seams. The reference forward calls these functions through this module's globals, never through a
local alias, so tests swap one with monkeypatch and copy no model code: tests/test_mutations.py puts
a known bug in (and expects the goldens to name its first stage), tests/alternatives.py a correct
variant (and expects no false alarm).

    rope_frequencies, scale_rope_frequencies, precompute_freqs_cis, apply_rope   RoPE
    rms_norm                                                                       every norm
    causal_mask, kv_head_of, attention_scores, attention_probs                    attention
    swiglu_parts                                                                   the FFN's gate and up
    residual                                                                       both skip connections
    output_weight                                                                  the unembedding (tied or not)

A new seam is a function of the reference forward that a test needs to swap: add it to this list.
The fast forward shares some of this math (norms, RoPE, output_weight), so a patch reaches it too;
no test relies on that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from impl.config import ModelConfig, RopeScaling
from impl.errors import check_prompt
from impl.layout import Weights
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
    Trace,
    V,
    key,
)


# ================================================================ the math, shared by both forwards
# ---------------------------------------------------------------- RoPE
def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """theta^(-2i/d) for i in [0, d/2), with Llama 3.1 scaling if the config has it. fp32, (d/2,)."""
    d = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.rope_scaling is not None:
        freqs = scale_rope_frequencies(freqs, config.rope_scaling)
    return freqs


def scale_rope_frequencies(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's `apply_scaling`: slow frequencies / factor, fast ones kept, a smooth blend between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * freqs / s.factor + smooth * freqs
    out = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)
    middle = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(middle, blended, out)


def precompute_freqs_cis(config: ModelConfig, seq_len: int, start: int = 0) -> torch.Tensor:
    """e^(i * position * freq) for positions [start, start+seq_len): complex64, (seq, d/2)."""
    positions = torch.arange(start, start + seq_len, dtype=torch.float32)
    angles = torch.outer(positions, rope_frequencies(config))  # (seq, d/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) as a complex number. x: (seq, heads, d)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (seq, heads, d/2)
    rotated = torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2)  # (seq, heads, d)
    return rotated.type_as(x)


# ---------------------------------------------------------------- norms, FFN, residual
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, the normalisation in fp32 (Meta's RMSNorm)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def swiglu_parts(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(x @ w1.T), x @ w3.T): the gate and the up projection. (seq, hidden) each."""
    return F.silu(x @ w1.T), x @ w3.T


def residual(x: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
    """x + sublayer(x): the skip connection around attention and around the FFN. (seq, dim).

    A function of its own only so that it is a seam: a test can take the skip away (tests/test_mutations.py).
    """
    return x + sublayer_out


# ---------------------------------------------------------------- attention
def causal_mask(q_len: int, k_len: int, start_pos: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0 where query (at start_pos + i) may see key j (j <= start_pos + i), -inf elsewhere. (q_len, k_len)."""
    q_pos = torch.arange(start_pos, start_pos + q_len)[:, None]
    k_pos = torch.arange(k_len)[None, :]
    return torch.zeros(q_len, k_len, dtype=dtype).masked_fill(k_pos > q_pos, float("-inf"))


def kv_head_of(n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Which kv head each query head reads: head // group (group = n_heads / n_kv_heads)."""
    return torch.arange(n_heads) // (n_heads // n_kv_heads)


def attention_scores(q: torch.Tensor, k: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """q.k / sqrt(d) plus the causal mask. q: (seq, h, d); k: (kv_len, h, d) -> (h, seq, kv_len)."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return scores + causal_mask(q.shape[0], k.shape[0], start_pos, scores.dtype)


def attention_probs(scores: torch.Tensor) -> torch.Tensor:
    """softmax over keys, in fp32 (Meta: F.softmax(scores.float(), dim=-1).type_as(xq))."""
    return F.softmax(scores.float(), dim=-1).type_as(scores)


def _no_trace(name: str, t: torch.Tensor) -> None:
    """The trace when nobody observes: the reference forward computes the same either way."""


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int = 0,
                            trace: Trace = _no_trace, layer: int = 0) -> torch.Tensor:
    """Causal attention written out, n_heads queries sharing n_kv_heads keys/values; reports scores and probs.

    q: (seq, h, d); k, v: (kv_len, kv, d) -> (seq, h, d). kv_len = start_pos + seq.
    """
    idx = kv_head_of(q.shape[1], k.shape[1])
    k_h, v_h = k[:, idx], v[:, idx]  # (kv_len, h, d): Meta's repeat_kv
    scores = attention_scores(q, k_h, start_pos)  # (h, seq, kv_len)
    trace(key(SCORES, layer), scores)
    probs = attention_probs(scores)  # (h, seq, kv_len)
    trace(key(PROBS, layer), probs)
    return torch.einsum("hqk,khd->qhd", probs, v_h)  # (seq, h, d)


# ---------------------------------------------------------------- the KV cache (both forwards)
@dataclass
class KVCache:
    """Keys (after RoPE) and values of every layer for positions [0, max_seq_len).

    Positions are the second-to-last axis, so each head's keys are one contiguous (positions, d) block: the
    layout SDPA's CPU kernel reads fastest (as in transformers' and gpt-fast's caches).
    """

    k: torch.Tensor  # (n_layers, n_kv_heads, max_seq_len, head_dim)
    v: torch.Tensor  # (n_layers, n_kv_heads, max_seq_len, head_dim)

    @classmethod
    def empty(cls, config: ModelConfig, max_seq_len: int, dtype: torch.dtype) -> KVCache:
        shape = (config.n_layers, config.n_kv_heads, max_seq_len, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, i: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer i's k, v (seq, kv, d) at start_pos; return every key and value so far, (kv_len, kv, d)."""
        end = start_pos + k.shape[0]
        self.k[i, :, start_pos:end] = k.transpose(0, 1)
        self.v[i, :, start_pos:end] = v.transpose(0, 1)
        return self.k[i, :, :end].transpose(0, 1), self.v[i, :, :end].transpose(0, 1)


def context_length(config: ModelConfig, cache: KVCache | None) -> int:
    """How many positions a forward may fill: the cache's length when there is one, else the model's."""
    return config.max_seq_len if cache is None else cache.max_seq_len


def output_weight(w: Weights) -> torch.Tensor:
    """The unembedding: output.weight, or the token embedding when the two are tied."""
    return w["output.weight"] if "output.weight" in w else w["tok_embeddings.weight"]


# ================================================================ the reference forward
def attention(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor, start_pos: int,
              cache: KVCache | None, trace: Trace) -> torch.Tensor:
    """Meta's Attention.forward for layer i: projections, RoPE, the cache, GQA, wo. x: (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}.attention."
    seq, h, kv, d = x.shape[0], config.n_heads, config.n_kv_heads, config.head_dim
    xq = (x @ w[p + "wq.weight"].T).view(seq, h, d)  # (seq, h, d)
    xk = (x @ w[p + "wk.weight"].T).view(seq, kv, d)  # (seq, kv, d)
    xv = (x @ w[p + "wv.weight"].T).view(seq, kv, d)  # (seq, kv, d)
    trace(key(Q, i), xq)
    trace(key(K, i), xk)
    trace(key(V, i), xv)
    xq, xk = apply_rope(xq, freqs_cis), apply_rope(xk, freqs_cis)
    trace(key(Q_ROPE, i), xq)
    trace(key(K_ROPE, i), xk)
    keys, values = (xk, xv) if cache is None else cache.update(i, start_pos, xk, xv)  # (kv_len, kv, d)
    heads = grouped_query_attention(xq, keys, values, start_pos, trace, i)  # (seq, h, d)
    trace(key(ATTN_HEADS, i), heads)
    out = heads.reshape(seq, h * d) @ w[p + "wo.weight"].T  # (seq, dim)
    trace(key(ATTN_OUT, i), out)
    return out


def feed_forward(x: torch.Tensor, w: Weights, i: int, trace: Trace) -> torch.Tensor:
    """Meta's FeedForward for layer i: w2(silu(w1 x) * w3 x). x: (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}.feed_forward."
    gate, up = swiglu_parts(x, w[p + "w1.weight"], w[p + "w3.weight"])  # (seq, hidden) each
    trace(key(FFN_GATE, i), gate)
    trace(key(FFN_UP, i), up)
    hidden = gate * up  # (seq, hidden)
    trace(key(FFN_HIDDEN, i), hidden)
    out = hidden @ w[p + "w2.weight"].T  # (seq, dim)
    trace(key(FFN_OUT, i), out)
    return out


def transformer_block(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                      start_pos: int = 0, cache: KVCache | None = None, trace: Trace = _no_trace) -> torch.Tensor:
    """One decoder layer: x + attention(norm(x)), then + feed_forward(norm(.)). (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}."
    trace(key(RESIDUAL_IN, i), x)
    xn = rms_norm(x, w[p + "attention_norm.weight"], config.norm_eps)
    trace(key(ATTN_NORM, i), xn)
    h = residual(x, attention(xn, w, i, config, freqs_cis, start_pos, cache, trace))
    trace(key(RESIDUAL_ATTN, i), h)
    hn = rms_norm(h, w[p + "ffn_norm.weight"], config.norm_eps)
    trace(key(FFN_NORM, i), hn)
    out = residual(h, feed_forward(hn, w, i, trace))
    trace(key(OUT, i), out)
    return out


@torch.inference_mode()
def forward(tokens: torch.Tensor, weights: Weights, config: ModelConfig, trace: Trace | None = None,
            start_pos: int = 0, cache: KVCache | None = None, all_logits: bool = True) -> torch.Tensor:
    """The reference: logits for tokens at positions [start_pos, start_pos + seq), every stage reported to trace.

    tokens: (seq,) int64 -> (seq, vocab), or (vocab,) for the last position when all_logits=False.
    The computation runs in the weights' dtype (fp32 or bf16); norms, RoPE and softmax in fp32.
    """
    trace = trace or _no_trace  # None is the default observer, which sees nothing: nothing else changes
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)  # (seq,)
    check_prompt(tokens, context_length(config, cache), start_pos=start_pos)
    trace(TOKENS, tokens)
    x = weights["tok_embeddings.weight"][tokens]  # (seq, dim)
    trace(EMBEDDINGS, x)
    freqs_cis = precompute_freqs_cis(config, tokens.shape[0], start_pos)  # (seq, d/2)
    trace(ROPE_COS, freqs_cis.real)
    trace(ROPE_SIN, freqs_cis.imag)
    for i in range(config.n_layers):
        x = transformer_block(x, weights, i, config, freqs_cis, start_pos, cache, trace)
    x = rms_norm(x, weights["norm.weight"], config.norm_eps)
    trace(NORM, x)
    out_w = output_weight(weights)  # (vocab, dim)
    last = x[-1] @ out_w.T  # (vocab,)
    trace(LOGITS, last)
    trace(LOGPROBS_LAST, F.log_softmax(last.float(), dim=-1))
    return x @ out_w.T if all_logits else last


# ================================================================ the fast forward
# ---------------------------------------------------------------- its matmul
# x86 without AMX multiplies bf16 through AVX512-BF16 dot products at about half its fp32 rate (measured in
# benchmarks/: the roof-mm rows). There, prompts multiply in fp32, converting the bf16 weight a block of rows at
# a time: never a whole fp32 copy, one rounding to bf16 at the end as in a bf16 matmul.
_BF16_VIA_FP32 = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                  and not getattr(torch._C._cpu, "_init_amx", lambda: True)())
BF16_VIA_FP32_MIN_ROWS = 128  # below, the conversion costs more than it saves (decode, short prompts)
_BLOCK_ELEMENTS = 1 << 22  # 16 MB of fp32 weight per block


def matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T, the fast path's projection. x: (seq, in); w: (out, in) -> (seq, out) in x's dtype."""
    if not (_BF16_VIA_FP32 and x.dtype == torch.bfloat16 and x.shape[0] >= BF16_VIA_FP32_MIN_ROWS):
        return x @ w.T
    xf, out = x.float(), torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    rows = max(1, _BLOCK_ELEMENTS // w.shape[1])
    for start in range(0, w.shape[0], rows):
        out[:, start:start + rows] = xf @ w[start:start + rows].float().T
    return out


# ---------------------------------------------------------------- its weights: stacked once, after loading
def fuse_weights(weights: Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The same weights plus wq|wk|wv and w1|w3 stacked (`attention.wqkv`, `feed_forward.w13`) for the fast path.

    The separate matrices become row views of the stacked ones, so the reference forward reads the same numbers
    and no weight is held twice once the caller lets the original dict go. Done once, after loading.
    """
    out = dict(weights)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        for fused, parts in (("attention.wqkv", ("wq", "wk", "wv")), ("feed_forward.w13", ("w1", "w3"))):
            names = [f"{p}{fused.split('.')[0]}.{n}.weight" for n in parts]
            stacked = torch.cat([out.pop(n) for n in names])
            out[f"{p}{fused}.weight"] = stacked
            out.update(zip(names, stacked.split([weights[n].shape[0] for n in names]), strict=True))
    return out


# ---------------------------------------------------------------- its kernels
def grouped_query_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 start_pos: int = 0) -> torch.Tensor:
    """grouped_query_attention through torch's fused kernel, without materialising repeated k/v or the scores.

    q: (seq, h, d); k, v: (kv_len, kv, d) -> (seq, h, d). The batch dimension matters: torch's CPU flash kernel
    takes 4-d inputs only (3-d falls back to the math path, 2-7x slower), and `is_causal` spares it the mask
    when queries and keys start together.
    """
    q_len, kv_len = q.shape[0], k.shape[0]
    mask = None if q_len in (1, kv_len) else causal_mask(q_len, kv_len, start_pos, q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, is_causal=q_len == kv_len > 1,
                                         enable_gqa=q.shape[1] != k.shape[1])  # (1, h, seq, d)
    return out[0].transpose(0, 1)


def qkv_rope(x: torch.Tensor, wqkv: torch.Tensor, n_heads: int, n_kv: int,
             freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from one matmul with wq, wk, wv stacked; RoPE on q and k in one call.

    x: (seq, dim); wqkv: ((h + 2 kv) * d, dim) -> q (seq, h, d), k and v (seq, kv, d).
    """
    seq = x.shape[0]
    qkv = matmul_t(x, wqkv).view(seq, n_heads + 2 * n_kv, -1)  # (seq, h + 2 kv, d)
    qk = apply_rope(qkv[:, :n_heads + n_kv], freqs_cis)  # (seq, h + kv, d)
    return qk[:, :n_heads], qk[:, n_heads:], qkv[:, n_heads + n_kv:]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(silu(x @ w1.T) * (x @ w3.T)) @ w2.T. x: (seq, dim) -> (seq, dim)."""
    gate, up = swiglu_parts(x, w1, w3)
    return matmul_t(gate.mul_(up), w2)  # in place: one (seq, hidden) temporary fewer


def swiglu_fused(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """swiglu with w1 and w3 stacked as one (2 * hidden, dim) matrix: one matmul for the gate and the up."""
    gate, up = matmul_t(x, w13).chunk(2, dim=-1)  # (seq, hidden) each
    return matmul_t(F.silu(gate, inplace=True).mul_(up), w2)


# ---------------------------------------------------------------- its engines, chosen once per call
def qkv_rope_stacked(x: torch.Tensor, w: Weights, i: int, config: ModelConfig,
                     freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer i's q, k (after RoPE) and v from the stacked wq|wk|wv (fuse_weights). x: (seq, dim)."""
    return qkv_rope(x, w[f"layers.{i}.attention.wqkv.weight"], config.n_heads, config.n_kv_heads, freqs_cis)


def qkv_rope_separate(x: torch.Tensor, w: Weights, i: int, config: ModelConfig,
                      freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer i's q, k (after RoPE) and v from wq, wk, wv: one matmul each. x: (seq, dim)."""
    p = f"layers.{i}.attention."
    seq, d = x.shape[0], config.head_dim
    q = (x @ w[p + "wq.weight"].T).view(seq, config.n_heads, d)  # (seq, h, d)
    k = (x @ w[p + "wk.weight"].T).view(seq, config.n_kv_heads, d)  # (seq, kv, d)
    v = (x @ w[p + "wv.weight"].T).view(seq, config.n_kv_heads, d)  # (seq, kv, d)
    return apply_rope(q, freqs_cis), apply_rope(k, freqs_cis), v


def feed_forward_stacked(x: torch.Tensor, w: Weights, i: int) -> torch.Tensor:
    """Layer i's FFN from the stacked w1|w3 (fuse_weights). x: (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}.feed_forward."
    return swiglu_fused(x, w[p + "w13.weight"], w[p + "w2.weight"])


def feed_forward_separate(x: torch.Tensor, w: Weights, i: int) -> torch.Tensor:
    """Layer i's FFN from w1, w3, w2. x: (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}.feed_forward."
    return swiglu(x, w[p + "w1.weight"], w[p + "w3.weight"], w[p + "w2.weight"])


@dataclass(frozen=True)
class Engines:
    """How the fast forward computes the parts that have more than one way: chosen once at the top of a call."""

    qkv_rope: Callable[[torch.Tensor, Weights, int, ModelConfig, torch.Tensor],
                       tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (x, w, i, config, freqs_cis) -> q, k, v
    feed_forward: Callable[[torch.Tensor, Weights, int], torch.Tensor]  # (x, w, i) -> (seq, dim)


STACKED = Engines(qkv_rope_stacked, feed_forward_stacked)
SEPARATE = Engines(qkv_rope_separate, feed_forward_separate)


def choose_engines(weights: Weights) -> Engines:
    """Stacked matrices where fuse_weights made them (one matmul for q|k|v, one for w1|w3), else one per matrix."""
    return STACKED if "layers.0.attention.wqkv.weight" in weights else SEPARATE


# ---------------------------------------------------------------- the forward
def attention_fast(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                   start_pos: int, cache: KVCache | None, engines: Engines) -> torch.Tensor:
    """`attention` through the chosen engines and SDPA, nothing reported. x: (seq, dim) -> (seq, dim)."""
    q, k, v = engines.qkv_rope(x, w, i, config, freqs_cis)  # (seq, h, d), (seq, kv, d), (seq, kv, d)
    if cache is not None:
        k, v = cache.update(i, start_pos, k, v)  # (kv_len, kv, d)
    heads = grouped_query_attention_sdpa(q, k, v, start_pos)  # (seq, h, d)
    return matmul_t(heads.reshape(x.shape[0], -1), w[f"layers.{i}.attention.wo.weight"])


def transformer_block_fast(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                           start_pos: int, cache: KVCache | None, engines: Engines) -> torch.Tensor:
    """`transformer_block` through the chosen engines, nothing reported. (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}."
    xn = rms_norm(x, w[p + "attention_norm.weight"], config.norm_eps)
    h = x + attention_fast(xn, w, i, config, freqs_cis, start_pos, cache, engines)
    return h + engines.feed_forward(rms_norm(h, w[p + "ffn_norm.weight"], config.norm_eps), w, i)


@torch.inference_mode()
def forward_fast(tokens: torch.Tensor, weights: Weights, config: ModelConfig, start_pos: int = 0,
                 cache: KVCache | None = None, all_logits: bool = True) -> torch.Tensor:
    """`forward` without a trace, through fused kernels: what generation and the benchmarks run.

    Same arguments and result as `forward`. Takes plain weights or `fuse_weights`' stacked ones.
    """
    engines = choose_engines(weights)  # the one choice of this call, not re-made per layer
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)  # (seq,)
    check_prompt(tokens, context_length(config, cache), start_pos=start_pos)
    x = weights["tok_embeddings.weight"][tokens]  # (seq, dim)
    freqs_cis = precompute_freqs_cis(config, tokens.shape[0], start_pos)  # (seq, d/2)
    for i in range(config.n_layers):
        x = transformer_block_fast(x, weights, i, config, freqs_cis, start_pos, cache, engines)
    x = rms_norm(x, weights["norm.weight"], config.norm_eps)
    out_w = output_weight(weights)  # (vocab, dim)
    return x @ out_w.T if all_logits else x[-1] @ out_w.T
