"""The golden folder format: round trip, determinism, atomic writes, and every refusal's message.

Synthetic goldens (a 1-layer, 16-token-vocabulary config, random tensors): no transformers needed.
"""

import json
import os

import pytest
import torch

from golden import format as gf
from golden.format import GoldenError, check_same_model, load_golden, write_golden
from impl import stages
from impl.config import ModelConfig, RopeScaling
from impl.errors import Llama3GoldenError

CONFIG = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=12,
                     rope_scaling=RopeScaling(original_max_position_embeddings=4))
TOKENS = [1, 5, 7]
SHA = "ab" * 32


def _tensors(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in stages.all_keys(CONFIG.n_layers):
        shape = stages.expected_shape(k, CONFIG, len(TOKENS))
        if k == "tokens":
            out[k] = torch.tensor(TOKENS, dtype=torch.int64)
        elif k == "logprobs_last":
            out[k] = torch.randn(shape, generator=g)
        else:
            out[k] = torch.randn(shape, generator=g).to(dtype)
    scores = out["layers.0.scores"]
    scores.masked_fill_(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
    return out


def _manifest(dtype="fp32", sha=SHA, config=CONFIG):
    return {"model": {"name": "synthetic", "config": config.to_dict(), "weights_sha256": sha, "source": "test"},
            "dtype": dtype, "attn_implementation": "eager", "prompt": "a b c", "tokens": TOKENS,
            "derived": ["scores"], "versions": {"torch": torch.__version__}}


@pytest.fixture
def golden_dir(tmp_path):
    return write_golden(tmp_path / "g", _manifest(), _tensors())


# ---------------------------------------------------------------- round trip and determinism
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_write_golden_round_trips(tmp_path, dtype):
    tensors = _tensors(gf.DTYPES[dtype])
    g = load_golden(write_golden(tmp_path / "g", _manifest(dtype), tensors))
    assert g.keys == list(tensors) == stages.all_keys(1)
    for k, t in tensors.items():
        assert g.tensors[k].dtype == t.dtype, k
        assert torch.equal(g.tensors[k], t), k  # bitwise, -inf included
    assert {k: g.manifest[k] for k in _manifest(dtype)} == _manifest(dtype)
    assert (g.config, g.dtype, g.tokens, g.torch_dtype) == (CONFIG, dtype, TOKENS, gf.DTYPES[dtype])
    assert g.manifest["format"] == "llama3-golden" and g.manifest["version"] == 2
    assert g.manifest["manifest_sha256"] == gf.manifest_digest(g.manifest)
    assert g.manifest["layout"]["qk"].startswith("meta-interleaved")
    assert g.manifest["stages"][1] == {"name": "embeddings", "shape": [3, 8], "dtype": dtype_name(dtype)}


def dtype_name(dtype):
    return {"fp32": "float32", "bf16": "bfloat16"}[dtype]


def test_write_golden_is_byte_identical_when_repeated(tmp_path):
    a = write_golden(tmp_path / "a", _manifest(), _tensors())
    b = write_golden(tmp_path / "b", _manifest(), _tensors())
    for name in (gf.MANIFEST, gf.ACTIVATIONS):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_write_golden_replaces_an_existing_golden(golden_dir):
    write_golden(golden_dir, _manifest(), _tensors(seed=1))
    assert torch.equal(load_golden(golden_dir).tensors["embeddings"], _tensors(seed=1)["embeddings"])
    assert sorted(p.name for p in golden_dir.parent.iterdir()) == ["g"]  # no temp or old folders left


def test_write_golden_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(GoldenError, match=r"notes: exists and is not a golden folder; refusing to overwrite it"):
        write_golden(tmp_path / "notes", _manifest(), _tensors())
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_write_golden_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(gf.os, "rename", fail)
    with pytest.raises(OSError):
        write_golden(tmp_path / "g", _manifest(), _tensors())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- refusals
def _flip_byte(d):
    p = d / gf.ACTIVATIONS
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(d):
    p = d / gf.ACTIVATIONS
    p.write_bytes(p.read_bytes()[:-100])


def _edit_manifest(redigest=True, **changes):
    """Edit manifest fields; by default recompute manifest_sha256 too (a hostile edit the digest cannot catch)."""
    def edit(d):
        m = json.loads((d / gf.MANIFEST).read_text())
        for k, v in changes.items():
            m[k] = v(m) if callable(v) else v
        if redigest:
            m["manifest_sha256"] = gf.manifest_digest(m)
        (d / gf.MANIFEST).write_text(json.dumps(m))
    return edit


def _drop(d, key):
    m = json.loads((d / gf.MANIFEST).read_text())
    del m[key]
    (d / gf.MANIFEST).write_text(json.dumps(m))


def _shape(m):
    m["stages"][1]["shape"] = [3, 9]
    return m["stages"]


def _dtype(m):
    m["stages"][1]["dtype"] = "bfloat16"
    return m["stages"]


def _unknown(m):
    m["stages"][1]["name"] = "embedings"
    return m["stages"]


REFUSALS = {
    "tampered": (_flip_byte, r"activations.safetensors: sha256 \w{12}\.\.\. does not match the manifest's "
                             r"\w{12}\.\.\. \(tampered or truncated\)$"),
    "truncated": (_truncate, r"activations.safetensors: sha256 .* \(tampered or truncated\)$"),
    "newer-version": (_edit_manifest(version=3), r"manifest.json: format version 3, this reader reads version 2$"),
    "older-version": (_edit_manifest(version=1), r"manifest.json: golden format version 1 is older than this reader's "
                                                 r"2; re-record it with `python -m golden record --model synthetic "
                                                 r"--prompt 'a b c' --dtype fp32 --out .*/g` \(the committed "
                                                 r"baselines: `python -m golden record-baselines`\)$"),
    "edited": (_edit_manifest(redigest=False, prompt="a b d"),
               r"manifest.json: content does not match its manifest_sha256 \(edited after recording\); re-record"),
    "format": (_edit_manifest(format="npz"), r"manifest.json: format 'npz' is not 'llama3-golden'$"),
    "not-json": (lambda d: (d / gf.MANIFEST).write_text("{"), r"manifest.json: not valid JSON \(.*\)$"),
    "no-manifest": (lambda d: (d / gf.MANIFEST).unlink(), r"g/manifest.json: missing$"),
    "no-tensors": (lambda d: (d / gf.ACTIVATIONS).unlink(), r"g/activations.safetensors: missing$"),
    "no-sha": (lambda d: _drop(d, "activations_sha256"), r"manifest.json: missing activations_sha256$"),
    "dtype": (_edit_manifest(dtype="fp16"), r"manifest.json: dtype 'fp16' is not fp32 or bf16$"),
    "shape": (_edit_manifest(stages=_shape), r"manifest.json: stage embeddings has shape \[3, 9\], "
                                             r"the model config gives \[3, 8\]$"),
    "stage-dtype": (_edit_manifest(stages=_dtype), r"activations.safetensors: stage embeddings is float32 \[3, 8\], "
                                                   r"the manifest says bfloat16 \[3, 8\]$"),
    "unknown-stage": (_edit_manifest(stages=_unknown), r"manifest.json: unknown stage 'embedings'$"),
    "unlisted": (_edit_manifest(stages=lambda m: m["stages"][:-1]),
                 r"manifest.json: holds 24 of the model's 25 stages; missing logprobs_last$"),
}


@pytest.mark.parametrize("damage, message", list(REFUSALS.values()), ids=list(REFUSALS))
def test_load_golden_refuses_with_one_line(golden_dir, damage, message):
    damage(golden_dir)
    with pytest.raises(GoldenError, match=message) as info:
        load_golden(golden_dir)
    assert str(info.value).startswith(str(golden_dir))
    assert "\n" not in str(info.value)


def test_load_golden_refuses_a_missing_folder(tmp_path):
    with pytest.raises(GoldenError, match=r"nowhere: no such golden folder$"):
        load_golden(tmp_path / "nowhere")


def test_golden_error_is_a_user_error():
    assert issubclass(GoldenError, Llama3GoldenError) and GoldenError.exit_code == 2


# ---------------------------------------------------------------- model identity
def test_check_same_model_accepts_the_recorded_model(golden_dir):
    check_same_model(load_golden(golden_dir), CONFIG, SHA)


@pytest.mark.parametrize("config, sha", [(CONFIG, "cd" * 32), (CONFIG.replace(norm_eps=1e-6), SHA)],
                         ids=["weights", "config"])
def test_check_same_model_refuses_another_model(golden_dir, config, sha):
    g = load_golden(golden_dir)
    with pytest.raises(GoldenError, match=rf"golden was recorded for model synthetic \(weights sha abababababab\), "
                                          rf"not mine \(weights sha {sha[:12]}\)$"):
        check_same_model(g, config, sha, name="mine")


def test_environment_names_the_software_and_cpu():
    env = gf.environment()
    assert {"python", "platform", "torch", "transformers", "tokenizers", "safetensors", "cpu", "cpu_flags"} <= set(env)
    assert env["torch"] == torch.__version__
    assert os.cpu_count() and isinstance(env["cpu_flags"], list)
