"""The machine's true roofs: the best GEMM rate any engine reaches, and a STREAM-like read rate.

- Peak FLOP/s per dtype: every GEMM engine of impl.engines (torch's default, oneDNN with the weight packed once,
  numpy's OpenBLAS, bf16 native and via fp32 (blocked, or on an fp32 copy)) multiplies at each of PEAK_SHAPES
  (a large product, one whose weight fits the caches, a tall one); the fastest engine and shape set the roof and
  are named. A second copy of the weights is allowed here: a roof is what the
  machine can do, not what impl may hold. Beside it, the theoretical peak where the clock and vector width are
  readable: cores x GHz x fp32 lanes x 2 (FMA) x 2 FMA units (assumed; AVX512-BF16 doubles it for bf16).
- Bandwidth: the fastest plain read (torch and numpy sums over fp32) of a buffer 4x the last-level cache.
  A block whose bytes fit in the caches is read from them: its bandwidth roof is the read rate of a buffer of
  its own size, repeated, when that is faster (`read_rate`).

A benchmark's fraction of roof = max(FLOPs / peak, bytes / bandwidth) / its time. Above 1 the roof is wrong
(something beat the machine's best): benchmarks/chart.py fails the run, it never clamps.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from impl import engines

PEAK_SHAPE = (1024, 2048, 2048)  # rows, in, out: 8.6 GFLOP, past every engine's small-shape overheads
# The peak is the fastest of these (rows, in, out): at the large shape alone, a block whose products stay in the
# caches beat the roof (SmolLM2's FFN at 128 tokens, fp32: 491 against 486 GFLOP/s, on 2026-11-26), and a roof
# that a block beats is not the machine's peak. The cache-resident (256, 1024, 1024) reached 498 there.
PEAK_SHAPES = (PEAK_SHAPE, (256, 1024, 1024), (2048, 1024, 1024))
QUICK_SHAPE = (64, 128, 128)  # the untimed default run: exercise the code in milliseconds


def gemm_rates(dtype: str, shape: tuple[int, int, int] = PEAK_SHAPE, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of each engine that runs this dtype here (and gets it right) at `shape`."""
    rows, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g).to(engines.DTYPES[dtype])
    w = torch.randn(n, k, generator=g).to(engines.DTYPES[dtype])
    with torch.inference_mode():
        seconds = engines.time_products(x, w, engines.prepare_all(w, dtype), dtype,
                                        lambda fn: engines.best_time(fn, repeats))
    return {name: 2 * rows * k * n / t / 1e9 for name, t in seconds.items() if t is not None}


def last_level_cache_bytes() -> int:
    """The largest cache's size from sysfs (32 MB if unreadable)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            sizes.append(int(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m[2]])
    return max(sizes, default=32 << 20)


@functools.cache
def read_rate(n_bytes: int, repeats: int = 5) -> tuple[float, str]:
    """(GB/s, how) of the fastest plain read of an fp32 buffer of n_bytes (a sum, or a product by a vector of
    ones), read `repeats` times (warm)."""
    cols = 1024
    buf = torch.randn(max(n_bytes // 4 // cols, 1), cols, generator=torch.Generator().manual_seed(3))
    arr, ones_t, ones_n = buf.numpy(), torch.ones(cols), torch.ones(cols).numpy()
    # a sum, and a matrix-vector product by ones (BLAS's streaming read, the kernel a decode step runs): the
    # fastest read is the roof, so a decode block is never measured against a slower way of reading than its own
    ways = {"torch.sum": buf.sum, "numpy.sum": arr.sum, "torch.mv": functools.partial(torch.mv, buf, ones_t),
            "numpy.dot": functools.partial(arr.dot, ones_n)}
    rates = {how: buf.numel() * 4 / engines.best_time(fn, repeats) / 1e9 for how, fn in ways.items()}
    how = max(rates, key=rates.get)
    return rates[how], how


def theoretical_gflops(ident: dict[str, str]) -> dict[str, float | str] | None:
    """cores x GHz x lanes x 2 x 2 FMA units, where /proc/cpuinfo has the clock and the flags say the width."""
    mhz = None
    if os.path.exists("/proc/cpuinfo"):
        m = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
        mhz = float(m[1]) if m else None
    flags = ident["cpu_flags"].split()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else None
    if mhz is None or lanes is None:
        return None
    fp32 = int(ident["threads"]) * mhz / 1e3 * lanes * 2 * 2
    return {"fp32": fp32, "bf16": fp32 * (2 if "avx512_bf16" in flags or "amx_bf16" in flags else 1),
            "how": f"{ident['threads']} threads x {mhz / 1e3:.2f} GHz x {lanes} fp32 lanes x 2 (FMA) x 2 FMA units "
                   "(assumed)"}


def measure(quick: bool = False) -> dict:
    """The roofs of this machine, measured now: JSON-ready, for machine_info["roofs"]."""
    ident = engines.identity()
    shapes = (QUICK_SHAPE,) if quick else PEAK_SHAPES
    out: dict = {"cpu_model": ident["cpu_model"], "cpu_flags": ident["cpu_flags"], "threads": ident["threads"],
                 "shapes": [list(s) for s in shapes], "quick": quick}
    for dtype in engines.DTYPES:
        best: dict[str, tuple[float, tuple[int, int, int]]] = {}  # engine -> its fastest (GFLOP/s, shape)
        for shape in shapes:
            for name, rate in gemm_rates(dtype, shape, 1 if quick else 10).items():
                best[name] = max(best.get(name, (0.0, shape)), (rate, shape))
        top = max(best, key=lambda name: best[name][0])
        out[dtype] = {"gflops": best[top][0], "engine": top, "shape": list(best[top][1]),
                      "engines": {name: rate for name, (rate, _) in best.items()}}
    llc = last_level_cache_bytes()
    gbs, how = read_rate((1 << 20) if quick else 4 * llc, 1 if quick else 5)
    out["bandwidth"] = {"gbytes_per_s": gbs, "how": how, "buffer_bytes": (1 << 20) if quick else 4 * llc,
                        "last_level_cache_bytes": llc}
    out["theoretical"] = theoretical_gflops(ident)
    return out


measured = functools.cache(measure)  # once per process: what the benchmarks are judged against as they run


def best_of(a: dict, b: dict) -> dict:
    """Two measurements of the roofs (a run's start and its end), each roof the higher: a VM's memory bandwidth and
    clock move with its neighbours' load over minutes (52 and 88 GB/s in two runs of 2026-11-26 on one machine),
    and a roof is what the machine can do."""
    out = dict(a)
    for dtype in ("fp32", "bf16"):
        out[dtype] = max(a[dtype], b[dtype], key=lambda r: r["gflops"])
    out["bandwidth"] = max(a["bandwidth"], b["bandwidth"], key=lambda r: r["gbytes_per_s"])
    return out


def bandwidth_for(n_bytes: int, roofs: dict, quick: bool = False, fresh: bool = False) -> tuple[float, str]:
    """The bandwidth roof for a block reading n_bytes: the larger-than-cache rate, or its own size's if faster.
    fresh: read its own size again now (not the process's first measurement of that size): a virtual machine's
    read rate moves with its neighbours (torch.sum of 134 MB: 52 and 70 GB/s minutes apart on 2026-11-26), so a
    memory-bound block is judged by a read taken beside its own timing."""
    dram = roofs["bandwidth"]["gbytes_per_s"]
    own, how = (read_rate.__wrapped__ if fresh else read_rate)(n_bytes, 1 if quick else 5)
    return (own, f"{how} of {n_bytes / 1e6:.1f} MB, repeated") if own > dram else (dram, "beyond the caches")
