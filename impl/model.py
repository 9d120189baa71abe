"""The Llama 3 forward pass, from scratch: small pure functions named for the math.

Follows Meta's reference `llama/model.py` and the "LLaMA 3 from scratch" walk-through
(complex-number RoPE, grouped-query attention, SwiGLU), vectorised over heads, with every size
read from the config. Tensors have no batch dimension: one prompt of `seq` tokens.

`forward(..., trace=fn)` reports every intermediate under the stage names of `impl.stages`;
with a trace the attention is computed explicitly (scores, probs); without one it takes the fast
path (`scaled_dot_product_attention`). Both are tested equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from impl.config import ModelConfig, RopeScaling
from impl.errors import PromptError

Trace = Callable[[str, torch.Tensor], None]
Weights = Mapping[str, torch.Tensor]


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


# ---------------------------------------------------------------- the fast path's matmul
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


# ---------------------------------------------------------------- norms and FFN
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, the normalisation in fp32 (Meta's RMSNorm)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def swiglu_parts(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(x @ w1.T), x @ w3.T): the gate and the up projection. (seq, hidden) each."""
    return F.silu(x @ w1.T), x @ w3.T


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(silu(x @ w1.T) * (x @ w3.T)) @ w2.T. x: (seq, dim) -> (seq, dim)."""
    gate, up = swiglu_parts(x, w1, w3)
    return matmul_t(gate.mul_(up), w2)  # in place: one (seq, hidden) temporary fewer


def swiglu_fused(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """swiglu with w1 and w3 stacked as one (2 * hidden, dim) matrix: one matmul for the gate and the up."""
    gate, up = matmul_t(x, w13).chunk(2, dim=-1)  # (seq, hidden) each
    return matmul_t(F.silu(gate, inplace=True).mul_(up), w2)


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


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int = 0,
                            trace: Trace | None = None, prefix: str = "") -> torch.Tensor:
    """Causal attention with n_heads queries sharing n_kv_heads keys/values.

    q: (seq, h, d); k, v: (kv_len, kv, d) -> (seq, h, d). kv_len = start_pos + seq.
    """
    n_heads, n_kv = q.shape[1], k.shape[1]
    if trace is None:
        # Fast path: the fused kernel, GQA without materialising repeated k/v. The batch dimension matters:
        # torch's CPU flash kernel takes 4-d inputs only (3-d falls back to the math path, 2-7x slower), and
        # `is_causal` spares it the mask when queries and keys start together.
        q_len, kv_len = q.shape[0], k.shape[0]
        mask = None if q_len in (1, kv_len) else causal_mask(q_len, kv_len, start_pos, q.dtype)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask, is_causal=q_len == kv_len > 1,
                                             enable_gqa=n_heads != n_kv)  # (1, h, seq, d)
        return out[0].transpose(0, 1)
    idx = kv_head_of(n_heads, n_kv)
    k_h, v_h = k[:, idx], v[:, idx]  # (kv_len, h, d)
    scores = attention_scores(q, k_h, start_pos)  # (h, seq, kv_len)
    probs = attention_probs(scores)
    out = torch.einsum("hqk,khd->qhd", probs, v_h)  # (seq, h, d)
    trace(prefix + "scores", scores)
    trace(prefix + "probs", probs)
    return out


def qkv_rope(x: torch.Tensor, wqkv: torch.Tensor, n_heads: int, n_kv: int,
             freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from one matmul with wq, wk, wv stacked; RoPE on q and k in one call.

    x: (seq, dim); wqkv: ((h + 2 kv) * d, dim) -> q (seq, h, d), k and v (seq, kv, d).
    """
    seq = x.shape[0]
    qkv = matmul_t(x, wqkv).view(seq, n_heads + 2 * n_kv, -1)  # (seq, h + 2 kv, d)
    qk = apply_rope(qkv[:, :n_heads + n_kv], freqs_cis)  # (seq, h + kv, d)
    return qk[:, :n_heads], qk[:, n_heads:], qkv[:, n_heads + n_kv:]


# ---------------------------------------------------------------- fast-path weights
def fuse_weights(weights: Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The same weights plus wq|wk|wv and w1|w3 stacked (`attention.wqkv`, `feed_forward.w13`) for the fast path.

    The separate matrices become row views of the stacked ones, so the traced path reads the same numbers
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


# ---------------------------------------------------------------- the model
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


def _no_trace(name: str, t: torch.Tensor) -> None:
    pass


def attention_block(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                    start_pos: int, cache: KVCache | None, trace: Trace | None) -> torch.Tensor:
    """Projections, RoPE, GQA and the output projection of layer i. x: (seq, dim) -> (seq, dim)."""
    t = trace or _no_trace
    p = f"layers.{i}."
    seq, h, kv, d = x.shape[0], config.n_heads, config.n_kv_heads, config.head_dim
    if trace is None and p + "attention.wqkv.weight" in w:
        q, k, v = qkv_rope(x, w[p + "attention.wqkv.weight"], h, kv, freqs_cis)
    else:
        q = (x @ w[p + "attention.wq.weight"].T).view(seq, h, d)
        k = (x @ w[p + "attention.wk.weight"].T).view(seq, kv, d)
        v = (x @ w[p + "attention.wv.weight"].T).view(seq, kv, d)
        t(p + "q", q)
        t(p + "k", k)
        t(p + "v", v)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        t(p + "q_rope", q)
        t(p + "k_rope", k)
    if cache is not None:
        k, v = cache.update(i, start_pos, k, v)  # (kv_len, kv, d)
    heads = grouped_query_attention(q, k, v, start_pos, trace, p)  # (seq, h, d)
    t(p + "attn_heads", heads)
    flat = heads.reshape(seq, h * d)
    out = flat @ w[p + "attention.wo.weight"].T if trace else matmul_t(flat, w[p + "attention.wo.weight"])
    t(p + "attn_out", out)
    return out


def transformer_block(x: torch.Tensor, w: Weights, i: int, config: ModelConfig, freqs_cis: torch.Tensor,
                      start_pos: int = 0, cache: KVCache | None = None, trace: Trace | None = None) -> torch.Tensor:
    """One decoder layer: x + attention(norm(x)), then + swiglu(norm(.)). (seq, dim) -> (seq, dim)."""
    t = trace or _no_trace
    p = f"layers.{i}."
    t(p + "residual_in", x)
    xn = rms_norm(x, w[p + "attention_norm.weight"], config.norm_eps)
    t(p + "attn_norm", xn)
    h = x + attention_block(xn, w, i, config, freqs_cis, start_pos, cache, trace)
    t(p + "residual_attn", h)
    hn = rms_norm(h, w[p + "ffn_norm.weight"], config.norm_eps)
    t(p + "ffn_norm", hn)
    if trace is None:
        w13 = w.get(p + "feed_forward.w13.weight")
        w1, w2, w3 = (w[p + f"feed_forward.{n}.weight"] for n in ("w1", "w2", "w3"))
        return h + (swiglu(hn, w1, w3, w2) if w13 is None else swiglu_fused(hn, w13, w2))
    gate, up = swiglu_parts(hn, w[p + "feed_forward.w1.weight"], w[p + "feed_forward.w3.weight"])
    hidden = gate * up
    ffn = hidden @ w[p + "feed_forward.w2.weight"].T
    t(p + "ffn_gate", gate)
    t(p + "ffn_up", up)
    t(p + "ffn_hidden", hidden)
    t(p + "ffn_out", ffn)
    out = h + ffn
    t(p + "out", out)
    return out


def output_weight(w: Weights) -> torch.Tensor:
    """The unembedding: output.weight, or the token embedding when the two are tied."""
    return w["output.weight"] if "output.weight" in w else w["tok_embeddings.weight"]


@torch.inference_mode()
def forward(tokens: torch.Tensor, weights: Weights, config: ModelConfig, trace: Trace | None = None,
            start_pos: int = 0, cache: KVCache | None = None, all_logits: bool = True) -> torch.Tensor:
    """Logits for tokens at positions [start_pos, start_pos + seq).

    tokens: (seq,) int64 -> (seq, vocab), or (vocab,) for the last position when all_logits=False.
    The computation runs in the weights' dtype (fp32 or bf16); norms, RoPE and softmax in fp32.
    """
    t = trace or _no_trace
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    seq = tokens.shape[0]
    if seq == 0:
        raise PromptError("empty prompt: nothing to run")
    limit = cache.max_seq_len if cache is not None else config.max_seq_len
    if start_pos + seq > limit:
        raise PromptError(f"{start_pos + seq} tokens exceed the context of {limit}")
    t("tokens", tokens)
    x = weights["tok_embeddings.weight"][tokens]  # (seq, dim)
    t("embeddings", x)
    freqs_cis = precompute_freqs_cis(config, seq, start_pos)  # (seq, d/2)
    t("rope_cos", freqs_cis.real)
    t("rope_sin", freqs_cis.imag)
    for i in range(config.n_layers):
        x = transformer_block(x, weights, i, config, freqs_cis, start_pos, cache, trace)
    x = rms_norm(x, weights["norm.weight"], config.norm_eps)
    t("norm", x)
    out_w = output_weight(weights)
    if trace is not None:
        last = x[-1] @ out_w.T  # (vocab,)
        t("logits", last)
        t("logprobs_last", F.log_softmax(last.float(), dim=-1))
    return x @ out_w.T if all_logits else x[-1] @ out_w.T
