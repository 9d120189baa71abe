"""Sampled goldens (golden.sampling): the sample, the summaries, the file format, catching power, bounded memory.

A golden of a long prompt keeps the full rows at a few positions and a summary of every row. Short goldens stay
full, so here the committed short goldens are sampled in memory (`sample_all`, the threshold forced low) to show
that the sampled form catches every mutation of tests/test_mutations.py at the same first stage, and that the
correct alternatives still pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from golden import check as golden_check
from golden import sampling
from golden.check import check_golden
from golden.format import GoldenError, load_golden, manifest_digest, write_golden
from golden.sampling import Sampled, sample_all, sample_positions
from impl import model, stages
from impl.config import PRESETS
from impl.weights import random_weights
from tests.alternatives import ALTERNATIVES, BF16_ONLY
from tests.conftest import GOLDEN_MODELS, golden_dir
from tests.test_mutations import CASES, IDS, _run_mutant


# ---------------------------------------------------------------- the sample
@pytest.mark.parametrize("seq", [65, 129, 1025, 8361])
def test_sample_keeps_first_last_and_a_spread(seq):
    pos = sample_positions(seq)
    assert pos == tuple(sorted(set(pos))) and len(pos) <= 4 + sampling.SPREAD
    assert {0, 1, seq - 2, seq - 1} <= set(pos)  # the last query is the longest-range row
    gaps = [b - a for a, b in zip(pos, pos[1:], strict=False)]
    assert max(gaps) <= math.ceil((seq - 1) / (sampling.SPREAD + 1)) + 1  # evenly spread


@pytest.mark.parametrize("seq", [1, 17, sampling.THRESHOLD])
def test_short_prompts_are_not_sampled(seq):
    assert sample_positions(seq) is None


# ---------------------------------------------------------------- the summaries
def _causal_scores(h=3, seq=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(h, seq, seq, generator=g) * 3
    return scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), -math.inf)


@pytest.mark.parametrize("block", [7, 1 << 22], ids=["blocks-of-rows", "one-block"])
def test_summaries_match_their_formulas(monkeypatch, block):
    monkeypatch.setattr(sampling, "_BLOCK", block)
    scores = _causal_scores()
    probs = scores.softmax(-1)
    pos = (0, 5, 39)
    s = sampling.reduce(scores, sampling.Rows.of(stages.SCORES, pos))
    p = sampling.reduce(probs, sampling.Rows.of(stages.PROBS, pos))
    x = sampling.reduce(scores[0], sampling.Rows.of(stages.RESIDUAL_IN, pos))  # (seq, seq) as a per-position stage
    d = scores.double()
    torch.testing.assert_close(s.summaries["logsumexp"].double(), torch.logsumexp(d, -1), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.summaries["max"].double(), d.amax(-1))
    pd = probs.double()
    entropy = -(pd * pd.log()).nan_to_num(0.0).sum(-1)
    torch.testing.assert_close(p.summaries["entropy"].double(), entropy, rtol=1e-5, atol=1e-6)
    assert torch.equal(p.summaries["argmax"].long(), probs.argmax(-1))
    assert torch.equal(s.values, scores[:, list(pos)]) and torch.equal(x.values, scores[0][list(pos)])


def test_l2_summary_is_the_row_norm():
    x = torch.randn(70, 4, 8)
    got = sampling.reduce(x, sampling.Rows.of(stages.Q, (0, 69))).summaries["l2"]
    torch.testing.assert_close(got.double(), x.double().reshape(70, -1).norm(dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("masked", [-math.inf, torch.finfo(torch.float32).min, -1e9, -1e4])
def test_logsumexp_ignores_any_spelling_of_the_mask(masked):
    scores = _causal_scores()
    spelled = scores.masked_fill(scores.isinf(), masked)
    rows = sampling.Rows.of(stages.SCORES, (0, 39))
    a, b = sampling.summarize(scores, rows), sampling.summarize(spelled, rows)
    assert torch.equal(a["logsumexp"], b["logsumexp"]) and torch.equal(a["max"], b["max"])


# ---------------------------------------------------------------- the file format
def _sampled_golden(name="tiny/fp32", positions=(0, 3, 16)):
    g = load_golden(golden_dir(*name.split("/")))
    return g, sample_all(g.tensors, positions)


def _fields(g):
    """The manifest of a sampled golden made from g's prefill (without g's decode steps)."""
    return {k: v for k, v in g.manifest.items() if k not in ("format", "version", "layout", "stages",
                                                                "activations_sha256", "manifest_sha256", "decode")}


def test_sampled_golden_round_trips(tmp_path):
    g, tensors = _sampled_golden()
    back = load_golden(write_golden(tmp_path / "g", _fields(g), tensors))
    assert list(back.tensors) == list(tensors)
    for k, t in tensors.items():
        b = back.tensors[k]
        if isinstance(t, Sampled):
            assert b.rows == t.rows and b.shape == t.shape and torch.equal(b.values, t.values), k
            assert all(torch.equal(b.summaries[n], v) for n, v in t.summaries.items()), k
        else:
            assert torch.equal(b, t), k
    entry = next(e for e in back.manifest["stages"] if e["name"] == "layers.0.scores")
    assert entry["rows"] == {"axis": 1, "positions": [0, 3, 16], "summaries": ["logsumexp", "max"]}
    assert entry["shape"] == [8, 17, 17]  # the stage's own shape; the file holds the rows up to each query


def _edit(folder, change):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))


def _rows_of(m, name):
    return next(e for e in m["stages"] if e["name"] == name)["rows"]


BAD_ROWS = {
    "position-past-the-prompt": (lambda m: _rows_of(m, "embeddings").update(positions=[0, 17]),
                                 "positions: sorted distinct positions in [0, 17)"),
    "unsorted": (lambda m: _rows_of(m, "embeddings").update(positions=[3, 0, 16]), "sorted distinct"),
    "other-summaries": (lambda m: _rows_of(m, "layers.0.probs").update(summaries=["entropy"]),
                        "a sampled probs stage holds ['entropy', 'argmax']"),
    "other-axis": (lambda m: _rows_of(m, "layers.0.scores").update(axis=0), "positions run along axis 1"),
    "tokens-sampled": (lambda m: m["stages"][0].update(rows=_rows_of(m, "embeddings")), "never sampled"),
}


@pytest.mark.parametrize("edit", list(BAD_ROWS))
def test_golden_with_bad_rows_is_refused_in_one_line(tmp_path, edit):
    g, tensors = _sampled_golden()
    folder = write_golden(tmp_path / "g", _fields(g), tensors)
    change, message = BAD_ROWS[edit]
    _edit(folder, change)
    with pytest.raises(GoldenError) as e:
        load_golden(folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_non_causal_attention_row_is_not_written(tmp_path):
    g, tensors = _sampled_golden()
    s = tensors["layers.0.probs"]
    values = s.values.clone()
    values[0, 0, 5] = 0.1  # query 0 attends key 5
    tensors["layers.0.probs"] = dataclasses.replace(s, values=values)
    with pytest.raises(GoldenError, match="probs row 0 holds values after its query"):
        write_golden(tmp_path / "g", _fields(g), tensors)


def test_bf16_check_refuses_an_fp32_truth_sampled_elsewhere(tmp_path):
    for dtype, pos in (("fp32", (0, 3, 16)), ("bf16", (0, 4, 16))):
        g, tensors = _sampled_golden(f"tiny/{dtype}", pos)
        write_golden(tmp_path / "tiny" / dtype, _fields(g), tensors)
    with pytest.raises(GoldenError, match="sampled at other positions than its fp32 golden"):
        golden_check.check(tmp_path / "tiny", dtypes=("bf16",))


# ---------------------------------------------------------------- catching power in sampled mode
SPARSE = "first-and-last"  # two positions in full: the summaries of every row carry the rest


def _positions(seq: int, how: str):
    return (0, seq - 1) if how == SPARSE else sample_positions(seq, threshold=1)


@pytest.fixture(scope="module")
def sampled_goldens(goldens):
    cache = {}

    def get(name, dtype, how):
        if (name, dtype, how) not in cache:
            g = goldens(name, dtype)
            cache[name, dtype, how] = dataclasses.replace(g, tensors=sample_all(g.tensors, _positions(len(g.tokens),
                                                                                                       how)))
        return cache[name, dtype, how]

    return get


def _sampled_check(sampled_goldens, models, how):
    def run(fn, name, dtype):
        ckpt, weights = models(name, dtype)
        return check_golden(fn, sampled_goldens(name, dtype, how), sampled_goldens(name, "fp32", how), ckpt.config,
                            weights)

    return run


SAMPLED_CASES = [pytest.param(m, g, d, how, id=f"{i}-{how}",
                              marks=[pytest.mark.slow] if g == "smollm2-135m" or how != SPARSE or d == "bf16"
                              else [])  # the default suite's budget: fp32 at two rows by default, the rest slow
                 for (m, g, d), i in zip(CASES, IDS, strict=True) for how in (SPARSE, "documented-sample")]


@pytest.mark.parametrize(("mutation", "golden", "dtype", "how"), SAMPLED_CASES)
def test_mutation_is_caught_at_the_same_stage_in_sampled_mode(monkeypatch, sampled_goldens, models, mutation, golden,
                                                              dtype, how):
    from tests.test_mutations import MUTATIONS

    report = _run_mutant(monkeypatch, models, _sampled_check(sampled_goldens, models, how), mutation, dtype, golden)
    first = report.first_failure
    assert first is not None, f"{mutation} ({golden}, {dtype}) passed a sampled golden"
    assert first.key == MUTATIONS[mutation][3], f"{mutation}: first failure named {first.key}"


def _sees_the_next_key(t):
    t[:, 7, 8] = t[:, 7, 7]


def _reversed_row(t):
    t[:, 7, :8] = t[:, 7, :8].flip(-1)  # same entropy, another argmax key


def _scaled_position(t):
    t[7] *= 1.01


ONE_ROW_BUGS = {  # a bug in one row that the sample (positions 0 and 16) does not hold: its summary catches it
    "scores-query-7-sees-key-8": ("layers.0.scores", _sees_the_next_key, ("logsumexp", "max")),
    "probs-row-7-reversed": ("layers.1.probs", _reversed_row, ("argmax",)),
    "attn-norm-position-7-scaled": ("layers.0.attn_norm", _scaled_position, ("l2",)),
}


@pytest.mark.parametrize("bug", list(ONE_ROW_BUGS))
def test_a_summary_catches_a_bug_in_a_row_that_is_not_sampled(sampled_goldens, models, bug):
    key, corrupt, parts = ONE_ROW_BUGS[bug]

    def fn(tokens, w, config, trace):
        def traced(k, t):
            if k == key:
                t = t.clone()
                corrupt(t)
            trace(k, t)

        return model.forward(tokens, w, config, trace=traced)

    first = _sampled_check(sampled_goldens, models, SPARSE)(fn, "tiny", "fp32").first_failure
    assert first is not None and first.key == key and first.metrics.part in parts, first


CORRECT = {**ALTERNATIVES, **{f"{k}-bf16-only": fn for k, (fn, _) in BF16_ONLY.items()}}  # bf16-only: in bf16
ALT_CASES = [pytest.param(a, g, d, marks=[] if g == "tiny" else [pytest.mark.slow], id=f"{a}-{g}-{d}")
             for a in CORRECT for g in GOLDEN_MODELS for d in ("fp32", "bf16")
             if d == "bf16" or not a.endswith("-bf16-only")]


@pytest.mark.parametrize(("alternative", "golden", "dtype"), ALT_CASES)
def test_correct_alternative_passes_in_sampled_mode(sampled_goldens, models, alternative, golden, dtype):
    """At the documented sample, what a long golden holds. (At two rows, bf16's scale-bias rule has too little to
    average: the all-bf16 RMSNorm reached S = 0.70, its limit, at SmolLM2's layers.13.attn_norm.)"""
    report = _sampled_check(sampled_goldens, models, "documented-sample")(CORRECT[alternative], golden, dtype)
    first = report.first_failure
    assert first is None, f"false alarm at {first.key} ({first.metrics.part}): rel {first.metrics.rel:.3e}"
    assert report.verdict == "PASS"


def test_diagnosis_uses_what_a_sampled_golden_holds(monkeypatch, sampled_goldens, models):
    """RoPE tables are recomputed from the config: diagnosed on the sampled rows. A scores bug needs the golden's
    full q_rope and k_rope: not tried, and the diagnosis says what it needs."""
    from tests.test_mutations import _rope_frequencies_theta_10000, _scores_scaled_by_dim

    check = _sampled_check(sampled_goldens, models, SPARSE)
    monkeypatch.setattr(model, "rope_frequencies", _rope_frequencies_theta_10000)
    d = check(model.forward, "tiny", "fp32").first_failure.diagnosis
    assert d.findings[0].id == "rope.theta" and d.findings[0].reproduces
    monkeypatch.undo()
    monkeypatch.setattr(model, "attention_scores", _scores_scaled_by_dim)
    d = check(model.forward, "tiny", "fp32").first_failure.diagnosis
    assert not any(f.reproduces for f in d.findings)
    assert any("layers.0.q_rope in full" in n for n in d.not_tried), d.not_tried


# ---------------------------------------------------------------- memory: compare as the trace arrives
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _peak_check_memory(n_layers: int, seq: int) -> int:
    """RSS growth while checking impl against a sampled golden of a tiny model, sampled at every trace call."""
    config = dataclasses.replace(PRESETS["tiny-long"], n_layers=n_layers, vocab_size=512, max_seq_len=seq)
    weights = random_weights(config)
    tokens = torch.arange(seq) % 512
    positions = sample_positions(seq)
    expected = {}
    with torch.inference_mode():  # the golden, sampled as it is made (never all stages at once)
        model.forward(tokens, weights, config, trace=lambda k, t: expected.__setitem__(
            k, sampling.sample_stage(k, t.clone(), positions)))
    golden = golden_check.Golden(None, {"tokens": tokens.tolist(), "dtype": "fp32"}, expected)
    base, peak = _rss(), [0]

    def fn(tokens, w, config, trace):
        def watched(k, t):
            trace(k, t)
            peak[0] = max(peak[0], _rss() - base)

        return model.forward(tokens, w, config, trace=watched)

    report = check_golden(fn, golden, golden, config, weights)
    assert report.verdict == "PASS", report.first_failure
    return peak[0]


_MEASURE = """
import ctypes, json, sys
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD fixed: a freed tensor goes back to the OS
from tests.test_sampling import _peak_check_memory
print(json.dumps([_peak_check_memory(n, 512) for n in (2, 8)]))
"""


@pytest.mark.slow  # a fresh process: ~6 s of CPU
def test_check_memory_does_not_grow_with_the_number_of_layers():
    """8 layers hold no more than 2: each stage is compared as it is traced and dropped. Holding every stage would
    add 6 layers' attention (measured with every stage kept: 2 layers +56 MB, 8 layers +173 MB at 1,024 tokens).
    In a fresh process with a fixed mmap threshold, so that the process's memory follows the live tensors."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _MEASURE], cwd=root, capture_output=True, text=True, check=True)
    two, eight = json.loads(out.stdout.splitlines()[-1])
    one_layer_attention = 2 * 2 * 512 * 512 * 4  # scores + probs, 2 heads, fp32
    assert eight - two < one_layer_attention, f"2 layers: +{two / 1e6:.1f} MB, 8 layers: +{eight / 1e6:.1f} MB"
