"""The recorder: run transformers' LlamaForCausalLM on a prompt and keep every stage of `impl.stages`.

The reference is transformers, never impl's math. It is built from the same bytes impl loads
(`impl.weights.load_checkpoint` -> `impl.formats.hf.save_hf` -> `from_pretrained`, or transformers' own
GGUF loader for a .gguf file, which cross-checks impl's GGUF conversion) with
`from_pretrained(..., dtype=...)`: never `.to(bfloat16)` afterwards, which would also cast
RoPE's `inv_freq` buffer and corrupt cos/sin.

Capture is by forward hooks and pre-hooks on the modules (see `_hook_model` for the map from
module to stage). What has no module -- q and k after RoPE, the masked scores, the softmax
probabilities -- comes from an attention function registered in transformers'
`AttentionInterface` ("golden_eager", "golden_sdpa"). It receives the post-RoPE states,
records them, and delegates to transformers' real eager / sdpa function, so the model's output
is transformers' own (tested bit-identical). Under eager, `probs` is the `attn_weights` that
eager_attention_forward returns; `scores` is recomputed with its own expressions
(repeat_kv, matmul, * scaling, + mask: bit-identical). Under sdpa the fused kernel exposes
neither, so both are derived; the manifest lists derived stages.

q, k, q_rope and k_rope are stored in Meta's interleaved-pair layout: HF's checkpoint conversion
permutes each head's rows so that RoPE pairs (i, i + d/2) ("rotate half"); undoing it per head
(`impl.layout.rotate_half_to_interleaved`, the same map as the weights' `unpermute_qk`) puts pair members
side by side, as `impl` and Meta's complex RoPE have them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from golden import sampling
from golden.decode import DEFAULT_STEPS, Plan, capture_decode, greedy_plan, plan_of
from golden.format import ATTN_DERIVED, check_destination, destination, environment, load_golden, write_golden
from golden.sampling import Sampled, sample_stage
from impl import stages
from impl.config import ModelConfig
from impl.errors import Llama3GoldenError, PromptError, check_prompt
from impl.layout import DTYPES, rotate_half_to_interleaved

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
# Stages the recorder computes itself rather than reading from transformers, per attention.
DERIVED = ATTN_DERIVED


# ---------------------------------------------------------------- the attention hook
_ACTIVE: _Recorder | None = None  # the recording in progress; attention functions report to it


def _masked_positions(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor:
    """Boolean (q_len, kv_len): True where a key is hidden from a query."""
    if mask is None:  # sdpa's is_causal path: the causal pattern, aligned to the last query
        return torch.ones(q_len, kv_len, dtype=torch.bool).triu(kv_len - q_len + 1)
    m = mask[0, 0].cpu()
    if m.dtype == torch.bool:
        return ~m
    return m <= torch.finfo(m.dtype).min  # eager_mask: 0 where visible, finfo.min where not


def _golden_attention(base: str):
    """An attention function that records, then calls transformers' own `base` function."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if base == "eager":
            # The function the plain model would call: the modeling file's own eager_attention_forward.
            real = sys.modules[type(module).__module__].eager_attention_forward
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as real
        out, weights = real(module, query, key, value, attention_mask, *args, **kwargs)
        if _ACTIVE is not None:
            _ACTIVE.attention(module, query, key, value, attention_mask, kwargs.get("scaling", module.scaling),
                              weights)
        return out, weights

    return attention


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for base, mask in (("eager", eager_mask), ("sdpa", sdpa_mask)):
        AttentionInterface.register(f"golden_{base}", _golden_attention(base))
        AttentionMaskInterface.register(f"golden_{base}", mask)  # the very mask the plain model gets


# ---------------------------------------------------------------- capture
class _Recorder:
    """Collects tensors under stage keys while one forward pass runs.

    With `positions` (a long prompt, golden.sampling), each stage is reduced to its sampled rows and its summaries
    of every row as it is produced, so the recording never holds more than the layer being computed."""

    def __init__(self, attn: str, head_dim: int, progress: Any = None, positions: tuple[int, ...] | None = None):
        self.attn, self.head_dim, self.progress, self.positions = attn, head_dim, progress, positions
        self.layer: int | None = None
        self.tensors: dict[str, torch.Tensor | Sampled] = {}

    def put(self, stage: str, t: torch.Tensor) -> None:
        """Store one tensor (batch dim already removed): detached, on the CPU, contiguous, a copy; sampled where
        the prompt is long."""
        k = stages.key(stage, self.layer if stages.BY_NAME[stage].per_layer else None)
        t = t.detach().to("cpu")
        stored = sample_stage(k, t, self.positions)
        self.tensors[k] = stored.to("cpu", copy=True).contiguous() if stored is t else stored

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(1, seq, n*d) -> (seq, n, d)."""
        return t[0].reshape(t.shape[1], -1, self.head_dim)

    def attention(self, module, query, key, value, mask, scaling: float, weights: torch.Tensor | None) -> None:
        from transformers.models.llama.modeling_llama import repeat_kv

        self.layer = module.layer_idx
        # (1, heads, seq, d) -> (seq, heads, d)
        self.put("q_rope", rotate_half_to_interleaved(query[0].transpose(0, 1)))
        # key holds every cached position in a decode step: k_rope is the new positions' (the last q_len)
        self.put("k_rope", rotate_half_to_interleaved(key[0, :, key.shape[2] - query.shape[2]:].transpose(0, 1)))
        # eager_attention_forward's own expressions, so under eager this is its pre-softmax tensor bit for bit.
        key_states = repeat_kv(key, module.num_key_value_groups)
        scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask
        hidden = _masked_positions(mask, query.shape[2], key.shape[2]).to(scores.device)
        scores = scores.masked_fill(hidden, float("-inf"))
        self.put("scores", scores[0])
        if weights is None:  # sdpa: eager's softmax of the same scores
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        self.put("probs", weights[0])


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@contextlib.contextmanager
def _hook_model(hf_model, rec: _Recorder) -> Iterator[None]:
    """Hooks every module whose input or output is a stage; switches to the recording attention."""
    global _ACTIVE
    inner, d = hf_model.model, rec.head_dim
    handles = []

    def after(module, stage, fn=lambda t: t[0]):
        handles.append(module.register_forward_hook(lambda m, a, out: rec.put(stage, fn(_first(out)))))

    def before(module, stage, fn=lambda t: t[0]):
        handles.append(module.register_forward_pre_hook(lambda m, a: rec.put(stage, fn(a[0]))))

    def layer_start(i):
        def hook(m, args, kwargs):
            rec.layer = i
            rec.put("residual_in", _first(args or (kwargs["hidden_states"],))[0])
        return hook

    def layer_end(m, args, out):
        rec.put("out", _first(out)[0])
        if rec.progress is not None:
            rec.progress.update(1)

    after(inner.embed_tokens, "embeddings")
    # cos/sin: (1, seq, d) as cat((angles, angles)); the first half is one value per pair.
    def rope(m, args, out):  # a forward hook must return None, or it replaces the module's output
        rec.put("rope_cos", out[0][0, :, : d // 2])
        rec.put("rope_sin", out[1][0, :, : d // 2])

    handles.append(inner.rotary_emb.register_forward_hook(rope))
    for i, layer in enumerate(inner.layers):
        handles.append(layer.register_forward_pre_hook(layer_start(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(layer_end))
        attn, mlp = layer.self_attn, layer.mlp
        after(layer.input_layernorm, "attn_norm")
        after(attn.q_proj, "q", lambda t: rotate_half_to_interleaved(rec.heads(t)))
        after(attn.k_proj, "k", lambda t: rotate_half_to_interleaved(rec.heads(t)))
        after(attn.v_proj, "v", rec.heads)
        before(attn.o_proj, "attn_heads", rec.heads)
        after(attn.o_proj, "attn_out")
        before(layer.post_attention_layernorm, "residual_attn")
        after(layer.post_attention_layernorm, "ffn_norm")
        after(mlp.act_fn, "ffn_gate")
        after(mlp.up_proj, "ffn_up")
        before(mlp.down_proj, "ffn_hidden")
        after(mlp.down_proj, "ffn_out")
    after(inner.norm, "norm")
    after(hf_model.lm_head, "logits", lambda t: t[0, -1])

    plain = hf_model.config._attn_implementation
    _register_attention()
    hf_model.set_attn_implementation(f"golden_{rec.attn}")
    _ACTIVE = rec
    try:
        yield
    finally:
        _ACTIVE = None
        hf_model.set_attn_implementation(plain)
        for h in handles:
            h.remove()


@torch.inference_mode()
def capture(hf_model, tokens: list[int], attn: str, progress: bool = False,
            sample_above: int = sampling.THRESHOLD) -> dict[str, torch.Tensor | Sampled]:
    """Run the model once on `tokens` and return every stage, in forward order (impl.stages keys); on a prompt
    of more than `sample_above` tokens, stages with a position axis sampled (golden.sampling)."""
    from tqdm import tqdm

    cfg = hf_model.config
    n_layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bar = tqdm(total=n_layers, desc="recording", unit="layer", disable=not progress, leave=False)
    rec = _Recorder(attn, head_dim, bar, sampling.sample_positions(len(tokens), sample_above))
    ids = torch.tensor([tokens], dtype=torch.long)
    rec.put("tokens", ids[0])
    with bar, _hook_model(hf_model, rec):
        hf_model(input_ids=ids, use_cache=False)
    rec.put("logprobs_last", F.log_softmax(rec.tensors["logits"].float(), dim=-1))
    keys = stages.all_keys(n_layers)  # the writer checks these are stages.every_stage of the golden
    missing = [k for k in keys if k not in rec.tensors]
    if missing or len(rec.tensors) != len(keys):
        raise RuntimeError(f"recorder bug: missing stages {missing[:5]}, extra "
                           f"{sorted(set(rec.tensors) - set(keys))[:5]}")
    return {k: rec.tensors[k] for k in keys}


# ---------------------------------------------------------------- the reference model
@dataclass
class Reference:
    """transformers' model plus the identity of the checkpoint it was built from."""

    hf_model: Any
    name: str
    config: ModelConfig
    weights_sha256: str
    source: str
    tokenizer: Any


def _gguf_path(source: str) -> Path | None:
    """The .gguf file of a Checkpoint whose one-line source is "gguf /path/model.gguf"."""
    kind, _, rest = source.partition(" ")
    return Path(rest) if kind == "gguf" else None


def _portable(source: str) -> str:
    """The checkpoint's source line with the asset cache folder spelled <cache>, so manifests do not
    carry one machine's home directory."""
    from impl import assets

    return source.replace(str(assets.cache_dir()), "<cache>")


@contextlib.contextmanager
def load_reference(model: str, dtype: str, attn: str = "eager", device_map: Any = None,
                   offload_folder: str | None = None) -> Iterator[Reference]:
    """Build transformers' LlamaForCausalLM from the checkpoint impl would load for `model`."""
    from transformers import LlamaForCausalLM

    from impl import tokenizer as impl_tokenizer
    from impl import weights as impl_weights
    from impl.formats.hf import save_hf

    if dtype not in DTYPES:
        raise Llama3GoldenError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise Llama3GoldenError(f"attention {attn!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    # The checkpoint as stored (dtype None): its digest is the model's identity in the manifest.
    ckpt = impl_weights.load_checkpoint(model, dtype=None)
    sha = impl_weights.sha256_of_weights(ckpt.weights)
    tok = impl_tokenizer.load_tokenizer(ckpt.tokenizer if ckpt.tokenizer is not None else model)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "attn_implementation": attn}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    gguf = _gguf_path(ckpt.source)
    with tempfile.TemporaryDirectory(prefix="golden-hf-") as tmp:
        if gguf is None:
            save_hf(tmp, ckpt.weights, ckpt.config)  # the bytes impl loaded, in HF's layout
        ckpt = dataclasses.replace(ckpt, weights={})  # free impl's copy before transformers loads its own
        if gguf is None:
            hf = LlamaForCausalLM.from_pretrained(tmp, **kwargs)
        else:
            # transformers' own GGUF reader (dequantise + un-permute), independent of impl's. Dequantise
            # explicitly: with the `kernels` package installed, transformers 5 would otherwise keep the
            # weights packed and run every matmul in a float32 GGUF kernel, whatever dtype was asked for.
            from transformers import GgufConfig

            hf = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  quantization_config=GgufConfig(dequantize=True), **kwargs)
        hf.eval()
        yield Reference(hf, model, ckpt.config, sha, _portable(ckpt.source), tok)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") on or off for the recording, as asked."""
    from transformers.utils import logging

    before = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if before else logging.disable_progress_bar)()


def _check_text(value: str, what: str) -> None:
    """Refuse text that cannot be written as UTF-8 (a lone surrogate: undecodable bytes on the command line)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{what} is not valid UTF-8 text ({e.object[e.start:e.end]!a} at position {e.start}; "
                          f"undecodable bytes in the argument?)") from None


def record(model: str, prompt: str, dtype: str, attn: str = "eager", *, out: str | Path, device_map: Any = None,
           offload_folder: str | None = None, progress: bool = True, sample_above: int = sampling.THRESHOLD,
           decode_steps: int = DEFAULT_STEPS, decode_plan: Plan | None = None) -> Path:
    """Record a golden of `model` on `prompt` in `dtype` ('fp32'|'bf16') into folder `out`; returns it.

    `device_map` / `offload_folder` go to `from_pretrained` unchanged (accelerate), for models
    larger than memory. A prompt of more than `sample_above` tokens is stored sampled (golden.sampling).
    `out` is checked and locked before the model loads (`golden.format.destination`):
    only a golden, an empty folder or a new path is written; anything else is refused before any work.
    `decode_steps` > 0 adds that many KV-cache decoding steps (golden.decode; 0: a prefill golden) on the fp32
    reference's greedy tokens: `decode_plan` when given (the fp32 golden's: `plan_from`), else made here, for a
    bf16 golden by loading the model in fp32 first (twice the memory: pass the fp32 golden's plan for a big model).
    """
    check_prompt(prompt)
    _check_text(prompt, "the prompt")
    _check_text(model, "the model name")
    if dtype not in DTYPES:
        raise Llama3GoldenError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise Llama3GoldenError(f"attention {attn!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if not (isinstance(decode_steps, int) and decode_steps >= 0):
        raise Llama3GoldenError(f"--decode-steps {decode_steps!r}: a number of steps >= 0 expected")
    # Held from before the model loads until the golden is in place: a folder that must not be replaced
    # is refused before any work, and a second writer of the same folder is refused at once.
    with destination(out), _progress_bars(progress):
        if decode_steps and decode_plan is None and dtype != "fp32":  # every dtype feeds the fp32 greedy tokens
            with load_reference(model, "fp32", attn, device_map, offload_folder) as ref32:
                decode_plan = _plan(ref32, prompt, model, decode_steps)
        with load_reference(model, dtype, attn, device_map, offload_folder) as ref:
            return _record(ref, model, prompt, dtype, attn, out, progress, sample_above, decode_steps, decode_plan)


def plan_from(folder: str | Path) -> Plan:
    """The decode plan of an fp32 golden (`record --decode-from`), or Llama3GoldenError if it has none."""
    g = load_golden(folder)
    plan = plan_of(g)
    if plan is None or g.dtype != "fp32":
        raise Llama3GoldenError(f"--decode-from {folder}: not an fp32 golden with decode steps")
    return plan


def _plan(ref: Reference, prompt: str, model: str, steps: int) -> Plan:
    tokens = [int(t) for t in ref.tokenizer.encode(prompt, bos=True)]
    check_prompt(tokens, ref.config.max_seq_len, new_tokens=steps, model=model)
    return greedy_plan(ref.hf_model, tokens, steps)


def _record(ref: Reference, model: str, prompt: str, dtype: str, attn: str, out: str | Path, progress: bool,
            sample_above: int, decode_steps: int, plan: Plan | None) -> Path:
    """The recording itself, on a loaded reference: the prefill's stages, then the decode steps."""
    tokens = [int(t) for t in ref.tokenizer.encode(prompt, bos=True)]
    check_prompt(tokens, ref.config.max_seq_len, new_tokens=decode_steps, model=model)
    tensors = capture(ref.hf_model, tokens, attn, progress=progress, sample_above=sample_above)
    manifest = {
        "model": {"name": model, "config": ref.config.to_dict(), "weights_sha256": ref.weights_sha256,
                  "source": ref.source},
        "dtype": dtype,
        "attn_implementation": attn,
        "prompt": prompt,
        "tokens": tokens,
        "derived": list(DERIVED[attn]),
        "versions": environment(),
    }
    if decode_steps:
        same_model = plan is None
        plan = plan or _plan(ref, prompt, model, decode_steps)
        if plan.prompt != tuple(tokens) or plan.steps != decode_steps:
            raise Llama3GoldenError(f"the decode plan was made for another prompt or step count than {model}'s "
                                    f"{len(tokens)} tokens and {decode_steps} steps")
        manifest["decode"], steps = capture_decode(ref.hf_model, tokens, plan, attn, ref.config, same_model)
        tensors.update(steps)
    return write_golden(out, manifest, tensors)


# ---------------------------------------------------------------- the committed baselines
WALKTHROUGH_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
SHORT_PROMPT = "The capital of France is"
PANGRAM_PROMPT = "The quick brown fox jumps over the lazy dog."  # 11 tokens with BOS: not the walk-through's 17
# 8,361 tokens with BOS: longer than Llama 3.1's original context (8,192), where its rope scaling shows in attention.
LONG_PROMPT = " ".join(f"Line {i}: the answer to the ultimate question of life, the universe, and everything is "
                       f"{i % 97}." for i in range(380))
DATA_DIR = Path(__file__).parent / "data"
# name -> (model, prompt, dtype); all eager. Regenerate with `python -m golden record-baselines`.
# tiny, tiny-varied, tiny-scaled and tiny-tied are the main job's default set (golden.check.DEFAULT_SET).
BASELINES: dict[str, tuple[str, str, str]] = {
    "tiny/fp32": ("tiny", WALKTHROUGH_PROMPT, "fp32"),
    "tiny/bf16": ("tiny", WALKTHROUGH_PROMPT, "bf16"),
    "tiny-varied/fp32": ("tiny-varied", PANGRAM_PROMPT, "fp32"),
    "tiny-varied/bf16": ("tiny-varied", PANGRAM_PROMPT, "bf16"),
    "tiny-scaled/fp32": ("tiny-scaled", WALKTHROUGH_PROMPT, "fp32"),
    "tiny-scaled/bf16": ("tiny-scaled", WALKTHROUGH_PROMPT, "bf16"),
    "tiny-tied/fp32": ("tiny-tied", SHORT_PROMPT, "fp32"),
    "tiny-tied/bf16": ("tiny-tied", SHORT_PROMPT, "bf16"),
    # The long-context golden: fp32 only (within 5 MB), every stage sampled by position (golden.sampling).
    "tiny-long/fp32": ("tiny-long", LONG_PROMPT, "fp32"),
    "smollm2-135m/fp32": ("smollm2-135m", SHORT_PROMPT, "fp32"),
    "smollm2-135m/bf16": ("smollm2-135m", SHORT_PROMPT, "bf16"),
}


# Baselines without decode steps: the long-context golden (its 5 MB hold the sampled prompt; a decode step's scores
# and probs span every position, and decoding is checked on the default set and SmolLM2).
NO_DECODE = frozenset({"tiny-long/fp32"})


def record_baselines(out: str | Path = DATA_DIR, names: list[str] | None = None,
                     progress: bool = True) -> list[Path]:
    """(Re-)record the committed baselines into `out`/<name>; returns their folders.

    Each with golden.decode.DEFAULT_STEPS decode steps (but those in NO_DECODE); a bf16 baseline feeds the tokens of
    the fp32 baseline of its model and prompt recorded in this run (or, recorded alone, of the fp32 reference, loaded
    for the purpose)."""
    unknown = sorted(set(names or ()) - set(BASELINES))
    if unknown:
        raise Llama3GoldenError(f"unknown baseline {unknown[0]!r}; known: {', '.join(BASELINES)}")
    chosen = [(name, spec) for name, spec in BASELINES.items() if not names or name in names]
    for name, _ in chosen:  # every destination, before the first recording
        check_destination(Path(out) / name)
    plans: dict[tuple[str, str], Plan] = {}
    folders = []
    for name, (model, prompt, dtype) in chosen:
        steps = 0 if name in NO_DECODE else DEFAULT_STEPS
        folder = record(model, prompt, dtype, "eager", out=Path(out) / name, progress=progress,
                        decode_steps=steps, decode_plan=plans.get((model, prompt)) if steps else None)
        if dtype == "fp32" and steps:
            plans[model, prompt] = plan_of(load_golden(folder))
        folders.append(folder)
    return folders
