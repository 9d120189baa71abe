"""The Llama 3 forward pass, from scratch: small pure functions named for the math, in two forwards.

Follows Meta's reference `llama/model.py` and the "LLaMA 3 from scratch" walk-through
(complex-number RoPE, grouped-query attention, SwiGLU), vectorised over heads, with every size
read from the config. Tensors have no batch dimension: one prompt of `seq` tokens.

- `forward` is the reference: it reads top to bottom like Meta's `Transformer.forward`
  (`transformer_block` -> `attention`, `feed_forward`) and reports every intermediate to
  `trace(key, tensor)` under the stage names of `impl.stages`. It is what the goldens check, stage
  by stage. The trace only observes: with none, the same computation runs unobserved.
- `forward_fast` is what `impl.generate` and the benchmarks run: the same math with no trace, through
  fused kernels (SDPA; stacked q|k|v and w1|w3 matrices from `fuse_weights`, packed ones from
  `prepare_for_generation`). Its GEMM engine is the one measured fastest on the running machine for the
  weights' dtype and the call's row count (impl.engines), chosen once per call (`choose_engines`). The
  goldens check it at the logits and the KV cache (tests/test_model_fastpath.py).

Seams. The reference forward calls these functions through this module's globals, never through a
local alias, so tests swap one with monkeypatch and copy no model code: tests/test_mutations.py puts
a known bug in (and expects the goldens to name its first stage), tests/alternatives.py a correct
variant (and expects no false alarm).

    rope_frequencies, scale_rope_frequencies, precompute_freqs_cis, apply_rope   RoPE
    rms_norm                                                                       every norm
    causal_mask, kv_head_of, attention_scores, attention_probs                    attention
    cache_keys_values                                                              the KV cache (decode)
    swiglu_parts                                                                   the FFN's gate and up
    residual                                                                       both skip connections
    output_weight                                                                  the unembedding (tied or not)

A new seam is a function of the reference forward that a test needs to swap: add it to this list.
The fast forward shares some of this math (norms, RoPE, output_weight), so a patch reaches it too;
no test relies on that.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from impl import engines as gemm
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

    @classmethod
    def with_room(cls, cache: KVCache | None, config: ModelConfig, length: int, dtype: torch.dtype) -> KVCache:
        """`cache` if it holds `length` positions, else a cache twice as long (within the model's context) holding
        its contents: a cache for a caller that does not know how many tokens will come (the decode protocol)."""
        if cache is not None and cache.max_seq_len >= length:
            return cache
        grown = cls.empty(config, min(max(2 * length, 32), config.max_seq_len), dtype)  # forward refuses beyond it
        if cache is not None:
            grown.k[:, :, :cache.max_seq_len] = cache.k
            grown.v[:, :, :cache.max_seq_len] = cache.v
        return grown


def cache_keys_values(cache: KVCache, i: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's new keys (after RoPE) and values (seq, kv, d) into the cache at start_pos; every key and value of
    positions [0, start_pos + seq), (kv_len, kv, d). A function of its own so that it is a seam (the cache bugs
    of tests/test_decode_mutations.py)."""
    return cache.update(i, start_pos, k, v)


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
    keys, values = (xk, xv) if cache is None else cache_keys_values(cache, i, start_pos, xk, xv)  # (kv_len, kv, d)
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
def matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T through the engine measured fastest on this machine for x's dtype and row count (impl.engines).

    x: (seq, in); w: (out, in) plain -> (seq, out) in x's dtype. The fast forward picks its engine once per call
    (`choose_engines`); this is the same choice for a single product.
    """
    return gemm.engine_for(_DTYPE_NAMES[x.dtype], x.shape[0]).matmul(x, w)


_DTYPE_NAMES = {v: k for k, v in gemm.DTYPES.items()}


# ---------------------------------------------------------------- its weights: stacked once, after loading
FUSED = (("attention.wqkv", ("wq", "wk", "wv")), ("feed_forward.w13", ("w1", "w3")))
PACKABLE = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")  # what packed weights replace


def _fuse_layer(src: dict[str, torch.Tensor], out: dict[str, torch.Tensor], i: int) -> None:
    p = f"layers.{i}."
    for fused, parts in FUSED:
        names = [f"{p}{fused.split('.')[0]}.{n}.weight" for n in parts]
        sizes = [src[n].shape[0] for n in names]
        stacked = torch.cat([out.pop(n) for n in names])
        out[f"{p}{fused}.weight"] = stacked
        out.update(zip(names, stacked.split(sizes), strict=True))


def fuse_weights(weights: Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The same weights plus wq|wk|wv and w1|w3 stacked (`attention.wqkv`, `feed_forward.w13`) for the fast path.

    The separate matrices become row views of the stacked ones, so the reference forward reads the same numbers
    and no weight is held twice once the caller lets the original dict go. Done once, after loading.
    """
    out = dict(weights)
    for i in range(config.n_layers):
        _fuse_layer(weights, out, i)
    return out


def prepare_for_generation(weights: dict[str, torch.Tensor], config: ModelConfig,
                           layout: str | None = None) -> dict[str, torch.Tensor]:
    """The weights as a process that only generates holds them: fused, and packed where that is faster here.

    Consumes `weights` layer by layer (the dict is emptied), so at most one layer's matrices exist twice while it
    runs: 8B bf16 stays within its 17 GB. layout: impl.engines.PLAIN or PACKED; None = what the engine table says
    for the weights' dtype. Packed weights replace the plain ones (an opaque oneDNN layout): the reference forward
    and the golden checks cannot read them, only `forward_fast`.
    """
    dtype = _DTYPE_NAMES[weights["layers.0.attention.wo.weight"].dtype]
    layout = layout or gemm.layout_for_generation(dtype)
    out: dict[str, torch.Tensor] = {}
    for name in [n for n in weights if not n.startswith("layers.")]:
        out[name] = weights.pop(name)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        for name in [n for n in weights if n.startswith(p)]:
            out[name] = weights.pop(name)
        _fuse_layer(dict(out), out, i)
        if layout == gemm.PACKED:
            for name in PACKABLE:
                out[f"{p}{name}.weight"] = gemm.pack_onednn(out[f"{p}{name}.weight"])
            for _, parts in FUSED:  # the row views would keep the plain stacked matrices alive
                for part in parts:
                    out.pop(next(n for n in out if n.startswith(p) and n.endswith(f".{part}.weight")))
    return out


def weights_layout(weights: Weights) -> str:
    """PACKED when prepare_for_generation packed them, else PLAIN."""
    w = weights.get("layers.0.attention.wqkv.weight")
    return gemm.PACKED if w is not None and w.is_mkldnn else gemm.PLAIN


# ---------------------------------------------------------------- its kernels
MatMul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (seq, in), w) -> x @ w.T (seq, out)


def grouped_query_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 start_pos: int = 0) -> torch.Tensor:
    """grouped_query_attention through torch's fused kernel, without materialising repeated k/v or the scores.

    q: (seq, h, d); k, v: (kv_len, kv, d) -> (seq, h, d) in q's dtype. The batch dimension matters: torch's CPU
    flash kernel takes 4-d inputs only (3-d falls back to the math path, 2-7x slower), and `is_causal` spares it
    the mask when queries and keys start together. bf16 inputs run the kernel in fp32 (q, k, v converted, the
    result rounded once): torch's bf16 kernel rounds its blocks' partial results to bf16 and moved SmolLM2's
    logits past the goldens' KL bound (3.0e-3 against 2.2e-3), where fp32 attention measures 1.2e-3 as the
    reference does. The conversion reads the cached keys once more, a small fraction of a layer's weights.
    """
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    q_len, kv_len = q.shape[0], k.shape[0]
    mask = None if q_len in (1, kv_len) else causal_mask(q_len, kv_len, start_pos, q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, is_causal=q_len == kv_len > 1,
                                         enable_gqa=q.shape[1] != k.shape[1])  # (1, h, seq, d)
    return out[0].transpose(0, 1).to(dtype)


def grouped_query_attention_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int = 0,
                                   block: int | None = None) -> torch.Tensor:
    """grouped_query_attention as transformers' eager attention computes it, in the inputs' dtype: q.k and p@v as
    batched products (bf16 ones accumulate in fp32), the softmax in fp32 and its probabilities rounded to q's dtype
    once. The query heads of one kv head are stacked as rows, so k and v are never repeated.

    block: queries in blocks of this many rows, each against only the keys it may see (start_pos + its last row):
    the causal mask's upper blocks are never computed (at 512 tokens in blocks of 128, 10 of 16 score blocks) and
    a block's scores stay in the caches. Each row's softmax is the same; only masked keys (probability 0) drop out.

    q: (seq, h, d); k, v: (kv_len, kv, d) -> (seq, h, d). Holds (h, block, kv_len) fp32 scores: the fast forward
    uses it only where they fit ATTENTION_MATMUL_BYTES and it was measured faster than SDPA (impl.engines).
    """
    seq = q.shape[0]
    if block is not None and seq > block:
        return torch.cat([grouped_query_attention_matmul(q[s:s + block], k[:start_pos + min(s + block, seq)],
                                                         v[:start_pos + min(s + block, seq)], start_pos + s)
                          for s in range(0, seq, block)])  # each block against the keys up to its own last row
    h, d = q.shape[1:]
    n_kv = k.shape[1]
    qg = q.transpose(0, 1).reshape(n_kv, h // n_kv * seq, d)  # consecutive heads share a kv head: (kv, g*seq, d)
    scores = torch.matmul(qg, k.permute(1, 2, 0)).mul_(d ** -0.5)  # (kv, g*seq, kv_len)
    scores = scores.view(n_kv, h // n_kv, seq, -1)
    if k.shape[0] > start_pos + seq:  # keys past the last query's position (a cache read whole): the whole mask
        scores = scores + causal_mask(seq, k.shape[0], start_pos, scores.dtype)
    elif seq > 1:  # only the last seq keys can be a query's future: that (seq, seq) block is all the mask there is
        scores[..., start_pos:].add_(torch.full((seq, seq), float("-inf"), dtype=scores.dtype).triu_(1))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(n_kv, -1, k.shape[0])
    return torch.matmul(probs, v.transpose(0, 1)).view(h, seq, d).transpose(0, 1)  # (seq, h, d)


ATTENTION_MATMUL_BYTES = 256 << 20  # the largest fp32 score block grouped_query_attention_matmul may hold
# The matmul core's query blocks, each a core of its own: which is fastest depends on the machine's caches and
# heads (measured here: blocks of 64 for Llama-3-8B's fp32 heads at 512 tokens, of 128 for bf16)
ATTENTION_QUERY_BLOCKS = {"matmul-64": 64, "matmul-128": 128}
ATTENTION_CORES = {"sdpa": grouped_query_attention_sdpa,
                   **{name: functools.partial(grouped_query_attention_matmul, block=block)
                      for name, block in ATTENTION_QUERY_BLOCKS.items()}}


def attention_core(name: str, n_heads: int, q_len: int, kv_len: int) -> Callable[..., torch.Tensor]:
    """The chosen core, or SDPA where a matmul core's score block would not fit ATTENTION_MATMUL_BYTES (memory
    wins)."""
    block = ATTENTION_QUERY_BLOCKS.get(name)
    if block is not None and 4 * n_heads * min(block, q_len) * kv_len > ATTENTION_MATMUL_BYTES:
        return grouped_query_attention_sdpa
    return ATTENTION_CORES[name]


def qkv_rope(x: torch.Tensor, wqkv: torch.Tensor, n_heads: int, n_kv: int, freqs_cis: torch.Tensor,
             mm: MatMul = matmul_t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from one matmul with wq, wk, wv stacked; RoPE on q and k in one call.

    x: (seq, dim); wqkv: ((h + 2 kv) * d, dim) -> q (seq, h, d), k and v (seq, kv, d).
    """
    seq = x.shape[0]
    qkv = mm(x, wqkv).view(seq, n_heads + 2 * n_kv, -1)  # (seq, h + 2 kv, d)
    qk = apply_rope(qkv[:, :n_heads + n_kv], freqs_cis)  # (seq, h + kv, d)
    return qk[:, :n_heads], qk[:, n_heads:], qkv[:, n_heads + n_kv:]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
           mm: MatMul = matmul_t) -> torch.Tensor:
    """(silu(x @ w1.T) * (x @ w3.T)) @ w2.T. x: (seq, dim) -> (seq, dim)."""
    gate = F.silu(mm(x, w1), inplace=True)
    return mm(gate.mul_(mm(x, w3)), w2)  # in place: one (seq, hidden) temporary fewer


def swiglu_fused(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, mm: MatMul = matmul_t) -> torch.Tensor:
    """swiglu with w1 and w3 stacked as one (2 * hidden, dim) matrix: one matmul for the gate and the up."""
    gate, up = mm(x, w13).chunk(2, dim=-1)  # (seq, hidden) each
    return mm(F.silu(gate, inplace=True).mul_(up), w2)


# ---------------------------------------------------------------- its engines, chosen once per call
def qkv_rope_stacked(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                     mm: MatMul) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer i's q, k (after RoPE) and v from the stacked wq|wk|wv (fuse_weights). x: (seq, dim)."""
    return qkv_rope(x, w[f"layers.{i}.attention.wqkv.weight"], config.n_heads, config.n_kv_heads, freqs_cis, mm)


def qkv_rope_separate(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                      mm: MatMul) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer i's q, k (after RoPE) and v from wq, wk, wv: one matmul each. x: (seq, dim)."""
    p = f"layers.{i}.attention."
    seq, d = x.shape[0], config.head_dim
    q = mm(x, w[p + "wq.weight"]).view(seq, config.n_heads, d)  # (seq, h, d)
    k = mm(x, w[p + "wk.weight"]).view(seq, config.n_kv_heads, d)  # (seq, kv, d)
    v = mm(x, w[p + "wv.weight"]).view(seq, config.n_kv_heads, d)  # (seq, kv, d)
    return apply_rope(q, freqs_cis), apply_rope(k, freqs_cis), v


def feed_forward_stacked(x: torch.Tensor, w: Weights, i: int, mm: MatMul) -> torch.Tensor:
    """Layer i's FFN from the stacked w1|w3 (fuse_weights). x: (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}.feed_forward."
    return swiglu_fused(x, w[p + "w13.weight"], w[p + "w2.weight"], mm)


def feed_forward_separate(x: torch.Tensor, w: Weights, i: int, mm: MatMul) -> torch.Tensor:
    """Layer i's FFN from w1, w3, w2. x: (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}.feed_forward."
    return swiglu(x, w[p + "w1.weight"], w[p + "w3.weight"], w[p + "w2.weight"], mm)


@dataclass(frozen=True)
class Engines:
    """How the fast forward computes the parts that have more than one way: chosen once at the top of a call."""

    qkv_rope: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (x, w, i, config, freqs_cis, mm)
    feed_forward: Callable[..., torch.Tensor]  # (x, w, i, mm) -> (seq, dim)
    matmul: MatMul  # the layers' projections, in the weights' layout
    engine: str  # impl.engines' name of `matmul`'s engine
    attention: str = "sdpa"  # the attention core's name in ATTENTION_CORES (impl.engines.core_for)


def choose_engines(weights: Weights, config: ModelConfig, rows: int = 1) -> Engines:
    """Stacked matrices where fuse_weights made them, else one per matrix; the GEMM engine measured fastest here
    for the weights' dtype, layout and `rows` (impl.engines: decode, short or long prompt), and the attention core
    measured fastest for those rows on the config's heads."""
    dtype = _DTYPE_NAMES[weights["layers.0.attention.wo.weight"].dtype]  # a matrix every layout has
    engine = gemm.engine_for(dtype, rows, weights_layout(weights))
    core = gemm.core_for(dtype, rows, (config.n_heads, config.n_kv_heads, config.head_dim))
    if "layers.0.attention.wqkv.weight" in weights:
        return Engines(qkv_rope_stacked, feed_forward_stacked, engine.matmul, engine.name, core)
    return Engines(qkv_rope_separate, feed_forward_separate, engine.matmul, engine.name, core)


# ---------------------------------------------------------------- the forward
def attention_fast(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                   start_pos: int, cache: KVCache | None, engines: Engines) -> torch.Tensor:
    """`attention` through the chosen engines and SDPA, nothing reported. x: (seq, dim) -> (seq, dim)."""
    q, k, v = engines.qkv_rope(x, w, i, config, freqs_cis, engines.matmul)  # (seq, h, d), (seq, kv, d) x 2
    if cache is not None:
        k, v = cache.update(i, start_pos, k, v)  # (kv_len, kv, d)
    attend = attention_core(engines.attention, q.shape[1], q.shape[0], k.shape[0])
    heads = attend(q, k, v, start_pos)  # (seq, h, d)
    return engines.matmul(heads.reshape(x.shape[0], -1), w[f"layers.{i}.attention.wo.weight"])


def transformer_block_fast(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                           start_pos: int, cache: KVCache | None, engines: Engines) -> torch.Tensor:
    """`transformer_block` through the chosen engines, nothing reported. (seq, dim) -> (seq, dim)."""
    p = f"layers.{i}."
    xn = rms_norm(x, w[p + "attention_norm.weight"], config.norm_eps)
    h = attention_fast(xn, w, i, config, freqs_cis, start_pos, cache, engines).add_(x)  # x + attention: the
    # projection's fresh output takes the sum, one (seq, dim) temporary fewer (and the FFN's below)
    return engines.feed_forward(rms_norm(h, w[p + "ffn_norm.weight"], config.norm_eps), w, i, engines.matmul).add_(h)


@torch.inference_mode()
def forward_fast(tokens: torch.Tensor, weights: Weights, config: ModelConfig, start_pos: int = 0,
                 cache: KVCache | None = None, all_logits: bool = True) -> torch.Tensor:
    """`forward` without a trace, through fused kernels: what generation and the benchmarks run.

    Same arguments and result as `forward`. Takes plain weights, `fuse_weights`' stacked ones or
    `prepare_for_generation`'s (possibly packed) ones.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)  # (seq,)
    engines = choose_engines(weights, config, tokens.shape[0])  # the one choice of this call, not re-made per layer
    check_prompt(tokens, context_length(config, cache), start_pos=start_pos)
    x = weights["tok_embeddings.weight"][tokens]  # (seq, dim)
    freqs_cis = precompute_freqs_cis(config, tokens.shape[0], start_pos)  # (seq, d/2)
    for i in range(config.n_layers):
        x = transformer_block_fast(x, weights, i, config, freqs_cis, start_pos, cache, engines)
    x = rms_norm(x, weights["norm.weight"], config.norm_eps)
    out_w = output_weight(weights)  # (vocab, dim): plain in every layout (the embedding reads it too when tied)
    return matmul_t(x, out_w) if all_logits else matmul_t(x[-1:], out_w)[0]
