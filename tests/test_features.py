"""What each golden checks (golden.features), the main job's summary by feature, and bf16's scale-bias statistic."""

from __future__ import annotations

import json
import math

import pytest
import torch

from golden import check as golden_check
from golden import cli, compare, features, report
from impl.config import PRESETS
from tests.conftest import golden_dir


@pytest.mark.parametrize(("model", "label"), [("tiny", "core"), ("tiny-varied", "core"),
                                              ("tiny-scaled", "3.1 rope scaling"), ("tiny-tied", "tied embeddings"),
                                              ("llama-3.2-1b", "3.1 rope scaling + tied embeddings")])
def test_feature_names_what_a_model_adds_to_the_core(model, label):
    assert features.feature(PRESETS[model]) == label


def test_rope_scaling_note_gives_the_numbers_on_rope_stages_only():
    note = features.rope_scaling_note(PRESETS["tiny-scaled"], "q_rope")
    assert note.startswith("this model uses Llama 3.1 rope scaling: factor 8, original context 64, ")
    assert "low_freq_factor 1, high_freq_factor 4" in note
    assert features.rope_scaling_note(PRESETS["tiny-scaled"], "scores") is None
    assert features.rope_scaling_note(PRESETS["tiny"], "rope_cos") is None


def test_llama3_port_reads_core_pass_and_rope_scaling_fail(tmp_path, capsys, monkeypatch):
    """The README's example implements Llama 3 without 3.1 scaling: the summary says which feature is missing,
    and the failing golden's report says the model uses rope scaling."""
    monkeypatch.syspath_prepend(str(golden_dir("tiny", "fp32").parents[3]))
    assert cli.main(["check", "--impl", "examples.my_llama:forward", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("  core: PASS; 3.1 rope scaling: FAIL at ")
    assert out.splitlines()[-1].endswith("; tied embeddings: PASS")
    assert "NOTE: this model uses Llama 3.1 rope scaling: factor 8, original context 64" in out
    entries = json.loads((tmp_path / "r.json").read_text())
    scaled = [e for e in entries if e["model"] == "tiny-scaled"]
    assert {e["feature"] for e in scaled} == {"3.1 rope scaling"} and len(scaled) == 2
    assert all(e["note"].startswith("this model uses Llama 3.1 rope scaling") for e in scaled)
    assert all(e["note"] is None and e["feature"] in ("core", "tied embeddings") for e in entries
               if e["model"] != "tiny-scaled")


def test_bf16_golden_is_judged_against_the_fp32_golden_of_its_own_config():
    """tiny and tiny-scaled share weights and prompt: a bf16 golden's truth must also share its config."""
    goldens = golden_check.golden_set(None)
    for g in goldens:
        if g.dtype == "bf16":
            truth = golden_check.fp32_truth(g, goldens)
            assert truth.model_name == g.model_name, f"{g.path} judged against {truth.path}"


# ---------------------------------------------------------------- the scale-bias statistic
def _rows(seed=0, n=16, d=64):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    r = (e + 4e-3 * torch.randn(n, d, generator=g, dtype=torch.float64) * e.abs()).to(torch.bfloat16)
    return e, r


def test_scale_bias_measures_a_row_scaling_beyond_the_reference():
    e, r = _rows()
    sb = compare.scale_bias(r.double() * 1.01, e, r)
    assert sb.bias == pytest.approx(0.01, rel=0.05) and sb.s > 1.0 and not sb.ok
    assert compare.scale_bias(r, e, r).s == 0.0


def test_scale_bias_allows_noise_of_the_reference_size_and_ignores_masked_entries():
    e, r = _rows()
    g = torch.Generator().manual_seed(1)
    a = r.double() + 4e-3 * torch.randn(e.shape, generator=g, dtype=torch.float64) * e.abs()
    assert compare.scale_bias(a, e, r).ok
    e2, r2, a2 = (x.double().clone() for x in (e, r, a))
    for x in (e2, r2, a2):
        x[:, 0] = -math.inf  # masked everywhere: left out
    assert compare.scale_bias(a2, e2, r2).s == pytest.approx(compare.scale_bias(a[:, 1:], e[:, 1:], r[:, 1:]).s,
                                                              rel=0.2)


def test_scale_bias_is_inf_on_a_shape_mismatch():
    e, r = _rows()
    assert compare.scale_bias(r[:-1], e, r).s == math.inf


def test_scale_bias_applies_in_bf16_at_the_norm_outputs_only(check_against):
    rep = check_against(golden_check.impl_forward, "tiny", "bf16")
    assert {r.stage for r in rep.results if r.scale_bias is not None} == {"attn_norm", "ffn_norm", "norm"}
    assert all(r.scale_bias is None for r in check_against(golden_check.impl_forward, "tiny", "fp32").results)
    row = report.report_dict(rep)["stages"][[r.key for r in rep.results].index("layers.0.attn_norm")]
    assert set(row["scale_bias"]) == {"s", "bias", "allowance", "limit"} and row["rule"] == ""
