"""impl.engines: the GEMM engine chosen from a timing table (injected here: no test machine has every CPU),
pinned by LLAMA3_GOLDEN_ENGINE, measured and cached per CPU identity, shown by `python -m impl engines`."""

import json

import pytest
import torch

from impl import cli, engines


def table(**overrides):
    """A timing table where torch takes 1 s everywhere, plus the given (dtype, class, engine) -> seconds."""
    t = {d: {c: {"torch": 1.0} for c in engines.ROW_CLASSES} for d in engines.DTYPES}
    for key, seconds in overrides.items():
        dtype, rclass, name = key.split("__")
        t[dtype][rclass][name.replace("_", "-")] = seconds
    return t


@pytest.mark.parametrize(("timings", "dtype", "rclass", "want"), [
    (table(fp32__short__onednn_packed=0.3, fp32__short__numpy=0.5), "fp32", "short", "numpy"),  # packed: not plain
    (table(fp32__long__numpy=0.5), "fp32", "long", "numpy"),
    (table(fp32__long__numpy=1.5), "fp32", "long", "torch"),
    (table(bf16__long__bf16_via_fp32=0.4), "bf16", "long", "bf16-via-fp32"),
    (table(bf16__long__bf16_via_fp32=0.4), "bf16", "decode", "torch"),  # per row class
    (table(bf16__decode__bf16_fp32_copy=0.1), "bf16", "decode", "torch"),  # a second copy: never
    (table(bf16__long__bf16_via_fp32=None), "bf16", "long", "torch"),  # failed or wrong: never
    (table(fp32__long__bf16_via_fp32=0.1), "fp32", "long", "torch"),  # no fp32 kernel: ignored
], ids=["packed-not-plain", "numpy-faster", "numpy-slower", "via-fp32-long", "per-row-class", "no-second-copy",
        "failed-engine", "wrong-dtype"])
def test_choose_fastest_usable_engine(timings, dtype, rclass, want):
    assert engines.choose(timings, dtype, rclass) == want


def test_choose_packed_layout_only_packed_engines():
    t = table(fp32__decode__onednn_packed=2.0)
    assert engines.choose(t, "fp32", "decode", engines.PACKED) == "onednn-packed"
    with pytest.raises(engines.EngineError, match="no packed engine"):
        engines.choose(t, "fp32", "short", engines.PACKED)


@pytest.mark.parametrize(("packed", "want"), [
    ((0.5, 0.5, 0.5), engines.PACKED),  # faster everywhere
    ((2.0, 0.1, 0.1), engines.PLAIN),  # slower at decode, which a generation repeats
    ((0.9, 5.0, 5.0), engines.PLAIN),  # faster decode does not pay for much slower prompts
    ((None, 0.5, 0.5), engines.PLAIN),  # cannot decode
], ids=["faster", "slow-decode", "slow-prompts", "broken"])
def test_generation_layout_weighs_a_nominal_generation(packed, want):
    t = table()
    for rclass, seconds in zip(engines.ROW_CLASSES, packed, strict=True):
        t["bf16"][rclass]["onednn-packed"] = seconds
    assert engines.generation_layout(t, "bf16") == want


@pytest.mark.parametrize(("rows", "rclass"), [(1, "decode"), (2, "short"), (127, "short"), (128, "long")])
def test_row_class_boundaries(rows, rclass):
    assert engines.row_class(rows) == rclass


def test_engine_for_follows_the_measured_table(monkeypatch):
    monkeypatch.delenv(engines.ENV, raising=False)
    monkeypatch.setattr(engines, "table", lambda: {"timings": table(fp32__long__numpy=0.5)})
    assert engines.engine_for("fp32", 512).name == "numpy"
    assert engines.engine_for("fp32", 1).name == "torch"


@pytest.mark.parametrize(("pin", "dtype", "layout", "want"), [
    ("numpy", "fp32", engines.PLAIN, "numpy"),
    ("numpy", "bf16", engines.PLAIN, "torch"),  # no bf16 kernel: torch there
    ("onednn-packed", "fp32", engines.PLAIN, "torch"),  # plain weights cannot be read by a packed engine
    ("torch", "bf16", engines.PACKED, "onednn-packed"),  # packed weights only by it
], ids=["numpy-fp32", "numpy-bf16", "packed-pin-plain-weights", "torch-pin-packed-weights"])
def test_engine_for_pinned(monkeypatch, pin, dtype, layout, want):
    monkeypatch.setenv(engines.ENV, pin)
    monkeypatch.setattr(engines, "table", lambda: pytest.fail("a pinned engine needs no measurement"))
    assert engines.engine_for(dtype, 17, layout).name == want


@pytest.mark.parametrize("pin", ["mkl", "bf16-fp32-copy"])
def test_bad_pin_is_an_engine_error(monkeypatch, pin):
    monkeypatch.setenv(engines.ENV, pin)
    with pytest.raises(engines.EngineError, match=engines.ENV):
        engines.engine_for("fp32", 1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty asset cache, a small measured shape, and no table remembered from before."""
    monkeypatch.setenv("LLAMA3_GOLDEN_CACHE", str(tmp_path))
    monkeypatch.setattr(engines, "MEASURE_SHAPE", (256, 64))
    monkeypatch.setattr(engines, "SMALL_SHAPE", (64, 32))
    engines.table.cache_clear()
    yield tmp_path
    engines.table.cache_clear()


def test_table_measured_once_then_read_from_the_cache(cache, monkeypatch):
    first = engines.table()
    assert first["file"].startswith(str(cache)) and first["identity"] == engines.identity()
    assert first["timings"]["fp32"]["decode"]["torch"] > 0
    engines.table.cache_clear()
    monkeypatch.setattr(engines, "measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
    assert engines.table()["timings"] == first["timings"]


def test_table_of_another_cpu_is_not_used(cache, monkeypatch):
    path = engines.cache_file()
    path.parent.mkdir(parents=True)
    other = {**engines.identity(), "cpu_model": "another CPU"}
    path.write_text(json.dumps({"identity": other, "timings": table(fp32__long__numpy=1e-9)}))
    assert engines.table()["timings"]["fp32"]["long"].get("numpy") != 1e-9


def test_table_timed_the_old_way_is_measured_again(cache):
    """A table cached before products were timed between torch's parallel ops (no "method") chose numpy's BLAS
    where it loses inside the forward: it is not used."""
    path = engines.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"identity": engines.identity(), "timings": table(fp32__long__numpy=1e-9)}))
    data = engines.table()
    assert data["timings"]["fp32"]["long"].get("numpy") != 1e-9
    assert json.loads(path.read_text())["method"] == engines.METHOD


def test_measure_times_each_product_between_torch_parallel_ops(cache, monkeypatch):
    """The hand-over of the cores between an engine's thread pool and torch's is part of an engine's time."""
    calls = []
    monkeypatch.setattr(engines, "torch_parallel_op", lambda: lambda: calls.append("between"))
    timings = engines.measure((256, 64), repeats=2)
    timed = sum(t is not None for d in timings.values() for row in d.values() for t in row.values())
    assert timed >= 3 * len(engines.ROW_CLASSES)  # torch at least, in each dtype and class
    assert len(calls) >= 3 * timed  # after each of a product's warm-up and two timed calls (plus the op's own timing)


def test_table_adds_the_small_weights_time(cache, monkeypatch):
    """An engine that wins on the large weight but loses more on a small model's (the thread hand-over) is not
    chosen: the table holds each engine's two times added."""
    def fake(shape, repeats=3):
        numpy, torch_s = (1.0, 1.2) if shape == engines.MEASURE_SHAPE else (0.5, 0.05)
        return {d: {c: {"torch": torch_s, "numpy": numpy if d == "fp32" else None} for c in engines.ROW_CLASSES}
                for d in engines.DTYPES}
    monkeypatch.setattr(engines, "measure", fake)
    timings = engines.table()["timings"]
    assert timings["fp32"]["long"] == {"torch": pytest.approx(1.25), "numpy": pytest.approx(1.5)}
    assert engines.choose(timings, "fp32", "long") == "torch"


@pytest.mark.parametrize(("cores", "want"), [
    ({"bf16": {"long": {"sdpa": 2.0, "matmul-64": 1.5, "matmul-128": 1.0}}}, "matmul-128"),
    ({"bf16": {"long": {"sdpa": 1.0, "matmul-64": 2.0, "matmul-128": 2.0}}}, "sdpa"),
    ({"bf16": {"long": {"sdpa": 1.0, "matmul-64": None, "matmul-128": 0.5}}}, "matmul-128"),
    ({"bf16": {"long": {"sdpa": 1.0, "matmul-64": None, "matmul-128": None}}}, "sdpa"),  # wrong here: never
    ({}, "sdpa"),  # a table without cores
], ids=["matmul-faster", "sdpa-faster", "one-wrong", "matmul-wrong", "no-table"])
def test_choose_core_fastest_correct(cores, want):
    assert engines.choose_core(cores, "bf16", "long") == want


@pytest.mark.parametrize(("rows", "want"), [(1, "decode"), (17, "short"), (127, "short"), (128, "long"),
                                             (255, "long"), (256, "longer"), (8192, "longer")])
def test_core_class_is_the_nearest_measured_rows(rows, want):
    assert engines.core_class(rows) == want


SMOL, BIG = (9, 3, 64), (32, 8, 128)


def test_core_for_pin_and_engine_pin(monkeypatch):
    monkeypatch.setenv(engines.CORE_ENV, "matmul-64")
    assert engines.core_for("bf16", 128, SMOL) == "matmul-64"
    monkeypatch.delenv(engines.CORE_ENV)
    monkeypatch.setenv(engines.ENV, "torch")  # the suite pins the GEMM engine: the core stays SDPA, as before
    assert engines.core_for("bf16", 128, SMOL) == "sdpa"
    monkeypatch.setenv(engines.CORE_ENV, "flash")
    with pytest.raises(engines.EngineError, match="flash"):
        engines.core_for("bf16", 128, SMOL)


CORES_BY_HEADS = {"9x3x64": {"fp32": {"long": {"sdpa": 0.25, "matmul-64": 0.31, "matmul-128": 0.34}}},
                  "32x8x128": {"fp32": {"long": {"sdpa": 1.6, "matmul-64": 1.2, "matmul-128": 1.4}}}}


@pytest.mark.parametrize(("heads", "want"), [
    (SMOL, "sdpa"), (BIG, "matmul-64"),  # measured on these heads: each its own choice (their sum chose matmul-64)
    ((15, 5, 64), "sdpa"),  # SmolLM2-360M: nearest in query width (960) is SmolLM2-135M's (576), not the 8B's (4096)
    ((32, 8, 64), "matmul-64"),  # Llama-3.2-1B: 2048 wide, nearer 4096 than 576 on a log scale
    ((64, 8, 128), "matmul-64"),  # 70B: beyond the widest measured, the widest
], ids=["smollm2-135m", "llama-3-8b", "smollm2-360m-nearest", "llama-3.2-1b-nearest", "70b-widest"])
def test_core_for_chooses_on_the_models_own_heads(monkeypatch, heads, want):
    monkeypatch.delenv(engines.ENV, raising=False)
    monkeypatch.delenv(engines.CORE_ENV, raising=False)
    monkeypatch.setattr(engines, "table", lambda: {"cores": CORES_BY_HEADS})
    assert engines.core_for("fp32", 128, heads) == want


def test_core_for_without_measured_cores_is_sdpa(monkeypatch):
    monkeypatch.delenv(engines.ENV, raising=False)
    monkeypatch.delenv(engines.CORE_ENV, raising=False)
    monkeypatch.setattr(engines, "table", lambda: {})
    assert engines.core_for("fp32", 128, SMOL) == "sdpa"


def test_choose_engines_reads_the_configs_heads(monkeypatch):
    """The fast forward asks for the core of its own model's heads."""
    from impl import model
    from impl.config import PRESETS

    asked = []
    monkeypatch.setattr(engines, "core_for", lambda dtype, rows, heads: asked.append(heads) or "sdpa")
    config = PRESETS["tiny"]
    w = {"layers.0.attention.wo.weight": torch.zeros(config.dim, config.dim)}
    model.choose_engines(w, config, 128)
    assert asked == [(config.n_heads, config.n_kv_heads, config.head_dim)]


def test_measure_cores_times_each_head_shape_apart_and_rejects_a_wrong_core(monkeypatch):
    from impl import model

    monkeypatch.setattr(engines, "CORE_SHAPES", ((4, 2, 8), (2, 1, 16)))
    monkeypatch.setitem(model.ATTENTION_CORES, "matmul-64", lambda q, k, v, s: model.grouped_query_attention_sdpa(
        q, k, v, s) * 1.1)
    cores = engines.measure_cores(repeats=1)
    assert set(cores) == {"4x2x8", "2x1x16"}
    assert all(t[d][c]["sdpa"] > 0 and t[d][c]["matmul-128"] > 0 and t[d][c]["matmul-64"] is None
               for t in cores.values() for d in engines.DTYPES for c in engines.CORE_ROWS)


@pytest.mark.parametrize("cores", [[1, 2], {"fp32": {"long": {"sdpa": 1.0}}}, {"9x3x64": 1.0}],
                         ids=["a-list", "cores-of-before-not-per-heads", "not-a-table"])
def test_table_with_malformed_cores_is_measured_again(cache, monkeypatch, cores):
    path = engines.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"identity": engines.identity(), "timings": table(), "method": engines.METHOD,
                                "cores": cores}))
    monkeypatch.setattr(engines, "measure_table", lambda: table())
    monkeypatch.setattr(engines, "measure_cores", lambda: {"9x3x64": {}})
    assert engines.table()["cores"] == {"9x3x64": {}}


def test_in_the_forward_takes_off_the_ops_own_time():
    import time

    t = engines.in_the_forward(lambda: time.sleep(0.02), lambda: time.sleep(0.01), repeats=2)
    assert 0.015 < t < 0.04


def test_in_the_forward_never_makes_a_product_free():
    """The op's own time varies: where it is timed longer alone than in the pair, the product keeps a tenth of the
    pair's time, not 0 (a 10 us product was once reported as 3 ns, 2,882,439% of a roof)."""
    import itertools
    import time

    op_seconds = itertools.cycle([0.01, 0.001])  # the warm-up call 10 ms, then in the pair 1 ms, alone 10 ms
    t = engines.in_the_forward(lambda: None, lambda: time.sleep(next(op_seconds)), repeats=1)
    assert 0.0001 <= t < 0.0005  # a tenth of the 1 ms pair, not pair - alone (-9 ms)


def test_table_corrupt_cache_is_measured_again(cache):
    path = engines.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert engines.table()["timings"]["fp32"]["short"]["torch"] > 0
    assert json.loads(path.read_text())["identity"] == engines.identity()


def test_measure_rejects_a_wrong_engine(cache, monkeypatch):
    wrong = engines.Engine("numpy", ("fp32",), engines.PLAIN, lambda x, w: (x @ w.T) * 1.01)
    monkeypatch.setitem(engines.ENGINES, "numpy", wrong)
    timings = engines.measure((256, 64), repeats=1)
    assert all(timings["fp32"][c]["numpy"] is None for c in engines.ROW_CLASSES)
    assert all(timings["fp32"][c]["torch"] > 0 for c in engines.ROW_CLASSES)


def test_cli_engines_prints_the_cached_choice(cache, monkeypatch, capsys):
    monkeypatch.delenv(engines.ENV, raising=False)
    path = engines.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"identity": engines.identity(), "measured_at": "then", "method": engines.METHOD,
                                "timings": table(fp32__long__numpy=0.5, bf16__decode__onednn_packed=0.1,
                                                 bf16__short__onednn_packed=0.1, bf16__long__onednn_packed=0.1)}))
    assert cli.main(["engines"]) == 0
    out = capsys.readouterr().out
    long_fp32 = next(line for line in out.splitlines() if line.startswith("fp32") and "long" in line)
    assert long_fp32.endswith("numpy") and engines.identity()["cpu_model"] in out
    assert "bf16: a generate-only process holds packed weights" in out
    assert "fp32: a generate-only process holds plain weights" in out


@pytest.mark.parametrize("env", [engines.ENV, engines.CORE_ENV])
def test_cli_generate_bad_pin_is_one_line_before_anything_else(monkeypatch, capsys, env):
    """Said before the checkpoint is read or the prompt echoed (the prompt was printed, then the error after it)."""
    monkeypatch.setenv(env, "bogus")
    assert cli.main(["generate", "--model", "/nonexistent/model", "--prompt", "Hello"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and f"{env}='bogus'" in err


def test_cli_engines_bad_core_pin_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setenv(engines.CORE_ENV, "flash")
    assert cli.main(["engines"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "LLAMA3_GOLDEN_ATTENTION='flash'" in err


def test_cli_engines_bad_pin_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setenv(engines.ENV, "fastest")
    assert cli.main(["engines"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "fastest" in err


def test_cli_engines_pinned_without_a_table_measures_nothing(cache, monkeypatch, capsys):
    monkeypatch.setenv(engines.ENV, "numpy")
    monkeypatch.setattr(engines, "measure", lambda *a, **k: pytest.fail("measured for a pinned process"))
    assert cli.main(["engines"]) == 0
    assert "LLAMA3_GOLDEN_ENGINE=numpy" in capsys.readouterr().out
