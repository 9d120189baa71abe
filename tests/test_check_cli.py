"""`python -m golden check`: exit codes 0/1/2, one-line errors, JSON and plot output (`pytest --impl`:
tests/test_pytest_plugin.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from golden import cli
from tests.conftest import golden_dir

BROKEN_IMPL = '''
import torch
from impl import model

def forward(tokens, w, cfg, trace):  # theta 10000 instead of the config's: a classic
    return model.forward(tokens, w, cfg.replace(rope_theta=10000.0), trace=trace)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's implementation module on sys.path."""
    (tmp_path / "user_llama.py").write_text(BROKEN_IMPL)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_llama:forward"


def test_check_default_golden_passes_with_exit_0(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "tiny, fp32" in out and "tiny, bf16" in out and out.count("PASS: 43/43 stages within tolerance") == 8
    for model in ("tiny-varied", "tiny-scaled", "tiny-tied"):
        assert f"{model}, fp32" in out and f"{model}, bf16" in out
    assert out.count("  decode: PASS 8/8 steps (") == 8
    assert out.splitlines()[-1] == "  core: PASS; 3.1 rope scaling: PASS; tied embeddings: PASS; decode: PASS"


def test_check_writes_json_and_plot(tmp_path):
    assert cli.main(["check", str(golden_dir("tiny", "fp32").parent), "--json", str(tmp_path / "r.json"),
                     "--plot", str(tmp_path / "r.png")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert [d["dtype"] for d in data] == ["fp32", "bf16"] and all(d["passed"] for d in data)
    assert {"max_abs", "rel", "nmse", "cosine"} <= set(data[0]["stages"][5]["metrics"])
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_broken_impl_exits_1_and_names_first_stage(user_module, capsys):
    assert cli.main(["check", str(golden_dir("tiny", "fp32")), "--impl", user_module]) == 1
    out = capsys.readouterr().out
    assert "FIRST FAILURE: rope_cos" in out and "FAIL" in out


@pytest.mark.parametrize(("args", "message"), [
    (["check", "no/such/folder"], "not a golden folder"),
    (["check", "--impl", "nomodule_xyz:forward"], "cannot import nomodule_xyz (ModuleNotFoundError: No module named "
                                                   "'nomodule_xyz'); run from the folder that holds it, or give "
                                                   "its file: path/to/nomodule_xyz.py:forward"),
    (["check", "--impl", "golden.check"], "expected module:callable"),
    (["check", "--impl", "golden.check:nothing_here"], "has no attribute nothing_here"),
    (["check", "--impl", "no/such/my_llama.py:forward"], "no file no/such/my_llama.py"),
], ids=["missing-golden", "unimportable-module", "no-colon", "no-attribute", "missing-file"])
def test_check_bad_input_exits_2_with_one_line(capsys, args, message):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.parametrize("name", ["my_llama.py", "impl.py"], ids=["file", "file-named-like-a-package"])
def test_check_loads_an_implementation_by_file_path(tmp_path, capsys, name):
    """A notebook export is a file, not a module on sys.path; one called impl.py shadows nothing."""
    (tmp_path / name).write_text(BROKEN_IMPL)
    assert cli.main(["check", str(golden_dir("tiny", "fp32")), "--impl", f"{tmp_path / name}:forward"]) == 1
    assert "FIRST FAILURE: rope_cos" in capsys.readouterr().out


def test_implementation_file_that_fails_to_load_is_one_line(tmp_path, capsys):
    (tmp_path / "my_llama.py").write_text("import torch\nW = undefined_name\n")
    assert cli.main(["check", "--impl", f"{tmp_path / 'my_llama.py'}:forward"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot import my_llama.py (NameError: name 'undefined_name' is not defined at " in err
    assert err.rstrip().endswith("my_llama.py:2)")


def test_check_tampered_golden_exits_2(tmp_path, capsys):
    dst = tmp_path / "g"
    shutil.copytree(golden_dir("tiny", "fp32"), dst)
    blob = bytearray((dst / "activations.safetensors").read_bytes())
    blob[-3] ^= 1
    (dst / "activations.safetensors").write_bytes(bytes(blob))
    assert cli.main(["check", str(dst)]) == 2
    assert "tampered or truncated" in capsys.readouterr().err


def test_check_bf16_alone_needs_its_fp32_golden(tmp_path, capsys):
    shutil.copytree(golden_dir("tiny", "bf16"), tmp_path / "bf16")
    assert cli.main(["check", str(tmp_path / "bf16")]) == 2
    assert "needs the fp32 golden" in capsys.readouterr().err


def test_check_impl_that_raises_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "crashing.py").write_text("def forward(tokens, w, cfg, trace):\n    raise ValueError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["check", "--impl", "crashing:forward"]) == 2
    assert "raised ValueError: boom at" in capsys.readouterr().err


def test_runner_accepts_a_batch_dim_full_logits_and_finite_masks(check_against):
    """Reporting conventions that are not bugs: (1, ...) tensors, logits of every position, -1e9 masks."""
    from impl import model

    def batched(tokens, w, cfg, trace):
        def report(name, t):
            if name == "scores":
                t = t.masked_fill(torch.isinf(t), -1e9)
            trace(name, t[None])

        logits = model.forward(tokens, w, cfg, trace=lambda n, t: None if n == "logits" else report(n, t))
        trace("logits", logits[None])  # (1, seq, vocab)

    report = check_against(batched, "tiny", "fp32")
    assert report.passed and not [r for r in report.results if r.status != "pass"]


def test_check_accepts_a_golden_of_a_bf16_stored_checkpoint(tmp_path):
    """The checker identifies the model as stored, as the recorder does (no fp32 re-load, no refusal)."""
    from golden.check import check
    from golden.record import WALKTHROUGH_PROMPT, record
    from impl import assets
    from impl.formats.hf import save_hf
    from impl.weights import load_checkpoint

    ckpt = load_checkpoint("tiny", dtype=torch.bfloat16)
    folder = save_hf(tmp_path / "hf-bf16", ckpt.weights, ckpt.config)
    shutil.copy(assets.asset_file("llama3-tokenizer", "tokenizer.json"), folder)
    golden = record(str(folder), WALKTHROUGH_PROMPT, "fp32", out=tmp_path / "g", progress=False)
    (outcome,) = check(golden, dtypes=("fp32",), model=str(folder))
    assert outcome.report.verdict == "PASS"
