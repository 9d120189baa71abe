"""Greedy generation with a KV cache: prefill -> decode_one_token -> decode_n_tokens -> generate.

The ladder follows gpt-fast's generate.py, on impl.model's fast forward. Greedy only: the point is to
be comparable, token for token, with transformers' greedy output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from impl.config import ModelConfig
from impl.errors import check_prompt
from impl.layout import Weights
from impl.model import KVCache, forward_fast


def prefill(tokens: torch.Tensor, weights: Weights, config: ModelConfig, cache: KVCache) -> int:
    """Run the whole prompt once, filling the cache; returns the greedy next token."""
    logits = forward_fast(tokens, weights, config, cache=cache, all_logits=False)  # (vocab,)
    return int(logits.argmax())


def decode_one_token(token: int, pos: int, weights: Weights, config: ModelConfig, cache: KVCache) -> int:
    """Feed one token at position `pos` against the cache; returns the greedy next token."""
    logits = forward_fast(torch.tensor([token]), weights, config, start_pos=pos, cache=cache, all_logits=False)
    return int(logits.argmax())


def decode_n_tokens(first: int, start_pos: int, n: int, weights: Weights, config: ModelConfig, cache: KVCache,
                    stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield `first` and up to n-1 more greedy tokens, stopping after a stop token."""
    stop = frozenset(stop_ids)
    token, pos = first, start_pos
    for i in range(n):
        yield token
        if token in stop or i == n - 1:
            return
        token = decode_one_token(token, pos, weights, config, cache)
        pos += 1


def generate(prompt_ids: list[int], weights: Weights, config: ModelConfig, max_new_tokens: int = 32,
             stop_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None) -> list[int]:
    """Greedy continuation of prompt_ids: at most max_new_tokens ids, ending at the first stop id."""
    check_prompt(prompt_ids, config.max_seq_len, new_tokens=1)  # room for at least the first new token
    if max_new_tokens < 1:
        return []
    total = min(len(prompt_ids) + max_new_tokens, config.max_seq_len)
    dtype = weights["tok_embeddings.weight"].dtype
    cache = KVCache.empty(config, total, dtype)
    first = prefill(torch.tensor(prompt_ids), weights, config, cache)
    out = []
    for token in decode_n_tokens(first, len(prompt_ids), total - len(prompt_ids), weights, config, cache, stop_ids):
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out
