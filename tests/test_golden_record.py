"""The recorder: transformers with hooks gives every stage, in impl's layout, deterministically,
without changing the model's own output; the committed baselines still re-record; diff names drift.
"""

import json
import math
import re

import pytest
import torch

from golden import cli
from golden.check import diff_goldens
from golden.compare import stage_metrics
from golden.decode import plan_of
from golden.format import ACTIVATIONS, MANIFEST, load_golden, sha256_file, write_golden
from golden.record import BASELINES, DATA_DIR, WALKTHROUGH_PROMPT, capture, load_reference, record
from golden.report import format_diff
from golden.sampling import Sampled
from impl import stages
from impl.errors import Llama3GoldenError
from impl.layout import DTYPES
from impl.layout import rotate_half_to_interleaved as to_meta_layout
from impl.model import forward
from impl.weights import load_checkpoint

TINY_BASELINES = [pytest.param(name, marks=pytest.mark.slow) if model == "tiny-long" else name  # 35 s to record
                  for name, (model, _, _) in BASELINES.items() if model.startswith("tiny")]
BUDGET_MB = 40  # issue 10: the default, decode and long-prompt goldens


@pytest.fixture(scope="module")
def tiny():
    """transformers' tiny model, fp32, loaded with plain eager attention."""
    with load_reference("tiny", "fp32", "eager") as ref:
        yield ref


@pytest.fixture(scope="module")
def tokens(tiny):
    return tiny.tokenizer.encode(WALKTHROUGH_PROMPT, bos=True)


@pytest.fixture(scope="module")
def eager(tiny, tokens):
    return capture(tiny.hf_model, tokens, "eager")


@pytest.fixture(scope="module")
def sdpa(tiny, tokens):
    return capture(tiny.hf_model, tokens, "sdpa")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return record("tiny", WALKTHROUGH_PROMPT, "fp32", out=tmp_path_factory.mktemp("rec") / "tiny/fp32", progress=False)


def _plain_logits(hf_model, tokens, attn):
    before = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(attn)
    try:
        with torch.inference_mode():
            return hf_model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1]
    finally:
        hf_model.set_attn_implementation(before)


# ---------------------------------------------------------------- the recording itself
def test_record_twice_gives_identical_files(recorded, tmp_path):
    again = record("tiny", WALKTHROUGH_PROMPT, "fp32", out=tmp_path / "again", progress=False)
    assert sha256_file(again / ACTIVATIONS) == sha256_file(recorded / ACTIVATIONS)
    assert (again / MANIFEST).read_bytes() == (recorded / MANIFEST).read_bytes()


def test_record_stages_are_complete_with_config_shapes(recorded):
    g = load_golden(recorded)
    assert len(g.tokens) == 17 and g.tokens[0] == 128000  # the walk-through's 17 tokens, BOS first
    assert g.keys == stages.all_keys(g.config.n_layers)
    for k, t in g.tensors.items():
        assert tuple(t.shape) == stages.expected_shape(k, g.config, 17), k
        assert t.dtype == (torch.int64 if k == "tokens" else torch.float32), k


def test_record_manifest_names_the_model_and_software(recorded, tiny):
    m = load_golden(recorded).manifest
    assert m["model"] == {"name": "tiny", "config": tiny.config.to_dict(), "weights_sha256": tiny.weights_sha256,
                          "source": "random tiny seed 0"}
    assert (m["dtype"], m["attn_implementation"], m["prompt"], m["derived"]) == (
        "fp32", "eager", WALKTHROUGH_PROMPT, ["scores"])
    assert m["versions"]["transformers"] and m["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_capture_leaves_model_output_bit_identical(tiny, tokens, eager, sdpa, attn):
    captured = {"eager": eager, "sdpa": sdpa}[attn]["logits"]
    assert torch.equal(captured, _plain_logits(tiny.hf_model, tokens, attn))


def test_capture_restores_the_model(tiny, eager):
    assert tiny.hf_model.config._attn_implementation == "eager"
    hooked = [n for n, m in tiny.hf_model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []


def test_capture_sdpa_agrees_with_eager(eager, sdpa):
    # Every stage, including sdpa's derived scores/probs: fp32 summation-order noise only.
    for k in eager:
        m = stage_metrics(sdpa[k], eager[k])
        assert m.rel <= 1e-5 and m.mask_mismatch == 0, f"{k}: {m}"


def test_capture_eager_scores_softmax_to_transformers_probs(eager):
    # scores are recomputed with eager_attention_forward's expressions; probs are its own output.
    for i in range(2):
        scores, probs = eager[f"layers.{i}.scores"], eager[f"layers.{i}.probs"]
        assert torch.equal(torch.softmax(scores, dim=-1, dtype=torch.float32), probs)


def test_capture_masks_scores_with_minus_inf(eager):
    above = torch.ones(17, 17, dtype=torch.bool).triu(1).expand(8, 17, 17)
    scores, probs = eager["layers.0.scores"], eager["layers.0.probs"]
    assert torch.all(scores[above] == -math.inf) and torch.all(torch.isfinite(scores[~above]))
    assert torch.all(probs[above] == 0)


def test_capture_q_k_are_in_meta_layout(tiny, eager):
    # Meta's checkpoint layout (impl's weights) times the normed input gives the golden's q and k directly.
    w = load_checkpoint("tiny").weights
    x = eager["layers.0.attn_norm"]
    q = (x @ w["layers.0.attention.wq.weight"].T).view(17, 8, 16)
    k = (x @ w["layers.0.attention.wk.weight"].T).view(17, 2, 16)
    torch.testing.assert_close(eager["layers.0.q"], q, msg="q")
    torch.testing.assert_close(eager["layers.0.k"], k, msg="k")
    assert not torch.allclose(to_meta_layout(q), q)  # the layouts do differ, so the check above means something


def test_capture_rope_rotates_adjacent_pairs(eager):
    # Meta layout: (x[2i], x[2i+1]) rotated by the angle whose cos/sin the golden holds for pair i.
    angle = torch.complex(eager["rope_cos"], eager["rope_sin"])[:, None, :]  # (seq, 1, d/2)
    for name in ("q", "k"):
        x = eager[f"layers.1.{name}"]
        rotated = torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * angle).flatten(-2)
        torch.testing.assert_close(eager[f"layers.1.{name}_rope"], rotated, msg=name)


def test_decode_steps_feed_transformers_greedy_generation(tiny, tokens):
    """The committed decode steps feed what transformers' own `generate` picks, greedily, after the prompt."""
    greedy = load_golden(DATA_DIR / "tiny/fp32").manifest["decode"]["greedy"]
    with torch.inference_mode():
        ids = torch.tensor([tokens])
        out = tiny.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(greedy),
                                     do_sample=False, pad_token_id=0)
    assert out[0, len(tokens):].tolist() == greedy


def test_record_refuses_bad_input(tmp_path):
    with pytest.raises(Llama3GoldenError, match="empty prompt"):
        record("tiny", "", "fp32", out=tmp_path / "unused")
    with pytest.raises(Llama3GoldenError, match="dtype 'fp16' is not one of fp32, bf16"):
        record("tiny", "x", "fp16", out=tmp_path / "unused")


# ---------------------------------------------------------------- impl against the recorder (smoke)
@pytest.mark.parametrize("name", ["tiny/fp32", "tiny-scaled/fp32"])
def test_impl_trace_matches_committed_golden(name):
    g = load_golden(DATA_DIR / name)
    ckpt = load_checkpoint(g.model_name)
    trace = {}
    forward(torch.tensor(g.tokens), ckpt.weights, ckpt.config, trace=lambda k, t: trace.__setitem__(k, t.clone()))
    assert sorted(trace) == sorted(g.keys)
    for k in g.keys:
        m = stage_metrics(trace[k], g.tensors[k])
        assert m.rel <= 1e-4 and m.mask_mismatch == 0, f"{name} {k}: {m}"


# ---------------------------------------------------------------- the committed baselines
@pytest.mark.parametrize("name", list(BASELINES))
def test_committed_baseline_loads(name):
    model, prompt, dtype = BASELINES[name]
    g = load_golden(DATA_DIR / name)
    assert (g.model_name, g.manifest["prompt"], g.dtype) == (model, prompt, dtype)
    assert g.keys == stages.all_keys(g.config.n_layers)
    float_dtype = DTYPES[dtype]
    for k, t in g.tensors.items():
        assert t.dtype == {"tokens": torch.int64, "logprobs_last": torch.float32}.get(k, float_dtype), k
    seq, n_heads = len(g.tokens), g.config.n_heads
    above = torch.ones(seq, seq, dtype=torch.bool).triu(1).expand(n_heads, seq, seq)
    for i in range(g.config.n_layers):
        scores, hidden = g.tensors[f"layers.{i}.scores"], above
        if isinstance(scores, Sampled):  # a long prompt: the sampled queries' rows (golden.sampling)
            hidden, scores = above[:, list(scores.rows.positions)], scores.values
        assert torch.all(scores[hidden] == -math.inf) and torch.all(torch.isfinite(scores[~hidden])), i


def test_committed_baselines_fit_the_budget():
    size = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert size <= BUDGET_MB * 1e6, f"golden/data holds {size / 1e6:.1f} MB"


@pytest.mark.parametrize("name", TINY_BASELINES)
def test_committed_baseline_rerecords_without_drift(name, tmp_path):
    # An upstream numerics change (new torch / transformers) shows up here as a named stage.
    model, prompt, dtype = BASELINES[name]
    # bf16 feeds the committed fp32 golden's decode tokens, as record-baselines does; fp32 decodes afresh (a changed
    # greedy token then shows in the diff)
    plan = plan_of(load_golden(DATA_DIR / name.replace("bf16", "fp32"))) if dtype == "bf16" else None
    new = load_golden(record(model, prompt, dtype, out=tmp_path / name, progress=False, decode_plan=plan))
    old = load_golden(DATA_DIR / name)
    report = diff_goldens(old, new)
    assert report.passed, format_diff(report, old.path, new.path)


# ---------------------------------------------------------------- diff
def _perturbed(src, dst, key, factor):
    g = load_golden(src)
    tensors = g.stored()  # the decode steps' too
    tensors[key] = (tensors[key].float() * factor).to(tensors[key].dtype)
    fields = {k: v for k, v in g.manifest.items() if k not in ("format", "version", "layout", "stages",
                                                               "activations_sha256")}
    return write_golden(dst, fields, tensors)


@pytest.mark.parametrize("name, factor", [("tiny/fp32", 1.001), ("tiny/bf16", 1.25)], ids=["fp32", "bf16"])
def test_diff_names_a_perturbed_stage(name, factor, tmp_path, capsys):
    b = _perturbed(DATA_DIR / name, tmp_path / "b", "layers.1.ffn_up", factor)
    assert cli.main(["diff", str(DATA_DIR / name), str(b), "--json", str(tmp_path / "d.json")]) == 1
    assert "first drift: layers.1.ffn_up: rel" in capsys.readouterr().out
    assert json.loads((tmp_path / "d.json").read_text())["first_failure"] == "layers.1.ffn_up"


def test_diff_draws_the_same_plot_as_check(tmp_path):
    b = _perturbed(DATA_DIR / "tiny/fp32", tmp_path / "b", "layers.1.ffn_up", 1.001)
    assert cli.main(["diff", str(DATA_DIR / "tiny/fp32"), str(b), "--plot", str(tmp_path / "d.png")]) == 1
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_passes_equal_goldens(capsys):
    a = str(DATA_DIR / "tiny/fp32")
    assert cli.main(["diff", a, a]) == 0
    assert "no drift beyond tolerance" in capsys.readouterr().out


@pytest.mark.parametrize("a, b, message", [
    ("tiny/fp32", "tiny-scaled/fp32", r"golden was recorded for model tiny-scaled \(weights sha \w+\), not tiny of"),
    ("tiny/fp32", "tiny/bf16", r"dtype bf16, .*tiny/fp32 is fp32; diff compares goldens of one dtype"),
], ids=["model", "dtype"])
def test_diff_refuses_goldens_of_different_models(a, b, message, capsys):
    assert cli.main(["diff", str(DATA_DIR / a), str(DATA_DIR / b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_cli_reports_a_missing_golden_in_one_line(tmp_path, capsys):
    assert cli.main(["diff", str(tmp_path / "x"), str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'x'}: no such golden folder\n"
