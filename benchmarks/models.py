"""Whole models timed: a forward over a prompt (the user's `--impl`, impl's fast path, transformers), and
end-to-end greedy generation (impl's `generate` on the weights `impl generate` prepares vs transformers' generate).

SmolLM2-135M runs on its real weights (the cached asset, as the golden tests use); the Llama-3-8B-shaped model
is one layer with random weights (std 0.02) and the real 128256-token vocabulary. Each case is a zero-argument
callable, built (weights loaded, prepared) outside the timed call.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks import cases
from impl import generate as impl_generate
from impl import model
from impl.config import PRESETS, ModelConfig, to_hf_config
from impl.formats.hf import to_hf_state_dict
from impl.layout import DTYPES, expected_shapes
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


# One weight set per (model, dtype), shared by every side: the user's forward and transformers read the same
# plain tensors (transformers' q/k rows are permuted copies: one layer's wq and wk), and impl's generation weights
# reuse them (prepare_for_generation's fused matrices; their row views replace the plain wq/wk/wv/w1/w3). Only a
# packed layout (oneDNN's, where it is faster here) holds the layer's matrices a second time: the user's forward
# cannot read it. Sets up to HOLD_BYTES stay loaded together (SmolLM2: 0.5 GB fp32 + 0.3 GB bf16); a bigger one (the
# 8B-shaped model: 5.1 GB fp32, 2.5 GB bf16) is held alone, every other set (and benchmarks.cases' one-layer
# weights) let go BEFORE it is built: one 8B-shaped case peaked at 5.8 GB resident, 9.3 GB before. The forward
# tests run one (model, dtype) after the other (benchmarks/test_hot_path.py), so each set is built once.
HOLD_BYTES = 2 << 30


@dataclass
class Held:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # plain, impl's layout: what the user's forward and transformers read
    generation: dict[str, torch.Tensor]  # what `impl generate` holds
    hf_state: dict[str, torch.Tensor] | None = None  # the same tensors under transformers' names, q/k permuted
    hf: dict[str, object] = field(default_factory=dict)  # attention implementation -> LlamaForCausalLM
    reference: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt length -> hf-eager's last logits


_HELD: dict[tuple[str, str], Held] = {}  # least recently used first


def _config(model_name: str) -> ModelConfig:
    return PRESETS["llama-3-8b"].replace(n_layers=1) if model_name == "llama-3-8b-1layer" else PRESETS[model_name]


def weight_bytes(model_name: str, dtype_name: str) -> int:
    """The plain weights' size, from the config alone (before anything is loaded)."""
    shapes = expected_shapes(_config(model_name)).values()
    return sum(math.prod(s) for s in shapes) * DTYPES[dtype_name].itemsize


def held(model_name: str, dtype_name: str) -> Held:
    """This model's one weight set in this dtype: built now (after letting others go if it needs the room)."""
    key = (model_name, dtype_name)
    if key in _HELD:
        _HELD[key] = _HELD.pop(key)  # now the most recently used
        return _HELD[key]
    need = weight_bytes(model_name, dtype_name)
    if need + sum(weight_bytes(*k) for k in _HELD) > HOLD_BYTES:
        while _HELD and need + sum(weight_bytes(*k) for k in _HELD) > HOLD_BYTES:
            del _HELD[next(iter(_HELD))]
        cases.release()  # and the one-layer groups' weights (3.5 GB for the 8B shapes), rebuilt if asked again
        gc.collect()  # the last test's closures are gone: their tensors go now, before the new set is built
    if model_name == "llama-3-8b-1layer":
        config = _config(model_name)
        weights = random_weights(config, seed=0, dtype=DTYPES[dtype_name])
    else:
        ckpt = load_checkpoint(model_name, dtype=DTYPES[dtype_name])
        config, weights = ckpt.config, dict(ckpt.weights)
    generation = model.prepare_for_generation(dict(weights), config)  # as `impl generate` does
    weights.update({n: generation[n] for n in weights if n in generation and not generation[n].is_mkldnn})
    _HELD[key] = Held(config, weights, generation)
    return _HELD[key]


def checkpoint(model_name: str, dtype_name: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, plain weights): SmolLM2's real ones, or one random 8B-shaped layer. Do not mutate."""
    h = held(model_name, dtype_name)
    return h.config, h.weights


def generation_weights(model_name: str, dtype_name: str) -> dict[str, torch.Tensor]:
    return held(model_name, dtype_name).generation


def hf_model(model_name: str, dtype_name: str, attn: str):
    """transformers' LlamaForCausalLM on the same tensors (q/k permuted to its layout), in the same dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h = held(model_name, dtype_name)
    if attn in h.hf:
        return h.hf[attn]
    hf_cfg = LlamaConfig(**to_hf_config(h.config, bos_id=0, eos_id=0))
    hf_cfg._attn_implementation = attn
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    if h.hf_state is None:  # once: eager and sdpa share it
        h.hf_state = to_hf_state_dict(h.weights, h.config)
    hf.load_state_dict(h.hf_state, assign=True, strict=False)  # assign: the same tensors, no copy
    if h.config.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)  # its buffers were on the meta device
    hf.requires_grad_(False).eval()
    h.hf[attn] = hf
    return hf


def tokens(model_name: str, seq: int) -> torch.Tensor:
    return torch.randint(0, _config(model_name).vocab_size, (seq,), generator=torch.Generator().manual_seed(seq))


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


def reference_logits(shape: ModelShape, dtype_name: str) -> torch.Tensor:
    """transformers eager's last logits (vocab,): what every side's are checked against, computed once."""
    h = held(shape.model, dtype_name)
    if shape.seq not in h.reference:
        fn = forward_case("hf-eager", shape, dtype_name)  # built outside inference mode: its tensors are kept
        with torch.inference_mode():
            h.reference[shape.seq] = fn()
    return h.reference[shape.seq]


def user_last_logits(user, shape: ModelShape, dtype_name: str) -> torch.Tensor | None:
    """The user's last-position logits as reported to the trace (the `logits` stage), for the untimed check."""
    from impl.stages import LOGITS

    config, weights = checkpoint(shape.model, dtype_name)
    seen: dict[str, torch.Tensor] = {}

    def keep_logits(name: str, t: torch.Tensor) -> None:  # only the last logits: no copy of every stage
        if name == LOGITS:
            seen[name] = t.detach().clone()

    with torch.inference_mode():
        user(tokens(shape.model, shape.seq), weights, config, keep_logits)
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
