"""The benchmark report's logic (no timing): roofs that are beaten fail the run, targets use the machine's own
numbers, and a baseline is only ever the same machine type's."""

import pytest

from benchmarks import baseline, chart, report

ROOFS = {"fp32": {"gflops": 100.0, "engine": "numpy", "engines": {"numpy": 100.0, "torch": 80.0}},
         "bf16": {"gflops": 300.0, "engine": "torch", "engines": {"torch": 300.0, "bf16-fp32-copy": 90.0}},
         "bandwidth": {"gbytes_per_s": 10.0, "how": "torch.sum", "buffer_bytes": 1 << 27,
                       "last_level_cache_bytes": 1 << 25},
         "cpu_model": "Test CPU", "cpu_flags": "avx2", "threads": "2", "shape": [1024, 2048, 2048],
         "theoretical": None}


def bench(name, dtype, seconds, op="ffn", seq=128, past=0, flops=10e9, n_bytes=1e6, group=None):
    return {"group": group or f"{op} smollm2-135m prefill-{seq}", "stats": {"min": seconds},
            "fullname": f"{name}-{dtype}",
            "extra_info": dict(op=op, model="smollm2-135m", shape=f"prefill-{seq}", seq=seq, past=past,
                               implementation=name, dtype=dtype, flops=flops, bytes=n_bytes,
                               bandwidth_roof_gbytes_per_s=10.0)}


def test_annotate_fraction_of_the_true_roof():
    b = [bench("impl-fused", "fp32", 0.125)]  # 10 GFLOP at 100 GFLOP/s = 0.1 s: 80%
    report.annotate(b, {"roofs": ROOFS})
    assert b[0]["extra_info"]["roofline_fraction"] == pytest.approx(0.8)
    assert b[0]["extra_info"]["bound"] == "compute"


def test_roof_beaten_is_a_violation_never_clamped():
    b = [bench("impl-fused", "fp32", 0.05), bench("hf", "fp32", 0.2)]  # 200% and 50% of the roof
    report.annotate(b, {"roofs": ROOFS})
    assert b[0]["extra_info"]["roofline_fraction"] == pytest.approx(2.0)
    violations = report.roof_violations(b)
    assert len(violations) == 1 and "impl-fused" in violations[0] and "200%" in violations[0]


def test_chart_fails_the_run_on_a_beaten_roof(tmp_path, capsys):
    import json

    b = [bench("impl-fused", "fp32", 0.05), bench("hf", "fp32", 0.2)]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": b, "machine_info": {"roofs": ROOFS, "torch": {}}, "datetime": "x"}))
    assert chart.main([str(path)]) == 1
    assert "roof measurement is wrong" in capsys.readouterr().err


@pytest.mark.parametrize(("bf16_peak", "goal"), [(300.0, 1.8), (150.0, 0.95)], ids=["fast-bf16", "slow-bf16"])
def test_bf16_goal_follows_the_machine_peaks(bf16_peak, goal):
    roofs = {**ROOFS, "bf16": {**ROOFS["bf16"], "engines": {"torch": bf16_peak, "bf16-fp32-copy": 999.0}}}
    assert report.bf16_prefill_goal({"roofs": roofs}) == goal  # the second-copy engine does not count


def test_short_fp32_goal_is_2x_only_where_the_best_engine_is_2x_torch():
    timings = {d: {c: {"torch": 1.0} for c in ("decode", "short", "long")} for d in ("fp32", "bf16")}
    b = [bench("impl-fused", "fp32", 0.1, seq=17), bench("hf", "fp32", 0.15, seq=17)]
    report.annotate(b, {"roofs": ROOFS})
    assert [t.goal for t in report.targets(b, {"roofs": ROOFS, "engines": timings})] == [1.0]
    timings["fp32"]["short"]["numpy"] = 0.6  # 1.7x: the goal stays 1x
    assert [t.goal for t in report.targets(b, {"roofs": ROOFS, "engines": timings})] == [1.0]
    timings["fp32"]["short"]["onednn-packed"] = 0.4  # 2.5x, with packed weights
    target = report.targets(b, {"roofs": ROOFS, "engines": timings})[0]
    assert target.goal == 2.0 and not target.met


def test_vs_transformers_tie_counts_as_met():
    assert report.Target("impl vs fastest transformers", 0.985, 1.0, "x").met
    assert not report.Target("impl vs fastest transformers", 0.97, 1.0, "x").met


def test_baseline_machine_types_differ_by_cpu():
    intel = {"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_flags": "avx2 avx512f avx512_bf16", "cores": "2"}
    amd = {"cpu_model": "AMD EPYC", "cpu_flags": "avx2", "cores": "2"}
    assert baseline.machine_type(intel) == "intel-xeon-2core-avx2-avx512-avx512bf16"
    assert baseline.machine_type(amd) == "amd-epyc-2core-avx2"


def test_baseline_run_without_one_says_so_and_does_not_compare(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(baseline, "FOLDER", tmp_path)
    monkeypatch.setattr(baseline.subprocess, "call", lambda args: calls.append(args) or 0)
    assert baseline.run(["-k", "ffn"]) == 0
    assert "no baseline for this machine type" in capsys.readouterr().out
    assert not any(a.startswith("--benchmark-compare") for a in calls[0])


def test_baseline_run_compares_with_this_machines_file(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(baseline, "FOLDER", tmp_path)
    baseline.path_for().write_text("{}")
    monkeypatch.setattr(baseline.subprocess, "call", lambda args: calls.append(args) or 0)
    baseline.run([])
    assert f"--benchmark-compare={baseline.path_for()}" in calls[0]
