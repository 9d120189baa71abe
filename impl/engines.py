"""Which GEMM engine the fast forward multiplies with: chosen by measurement on the running machine, not by CPU flags.

The same `x @ w.T` runs 2-5x faster or slower depending on the engine and the CPU: torch's default (MKL or
oneDNN, repacking the weight at every call), oneDNN with the weight packed once, numpy's OpenBLAS, and for bf16
native AVX512-BF16/AMX kernels or fp32 kernels on weights converted a block at a time. Which is fastest differs
between CPUs of the same family and between row counts (one decode row, a short prompt, a long prompt), so:

- `measure()` times every available engine per dtype and row class on one weight larger than the caches
  (a few seconds), checks each result against an fp64 product (a fast wrong engine is never chosen), and
  `table()` caches the timings per CPU model + flags + torch/numpy version in `impl.assets.cache_dir()/engines/`.
- `choose(timings, dtype, row_class, layout)` is the pure choice: the fastest correct engine for that weight
  layout, never one that needs a second copy of the weights (memory wins over speed: 8B bf16 stays in 17 GB).
- `generation_layout` says whether a process that only generates should hold packed weights instead of plain
  ones (a process that checks against goldens holds the plain layout, which the reference forward reads).
- `LLAMA3_GOLDEN_ENGINE=<name>` pins one engine (where it supports the dtype; torch elsewhere): what tests do.

`python -m impl engines` prints the table and the choices.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from impl.errors import Llama3GoldenError

ENV = "LLAMA3_GOLDEN_ENGINE"
ROW_CLASSES = ("decode", "short", "long")
ROWS = {"decode": 1, "short": 17, "long": 128}  # what each class is measured at
LONG_FROM = 128  # rows: a prompt from here on is "long"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PLAIN, PACKED = "plain", "packed"
# The measured weight: (out, in) = (8192, 2048), 64 MB in fp32 / 32 MB in bf16, beyond L2 and most L3s, as real
# weights are. The long class at 128 rows is 4.3 GFLOP: the whole table takes a few seconds.
MEASURE_SHAPE = (8192, 2048)
# ...and a small one beside it, timed the same way and added in: (1536, 576) is SmolLM2-135M's w1, 3.5 MB in fp32,
# in the caches. The cost of handing the cores between an engine's thread pool and torch's is the same for both, so
# it is the small model's products it decides: numpy's OpenBLAS, timed on the large weight alone (even between
# torch's ops), won at 128 rows by 10% and made a SmolLM2 fp32 layer 4x slower than torch (31 vs 134 GFLOP/s).
SMALL_SHAPE = (1536, 576)
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}  # ||out - exact|| / ||exact||: bf16 rounds the output to 8 bits
_BLOCK_ELEMENTS = 1 << 22  # bf16-via-fp32: 16 MB of fp32 weight per block


class EngineError(Llama3GoldenError):
    """LLAMA3_GOLDEN_ENGINE names no engine."""


# ================================================================ the engines
def matmul_torch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch's default: MKL (fp32) or oneDNN (bf16), the weight repacked inside every call."""
    return x @ w.T


def matmul_numpy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """numpy's BLAS (OpenBLAS in the wheels) on the same memory: no copy of the weight."""
    return torch.from_numpy(x.numpy() @ w.numpy().T)


def matmul_bf16_via_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for bf16 through fp32 kernels, converting the weight a block of rows at a time: never a whole fp32
    copy, one rounding to bf16 at the end as in a bf16 matmul. For CPUs whose bf16 kernels are slow (no AMX)."""
    xf, out = x.float(), torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    rows = max(1, _BLOCK_ELEMENTS // w.shape[1])
    for start in range(0, w.shape[0], rows):
        out[:, start:start + rows] = xf @ w[start:start + rows].float().T
    return out


def matmul_fp32_copy(x: torch.Tensor, w32: torch.Tensor) -> torch.Tensor:
    """bf16 activations against an fp32 copy of a bf16 weight: measured to show what it would give, never chosen
    (the copy doubles the weights' memory)."""
    return (x.float() @ w32.T).to(x.dtype)


def pack_onednn(w: torch.Tensor) -> torch.Tensor:
    """The weight reordered once into oneDNN's blocked layout (an opaque mkldnn tensor: only this engine reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(w)


def matmul_onednn_packed(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


@dataclass(frozen=True)
class Engine:
    name: str
    dtypes: tuple[str, ...]
    layout: str  # PLAIN: reads the loaded weights; PACKED: needs `prepare(w)`'s result instead of them
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (rows, in), prepared w) -> (rows, out)
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None  # plain weight -> what matmul reads
    second_copy: bool = False  # needs a second copy of the weights beside the plain ones: never chosen
    what: str = ""


ENGINES = {e.name: e for e in (
    Engine("torch", ("fp32", "bf16"), PLAIN, matmul_torch, what="torch's default (x @ w.T)"),
    Engine("numpy", ("fp32",), PLAIN, matmul_numpy, what="numpy's BLAS on the same memory"),
    Engine("bf16-via-fp32", ("bf16",), PLAIN, matmul_bf16_via_fp32,
           what="fp32 kernels, the bf16 weight converted 16 MB at a time"),
    Engine("onednn-packed", ("fp32", "bf16"), PACKED, matmul_onednn_packed, pack_onednn,
           what="oneDNN, the weight packed once (replaces the plain weight)"),
    Engine("bf16-fp32-copy", ("bf16",), PLAIN, matmul_fp32_copy, lambda w: w.float(), second_copy=True,
           what="fp32 kernels on an fp32 copy of the weights (a second copy: never chosen)"),
)}


def row_class(rows: int) -> str:
    return "decode" if rows == 1 else "short" if rows < LONG_FROM else "long"


# ================================================================ the choice (pure: tests inject timing tables)
Timings = dict[str, dict[str, dict[str, float | None]]]  # dtype -> row class -> engine -> seconds (None: failed)


def choose(timings: Timings, dtype: str, rclass: str, layout: str = PLAIN) -> str:
    """The fastest correct engine for weights in `layout`, among those needing no second copy; torch if none."""
    times = timings.get(dtype, {}).get(rclass, {})
    usable = {n: t for n, t in times.items() if t is not None and n in ENGINES and ENGINES[n].layout == layout
              and dtype in ENGINES[n].dtypes and not ENGINES[n].second_copy}
    if usable:
        return min(usable, key=usable.get)
    if layout == PACKED:
        raise EngineError(f"no packed engine works for {dtype} on this machine")
    return "torch"


GENERATION_DECODE_STEPS = 32  # a nominal generation: one short and one long prompt, 32 decode steps each


def generation_layout(timings: Timings, dtype: str) -> str:
    """PACKED where packed weights make a nominal generation faster than the best plain engines, else PLAIN."""
    def total(layout: str) -> float | None:
        try:
            t = [timings[dtype][c][choose(timings, dtype, c, layout)] for c in ROW_CLASSES]
        except (KeyError, EngineError):
            return None
        return None if None in t else GENERATION_DECODE_STEPS * t[0] + t[1] + t[2]

    plain, packed = total(PLAIN), total(PACKED)
    return PACKED if packed is not None and plain is not None and packed < plain else PLAIN


def pinned() -> str | None:
    """LLAMA3_GOLDEN_ENGINE, checked: None when unset."""
    name = os.environ.get(ENV) or None
    if name is not None and name not in ENGINES:
        raise EngineError(f"{ENV}={name!r}: no such engine; known: {', '.join(ENGINES)}")
    if name is not None and ENGINES[name].second_copy:
        raise EngineError(f"{ENV}={name!r} needs a second copy of the weights; pin another engine")
    return name


def engine_for(dtype: str, rows: int, layout: str = PLAIN) -> Engine:
    """The engine the fast forward uses for `rows` rows of `dtype` on weights in `layout`."""
    name = pinned()
    if name is not None:
        e = ENGINES[name]
        if layout == PACKED:  # packed weights can only be read by the packing engine
            return e if e.layout == PACKED else ENGINES["onednn-packed"]
        return e if e.layout == PLAIN and dtype in e.dtypes else ENGINES["torch"]
    return ENGINES[choose(table()["timings"], dtype, row_class(rows), layout)]


def layout_for_generation(dtype: str) -> str:
    name = pinned()
    if name is not None:
        return ENGINES[name].layout
    return generation_layout(table()["timings"], dtype)


# ================================================================ measuring, and the cache
def identity() -> dict[str, str]:
    """What the timings depend on: the CPU's model and flags, torch's and numpy's versions."""
    fields: dict[str, str] = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, sep, v = line.partition(":")
                if sep and k.strip() in ("model name", "flags", "Features") and k.strip() not in fields:
                    fields[k.strip()] = v.strip()
    import numpy

    return {"cpu_model": fields.get("model name", platform.processor() or platform.machine()),
            "cpu_flags": fields.get("flags", fields.get("Features", "")), "cores": str(os.cpu_count()),
            "threads": str(torch.get_num_threads()), "torch": torch.__version__, "numpy": numpy.__version__}


def cache_file(ident: dict[str, str] | None = None) -> Path:
    from impl.assets import cache_dir

    ident = ident or identity()
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "engines" / f"{digest}.json"


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of fn's fastest call of `repeats`, after one warm-up call (also what benchmarks/roofs.py uses)."""
    fn()  # warm: first-call set-up is not the steady state
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact).norm() / exact.norm())


def torch_parallel_op() -> Callable[[], object]:
    """A torch op that enters torch's own OpenMP parallel region (an add over 512 KB, 4x torch's grain size), as
    the forward's norms, RoPE and attention do between its products. Small, so that its own time (taken off,
    and noisy like every time on a shared machine) stays small beside a one-row product's."""
    a = torch.randn(1 << 17, generator=torch.Generator().manual_seed(1))
    out = torch.empty_like(a)
    return functools.partial(torch.add, a, 1.0, out=out)


def in_the_forward(fn: Callable[[], object], between: Callable[[], object], repeats: int) -> float:
    """Seconds of fn as the forward runs it: each product followed by one of torch's parallel ops, whose own time,
    timed in turn with the pair, is taken off. An engine with its own thread pool (numpy's OpenBLAS) pays for the
    hand-over of the cores there: measured alone, numpy's product looked 2.7x faster than torch's at one row on an
    AMD EPYC, and a SmolLM2 layer on it ran 25x slower than on torch (7.96 against 0.30 ms for a decode step).
    Never below a tenth of the pair's time: the op's time taken at another moment made a 10 us product 3 ns."""
    fn(), between()  # warm
    pair = alone = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(), between()
        middle = time.perf_counter()
        between()
        pair, alone = min(pair, middle - start), min(alone, time.perf_counter() - middle)
    return max(pair - alone, pair / 10)


def prepare_all(w: torch.Tensor, dtype: str) -> dict[str, torch.Tensor | None]:
    """w as each engine of this dtype reads it (packed where it packs); None where that fails here."""
    prepared: dict[str, torch.Tensor | None] = {}
    for e in ENGINES.values():
        if dtype in e.dtypes:
            try:
                prepared[e.name] = e.prepare(w) if e.prepare else w
            except RuntimeError:  # e.g. oneDNN cannot pack bf16 without avx512bw / avx_ne_convert
                prepared[e.name] = None
    return prepared


def time_products(x: torch.Tensor, w: torch.Tensor, prepared: dict[str, torch.Tensor | None], dtype: str,
                  timer: Callable[[Callable[[], object]], float]) -> dict[str, float | None]:
    """Seconds of each prepared engine's x @ w.T by `timer`, None where it fails or is wrong (checked once against
    an fp64 product: a fast wrong engine is never timed)."""
    exact = x.double() @ w.double().T
    out: dict[str, float | None] = {}
    for name, pw in prepared.items():
        out[name] = None
        if pw is None:
            continue
        fn = functools.partial(ENGINES[name].matmul, x, pw)
        try:
            if relative_error(fn(), exact) < TOLERANCE[dtype]:
                out[name] = timer(fn)
        except RuntimeError:
            pass
    return out


def measure(shape: tuple[int, int] | None = None, repeats: int = 3) -> Timings:
    """Seconds per product for every engine, dtype and row class (min of `repeats`), each timed between torch's
    own parallel ops as in the forward (`in_the_forward`); None where an engine fails or returns a wrong result.
    shape: the weight's (out, in), MEASURE_SHAPE by default."""
    shape = shape or MEASURE_SHAPE
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(shape, generator=g) * 0.02
    between = torch_parallel_op()
    out: Timings = {}
    with torch.inference_mode():
        for dtype, tdtype in DTYPES.items():
            w = w32.to(tdtype)
            prepared = prepare_all(w, dtype)
            for rclass, rows in ROWS.items():
                x = torch.randn(rows, shape[1], generator=g).to(tdtype)
                out.setdefault(dtype, {})[rclass] = time_products(
                    x, w, prepared, dtype, lambda fn: in_the_forward(fn, between, repeats))
            del prepared
    return out


# How `measure` times: a cached table timed another way is measured again. 2: products between torch's parallel
# ops (`in_the_forward`); 3: and on SMALL_SHAPE too, added; 4-6: and the attention cores ("cores"); 7: the op's
# own time taken in turn with each pair (it made a one-row product 3 ns), matmul cores in query blocks; 8: the
# cores per head shape, not added over both. 1 (no field): products alone, which chose numpy's BLAS where it loses
# in the forward.
METHOD = 8


# ================================================================ the attention core (softmax(q.k) @ v)
CORE_ENV = "LLAMA3_GOLDEN_ATTENTION"
CORES = ("sdpa", "matmul-64", "matmul-128")  # impl.model.ATTENTION_CORES: torch's fused SDPA (fp32 for bf16), or
# transformers' eager arithmetic in query blocks of 64 or 128 rows
# (heads, kv heads, head dim) each measured on, apart: SmolLM2-135M's and Llama-3-8B's (a decode step reads 512 keys).
# Which core wins depends on the heads too: on an AMD EPYC at 128 fp32 rows SDPA took 0.25 ms on SmolLM2's heads
# against blocks of 64's 0.31, and 1.7 ms on the 8B's against their 1.3 (their sum chose blocks of 64 for both).
CORE_SHAPES = ((9, 3, 64), (32, 8, 128))
CORE_DECODE_KEYS = 512
# The core's classes of query rows and the rows each is measured at. Finer than the GEMM classes: measured on an
# AMD EPYC, the unblocked matmul core won bf16 at 128 rows by 2.4x and lost fp32 at 512 by 2x (its (heads, T, T)
# scores outgrew the caches), so a prompt takes the choice measured at the nearest of 128 and 512.
CORE_ROWS = {"decode": 1, "short": 17, "long": 128, "longer": 512}


def core_class(rows: int) -> str:
    """decode (1 row), short (< 128), long (< 256: nearer 128), longer (nearer 512 and beyond)."""
    return "decode" if rows == 1 else "short" if rows < LONG_FROM else "long" if rows < 2 * LONG_FROM else "longer"


def _added(a: float | None, b: float | None) -> float | None:
    """Two times of one engine added (its large and small weight's); None (wrong or unavailable) where either is."""
    return None if a is None or b is None else a + b


Heads = tuple[int, int, int]  # (heads, kv heads, head dim)


def time_cores(heads: Heads, rows: int, keys: int, dtype: str, repeats: int,
               generator: torch.Generator) -> dict[str, float | None]:
    """Seconds of each attention core on random (rows, h, d) queries after keys - rows cached positions, (keys, kv, d)
    keys and values; None where a core is wrong (checked once against the explicit attention in fp64)."""
    from impl import model  # the cores are model math; the choice and its cache live here

    h, kv, d = heads
    q = torch.randn(rows, h, d, generator=generator).to(DTYPES[dtype])
    k, v = (torch.randn(keys, kv, d, generator=generator).to(DTYPES[dtype]) for _ in range(2))
    start = keys - rows
    exact = model.grouped_query_attention(q.double(), k.double(), v.double(), start)
    out: dict[str, float | None] = {}
    with torch.inference_mode():
        for name in CORES:
            fn = functools.partial(model.ATTENTION_CORES[name], q, k, v, start)
            out[name] = best_time(fn, repeats) if relative_error(fn(), exact) < TOLERANCE[dtype] else None
    return out


def heads_key(heads: Heads) -> str:
    """(9, 3, 64) -> "9x3x64": how the table names a head shape."""
    return "x".join(map(str, heads))


def measure_cores(repeats: int = 5) -> dict[str, Timings]:
    """Seconds per attention core, dtype and row class on each of CORE_SHAPES apart: {heads_key: timings}; None where
    a core is wrong."""
    g = torch.Generator().manual_seed(4)
    out: dict[str, Timings] = {}
    for heads in CORE_SHAPES:
        for dtype in DTYPES:
            for rclass, rows in CORE_ROWS.items():
                keys = CORE_DECODE_KEYS if rclass == "decode" else rows
                out.setdefault(heads_key(heads), {}).setdefault(dtype, {})[rclass] = time_cores(
                    heads, rows, keys, dtype, repeats, g)
    return out


def cores_for_heads(cores: dict[str, Timings], heads: Heads) -> Timings:
    """The core timings measured on `heads`, else on the measured head shape nearest in query width (heads x head
    dim, on a log scale: the work per query and key), as a prompt takes the nearest measured rows. {} if none."""
    if heads_key(heads) in cores:
        return cores[heads_key(heads)]
    measured = [tuple(int(n) for n in key.split("x")) for key in cores]
    if not measured:
        return {}
    nearest = min(measured, key=lambda m: abs(math.log(m[0] * m[2] / (heads[0] * heads[2]))))
    return cores[heads_key(nearest)]


def pinned_core() -> str | None:
    """LLAMA3_GOLDEN_ATTENTION, checked: None when unset."""
    name = os.environ.get(CORE_ENV) or None
    if name is not None and name not in CORES:
        raise EngineError(f"{CORE_ENV}={name!r}: no such attention core; known: {', '.join(CORES)}")
    return name


def choose_core(cores: Timings, dtype: str, rclass: str) -> str:
    """The fastest correct attention core; SDPA where nothing was measured."""
    times = {n: t for n, t in cores.get(dtype, {}).get(rclass, {}).items() if t is not None and n in CORES}
    return min(times, key=times.get) if times else "sdpa"


def core_for(dtype: str, rows: int, heads: Heads) -> str:
    """The attention core the fast forward uses on `heads` (heads, kv heads, head dim): LLAMA3_GOLDEN_ATTENTION where
    set, SDPA where only the GEMM engine is pinned (as the test suite pins it), else the one measured fastest here
    on those heads (or the nearest measured ones)."""
    name = pinned_core()
    if name is not None:
        return name
    if pinned() is not None:
        return "sdpa"
    return choose_core(cores_for_heads(table().get("cores", {}), heads), dtype, core_class(rows))


def measure_table(repeats: int = 5) -> Timings:
    """measure() on MEASURE_SHAPE and on SMALL_SHAPE, each engine's two times added (None where either is)."""
    large, small = measure(MEASURE_SHAPE, repeats), measure(SMALL_SHAPE, repeats)
    return {d: {c: {name: _added(t, small[d][c].get(name)) for name, t in row.items()}
                for c, row in classes.items()} for d, classes in large.items()}


def weight_elements(data: dict) -> int:
    """The weights' elements a table's times multiply (both measured shapes; one for a table of before)."""
    shapes = data.get("shapes") or [data.get("shape") or MEASURE_SHAPE]
    return sum(n * k for n, k in shapes)


def _valid(data: object, ident: dict[str, str]) -> bool:
    if not isinstance(data, dict) or data.get("identity") != ident or not isinstance(data.get("timings"), dict):
        return False
    if data.get("method") != METHOD:
        return False
    cores = data.get("cores", {})
    if not isinstance(cores, dict) or not all(
            isinstance(v, dict) and re.fullmatch(r"\d+x\d+x\d+", k) for k, v in cores.items()):
        return False
    t = data["timings"]
    return all(isinstance(t.get(d), dict) and all(isinstance(t[d].get(c), dict) for c in ROW_CLASSES) for d in DTYPES)


@functools.cache
def table(remeasure: bool = False) -> dict:
    """{"identity", "timings", "measured_at", "file"}: from the cache, or measured now and cached."""
    ident, path = identity(), cache_file()
    if not remeasure and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        if _valid(data, ident):
            return {**data, "file": str(path)}
    data = {"identity": ident, "timings": measure_table(), "shapes": [list(MEASURE_SHAPE), list(SMALL_SHAPE)],
            "cores": measure_cores(), "method": METHOD,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:  # a cache that cannot be written costs the measurement next time, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass
    return {**data, "file": str(path)}


def describe(data: dict) -> str:
    """The table `python -m impl engines` prints: GFLOP/s per engine, the choice per dtype and row class."""
    ident, timings = data["identity"], data["timings"]
    elements = weight_elements(data)
    shapes = " and ".join(f"({n}, {k})" for n, k in (data.get("shapes") or [data.get("shape", MEASURE_SHAPE)]))
    lines = [f"CPU: {ident['cpu_model']}, {ident['cores']} cores, {ident['threads']} threads; "
             f"torch {ident['torch']}, numpy {ident['numpy']}",
             f"flags: {ident['cpu_flags']}",
             f"measured {data.get('measured_at', '?')}, cached in {data.get('file', '?')}",
             f"GFLOP/s of x @ w.T over weights {shapes} (out, in), each product between torch's parallel ops as in "
             "the forward, the fastest of 5; '-' = unavailable or wrong here", ""]
    names = list(ENGINES)
    lines.append(f"{'dtype':5} {'rows':>12} " + " ".join(f"{name:>15}" for name in names) + "  chosen (plain)")
    for dtype in DTYPES:
        for rclass in ROW_CLASSES:
            rows, times = ROWS[rclass], timings[dtype][rclass]
            cells = [f"{2 * rows * elements / times[name] / 1e9:15.1f}" if times.get(name) else f"{'-':>15}"
                     for name in names]
            lines.append(f"{dtype:5} {rclass + f' ({rows})':>12} " + " ".join(cells)
                         + f"  {choose(timings, dtype, rclass)}")
        lines.append(f"{dtype}: a generate-only process holds {generation_layout(timings, dtype)} weights")
    cores = data.get("cores") or {}
    for key, timings_of_heads in cores.items():
        lines += ["", f"attention core, ms, heads x kv heads x head dim {key} (decode: one query, "
                  f"{CORE_DECODE_KEYS} keys)", f"{'dtype':5} {'rows':>12} " + " ".join(f"{c:>15}" for c in CORES)
                  + "  chosen"]
        for dtype in DTYPES:
            for rclass, rows in CORE_ROWS.items():
                row = timings_of_heads.get(dtype, {}).get(rclass, {})
                cells = [f"{1e3 * row[c]:15.3f}" if row.get(c) else f"{'-':>15}" for c in CORES]
                lines.append(f"{dtype:5} {rclass + f' ({rows})':>12} " + " ".join(cells)
                             + f"  {choose_core(timings_of_heads, dtype, rclass)}")
    return "\n".join(lines)
