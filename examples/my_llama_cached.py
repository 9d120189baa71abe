"""A from-scratch Llama 3 with a KV cache, in the decode protocol of `python -m golden check` (README, "Checking
decoding"): examples/my_llama.py's forward plus `start_pos` and a cache it owns, and Llama 3.1's rope scaling.

    logits, cache = forward(prompt, w, cfg, trace)                                 # prefill: start_pos 0, no cache
    logits, cache = forward(next_token, w, cfg, trace, start_pos=len(prompt), cache=cache)   # one call per token
"""

import math

import torch
from torch.nn.functional import silu


def rope_frequencies(cfg):
    """theta^(-2i/d), with Llama 3.1's scaling where the config has it (slow frequencies / factor, a blend between)."""
    d = cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)
    s = cfg.rope_scaling
    if s is None:
        return freqs
    wavelen, context = 2 * math.pi / freqs, s.original_max_position_embeddings
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * freqs / s.factor + smooth * freqs
    kept = torch.where(wavelen < context / s.high_freq_factor, freqs, blended)
    return torch.where(wavelen > context / s.low_freq_factor, freqs / s.factor, kept)


def forward(tokens, w, cfg, trace, start_pos=0, cache=None):
    seq, d, rep = len(tokens), cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    cache = cache or {"k": [None] * cfg.n_layers, "v": [None] * cfg.n_layers}  # per layer: (positions, kv, d)

    def put(name, x):  # report a stage, pass it on
        trace(name, x)
        return x

    def norm(x, g):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).type_as(x) * g

    positions = torch.arange(start_pos, start_pos + seq).float()  # the new tokens' places in the sequence
    cis = torch.polar(torch.ones(seq, d // 2), torch.outer(positions, rope_frequencies(cfg)))

    def rope(x):  # (seq, heads, d): rotate interleaved pairs as complex numbers
        return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * cis[:, None]).flatten(-2)

    trace("tokens", tokens)
    trace("rope_cos", cis.real)
    trace("rope_sin", cis.imag)
    x = put("embeddings", w["tok_embeddings.weight"][tokens])
    mask = torch.full((seq, start_pos + seq), float("-inf")).triu(start_pos + 1)  # query i sees keys <= start_pos + i
    for i in range(cfg.n_layers):
        W = {k.removeprefix(f"layers.{i}."): v for k, v in w.items() if k.startswith(f"layers.{i}.")}
        L = f"layers.{i}."
        h = put(L + "attn_norm", norm(put(L + "residual_in", x), W["attention_norm.weight"]))
        q = put(L + "q", (h @ W["attention.wq.weight"].T).unflatten(-1, (cfg.n_heads, d)))
        k = put(L + "k", (h @ W["attention.wk.weight"].T).unflatten(-1, (cfg.n_kv_heads, d)))
        v = put(L + "v", (h @ W["attention.wv.weight"].T).unflatten(-1, (cfg.n_kv_heads, d)))
        q, k = put(L + "q_rope", rope(q).type_as(x)), put(L + "k_rope", rope(k).type_as(x))
        if cache["k"][i] is not None:  # the keys (after RoPE) and values of every earlier position
            k, v = torch.cat([cache["k"][i], k]), torch.cat([cache["v"][i], v])
        cache["k"][i], cache["v"][i] = k, v
        scores = put(L + "scores", torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(rep, 1)) / d**0.5 + mask)
        probs = put(L + "probs", scores.float().softmax(-1).type_as(x))
        heads = put(L + "attn_heads", torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(rep, 1)))
        x = put(L + "residual_attn", x + put(L + "attn_out", heads.flatten(1) @ W["attention.wo.weight"].T))
        h = put(L + "ffn_norm", norm(x, W["ffn_norm.weight"]))
        gate = put(L + "ffn_gate", silu(h @ W["feed_forward.w1.weight"].T))
        ffn = put(L + "ffn_hidden", gate * put(L + "ffn_up", h @ W["feed_forward.w3.weight"].T))
        x = put(L + "out", x + put(L + "ffn_out", ffn @ W["feed_forward.w2.weight"].T))
    x = put("norm", norm(x, w["norm.weight"]))
    logits = put("logits", x[-1] @ w.get("output.weight", w["tok_embeddings.weight"]).T)
    trace("logprobs_last", logits.float().log_softmax(-1))
    return logits, cache
