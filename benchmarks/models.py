"""Whole models timed: a forward over a prompt (the user's `--impl`, impl's fast path, transformers), and
end-to-end greedy generation (impl's `generate` on the weights `impl generate` prepares vs transformers' generate).

SmolLM2-135M runs on its real weights (the cached asset, as the golden tests use); the Llama-3-8B-shaped model
is one layer with random weights (std 0.02) and the real 128256-token vocabulary. Each case is a zero-argument
callable, built (weights loaded, prepared) outside the timed call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from impl import generate as impl_generate
from impl import model
from impl.config import PRESETS, ModelConfig, to_hf_config
from impl.formats.hf import to_hf_state_dict
from impl.layout import DTYPES
from impl.weights import load_checkpoint, random_weights

FORWARD_IMPLEMENTATIONS = ("user", "impl", "hf-eager", "hf-sdpa")
GENERATE_IMPLEMENTATIONS = ("impl", "hf-eager", "hf-sdpa")
FORWARD_SEQS = (17, 128, 512)
GENERATE_PROMPT, GENERATE_NEW = 17, 32
# ||logits - transformers eager's|| / ||...|| at the last position: the whole model, so looser than one block's.
FORWARD_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


@dataclass(frozen=True)
class ModelShape:
    model: str  # "smollm2-135m" (real weights) or "llama-3-8b-1layer" (random)
    seq: int

    @property
    def label(self) -> str:
        return f"prefill-{self.seq}"


@functools.cache
def checkpoint(model_name: str, dtype_name: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, plain weights): SmolLM2's real ones, or one random 8B-shaped layer. Do not mutate."""
    if model_name == "llama-3-8b-1layer":
        config = PRESETS["llama-3-8b"].replace(n_layers=1)
        return config, random_weights(config, seed=0, dtype=DTYPES[dtype_name])
    ckpt = load_checkpoint(model_name, dtype=DTYPES[dtype_name])
    return ckpt.config, ckpt.weights


@functools.cache
def generation_weights(model_name: str, dtype_name: str) -> dict[str, torch.Tensor]:
    config, weights = checkpoint(model_name, dtype_name)
    return model.prepare_for_generation(dict(weights), config)  # as `impl generate` does


@functools.cache
def hf_model(model_name: str, dtype_name: str, attn: str):
    """transformers' LlamaForCausalLM on the same weights (q/k permuted to its layout), in the same dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config, weights = checkpoint(model_name, dtype_name)
    hf_cfg = LlamaConfig(**to_hf_config(config, bos_id=0, eos_id=0))
    hf_cfg._attn_implementation = attn
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(weights, config), assign=True, strict=False)
    if config.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)  # its buffers were on the meta device
    hf.requires_grad_(False).eval()
    return hf


def tokens(model_name: str, seq: int) -> torch.Tensor:
    config, _ = checkpoint(model_name, "fp32")
    return torch.randint(0, config.vocab_size, (seq,), generator=torch.Generator().manual_seed(seq))


def _no_trace(name: str, t: torch.Tensor) -> None:
    pass


def forward_case(name: str, shape: ModelShape, dtype_name: str, user=None) -> Callable[[], torch.Tensor]:
    """A callable returning the last position's logits (vocab,) for `name` on this model, prompt and dtype."""
    config, weights = checkpoint(shape.model, dtype_name)
    toks = tokens(shape.model, shape.seq)
    if name == "user":  # the trace protocol: fn(tokens, weights, config, trace), observed by nobody here
        return lambda: user(toks, weights, config, _no_trace)
    if name == "impl":
        w = generation_weights(shape.model, dtype_name)
        return lambda: model.forward_fast(toks, w, config, all_logits=False)
    hf = hf_model(shape.model, dtype_name, name.removeprefix("hf-"))
    return lambda: hf(toks[None], use_cache=False, logits_to_keep=1).logits[0, -1]


def user_last_logits(user, shape: ModelShape, dtype_name: str) -> torch.Tensor | None:
    """The user's last-position logits as reported to the trace (the `logits` stage), for the untimed check."""
    from impl.stages import LOGITS

    config, weights = checkpoint(shape.model, dtype_name)
    seen: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        user(tokens(shape.model, shape.seq), weights, config, lambda k, t: seen.__setitem__(k, t.detach().clone()))
    return seen.get(LOGITS)


def generate_case(name: str, dtype_name: str, model_name: str = "smollm2-135m",
                  new: int = GENERATE_NEW) -> Callable[[], list[int]]:
    """A callable returning `new` greedy token ids after a GENERATE_PROMPT-token prompt (no early stop)."""
    config, _ = checkpoint(model_name, dtype_name)
    prompt = tokens(model_name, GENERATE_PROMPT)
    if name == "impl":
        w = generation_weights(model_name, dtype_name)
        return lambda: impl_generate.generate(prompt.tolist(), w, config, new)
    hf = hf_model(model_name, dtype_name, name.removeprefix("hf-"))

    def run_hf() -> list[int]:
        out = hf.generate(prompt[None], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        return out[0, GENERATE_PROMPT:].tolist()

    return run_hf
