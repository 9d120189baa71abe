"""The hot path timed: attention block and SwiGLU FFN, one layer, every implementation in one group per shape.

Group = operation x model x prefill length (or decode step); inside it impl, the walk-through's loop,
transformers and the two roofs, each in fp32 and bf16. Correctness is checked once, outside the timed call.
The default test run executes each body once (--benchmark-disable) on the SmolLM2 shapes; the 8B shapes
are `slow`. `tox -e bench` times everything; `python -m benchmarks.chart` turns the JSON into a table and PNG.
"""

import pytest

from benchmarks import cases
from impl.layout import DTYPES


def _params(op: str):
    for shape in cases.SHAPES:
        marks = [pytest.mark.slow] if cases.is_heavy(op, shape) else []
        for name in cases.IMPLEMENTATIONS[op]:
            for dtype_name in DTYPES:
                yield pytest.param(shape, name, dtype_name, marks=marks,
                                   id=f"{shape.model}-{shape.label}-{name}-{dtype_name}")


def run_case(benchmark, op: str, shape: cases.Shape, name: str, dtype_name: str) -> None:
    fn = cases.implementation(op, name, shape, dtype_name)
    if name not in cases.ROOFS:  # once, untimed: a fast wrong kernel cannot win
        err = cases.relative_error(fn(), cases.reference(op, shape, dtype_name))
        assert err < cases.TOLERANCE[dtype_name], f"{name} {op} {shape.label} {dtype_name}: relative error {err:.3g}"
    benchmark.group = f"{op} {shape.model} {shape.label}"
    benchmark.extra_info.update(op=op, model=shape.model, shape=shape.label, seq=shape.seq, past=shape.past,
                                implementation=name, dtype=dtype_name, flops=cases.flops(op, shape),
                                bytes=cases.bytes_moved(op, shape, DTYPES[dtype_name]))
    seconds = cases.estimated_seconds(op, shape, dtype_name)
    if seconds > 0.25:  # the 8B prompts: a fixed few rounds, not pytest-benchmark's calibration
        benchmark.pedantic(fn, rounds=5 if seconds < 2 else 3, iterations=1, warmup_rounds=1)
    else:
        benchmark(fn)


@pytest.mark.parametrize(("shape", "name", "dtype_name"), list(_params("attention")))
def test_attention(benchmark, shape, name, dtype_name):
    run_case(benchmark, "attention", shape, name, dtype_name)


@pytest.mark.parametrize(("shape", "name", "dtype_name"), list(_params("ffn")))
def test_ffn(benchmark, shape, name, dtype_name):
    run_case(benchmark, "ffn", shape, name, dtype_name)
