"""The "LLaMA 3 from scratch" walk-through's layer, copied recipe for recipe: the baseline a learner starts from.

Per query head it multiplies by that head's slice of wq, wk and wv (so each kv head's projection is redone
for every query head of its group, as in the walk-through), splits q and k into pairs, rotates them as
complex numbers, takes qk / sqrt(head_dim) with a triu mask, softmax, @ v; then it concatenates the heads and
multiplies by wo. The FFN is silu(x @ w1.T) * (x @ w3.T) @ w2.T. Sizes come from the config instead of the
walk-through's literals (`head // 4`, `(128) ** 0.5`), and the softmax is cast to the weights' dtype (the
walk-through writes `.to(torch.bfloat16)` because its weights are bf16).

Two additions the walk-through does not need, marked below: a key/value cache for the decode step (it only
runs the 17-token prompt), and the mask's offset for queries that start after the cached positions.
"""

from __future__ import annotations

import torch

from impl.config import ModelConfig


def attention(x: torch.Tensor, layer: dict[str, torch.Tensor], config: ModelConfig, freqs_cis: torch.Tensor,
              past_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: (seq, dim), normed. freqs_cis: (seq, d/2) for the new positions. past_kv: rotated keys and values of
    the cached positions, (kv_heads, past, d) each, or None for a prompt. Returns (seq, dim), before the residual."""
    n_heads, n_kv_heads, dim = config.n_heads, config.n_kv_heads, config.dim
    q_layer = layer["attention.wq.weight"]
    q_layer = q_layer.view(n_heads, q_layer.shape[0] // n_heads, dim)
    k_layer = layer["attention.wk.weight"]
    k_layer = k_layer.view(n_kv_heads, k_layer.shape[0] // n_kv_heads, dim)
    v_layer = layer["attention.wv.weight"]
    v_layer = v_layer.view(n_kv_heads, v_layer.shape[0] // n_kv_heads, dim)
    w_layer = layer["attention.wo.weight"]
    qkv_attention_store = []
    for head in range(n_heads):
        q_layer_head = q_layer[head]
        k_layer_head = k_layer[head // config.n_rep]
        v_layer_head = v_layer[head // config.n_rep]
        q_per_token = torch.matmul(x, q_layer_head.T)
        k_per_token = torch.matmul(x, k_layer_head.T)
        v_per_token = torch.matmul(x, v_layer_head.T)
        q_per_token_split_into_pairs = q_per_token.float().view(q_per_token.shape[0], -1, 2)
        q_per_token_as_complex_numbers = torch.view_as_complex(q_per_token_split_into_pairs)
        q_per_token_split_into_pairs_rotated = torch.view_as_real(q_per_token_as_complex_numbers * freqs_cis)
        q_per_token_rotated = q_per_token_split_into_pairs_rotated.view(q_per_token.shape)
        k_per_token_split_into_pairs = k_per_token.float().view(k_per_token.shape[0], -1, 2)
        k_per_token_as_complex_numbers = torch.view_as_complex(k_per_token_split_into_pairs)
        k_per_token_split_into_pairs_rotated = torch.view_as_real(k_per_token_as_complex_numbers * freqs_cis)
        k_per_token_rotated = k_per_token_split_into_pairs_rotated.view(k_per_token.shape)
        if past_kv is not None:  # addition: the decode step reads the cached positions
            k_per_token_rotated = torch.cat([past_kv[0][head // config.n_rep].float(), k_per_token_rotated])
            v_per_token = torch.cat([past_kv[1][head // config.n_rep], v_per_token])
        qk_per_token = torch.matmul(q_per_token_rotated, k_per_token_rotated.T) / (config.head_dim) ** 0.5
        past = 0 if past_kv is None else past_kv[0].shape[1]
        mask = torch.full((x.shape[0], past + x.shape[0]), float("-inf"))
        mask = torch.triu(mask, diagonal=past + 1)  # addition: past + 1 (the walk-through has 1, with past = 0)
        qk_per_token_after_masking = qk_per_token + mask
        qk_per_token_after_masking_after_softmax = torch.nn.functional.softmax(qk_per_token_after_masking,
                                                                               dim=1).to(v_per_token.dtype)
        qkv_attention = torch.matmul(qk_per_token_after_masking_after_softmax, v_per_token)
        qkv_attention_store.append(qkv_attention)
    stacked_qkv_attention = torch.cat(qkv_attention_store, dim=-1)
    return torch.matmul(stacked_qkv_attention, w_layer.T)


def feed_forward(x: torch.Tensor, layer: dict[str, torch.Tensor]) -> torch.Tensor:
    """x: (seq, dim), normed -> (seq, dim), before the residual."""
    w1 = layer["feed_forward.w1.weight"]
    w2 = layer["feed_forward.w2.weight"]
    w3 = layer["feed_forward.w3.weight"]
    return torch.matmul(torch.functional.F.silu(torch.matmul(x, w1.T)) * torch.matmul(x, w3.T), w2.T)
