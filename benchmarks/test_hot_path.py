"""The hot path timed: attention block, SwiGLU FFN and the whole decoder layer (one layer), a whole model's
forward (the user's `--impl`, impl, transformers) and end-to-end generation, every implementation in one group.

Every 8B-shaped case lives in this one file, so that `tox -e slow` (`-n auto --dist loadfile`) runs them all in
one xdist worker, in collection order: two workers each holding 8B-shaped weights were OOM-killed on a 24 GB
machine. (`--dist loadgroup` with `xdist_group` marks would be finer, but silently stops grouping on pytest 9.2:
pytest-dev/pytest-xdist#1386.)

Group = operation x model x prefill length (or decode step); inside it impl, the walk-through's loop and
transformers, each in fp32 and bf16. Correctness is checked once, outside the timed call. The default test
run executes each body once (--benchmark-disable) on the small cases; the 8B shapes, the long whole-model
prompts, the SmolLM2 forward cases but two (user fp32, impl bf16) and the generate cases but one (impl fp32) are
`slow`. `tox -e bench` times everything against the machine's roofs (benchmarks/roofs.py);
`python -m benchmarks.chart` turns the JSON into a table and PNG.
"""

import pytest
import torch

from benchmarks import cases, models, roofs
from impl.layout import DTYPES


def _params(op: str):
    for shape in cases.SHAPES:
        marks = [pytest.mark.slow] if cases.is_heavy(op, shape) else []
        for name in cases.IMPLEMENTATIONS[op]:
            for dtype_name in DTYPES:
                yield pytest.param(shape, name, dtype_name, marks=marks,
                                   id=f"{shape.model}-{shape.label}-{name}-{dtype_name}")


def _record(benchmark, fn, group: str, info: dict, estimated_seconds: float) -> None:
    """Time fn (or run it once when benchmarks are disabled) under `group`, with what the report needs."""
    benchmark.group = group
    benchmark.extra_info.update(info)
    quick = benchmark.disabled

    def bandwidth() -> None:  # the bandwidth roof of this block's bytes (in the caches when they fit), read now
        gbs, how = roofs.bandwidth_for(info["bytes"], roofs.measured(quick), quick, fresh=not quick)
        if gbs > benchmark.extra_info.get("bandwidth_roof_gbytes_per_s", 0.0):
            benchmark.extra_info.update(bandwidth_roof_gbytes_per_s=gbs, bandwidth_roof_how=how)

    def call():
        with torch.inference_mode():
            return fn()

    if info.get("bytes"):
        bandwidth()
    if estimated_seconds > 0.25:  # the 8B prompts, whole models: a fixed few rounds, not pytest-benchmark's calibration
        benchmark.pedantic(call, rounds=5 if estimated_seconds < 2 else 3, iterations=1, warmup_rounds=1)
    else:
        benchmark(call)
    if info.get("bytes") and not quick:
        bandwidth()  # and after it: the higher of the two reads beside the timing


def run_case(benchmark, op: str, shape: cases.Shape, name: str, dtype_name: str) -> None:
    fn = cases.implementation(op, name, shape, dtype_name)
    err = cases.relative_error(fn(), cases.reference(op, shape, dtype_name))  # once, untimed: a fast wrong kernel
    assert err < cases.TOLERANCE[dtype_name], f"{name} {op} {shape.label} {dtype_name}: relative error {err:.3g}"
    info = dict(op=op, model=shape.model, shape=shape.label, seq=shape.seq, past=shape.past, implementation=name,
                dtype=dtype_name, flops=cases.flops(op, shape), bytes=cases.bytes_moved(op, shape, DTYPES[dtype_name]))
    if name == "impl-generate" and not benchmark.disabled:  # the evidence for a missed roof target (report.py)
        bound = cases.engine_bound_seconds(op, shape, dtype_name)
        info.update(engine_bound_s=bound["seconds"], engine_bound_engines=bound["engines"])
    _record(benchmark, fn, f"{op} {shape.model} {shape.label}", info, cases.estimated_seconds(op, shape, dtype_name))


@pytest.mark.parametrize(("shape", "name", "dtype_name"), list(_params("attention")))
def test_attention(benchmark, shape, name, dtype_name):
    run_case(benchmark, "attention", shape, name, dtype_name)


@pytest.mark.parametrize(("shape", "name", "dtype_name"), list(_params("ffn")))
def test_ffn(benchmark, shape, name, dtype_name):
    run_case(benchmark, "ffn", shape, name, dtype_name)


@pytest.mark.parametrize(("shape", "name", "dtype_name"), list(_params("layer")))
def test_layer(benchmark, shape, name, dtype_name):
    run_case(benchmark, "layer", shape, name, dtype_name)


# ------------------------------------------------------------------------------------------- whole models
DEFAULT_FORWARD = {("user", "fp32"), ("impl", "bf16")}


def _forward_params():
    # One (model, dtype) after the other, so each weight set is built once and let go before the next
    # (benchmarks/models.py holds one 8B-shaped set at a time).
    for model_name in ("smollm2-135m", "llama-3-8b-1layer"):
        for dtype_name in DTYPES:
            for seq in models.FORWARD_SEQS:
                for name in models.FORWARD_IMPLEMENTATIONS:
                    # the default run: SmolLM2's 17 tokens, through the user's trace in fp32 and impl's fast path in
                    # bf16 (transformers' eager forward is the reference of every case); the rest is `slow`
                    slow = model_name != "smollm2-135m" or seq > 17 or (name, dtype_name) not in DEFAULT_FORWARD
                    yield pytest.param(models.ModelShape(model_name, seq), name, dtype_name,
                                       marks=[pytest.mark.slow] if slow else [],
                                       id=f"{model_name}-prefill-{seq}-{name}-{dtype_name}")


@pytest.mark.parametrize(("shape", "name", "dtype_name"), list(_forward_params()))
def test_forward(benchmark, user_forward, shape, name, dtype_name):
    """A whole forward over the prompt: `user` is `--impl module:callable` (impl's reference forward without it)."""
    fn = models.forward_case(name, shape, dtype_name, user_forward)
    ref = models.reference_logits(shape, dtype_name)
    got = models.user_last_logits(user_forward, shape, dtype_name) if name == "user" else fn()
    assert got is not None, "the user's forward reported no `logits` stage to the trace"
    err = cases.relative_error(got.reshape(-1), ref)
    assert err < models.FORWARD_TOLERANCE[dtype_name], f"{name} {shape.label} {dtype_name}: last logits {err:.3g}"
    config, _ = models.checkpoint(shape.model, dtype_name)
    layer = cases.Shape(shape.model.removesuffix("-1layer"), shape.seq)  # every layer, then the last unembedding
    flops = config.n_layers * cases.flops("layer", layer) + 2 * config.vocab_size * config.dim
    info = dict(op="forward", model=shape.model, shape=shape.label, seq=shape.seq, past=0, implementation=name,
                dtype=dtype_name, flops=flops)
    _record(benchmark, fn, f"forward {shape.model} {shape.label}", info, info["flops"] / 40e9)


def _generate_params():
    """The default run executes the body once on impl in fp32 (impl's generate and transformers' eager generate, as
    its reference); the other five cases (transformers' generate on CPU, bf16 above all, took minutes on 2 cores)
    are `slow`."""
    for dtype_name in DTYPES:
        for name in models.GENERATE_IMPLEMENTATIONS:
            slow = (name, dtype_name) != ("impl", "fp32")
            yield pytest.param(name, dtype_name, marks=[pytest.mark.slow] if slow else [], id=f"{dtype_name}-{name}")


@pytest.mark.parametrize(("name", "dtype_name"), list(_generate_params()))
def test_generate(benchmark, name, dtype_name):
    """End to end: `impl generate`'s fast path (its prepared weights) vs transformers' greedy generate."""
    fn = models.generate_case(name, dtype_name)
    ids, want = fn(), models.generate_case("hf-eager", dtype_name)()
    assert len(ids) == models.GENERATE_NEW
    same = ids == want if dtype_name == "fp32" else ids[0] == want[0]  # bf16 paths may part ways after a near tie
    assert same, f"{name} {dtype_name}: generated {ids[:8]}..., transformers {want[:8]}..."
    info = dict(op="generate", model="smollm2-135m", shape=f"{models.GENERATE_PROMPT}+{models.GENERATE_NEW}",
                seq=models.GENERATE_PROMPT, past=0, implementation=name, dtype=dtype_name,
                new_tokens=models.GENERATE_NEW)
    _record(benchmark, fn, f"generate smollm2-135m {info['shape']}", info, 2.5)  # 3 rounds
