"""A from-scratch Llama 3 in the trace protocol. Check it with
`python -m golden check --impl examples.my_llama:forward` or `pytest --impl examples.my_llama:forward`."""
import torch
from torch.nn.functional import silu


def forward(tokens, w, cfg, trace):
    seq, d, rep = len(tokens), cfg.head_dim, cfg.n_heads // cfg.n_kv_heads

    def norm(x, g):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).type_as(x) * g

    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)  # this sketch ignores rope scaling
    cis = torch.polar(torch.ones(seq, d // 2), torch.outer(torch.arange(seq).float(), freqs))

    def rope(x):  # (seq, heads, d): rotate interleaved pairs as complex numbers
        return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * cis[:, None]).flatten(-2)

    x = w["tok_embeddings.weight"][tokens]
    trace("embeddings", x)
    for i in range(cfg.n_layers):
        W = {k.removeprefix(f"layers.{i}."): v for k, v in w.items() if k.startswith(f"layers.{i}.")}
        h = norm(x, W["attention_norm.weight"])
        q = rope((h @ W["attention.wq.weight"].T).unflatten(-1, (cfg.n_heads, d))).type_as(x)
        k = rope((h @ W["attention.wk.weight"].T).unflatten(-1, (cfg.n_kv_heads, d))).type_as(x)
        v = (h @ W["attention.wv.weight"].T).unflatten(-1, (cfg.n_kv_heads, d))
        trace(f"layers.{i}.q_rope", q)
        scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(rep, 1)) / d**0.5
        probs = (scores + torch.full((seq, seq), float("-inf")).triu(1)).float().softmax(-1).type_as(x)
        trace(f"layers.{i}.probs", probs)
        x = x + torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(rep, 1)).flatten(1) @ W["attention.wo.weight"].T
        h = norm(x, W["ffn_norm.weight"])
        ffn = silu(h @ W["feed_forward.w1.weight"].T) * (h @ W["feed_forward.w3.weight"].T)
        x = x + ffn @ W["feed_forward.w2.weight"].T
        trace(f"layers.{i}.out", x)
    x = norm(x, w["norm.weight"])
    trace("norm", x)
    trace("logits", x[-1] @ w.get("output.weight", w["tok_embeddings.weight"]).T)
