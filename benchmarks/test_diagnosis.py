"""What the diagnosis of the first failure adds to a SmolLM2 check (golden.diagnose; target: under 2 s).

The check of a buggy implementation is run once outside the timed call; the timed call is the diagnosis alone, on
the failing stage the check found. Three bugs, three kinds of first stage: rope_cos (RoPE theta), layers.0.scores
(the walk-through's head // 4) and logits (an output vector of 49,152 entries). Timed by `tox -e bench`; the default
run executes the body once, untimed, on one case.
"""

from __future__ import annotations

import pytest
import torch

from golden import compare, diagnose
from golden.check import load_model_for, run_implementation
from golden.format import load_golden
from impl import model
from tests.conftest import golden_dir


def _theta_10000(tokens, weights, config, trace):
    return model.forward(tokens, weights, config.replace(rope_theta=10000.0), trace=trace)


def _head_by_4(tokens, weights, config, trace):
    original = model.kv_head_of
    model.kv_head_of = lambda n_heads, n_kv_heads: torch.arange(n_heads) // 4
    try:
        return model.forward(tokens, weights, config, trace=trace)
    finally:
        model.kv_head_of = original


def _tied_output_skipped_norm(tokens, weights, config, trace):
    def traced(name, t):
        if name != "norm":
            trace(name, t)
    return model.forward(tokens, {**weights, "norm.weight": torch.ones_like(weights["norm.weight"])}, config,
                         trace=traced)


BUGS = {"rope-theta": _theta_10000, "head-by-4": _head_by_4, "logits": _tied_output_skipped_norm}


def _params():
    """The default run executes the body once (rope-theta, fp32); the other five cases are `slow` (each checks
    SmolLM2 once more; tests/test_diagnose.py holds what each diagnosis must say)."""
    for bug in BUGS:
        for dtype in ("fp32", "bf16"):
            slow = (bug, dtype) != ("rope-theta", "fp32")
            yield pytest.param(bug, dtype, marks=[pytest.mark.slow] if slow else [], id=f"{bug}-{dtype}")


@pytest.mark.parametrize(("bug", "dtype"), list(_params()))
def test_diagnosis_time_on_smollm2(benchmark, bug, dtype):
    g, truth = load_golden(golden_dir("smollm2-135m", dtype)), load_golden(golden_dir("smollm2-135m", "fp32"))
    ckpt, weights = load_model_for(g, g.torch_dtype)
    actual = run_implementation(BUGS[bug], g.tokens, weights, ckpt.config)
    report = compare.compare(truth.tensors, actual, dtype, g.tensors if dtype == "bf16" else None)
    first = report.first_failure
    assert first is not None
    benchmark.group = "diagnosis smollm2-135m"
    # the fields benchmarks/report.py and chart.py read of every row (no FLOPs: it is not a kernel)
    benchmark.extra_info.update(bug=bug, dtype=dtype, stage=first.key, implementation="golden.diagnose",
                                op="diagnosis", model="smollm2-135m", shape=bug, seq=len(g.tokens), past=0, flops=0,
                                bytes=0)
    d = benchmark(diagnose.diagnose, first.key, actual, truth.tensors, ckpt.config, weights, first.limit)
    assert d.findings
