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
    b = [bench("impl-generate", "fp32", 0.125)]  # 10 GFLOP at 100 GFLOP/s = 0.1 s: 80%
    report.annotate(b, {"roofs": ROOFS})
    assert b[0]["extra_info"]["roofline_fraction"] == pytest.approx(0.8)
    assert b[0]["extra_info"]["bound"] == "compute"


def test_annotate_leaves_rows_that_are_not_kernels_without_rates():
    """The diagnosis timings carry flops=0, bytes=0 and no bandwidth roof: annotating them must not fail the run's
    saving (a KeyError there once lost a whole timed run) nor give them a rate or a roof fraction."""
    diag = bench("golden.diagnose", "fp32", 0.5, op="diagnosis", flops=0, n_bytes=0, group="diagnosis smollm2-135m")
    del diag["extra_info"]["bandwidth_roof_gbytes_per_s"]
    b = [diag, bench("impl-generate", "fp32", 0.125)]
    report.annotate(b, {"roofs": ROOFS})
    assert not {"gflops", "roofline_fraction", "bound"} & set(b[0]["extra_info"])
    assert b[1]["extra_info"]["roofline_fraction"] == pytest.approx(0.8)


def test_chart_renders_a_run_with_diagnosis_timings(tmp_path):
    import json

    diag = bench("golden.diagnose", "fp32", 0.5, op="diagnosis", flops=0, n_bytes=0, group="diagnosis smollm2-135m")
    diag["extra_info"].update(bug="rope-theta", stage="layers.0.q_rope")
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": [diag, bench("impl-generate", "fp32", 0.125), bench("hf", "fp32", 0.2)],
                                "machine_info": {"roofs": ROOFS, "torch": {}}, "datetime": "x"}))
    out = tmp_path / "results.md"
    assert chart.main([str(path), "--markdown", str(out), "--png", str(tmp_path / "chart.png")]) == 0
    assert "| rope-theta | fp32 | `layers.0.q_rope` | 0.50 |" in out.read_text()


def test_roofs_of_a_run_are_the_higher_of_its_start_and_end():
    from benchmarks import roofs

    start = {**ROOFS, "bandwidth": {**ROOFS["bandwidth"], "gbytes_per_s": 50.0}}
    end = {**ROOFS, "fp32": {**ROOFS["fp32"], "gflops": 90.0},
           "bandwidth": {**ROOFS["bandwidth"], "gbytes_per_s": 88.0}}
    best = roofs.best_of(start, end)
    assert best["bandwidth"]["gbytes_per_s"] == 88.0 and best["fp32"]["gflops"] == 100.0


def test_gemm_peak_is_the_fastest_engine_at_any_peak_shape(monkeypatch):
    """A roof measured at one large shape was beaten by a block whose products stay in the caches: the peak is the
    fastest over PEAK_SHAPES, and names the engine and shape that set it."""
    from benchmarks import roofs

    small = roofs.PEAK_SHAPES[1]
    rates = {"fp32": {small: {"numpy": 120.0}}, "bf16": {small: {"torch": 310.0}}}
    monkeypatch.setattr(roofs, "gemm_rates", lambda dtype, shape, repeats: {
        "torch": 100.0, "numpy": 90.0, **rates[dtype].get(shape, {})})
    monkeypatch.setattr(roofs, "read_rate", lambda n_bytes, repeats: (10.0, "torch.sum"))
    measured = roofs.measure()
    assert (measured["fp32"]["gflops"], measured["fp32"]["engine"], measured["fp32"]["shape"]) == (120.0, "numpy",
                                                                                                list(small))
    assert measured["fp32"]["engines"] == {"torch": 100.0, "numpy": 120.0}  # each engine at its fastest shape
    assert (measured["bf16"]["gflops"], measured["bf16"]["engine"]) == (310.0, "torch")


def test_annotate_judges_a_decode_block_by_the_higher_bandwidth_roof():
    b = [bench("impl-generate", "fp32", 0.001, op="ffn", seq=1, past=512, flops=1e6, n_bytes=40e6)]
    b[0]["extra_info"]["bandwidth_roof_gbytes_per_s"] = 50.0  # as it ran
    report.annotate(b, {"roofs": {**ROOFS, "bandwidth": {**ROOFS["bandwidth"], "gbytes_per_s": 80.0}}})
    assert b[0]["extra_info"]["bandwidth_fraction"] == pytest.approx(0.5)  # 40 MB at 80 GB/s in 1 ms


def test_roof_beaten_is_a_violation_never_clamped():
    b = [bench("impl-generate", "fp32", 0.05), bench("hf", "fp32", 0.2)]  # 200% and 50% of the roof
    report.annotate(b, {"roofs": ROOFS})
    assert b[0]["extra_info"]["roofline_fraction"] == pytest.approx(2.0)
    violations = report.roof_violations(b)
    assert len(violations) == 1 and "impl-generate" in violations[0] and "200%" in violations[0]


def test_chart_fails_the_run_on_a_beaten_roof(tmp_path, capsys):
    import json

    b = [bench("impl-generate", "fp32", 0.05), bench("hf", "fp32", 0.2)]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": b, "machine_info": {"roofs": ROOFS, "torch": {}}, "datetime": "x"}))
    assert chart.main([str(path)]) == 1
    assert "roof measurement is wrong" in capsys.readouterr().err


@pytest.mark.parametrize(("bf16_peak", "goal"), [(300.0, 1.8), (150.0, 0.95)], ids=["fast-bf16", "slow-bf16"])
def test_bf16_goal_follows_the_machine_peaks(bf16_peak, goal):
    roofs = {**ROOFS, "bf16": {**ROOFS["bf16"], "engines": {"torch": bf16_peak, "bf16-fp32-copy": 999.0}}}
    assert report.bf16_prefill_goal({"roofs": roofs})[0] == goal  # the second-copy engine does not count


def test_short_fp32_goal_is_2x_only_where_the_best_engine_is_2x_torch():
    timings = {d: {c: {"torch": 1.0} for c in ("decode", "short", "long")} for d in ("fp32", "bf16")}
    b = [bench("impl-generate", "fp32", 0.1, seq=17), bench("hf", "fp32", 0.15, seq=17)]
    report.annotate(b, {"roofs": ROOFS})
    assert [t.goal for t in report.targets(b, {"roofs": ROOFS, "engines": timings})] == [1.0]
    timings["fp32"]["short"]["numpy"] = 0.6  # 1.7x: the goal stays 1x
    assert [t.goal for t in report.targets(b, {"roofs": ROOFS, "engines": timings})] == [1.0]
    timings["fp32"]["short"]["onednn-packed"] = 0.4  # 2.5x, with packed weights
    target = report.targets(b, {"roofs": ROOFS, "engines": timings})[0]
    assert target.goal == 2.0 and not target.met
    assert "onednn-packed" in report.short_fp32_goal({"engines": timings})[1]


def test_vs_transformers_tie_counts_as_met():
    assert report.Target(report.VS_HF, "x", 0.985, 1.0, tie=True).met
    assert not report.Target(report.VS_HF, "x", 0.97, 1.0, tie=True).met
    assert not report.Target(report.PREFILL_ROOF, "x", 0.79, 0.80).met  # no tie for the roof goals


# ------------------------------------------------------------------ a whole synthetic run: every target, as ratios
ENGINE_GFLOP = 2 * 8192 * 2048 / 1e9  # per row of the engine table's (8192, 2048) weight


def engine_table(fp32_long=80.0, bf16_long=160.0, decode_gbs=8.0, fp32_engine="numpy"):
    """Seconds per product: at 128 rows fp32_engine (fp32) and torch (bf16) reach these GFLOP/s (torch's fp32 half
    of that), and at one row torch reads its weight at decode_gbs GB/s."""
    def row(best, long_gflops, itemsize):
        long = {"torch": 2 * 128 * ENGINE_GFLOP / long_gflops, best: 128 * ENGINE_GFLOP / long_gflops}
        return {"decode": {"torch": 8192 * 2048 * itemsize / decode_gbs / 1e9},
                "short": {"torch": 17 * ENGINE_GFLOP / 10.0}, "long": long}
    return {"fp32": row(fp32_engine, fp32_long, 4), "bf16": row("torch", bf16_long, 2)}


def run(layer_s=(0.125, 0.1), hf_s=0.2, decode_s=1e-3, generate_s=(1.0, 2.0), engines=None):
    """A run of one layer group at 128 tokens and one decode step (impl-generate vs hf-eager, fp32 and bf16), and
    generate (impl vs hf-sdpa): seconds per call given; 10 GFLOP a prefill, 1e6 bytes a decode step."""
    b = []
    for dtype, t in zip(("fp32", "bf16"), layer_s, strict=True):
        b += [bench("impl-generate", dtype, t, op="layer"), bench("hf-eager", dtype, hf_s, op="layer"),
              bench("impl-generate", dtype, decode_s, op="layer", seq=1, past=512, flops=1e6),
              bench("hf-eager", dtype, 2 * decode_s, op="layer", seq=1, past=512, flops=1e6)]
        for name, g in (("impl", generate_s[0]), ("hf-sdpa", generate_s[1])):
            gen = bench(name, dtype, g, op="generate", seq=17, group="generate smollm2-135m 17+32")
            gen["extra_info"] = {**gen["extra_info"], "new_tokens": 32, "shape": "17+32"}
            del gen["extra_info"]["flops"], gen["extra_info"]["bytes"]
            b.append(gen)
    for x in b:  # unique names and groups per shape
        x["fullname"] = f"{x['group']} {x['fullname']}"
        if x["extra_info"]["past"]:
            x["group"], x["extra_info"]["shape"] = "layer smollm2-135m decode-512", "decode-512"
    info = {"roofs": ROOFS, "engines": engines or engine_table(), "engines_shape": [8192, 2048],
            "torch": {"other_processes_cpu_share": 0.01}}
    report.annotate(b, info)
    return b, info


def by_what(found):
    return {(t.what, t.where.removeprefix("layer smollm2-135m ").removeprefix("generate smollm2-135m ")): t
            for t in found}


def test_targets_every_issue_14_target_is_a_ratio_of_the_same_run():
    b, info = run()
    found = by_what(report.targets(b, info))
    assert found[report.VS_HF, "decode-512 fp32"].value == pytest.approx(2.0)
    assert found[report.VS_HF, "prefill-128 fp32"].value == pytest.approx(0.2 / 0.125)  # fastest transformers / impl
    assert found[report.PREFILL_ROOF, "prefill-128 fp32"].value == pytest.approx(0.8)  # 10 GFLOP at 100 GFLOP/s: 0.1 s
    assert found[report.BF16_PREFILL, "prefill-128 bf16"].value == pytest.approx(1.25)  # fp32 time / bf16 time
    assert found[report.DECODE_BANDWIDTH, "decode-512 bf16"].value == pytest.approx(0.1)  # 1e6 B / 10 GB/s / 1 ms
    assert found[report.GENERATE, "17+32 bf16"].value == pytest.approx(2.0)  # tokens/s over transformers' best
    assert report.unmeasured(list(found.values())) == []


@pytest.mark.parametrize(("what", "engines", "verdict"), [
    (report.PREFILL_ROOF, engine_table(fp32_long=60.0), "yes: numpy reaches 60% of the fp32 roof at 128 rows"),
    (report.PREFILL_ROOF, engine_table(fp32_long=95.0), "no: numpy reaches 95% of the fp32 roof at 128 rows"),
    (report.PREFILL_ROOF, engine_table(fp32_long=90.0, fp32_engine="onednn-packed"),
     "no: onednn-packed (packed weights, as a generate-only process holds them) reaches 90% of the fp32 roof"),
    (report.DECODE_BANDWIDTH, engine_table(decode_gbs=5.0), "yes: torch reads its weight at 50% of this block's"),
    (report.DECODE_BANDWIDTH, engine_table(decode_gbs=9.0), "no: torch reads its weight at 90% of this block's"),
    (report.BF16_PREFILL, engine_table(bf16_long=120.0),
     "yes: the best bf16 engine (torch) is 1.50x the best fp32 one (numpy)"),
    (report.BF16_PREFILL, engine_table(bf16_long=200.0), "no: the best bf16 engine (torch) is 2.50x the best fp32"),
], ids=["roof-beyond", "roof-reachable", "roof-reachable-packed", "decode-beyond", "decode-reachable",
        "bf16-beyond", "bf16-reachable"])
def test_missed_target_says_whether_the_best_engine_could_meet_it(what, engines, verdict):
    b, info = run(layer_s=(0.25, 0.2), decode_s=2e-3, engines=engines)  # 40%, 1.25x, 5%: all missed
    missed = [t for t in report.targets(b, info)
              if t.what == what and (what != report.PREFILL_ROOF or "fp32" in t.where)]  # bf16: its own roof
    assert missed and not any(t.met for t in missed)
    assert all(t.beyond.startswith(verdict) for t in missed), [t.beyond for t in missed]


def with_engine_bound(b, seconds):
    """The run's blocks with their own products timed at the best engines: {(dtype, decode?): seconds}."""
    for x in b:
        key = (x["extra_info"]["dtype"], bool(x["extra_info"]["past"]))
        if x["extra_info"]["implementation"] == "impl-generate" and key in seconds:
            x["extra_info"].update(engine_bound_s=seconds[key], engine_bound_engines="torch,numpy")
    return b


@pytest.mark.parametrize(("what", "seconds", "verdict"), [
    # the fp32 prefill's roof time is 0.1 s (10 GFLOP at 100 GFLOP/s): products alone in 0.2 s reach 50% of it
    (report.PREFILL_ROOF, {("fp32", False): 0.2}, "yes: the best engines on this block's own products (torch,numpy)"
                                                  ", alone, take 200.00 ms: 50% of the roof"),
    (report.PREFILL_ROOF, {("fp32", False): 0.11}, "no: the best engines on this block's own products (torch,numpy)"
                                                   ", alone, take 110.00 ms: 91% of the roof"),
    # a decode step's bytes at the bandwidth roof: 1e6 B at 10 GB/s = 0.1 ms
    (report.DECODE_BANDWIDTH, {("fp32", True): 1e-3, ("bf16", True): 1e-3}, "yes: the best engines on this block's "
                                                                            "own products (torch,numpy), alone, take "
                                                                            "1.00 ms: 10% of the bandwidth roof"),
    (report.BF16_PREFILL, {("fp32", False): 0.2, ("bf16", False): 0.15},
     "yes: the best engines on this block's own products are 1.33x faster in bf16 than in fp32"),
    (report.BF16_PREFILL, {("fp32", False): 0.2, ("bf16", False): 0.08},
     "no: the best engines on this block's own products are 2.50x faster in bf16 than in fp32"),
], ids=["roof-beyond", "roof-reachable", "decode-beyond", "bf16-beyond", "bf16-reachable"])
def test_missed_target_is_judged_by_the_blocks_own_products_where_measured(what, seconds, verdict):
    """The engine table's large weight says little of a small model's products: where the run timed the block's
    own products at the best engines, that decides (and is preferred to the table)."""
    b, info = run(layer_s=(0.25, 0.2), decode_s=2e-3, engines=engine_table(fp32_long=95.0, bf16_long=200.0,
                                                                              decode_gbs=9.0))
    missed = [t for t in report.targets(with_engine_bound(b, seconds), info) if t.what == what
              and (what != report.PREFILL_ROOF or "fp32" in t.where) and (what != report.DECODE_BANDWIDTH
                                                                           or "fp32" in t.where)]
    assert missed and not any(t.met for t in missed)
    assert all(t.beyond.startswith(verdict) for t in missed), [t.beyond for t in missed]


def test_missed_decode_in_the_caches_is_not_judged_by_a_weight_beyond_them():
    b, info = run(decode_s=2e-3, engines=engine_table(decode_gbs=1.0))
    for x in b:
        if x["extra_info"]["past"]:
            x["extra_info"]["bandwidth_roof_how"] = "numpy.sum of 1.0 MB, repeated"
    missed = [t for t in report.targets(b, info) if t.what == report.DECODE_BANDWIDTH]
    assert len(missed) == 2 and all(t.beyond.startswith("not shown: this block's bytes fit in the caches")
                                    for t in missed)


def test_missed_vs_transformers_is_never_beyond_the_machine():
    b, info = run(layer_s=(0.5, 0.5), generate_s=(3.0, 2.0))
    missed = [t for t in report.targets(b, info) if t.what in (report.VS_HF, report.GENERATE) and not t.met]
    assert len(missed) == 4 and all(t.beyond.startswith("no: ") for t in missed)


def test_partial_run_names_the_targets_it_did_not_measure():
    b, info = run()
    found = report.targets([x for x in b if x["extra_info"]["op"] != "generate" and not x["extra_info"]["past"]],
                           info)
    assert report.unmeasured(found) == [report.DECODE_BANDWIDTH, f"{report.GENERATE} fp32",
                                        f"{report.GENERATE} bf16"]


def test_markdown_reports_roofs_engines_and_every_target_row(tmp_path):
    b, info = run(layer_s=(0.125, 0.125))
    info["roofs"] = {**ROOFS, "theoretical": {"fp32": 332.0, "bf16": 665.0, "how": "2 threads x 2.60 GHz"}}
    text = chart.markdown({"benchmarks": b, "machine_info": info, "datetime": "2026-11-26T10:00"})
    assert "CPU: Test CPU, 2 threads. Flags: `avx2`" in text
    assert "| fp32 GEMM (1024x2048 @ 2048x2048) | 100.0 GFLOP/s | numpy | numpy 100, torch 80 | 332 GFLOP/s |" in text
    assert "| fp32 | long (128) | 40.0 | 80.0 | numpy |" in text  # the engine table: GFLOP/s, the choice
    assert ("| bf16 / fp32 prefill | layer smollm2-135m prefill-128 bf16 | 1.00 | 1.80 | MISSED "
            "| no: the best bf16 engine (torch) is 2.00x the best fp32 one (numpy) at 128 rows |") in text
    assert f"| {report.PREFILL_ROOF} | layer smollm2-135m prefill-128 fp32 | 0.80 | 0.80 | met |  |" in text
    assert "bf16 / fp32 prefill at 128 tokens or more: 1.8x" in text
    assert "NOT A TRUSTWORTHY RUN" not in text


def test_markdown_names_each_roofs_own_shape_without_a_top_level_one():
    """roofs.measure writes the shape that set each roof under its dtype and none beside them (a run's JSON failed
    to render: the top-level shape was read even where the dtype's own was there)."""
    b, info = run(layer_s=(0.125, 0.125))
    per_dtype = {k: v for k, v in ROOFS.items() if k != "shape"}
    per_dtype["fp32"] = {**ROOFS["fp32"], "shape": [256, 1024, 1024]}
    per_dtype["bf16"] = {**ROOFS["bf16"], "shape": [2048, 1024, 1024]}
    info["roofs"] = per_dtype
    text = chart.markdown({"benchmarks": b, "machine_info": info, "datetime": "2026-11-26T10:00"})
    assert "| fp32 GEMM (256x1024 @ 1024x1024) | 100.0 GFLOP/s |" in text
    assert "| bf16 GEMM (2048x1024 @ 1024x1024) | 300.0 GFLOP/s |" in text


@pytest.mark.parametrize(("bf16_theoretical", "says"), [(665.0, False), (200.0, True)],
                         ids=["under-theoretical", "beats-theoretical"])
def test_markdown_says_when_a_measured_peak_beats_the_reported_clocks_theoretical(bf16_theoretical, says):
    b, info = run()
    info["roofs"] = {**ROOFS, "theoretical": {"fp32": 332.0, "bf16": bf16_theoretical, "how": "2.60 GHz"}}
    text = chart.markdown({"benchmarks": b, "machine_info": info, "datetime": "x"})
    assert ("The measured bf16 peak beats this: the cores run faster than the reported clock" in text) is says
    assert ("by at least 1.50x" in text) is says  # 300 measured / 200


@pytest.mark.parametrize("share", [0.81, None], ids=["loaded", "unknown"])
def test_markdown_says_a_shared_machine_run_is_not_trustworthy(share):
    b, info = run()
    info["torch"]["other_processes_cpu_share"] = share
    text = chart.markdown({"benchmarks": b, "machine_info": info, "datetime": "x"})
    assert "NOT A TRUSTWORTHY RUN: other processes took " + ("81%" if share else "an unknown share") in text


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


@pytest.mark.parametrize(("op", "with_core"), [("attention", True), ("layer", True), ("ffn", False)])
def test_engine_bound_adds_the_fastest_correct_attention_core(monkeypatch, op, with_core):
    """The evidence for a missed roof is the block's products and, where it attends, its attention core: never a
    core that is wrong (a fast wrong core would make every target look within reach)."""
    from benchmarks import cases
    from impl import model

    monkeypatch.setitem(model.ATTENTION_CORES, "matmul-64", lambda q, k, v, s: q * 0)  # wrong, and fastest
    bound = cases.engine_bound_seconds.__wrapped__(op, cases.Shape("tiny", 8, 4), "fp32", repeats=1)
    names = bound["engines"].split(",")
    assert len(names) == len(cases.products(op, cases.Shape("tiny", 8).config)) + with_core
    assert (names[-1] in ("core sdpa", "core matmul-128")) == with_core and bound["seconds"] > 0


@pytest.mark.slow  # two timed runs of one benchmark (the roofs and engines are measured in each): ~40 s
def test_regression_against_the_baseline_is_one_line_exit_1(tmp_path):
    """pytest-benchmark raises on a regression, which pytest printed as an internal-error traceback."""
    import json
    import os
    import subprocess
    import sys

    case = "benchmarks/test_hot_path.py::test_attention[smollm2-135m-prefill-17-impl-generate-fp32]"
    command = [sys.executable, "-m", "pytest", case, "-p", "no:xdist", "-p", "no:cacheprovider",
               "--benchmark-enable", "--benchmark-max-time=0.01"]
    # a fresh session, not an xdist worker's child: pytest-benchmark times nothing where PYTEST_XDIST_WORKER is set
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    first = subprocess.run([*command, f"--benchmark-json={tmp_path / 'run.json'}"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run = json.loads((tmp_path / "run.json").read_text())
    for b in run["benchmarks"]:  # a baseline a million times faster than anything
        b["stats"].update({k: v * 1e-6 for k, v in b["stats"].items() if k in ("min", "max", "mean", "median")})
    (tmp_path / "fast.json").write_text(json.dumps(run))
    done = subprocess.run([*command, f"--benchmark-compare={tmp_path / 'fast.json'}",
                           "--benchmark-compare-fail=min:15%"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    assert "error: performance regressed" in out and "has failed PercentageRegressionCheck" in out


@pytest.mark.parametrize("cores", [
    {"9x3x64": {"fp32": {"long": {"sdpa": 2.5e-4, "matmul-64": 3.1e-4, "matmul-128": 3.4e-4}}},
     "32x8x128": {"fp32": {"long": {"sdpa": 1.6e-3, "matmul-64": 1.2e-3, "matmul-128": 1.4e-3}}}},
    {"fp32": {"long": {"sdpa": 1.85e-3, "matmul-64": 1.51e-3, "matmul-128": 1.74e-3}}},
], ids=["per-heads", "added-of-before"])
def test_cores_table_names_each_head_shape_and_its_choice(cores):
    lines = chart.cores_markdown({"attention_cores": cores})
    rows = [line for line in lines if line.startswith("| 9x3x64") or line.startswith("| 32x8x128")]
    if "9x3x64" in cores:
        assert rows == ["| 9x3x64 | fp32 | long (128) | 0.250 | 0.310 | 0.340 | sdpa |",
                        "| 32x8x128 | fp32 | long (128) | 1.600 | 1.200 | 1.400 | matmul-64 |"]
    else:  # a run of before: one row over both head shapes, as it was measured
        assert rows == ["| 9x3x64 + 32x8x128 | fp32 | long (128) | 1.850 | 1.510 | 1.740 | matmul-64 |"]
