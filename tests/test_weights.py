"""impl.weights, impl.formats, impl.layout: the three checkpoint formats load to one layout, and the q/k
conversions are transformers' and llama.cpp's own (checked against transformers' RoPE and its GGUF reader,
not only against themselves)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from impl import weights as W
from impl.config import PRESETS, from_meta_params
from impl.errors import AssetError, ConfigError, ShapeError, UnknownModelError
from impl.formats.gguf import llama3_rope_factors, load_gguf, save_gguf
from impl.formats.hf import from_hf_state_dict, load_hf, save_hf, to_hf_state_dict
from impl.formats.meta import load_meta, meta_params, save_meta
from impl.layout import expected_shapes, permute_qk, unpermute_qk, validate

TINY = PRESETS["tiny"]
TINY_SCALED = PRESETS["tiny-scaled"]
FORMATS = ("meta", "hf", "gguf")
LLAMA3_8B_PARAMS = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}


# fairscale's split in Meta's model-parallel checkpoints: ColumnParallel on dim 0, RowParallel/embedding on dim 1.
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def save(fmt: str, folder: Path, weights, config) -> Path:
    """Write one format; return what load_checkpoint takes (a folder, or the .gguf file)."""
    if fmt == "meta":
        return save_meta(folder, weights, config)
    if fmt == "hf":
        return save_hf(folder, weights, config)
    return save_gguf(folder / "model.gguf", weights, config)


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), f"{name} differs"


def hf_model(path: Path, gguf_file: str | None = None):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, gguf_file=gguf_file).eval()


@pytest.fixture(scope="module")
def tiny_weights():
    return W.random_weights(TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_saved(tiny_weights, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: save(fmt, root / fmt, tiny_weights, TINY) for fmt in FORMATS}


# ----------------------------------------------------------------------------- permutations

@pytest.mark.parametrize("n_heads", [8, 2, 1], ids=["8h", "2h", "1h"])
def test_permute_qk_unpermute_is_exact_inverse(n_heads):
    w = torch.randn(n_heads * 16, 128)
    assert torch.equal(unpermute_qk(permute_qk(w, n_heads), n_heads), w)
    assert torch.equal(permute_qk(unpermute_qk(w, n_heads), n_heads), w)
    assert not torch.equal(permute_qk(w, n_heads), w)


def test_permute_qk_moves_pairs_to_halves():
    # One head of head_dim 6: Meta rows (r0, i0, r1, i1, r2, i2) -> HF rows (r0, r1, r2, i0, i1, i2).
    meta = torch.tensor([[0.0], [10.0], [1.0], [11.0], [2.0], [12.0]])
    assert permute_qk(meta, 1).flatten().tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]


def test_layout_imports_neither_model_nor_weights_nor_formats():
    # impl.model imports impl.layout (Weights), impl.formats.gguf imports impl.model: layout stays below both.
    code = ("import sys, impl.layout; "
            "print([m for m in ('impl.model', 'impl.weights', 'impl.formats') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_hf_state_dict_round_trip_is_exact(tiny_weights):
    sd = to_hf_state_dict(tiny_weights, TINY)
    assert "model.layers.1.self_attn.k_proj.weight" in sd and "lm_head.weight" in sd
    assert_same_weights(from_hf_state_dict(sd, TINY), tiny_weights)


def _meta_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's apply_rotary_emb: rotate adjacent pairs as complex numbers. x: (seq, heads, head_dim)."""
    seq, hd = x.shape[0], x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)  # (seq, hd/2)
    xc = torch.view_as_complex(x.double().reshape(seq, x.shape[1], hd // 2, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[:, None, :]).flatten(-2)


def _to_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs -> HF's order (all first members, then all second members), per head."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def test_save_hf_q_k_follow_transformers_rope(tiny_weights, tiny_saved, monkeypatch):
    """transformers' own attention, run on our save_hf folder, rotates exactly Meta's pairs."""
    from transformers.models.llama import modeling_llama

    model = hf_model(tiny_saved["hf"])
    seen = {}
    original_rope = modeling_llama.apply_rotary_pos_emb

    def recording_rope(q, k, cos, sin, *args, **kwargs):
        q_rot, k_rot = original_rope(q, k, cos, sin, *args, **kwargs)
        seen.setdefault("q_rope", q_rot[0].transpose(0, 1))  # (seq, heads, head_dim); layer 0 only
        seen.setdefault("k_rope", k_rot[0].transpose(0, 1))
        return q_rot, k_rot

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", recording_rope)
    def record_input(module, args):  # a pre-hook returning None leaves the input alone
        seen.setdefault("x", args[0][0])

    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(record_input)
    with torch.no_grad():
        model(torch.tensor([[128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679]]))

    x, hd = seen["x"].double(), TINY.head_dim  # the normed input of layer 0, (seq, dim)
    for stage, w, heads in (("q_rope", "wq", TINY.n_heads), ("k_rope", "wk", TINY.n_kv_heads)):
        meta = (x @ tiny_weights[f"layers.0.attention.{w}.weight"].double().T).view(len(x), heads, hd)
        expected = _to_rotate_half(_meta_rope(meta, TINY.rope_theta)).float()
        torch.testing.assert_close(seen[stage], expected, rtol=1e-5, atol=1e-5, msg=f"{stage} differs")


def test_save_gguf_matches_transformers_gguf_reader(tiny_saved):
    """transformers' GGUF loader undoes llama.cpp's q/k permutation; ours must have applied exactly that."""
    from_gguf = hf_model(tiny_saved["gguf"].parent, gguf_file=tiny_saved["gguf"].name).state_dict()
    from_hf = hf_model(tiny_saved["hf"]).state_dict()
    assert sorted(from_gguf) == sorted(from_hf)
    for name in from_hf:
        assert torch.equal(from_gguf[name], from_hf[name]), name


# ----------------------------------------------------------------------------- formats agree

@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_gives_saved_weights(fmt, tiny_saved, tiny_weights):
    ck = W.load_checkpoint(tiny_saved[fmt])
    assert ck.config == TINY
    assert_same_weights(ck.weights, tiny_weights)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_keeps_tied_embeddings(fmt, tmp_path):
    config = TINY.replace(tie_embeddings=True, vocab_size=1000)
    weights = W.random_weights(config, seed=1)
    assert "output.weight" not in weights
    ck = W.load_checkpoint(save(fmt, tmp_path, weights, config))
    assert ck.config.tie_embeddings
    assert_same_weights(ck.weights, weights)


def test_save_hf_tied_embeddings_tie_in_transformers(tmp_path):
    config = TINY.replace(tie_embeddings=True, vocab_size=1000)
    weights = W.random_weights(config, seed=1)
    model = hf_model(save_hf(tmp_path, weights, config))
    assert torch.equal(model.lm_head.weight, weights["tok_embeddings.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_dtype_none_keeps_stored_dtype(fmt, dtype, tmp_path):
    config = TINY.replace(vocab_size=1000)
    weights = {k: v.to(dtype) for k, v in W.random_weights(config).items()}
    ck = W.load_checkpoint(save(fmt, tmp_path, weights, config), dtype=None)
    assert_same_weights(ck.weights, weights)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_casts_to_dtype(fmt, tiny_saved, tiny_weights):
    ck = W.load_checkpoint(tiny_saved[fmt], dtype=torch.bfloat16)
    assert_same_weights(ck.weights, {k: v.to(torch.bfloat16) for k, v in tiny_weights.items()})


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_n_layers_keeps_first_layers(fmt, tiny_saved, tiny_weights):
    ck = W.load_checkpoint(tiny_saved[fmt], n_layers=1)
    assert ck.config == TINY.replace(n_layers=1)
    assert_same_weights(ck.weights, {k: v for k, v in tiny_weights.items() if not k.startswith("layers.1.")})


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_load_meta_dtype_none_maps_file_without_copy(tiny_saved):
    """An 8B bf16 checkpoint must not be copied: with dtype None every tensor points into the mapped file."""
    ck = W.load_checkpoint(tiny_saved["meta"], dtype=None)
    ranges = _mapped_ranges((tiny_saved["meta"] / "consolidated.00.pth").resolve())
    assert ranges
    for name, t in ck.weights.items():
        assert any(lo <= t.data_ptr() < hi for lo, hi in ranges), f"{name} is a copy"


def test_load_meta_concatenates_model_parallel_shards(tmp_path, tiny_weights):
    save_meta(tmp_path, tiny_weights, TINY)
    (tmp_path / "consolidated.00.pth").unlink()
    shards: list[dict] = [{}, {}]
    for name, t in tiny_weights.items():
        kind = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
        dim = SHARD_DIM.get(kind)
        parts = (t, t) if dim is None else t.chunk(2, dim=dim)  # norms are replicated
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    assert_same_weights(load_meta(tmp_path).weights, tiny_weights)


def test_load_hf_reads_sharded_index(tmp_path, tiny_weights):
    from safetensors.torch import save_file

    save_hf(tmp_path, tiny_weights, TINY)
    (tmp_path / "model.safetensors").unlink()
    sd = to_hf_state_dict(tiny_weights, TINY)
    files = {name: f"model-{1 + ('layers.1.' in name):05d}-of-00002.safetensors" for name in sd}
    for file in set(files.values()):
        save_file({n: t for n, t in sd.items() if files[n] == file}, tmp_path / file, metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    assert_same_weights(W.load_checkpoint(tmp_path).weights, tiny_weights)


def test_load_checkpoint_tiny_is_random_weights_with_llama3_tokenizer():
    ck = W.load_checkpoint("tiny")
    assert ck.config == TINY and ck.tokenizer == "llama3-tokenizer"
    assert W.sha256_of_weights(ck.weights) == W.sha256_of_weights(W.random_weights(TINY, seed=0))


def test_load_checkpoint_hub_layout_goes_through_assets(tmp_path, tiny_weights, monkeypatch):
    """A meta-llama/... id: assets fetches original/{params.json,tokenizer.model,consolidated.00.pth} from the Hub
    (faked here by a local folder) and weights loads what it fetched."""
    import huggingface_hub

    repo = tmp_path / "repo"
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_text("stand-in\n")
    save_meta(repo / "original", tiny_weights, TINY, tokenizer_path=tokenizer)
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ck = W.load_checkpoint("meta-llama/Meta-Llama-3-8B")
    assert {f for _, f in asked} >= {"original/params.json", "original/consolidated.00.pth"}
    assert ck.config == TINY and ck.tokenizer == repo / "original" / "tokenizer.model"
    assert_same_weights(ck.weights, tiny_weights)
    assert W.load_checkpoint(repo).config == TINY  # the local repo folder too (original/ is found)


# ----------------------------------------------------------------------------- configs

def test_from_meta_params_llama3_8b_hidden_dim():
    assert from_meta_params(LLAMA3_8B_PARAMS).hidden_dim == 14336


@pytest.mark.parametrize("hidden_dim", [384, 512, 200], ids=["hidden_dim", "multiple_of_256", "scaled_down"])
def test_save_meta_params_json_reproduces_hidden_dim(hidden_dim, tmp_path):
    config = TINY.replace(hidden_dim=hidden_dim, vocab_size=1000)
    save_meta(tmp_path, W.random_weights(config), config)
    params = json.loads((tmp_path / "params.json").read_text())
    assert from_meta_params(params) == config
    assert W.load_checkpoint(tmp_path).config == config


def test_save_meta_refuses_rope_scaling_params_json_cannot_hold():
    # Meta's params.json carries only use_scaled_rope (+ a factor); tiny-scaled's original context of 32 is lost.
    with pytest.raises(ConfigError, match="params.json"):
        meta_params(TINY_SCALED)


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"], ids=["transformers5", "transformers4"])
def test_load_hf_reads_both_rope_spellings(spelling, tmp_path):
    config = TINY_SCALED.replace(vocab_size=1000)
    save_hf(tmp_path, W.random_weights(config), config)
    hf = json.loads((tmp_path / "config.json").read_text())
    if spelling == "rope_parameters":
        del hf["rope_scaling"], hf["rope_theta"]
    else:
        del hf["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert W.load_checkpoint(tmp_path).config == config


def test_save_gguf_round_trips_llama31_rope_scaling(tmp_path):
    config = TINY_SCALED.replace(vocab_size=1000)
    weights = W.random_weights(config)
    ck = W.load_checkpoint(save_gguf(tmp_path / "m.gguf", weights, config))
    assert ck.config == config
    assert_same_weights(ck.weights, weights)


def _llama_cpp_rope_factors(config) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel): the Llama 3.1 divisors it stores in rope_freqs.weight."""
    s, dim = config.rope_scaling, config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32)


@pytest.mark.parametrize("preset", ["tiny-scaled", "llama-3.1-8b", "llama-3.2-1b"])
def test_gguf_rope_factors_are_llama_cpps(preset):
    # Derived from impl.model's scaling (unscaled / scaled frequency); llama.cpp re-types the formula as a loop.
    config = PRESETS[preset]
    torch.testing.assert_close(llama3_rope_factors(config), _llama_cpp_rope_factors(config), rtol=1e-6, atol=0)


def test_load_gguf_vocab_comes_from_token_list(tmp_path):
    config = TINY.replace(vocab_size=300)
    tokens = [f"t{i}" for i in range(300)]
    path = save_gguf(tmp_path / "m.gguf", W.random_weights(config), config, tokens=tokens)
    assert load_gguf(path).config == config


# ----------------------------------------------------------------------------- validation and errors

def test_validate_wrong_shape_names_tensor(tiny_weights):
    broken = dict(tiny_weights)
    broken["layers.1.attention.wk.weight"] = torch.zeros(64, 128)
    with pytest.raises(ShapeError, match=r"layers\.1\.attention\.wk\.weight.*\(64, 128\).*\(32, 128\)"):
        validate(broken, TINY)


def test_validate_missing_tensor_names_it(tiny_weights):
    broken = {k: v for k, v in tiny_weights.items() if k != "layers.0.ffn_norm.weight"}
    with pytest.raises(ShapeError, match=r"layers\.0\.ffn_norm\.weight is missing"):
        validate(broken, TINY)


def test_validate_unexpected_tensor_names_it(tiny_weights):
    with pytest.raises(ShapeError, match=r"unexpected tensor output\.weight"):
        validate(tiny_weights, TINY.replace(tie_embeddings=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_wrong_shape_is_shape_error(fmt, tmp_path, tiny_weights, monkeypatch):
    broken = dict(tiny_weights)
    broken["layers.0.feed_forward.w2.weight"] = broken["layers.0.feed_forward.w2.weight"][:, :256].contiguous()
    with monkeypatch.context() as m:
        # The writers check too; let them write it.
        m.setattr(f"impl.formats.{fmt}.validate", lambda weights, config: None)
        path = save(fmt, tmp_path, broken, TINY)
    with pytest.raises(ShapeError, match=r"layers\.0\.feed_forward\.w2\.weight has shape \(128, 256\)"):
        W.load_checkpoint(path)


@pytest.mark.parametrize("fraction", [0.5, 0.999], ids=["half", "last_byte"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_truncated_file_is_asset_error(fmt, fraction, tiny_saved, tmp_path):
    src = tiny_saved[fmt]
    if fmt == "gguf":
        target = shutil.copy(src, tmp_path / src.name)
        victim = Path(target)
    else:
        target = shutil.copytree(src, tmp_path / fmt)
        victim = Path(target) / {"meta": "consolidated.00.pth", "hf": "model.safetensors"}[fmt]
    os.truncate(victim, int(victim.stat().st_size * fraction))
    with pytest.raises(AssetError, match=victim.name) as info:
        W.load_checkpoint(target)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt,missing", [("meta", "consolidated.00.pth"), ("meta", "params.json"),
                                         ("hf", "model.safetensors")],
                         ids=["meta_pth", "meta_params", "hf_safetensors"])
def test_load_checkpoint_missing_file_is_asset_error(fmt, missing, tiny_saved, tmp_path):
    folder = Path(shutil.copytree(tiny_saved[fmt], tmp_path / fmt))
    (folder / missing).unlink()
    with pytest.raises(AssetError, match=missing):
        {"meta": load_meta, "hf": load_hf}[fmt](folder)


def test_load_checkpoint_unknown_name_is_unknown_model_error():
    with pytest.raises(UnknownModelError):
        W.load_checkpoint("no-such-model")


# ----------------------------------------------------------------------------- random weights, digests

def test_random_weights_is_deterministic(tiny_weights):
    assert_same_weights(W.random_weights(TINY, seed=0), tiny_weights)
    assert W.sha256_of_weights(W.random_weights(TINY, seed=1)) != W.sha256_of_weights(tiny_weights)


def test_random_weights_same_in_fresh_process(tiny_weights):
    code = ("from impl import weights as W; from impl.config import PRESETS; "
            "print(W.sha256_of_weights(W.random_weights(PRESETS['tiny'], seed=0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == W.sha256_of_weights(tiny_weights)


def test_random_weights_scales(tiny_weights):
    emb, norm = tiny_weights["tok_embeddings.weight"], tiny_weights["layers.0.attention_norm.weight"]
    assert abs(emb.std().item() - 0.02) < 1e-4 and abs(emb.mean().item()) < 1e-4
    assert abs(norm.mean().item() - 1.0) < 0.02 and 0.08 < norm.std().item() < 0.12  # not all ones
    assert list(tiny_weights) == list(expected_shapes(TINY))


def test_sha256_of_weights_sees_names_dtypes_and_bytes():
    base = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    digest = W.sha256_of_weights(base)
    assert W.sha256_of_weights({"b": torch.ones(4), "a": torch.zeros(2, 3)}) == digest  # insertion order
    changed = {"a": base["a"].clone(), "b": base["b"]}
    changed["a"][1, 2] = 1e-30
    for other in (changed, {"c": base["a"], "b": base["b"]}, {"a": base["a"].half(), "b": base["b"]},
                  {"a": base["a"].reshape(3, 2), "b": base["b"]}):
        assert W.sha256_of_weights(other) != digest


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF

@pytest.fixture(scope="module")
def smollm2():
    return W.load_checkpoint("smollm2-135m")  # fetched (and sha256-checked) by impl.assets


def test_smollm2_gguf_config_matches_preset(smollm2):
    assert smollm2.config == PRESETS["smollm2-135m"]
    assert "output.weight" not in smollm2.weights


# slow: transformers' GGUF reader parses the real file's metadata in Python (its 49,152-token vocabulary), the
# heaviest test of this file; the default suite checks the same reader on tiny (test_save_gguf_matches_...).
@pytest.mark.slow
def test_smollm2_gguf_weights_match_transformers_gguf_reader(smollm2):
    path = Path(smollm2.tokenizer)
    reference = hf_model(path.parent, gguf_file=path.name).state_dict()
    ours = to_hf_state_dict(smollm2.weights, smollm2.config)
    assert sorted(ours) == sorted(k for k in reference if k != "lm_head.weight")
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_random_weights_are_the_same_drawn_in_any_chunk_size(dtype, monkeypatch):
    whole = W.random_weights(TINY, seed=0, dtype=dtype)  # every tiny matrix fits in one chunk
    monkeypatch.setattr(W, "_RANDOM_CHUNK", 7)  # chunks that split every tensor, rows and all
    chunked = W.random_weights(TINY, seed=0, dtype=dtype)
    assert W.sha256_of_weights(chunked) == W.sha256_of_weights(whole)
