"""A Llama 3 tokenizer as the walk-through builds it: tiktoken, Meta's tokenizer.model and Meta's split pattern.
Check it with `python -m golden check-tokenizer --impl my_tok:encode` (from examples/) or
`--impl examples/my_tok.py:encode`.

Meta's tokenizer.model is read from $LLAMA3_TOKENIZER_MODEL, else from where `python -m impl fetch llama3-tokenizer`
put it.
"""
import base64
import os

import tiktoken

CACHE = os.environ.get("LLAMA3_GOLDEN_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama3-golden")
PATH = os.environ.get("LLAMA3_TOKENIZER_MODEL") or os.path.join(CACHE, "llama3-tokenizer", "tokenizer.model")
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>", "<|python_tag|>", "<|image|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]

with open(PATH, "rb") as f:  # one "base64(token) rank" per line
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}
enc = tiktoken.Encoding("llama3", pat_str=PAT_STR, mergeable_ranks=ranks,
                        special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIALS)})


def encode(text: str) -> list[int]:
    return enc.encode(text, disallowed_special=())  # no BOS; "<|eot_id|>" in the text is plain text
