"""Bad models: configs that would run and print garbage, and malformed files, each one line with exit 2.

One parametrized test per class, through the CLI (`cli.main`, the same boundary `python -m impl` runs;
two cases also as a real subprocess). The model is a micro Llama (1 layer, vocabulary 256) saved once in
Meta's and Hugging Face's layouts; each case edits only the JSON beside a link to its weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from impl import cli
from impl.config import ModelConfig
from impl.formats.hf import save_hf
from impl.formats.meta import save_meta
from impl.weights import random_weights

ROOT = Path(__file__).resolve().parent.parent
MICRO = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=256, max_seq_len=64)
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("micro")
    weights = random_weights(MICRO)
    return {"meta": save_meta(root / "meta", weights, MICRO), "hf": save_hf(root / "hf", weights, MICRO)}


def edited_model(saved: dict[str, Path], tmp_path: Path, layout: str, edit) -> Path:
    """A copy of the saved micro model whose JSON is edit(json) (a dict of changes, or the whole new text)."""
    source = saved[layout]
    folder = tmp_path / layout
    folder.mkdir()
    for f in source.iterdir():
        if f.suffix != ".json":
            (folder / f.name).symlink_to(f)
    name = "params.json" if layout == "meta" else "config.json"
    spec = json.loads((source / name).read_text())
    text = edit if isinstance(edit, str) else json.dumps({**spec, **edit})
    (folder / name).write_text(text)
    return folder


def generate(model: Path, capsys) -> tuple[int, str]:
    code = cli.main(["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "1"])
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert code == 2, (code, err)
    for fragment in fragments:
        assert fragment in err, (fragment, err)


NAN, INF = float("nan"), float("inf")
RS = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32}

# (layout, edit, what the one line must name)
BAD_CONFIGS = {
    "params-norm_eps-negative": ("meta", {"norm_eps": -1e-5}, "norm_eps"),
    "params-norm_eps-nan": ("meta", {"norm_eps": NAN}, "norm_eps"),
    "params-norm_eps-string": ("meta", {"norm_eps": "1e-5"}, "norm_eps"),
    "params-norm_eps-null": ("meta", {"norm_eps": None}, "norm_eps"),
    "params-rope_theta-zero": ("meta", {"rope_theta": 0}, "rope_theta"),
    "params-rope_theta-negative": ("meta", {"rope_theta": -500000.0}, "rope_theta"),
    "params-rope_theta-inf": ("meta", {"rope_theta": INF}, "rope_theta"),
    "params-rope_theta-bool": ("meta", {"rope_theta": True}, "rope_theta"),
    "params-multiple_of-zero": ("meta", {"multiple_of": 0}, "multiple_of"),
    "params-multiple_of-string": ("meta", {"multiple_of": "256"}, "multiple_of"),
    "params-ffn_dim_multiplier-string": ("meta", {"ffn_dim_multiplier": "1.3"}, "ffn_dim_multiplier"),
    "params-dim-string": ("meta", {"dim": "64"}, "dim"),
    "params-n_heads-null": ("meta", {"n_heads": None}, "n_heads"),
    "params-n_layers-bool": ("meta", {"n_layers": True}, "n_layers"),
    "params-use_scaled_rope-string": ("meta", {"use_scaled_rope": "yes"}, "use_scaled_rope"),
    "params-rope_scaling_factor-zero": ("meta", {"use_scaled_rope": True, "rope_scaling_factor": 0}, "factor"),
    "params-json-list": ("meta", "[64, 1, 4]", "expected a JSON object"),
    "config-rms_norm_eps-nan": ("hf", {"rms_norm_eps": NAN}, "norm_eps"),
    "config-rms_norm_eps-negative": ("hf", {"rms_norm_eps": -1.0}, "norm_eps"),
    "config-rms_norm_eps-null": ("hf", {"rms_norm_eps": None}, "rms_norm_eps"),
    "config-rope_theta-zero": ("hf", {"rope_theta": 0, "rope_parameters": None}, "rope_theta"),
    "config-rope_theta-string": ("hf", {"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}},
                                 "rope_theta"),
    "config-vocab_size-string": ("hf", {"vocab_size": "256"}, "vocab_size"),
    "config-num_hidden_layers-bool": ("hf", {"num_hidden_layers": True}, "num_hidden_layers"),
    "config-tie_word_embeddings-string": ("hf", {"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    "config-rope_scaling-missing-key": ("hf", {"rope_parameters": None, "rope_scaling": {"rope_type": "llama3",
                                                                                         "factor": 8.0}},
                                        "missing low_freq_factor"),
    "config-rope_scaling-factor-string": ("hf", {"rope_parameters": {**RS, "factor": "8"}}, "factor"),
    "config-rope_scaling-factor-zero": ("hf", {"rope_parameters": {**RS, "factor": 0.0}}, "factor"),
    "config-rope_scaling-low-above-high": ("hf", {"rope_parameters": {**RS, "low_freq_factor": 4.0,
                                                                      "high_freq_factor": 1.0}}, "low_freq_factor"),
    "config-rope_scaling-list": ("hf", {"rope_parameters": None, "rope_scaling": [8.0]}, "rope_scaling"),
    "config-json-list": ("hf", "[]", "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line(saved, tmp_path, capsys, case):
    layout, edit, fragment = BAD_CONFIGS[case]
    assert_one_line(*generate(edited_model(saved, tmp_path, layout, edit), capsys), fragment)


@pytest.mark.parametrize("case", ["params-multiple_of-zero", "config-json-list"])
def test_bad_config_through_python_m_impl(saved, tmp_path, case):
    layout, edit, fragment = BAD_CONFIGS[case]
    model = edited_model(saved, tmp_path, layout, edit)
    result = subprocess.run([sys.executable, "-m", "impl", "generate", "--model", str(model), "--prompt", "hi"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line(result.returncode, result.stderr, fragment)


def test_good_micro_model_loads(saved, capsys):
    # The corpus's base is valid: each case fails for its own edit (here only the missing tokenizer).
    for folder in saved.values():
        assert_one_line(*generate(folder, capsys), "no tokenizer found")


# ---- files the loaders read (impl/weights.py, being split into impl/formats/): the lead wires these ----

def _tensor_edit(saved, tmp_path, layout: str, dtype: torch.dtype) -> Path:
    folder = tmp_path / layout
    folder.mkdir()
    if layout == "hf":
        from safetensors.torch import load_file, save_file

        (folder / "config.json").write_bytes((saved["hf"] / "config.json").read_bytes())
        tensors = load_file(saved["hf"] / "model.safetensors")
        name = "model.norm.weight"
        tensors[name] = torch.ones_like(tensors[name], dtype=dtype)
        save_file(tensors, folder / "model.safetensors")
    else:
        (folder / "params.json").write_bytes((saved["meta"] / "params.json").read_bytes())
        tensors = torch.load(saved["meta"] / "consolidated.00.pth", weights_only=True)
        tensors["norm.weight"] = torch.ones_like(tensors["norm.weight"], dtype=dtype)
        torch.save(tensors, folder / "consolidated.00.pth")
    return folder


@pytest.mark.parametrize(("layout", "dtype"), [("hf", torch.int32), ("hf", torch.bool), ("meta", torch.int64),
                                               ("meta", torch.uint8)])
def test_integer_or_bool_weights_are_refused_before_casting(saved, tmp_path, capsys, layout, dtype):
    folder = _tensor_edit(saved, tmp_path, layout, dtype)
    assert_one_line(*generate(folder, capsys), "norm.weight", f"dtype {dtype}")


def _sharded(saved, tmp_path, shard_name) -> Path:
    from safetensors.torch import load_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved["hf"] / "config.json").read_bytes())
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((saved["hf"] / "model.safetensors").read_bytes())
    names = load_file(outside)
    shard = {"dotdot": "../outside.safetensors", "absolute": str(outside)}[shard_name]
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("shard", ["dotdot", "absolute"])
def test_sharded_index_naming_files_outside_the_folder_is_refused(saved, tmp_path, capsys, shard):
    folder = _sharded(saved, tmp_path, shard)
    assert_one_line(*generate(folder, capsys), "model.safetensors.index.json", "not a file in the model folder")


@pytest.mark.parametrize(("layout", "name", "text", "fragment"), [
    ("meta", "params.json", DEEP, "not valid JSON"),
    ("hf", "config.json", DEEP, "not valid JSON"),
    ("hf", "model.safetensors.index.json", DEEP, "not valid JSON"),
    ("hf", "model.safetensors.index.json", "[]", "expected a JSON object"),
], ids=["params-deep", "config-deep", "index-deep", "index-list"])
def test_malformed_loader_json_is_one_line(saved, tmp_path, capsys, layout, name, text, fragment):
    folder = tmp_path / layout
    folder.mkdir()
    for f in saved[layout].iterdir():
        os.symlink(f, folder / f.name)
    (folder / name).unlink(missing_ok=True)
    (folder / name).write_text(text)
    assert_one_line(*generate(folder, capsys), name, fragment)
