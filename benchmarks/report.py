"""Derived numbers for the pytest-benchmark JSON: GFLOP/s, fraction of the machine's roofs, ratios, the targets.

`annotate` runs in the `pytest_benchmark_update_json` hook (benchmarks/conftest.py), so every saved JSON,
the baseline included, carries them in each benchmark's `extra_info`. The roofs are the machine's, measured
in the same run (benchmarks/roofs.py, in `machine_info["roofs"]`): the best GEMM rate of any engine per dtype,
and the read rate (beyond the caches, or of the block's own bytes when they fit in them). A block's roofline
time is the larger of FLOPs / peak and bytes / bandwidth; its fraction is that time over the block's. A
fraction above 1 means a roof is wrong: `roof_violations` lists them and the chart fails the run.

`targets` turns issue 14's targets into ratios of the same run (impl vs the fastest transformers variant, 2x at
17 fp32 tokens where the best engine is 2x torch's default there, 80% of the roof for prefill from 128 tokens,
70% of the bandwidth roof for decode, bf16 / fp32 prefill 1.8x or 0.95x by the machine's peaks, `impl generate`
vs transformers' `generate`), and for a missed one says whether the run's engine table (impl.engines) shows it
beyond the best engine impl may hold.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

HF = ("hf", "hf-eager", "hf-sdpa")
# impl's fast path as a process that runs for speed holds its weights (prepare_for_generation: fused, packed where
# that is faster here), for blocks and layers as for whole models (forward_fast and generate on those weights)
HOT = {"attention": "impl-generate", "ffn": "impl-generate", "layer": "impl-generate", "forward": "impl",
       "generate": "impl"}
TIE = 0.98  # a ratio at or above this counts as a tie, not a loss: run-to-run noise on a shared machine


# The fastest round, not the median: on a shared 2-core machine another process only ever adds time, and with
# two OpenMP threads a single busy core stalls a whole parallel region for a scheduler slice.
STAT = "min"


def _time(b: dict) -> float:
    return b["stats"][STAT]


def annotate(benchmarks: list[dict], machine_info: dict) -> None:
    """Add gflops, roofline_fraction, bandwidth_fraction, bound, bf16_speedup, vs_best_hf, tokens_per_s in place."""
    roofs = machine_info.get("roofs") or {}
    by_key = {(b["group"], b["extra_info"]["implementation"], b["extra_info"]["dtype"]): b for b in benchmarks}
    for b in benchmarks:
        info, t = b["extra_info"], _time(b)
        group, name, dtype = b["group"], info["implementation"], info["dtype"]
        # rows that are not kernels (the diagnosis timings: flops=0, bytes=0) get no rate and no roof
        if info.get("flops"):
            info["gflops"] = info["flops"] / t / 1e9
        if "new_tokens" in info:
            info["tokens_per_s"] = info["new_tokens"] / t
        peak = roofs.get(dtype, {}).get("gflops")
        if peak and info.get("flops"):
            compute_s = info["flops"] / peak / 1e9
            # the block's own roof as it ran (its bytes' read rate, or beyond the caches), or the run's final
            # beyond-the-caches roof where that came out higher (roofs.best_of)
            bw_s = 0.0
            if info.get("bytes") and info.get("bandwidth_roof_gbytes_per_s"):
                info["bandwidth_roof_gbytes_per_s"] = max(info["bandwidth_roof_gbytes_per_s"],
                                                          roofs.get("bandwidth", {}).get("gbytes_per_s") or 0.0)
                bw_s = info["bytes"] / info["bandwidth_roof_gbytes_per_s"] / 1e9
            info["roofline_s"] = max(compute_s, bw_s)
            info["roofline_fraction"] = info["roofline_s"] / t
            if bw_s:
                info["bandwidth_s"] = bw_s
                info["bandwidth_fraction"] = bw_s / t
            info["bound"] = "compute" if compute_s >= bw_s else "memory"
        fp32, bf16 = by_key.get((group, name, "fp32")), by_key.get((group, name, "bf16"))
        if fp32 and bf16:
            info["bf16_speedup"] = _time(fp32) / _time(bf16)
        hf = [_time(by_key[k]) for k in ((group, h, dtype) for h in HF) if k in by_key]
        if name not in HF and hf:
            info["vs_best_hf"] = min(hf) / t


def roof_violations(benchmarks: list[dict], limit: float = 1.0) -> list[str]:
    """Benchmarks faster than the machine's roof: the roof measurement is wrong (never clamped)."""
    return [f"{b['group']} {b['extra_info']['implementation']} {b['extra_info']['dtype']}: "
            f"{100 * b['extra_info']['roofline_fraction']:.0f}% of the roof"
            for b in benchmarks if b["extra_info"].get("roofline_fraction", 0) > limit]


# Issue 14's targets, one name each (a row of the report per group and dtype it applies to).
VS_HF = "impl vs fastest transformers"
GENERATE = "impl generate vs transformers generate (tokens/s)"
PREFILL_ROOF = "prefill fraction of the true roof"
DECODE_BANDWIDTH = "decode fraction of the bandwidth roof"
BF16_PREFILL = "bf16 / fp32 prefill"
PREFILL_FROM = 128  # prompt tokens from which the roof and bf16 targets apply


@dataclass(frozen=True)
class Target:
    what: str
    where: str
    value: float  # a ratio of two numbers of this run
    goal: float
    tie: bool = False  # a ratio >= TIE x goal counts as met (impl vs transformers: run-to-run noise)
    beyond: str = ""  # missed: whether a measurement of this run shows it beyond the machine's best engine

    @property
    def met(self) -> bool:
        return self.value >= self.goal * (TIE if self.tie else 1.0)


def best_engine(machine_info: dict, dtype: str, rclass: str) -> tuple[str, float] | None:
    """(name, seconds) of the fastest engine impl may hold at this row class (plain or packed weights, never a
    second copy), from the run's engine table (impl.engines); None without one."""
    from impl import engines

    timings = machine_info.get("engines") or {}
    try:
        row = timings[dtype][rclass]
        found = []
        for layout in (engines.PLAIN, engines.PACKED):
            try:
                name = engines.choose(timings, dtype, rclass, layout)
            except engines.EngineError:
                continue
            if row.get(name):
                found.append((name, row[name]))
        return min(found, key=lambda nt: nt[1]) if found else None
    except (KeyError, TypeError):
        return None


def engine_elements(machine_info: dict) -> int:
    """The weight elements the run's engine table times multiply (a run of before: its one weight's)."""
    from impl import engines

    if machine_info.get("engines_elements"):
        return machine_info["engines_elements"]
    return engines.weight_elements({"shape": machine_info.get("engines_shape")})


def _best_engine_vs_torch(machine_info: dict, dtype: str, rclass: str) -> tuple[str, float] | None:
    """(engine, its speed over torch's default) at this row class, from the run's engine table."""
    best = best_engine(machine_info, dtype, rclass)
    try:
        return best[0], machine_info["engines"][dtype][rclass]["torch"] / best[1]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def short_fp32_goal(machine_info: dict) -> tuple[float, str]:
    """(goal, why) vs transformers at 17 tokens in fp32: 2x where the best engine is >= 2x torch's default there."""
    from impl import engines

    best = _best_engine_vs_torch(machine_info, "fp32", "short")
    if best is None:
        return 1.0, "1x (no engine table in this run)"
    rows = engines.ROWS["short"]
    return ((2.0, f"2x: the best fp32 engine at {rows} rows ({best[0]}) is {best[1]:.1f}x torch's default")
            if best[1] >= 2 else (1.0, f"1x: the best fp32 engine at {rows} rows ({best[0]}) is only "
                                       f"{best[1]:.2f}x torch's default (the 2x goal needs 2x)"))


def bf16_prefill_goal(machine_info: dict) -> tuple[float, str]:
    """(goal, why): 1.8x where the bf16 peak (an engine needing no second copy) is >= 2x the fp32 peak, else 0.95x."""
    from impl import engines

    roofs = machine_info.get("roofs") or {}
    try:
        bf16 = max(v for k, v in roofs["bf16"]["engines"].items() if not engines.ENGINES[k].second_copy)
        fp32 = roofs["fp32"]["gflops"]
    except (KeyError, ValueError):
        return 0.95, "0.95x (no roofs in this run)"
    ratio = bf16 / fp32
    return ((1.8, f"1.8x: the bf16 peak without a second copy ({bf16:.0f} GFLOP/s) is {ratio:.1f}x the fp32 peak")
            if ratio >= 2 else (0.95, f"0.95x: the bf16 peak without a second copy ({bf16:.0f} GFLOP/s) is "
                                      f"{ratio:.2f}x the fp32 peak ({fp32:.0f}), under 2x"))


def goals(machine_info: dict) -> list[str]:
    """The goals that depend on the machine, with the measurement that set each."""
    return [f"fp32 attention, FFN and layer at 17 tokens vs transformers: {short_fp32_goal(machine_info)[1]}.",
            f"bf16 / fp32 prefill at {PREFILL_FROM} tokens or more: {bf16_prefill_goal(machine_info)[1]}."]


def _own_products(what: str, info: dict, fp32_info: dict | None, goal: float) -> str | None:
    """The evidence from this block's own products at the machine's best engines (cases.engine_bound_seconds,
    measured in the run beside the block): None where the run did not measure it."""
    bound = info.get("engine_bound_s")
    if not bound:
        return None
    engines_used = info.get("engine_bound_engines", "")
    parts = "own products and attention core" if "core " in engines_used else "own products"
    alone = f"the best engines on this block's {parts} ({engines_used}), alone, take {1e3 * bound:.2f} ms"
    if what == PREFILL_ROOF and "roofline_s" in info:
        reached = info["roofline_s"] / bound
        where = f"{alone}: {100 * reached:.0f}% of the roof"
    elif what == DECODE_BANDWIDTH and "bandwidth_s" in info:
        reached = info["bandwidth_s"] / bound
        where = f"{alone}: {100 * reached:.0f}% of the bandwidth roof"
    elif what == BF16_PREFILL and fp32_info and fp32_info.get("engine_bound_s"):
        reached = fp32_info["engine_bound_s"] / bound
        where = (f"the best engines on this block's {parts} are {reached:.2f}x faster in bf16 than in fp32 "
                 f"({1e3 * fp32_info['engine_bound_s']:.2f} -> {1e3 * bound:.2f} ms)")
    else:
        return None
    return ("yes: " if reached < goal else "no: ") + where


def _beyond(what: str, info: dict, machine_info: dict, goal: float, fp32_info: dict | None = None) -> str:
    """For a missed target: does a measurement of this run show it beyond the best engine impl may hold? This
    block's own products at the best engines where the run measured them, else the engine table."""
    from impl import engines

    if what in (VS_HF, GENERATE):
        return "no: impl may run transformers' own kernels (torch's default); none is beyond it"
    own = _own_products(what, info, fp32_info, goal)
    if own is not None:
        return own
    dtype = info["dtype"]
    rclass = "decode" if what == DECODE_BANDWIDTH else "long"
    best = best_engine(machine_info, dtype, rclass)
    if best is None:
        return "not shown: no engine table in this run"
    if what == DECODE_BANDWIDTH and info.get("bandwidth_roof_how", "beyond the caches") != "beyond the caches":
        return "not shown: this block's bytes fit in the caches, the engine table's weight does not"
    name, seconds = best
    if engines.ENGINES[name].layout == engines.PACKED:  # a checking process holds plain weights: say so
        name += " (packed weights, as a generate-only process holds them)"
    elements = engine_elements(machine_info)
    rows = engines.ROWS[rclass]
    if what == PREFILL_ROOF:
        peak = machine_info.get("roofs", {}).get(dtype, {}).get("gflops")
        reached = 2 * rows * elements / seconds / 1e9 / peak if peak else float("nan")
        where = f"{name} reaches {100 * reached:.0f}% of the {dtype} roof at {rows} rows"
    elif what == DECODE_BANDWIDTH:
        reached = elements * engines.DTYPES[dtype].itemsize / seconds / 1e9 / info["bandwidth_roof_gbytes_per_s"]
        where = f"{name} reads its weight at {100 * reached:.0f}% of this block's bandwidth roof"
    else:  # BF16_PREFILL
        fp32 = best_engine(machine_info, "fp32", rclass)
        if fp32 is None:
            return "not shown: no fp32 engine in the table"
        reached = fp32[1] / seconds
        where = f"the best bf16 engine ({name}) is {reached:.2f}x the best fp32 one ({fp32[0]}) at {rows} rows"
    return ("yes: " if reached < goal else "no: ") + where


def targets(benchmarks: list[dict], machine_info: dict) -> list[Target]:
    """Issue 14's targets, one row per (target, group, dtype) that it applies to, for impl's hot variant."""
    out = []
    short_fp32 = short_fp32_goal(machine_info)[0]
    bf16_goal = bf16_prefill_goal(machine_info)[0]

    by_key = {(b["group"], b["extra_info"]["implementation"], b["extra_info"]["dtype"]): b["extra_info"]
              for b in benchmarks}

    def add(what: str, value: float, goal: float, info: dict, where: str, fp32: dict | None = None) -> None:
        t = Target(what, where, value, goal, tie=what in (VS_HF, GENERATE))
        if not t.met:
            t = Target(what, where, value, goal, t.tie, _beyond(what, info, machine_info, goal, fp32))
        out.append(t)

    for b in benchmarks:
        info = b["extra_info"]
        if info["implementation"] != HOT.get(info["op"]):
            continue
        where = f"{info['op']} {info['model']} {info['shape']} {info['dtype']}"
        if "vs_best_hf" in info:
            short = info["seq"] == 17 and info["past"] == 0 and info["dtype"] == "fp32"
            block = info["op"] in ("attention", "ffn", "layer")
            add(GENERATE if info["op"] == "generate" else VS_HF, info["vs_best_hf"],
                short_fp32 if short and block else 1.0, info, where)
        if info["op"] in ("forward", "generate"):
            continue  # whole models: the ratio above only (their roofs mix every block)
        prefill = info["past"] == 0 and info["seq"] >= PREFILL_FROM
        if prefill and "roofline_fraction" in info:
            add(PREFILL_ROOF, info["roofline_fraction"], 0.80, info, where)
        if info["past"] > 0 and "bandwidth_fraction" in info:
            add(DECODE_BANDWIDTH, info["bandwidth_fraction"], 0.70, info, where)
        if prefill and info["dtype"] == "bf16" and "bf16_speedup" in info:
            add(BF16_PREFILL, info["bf16_speedup"], bf16_goal, info, where,
                by_key.get((b["group"], info["implementation"], "fp32")))
    return out


def unmeasured(found: list[Target]) -> list[str]:
    """Issue 14's targets with no row in this run (a partial run, e.g. `-k`): named, never silently absent."""
    have = {(t.what, t.where.split()[-1] if t.what == GENERATE else "") for t in found}
    want = [(VS_HF, ""), (PREFILL_ROOF, ""), (DECODE_BANDWIDTH, ""), (BF16_PREFILL, ""), (GENERATE, "fp32"),
            (GENERATE, "bf16")]
    return [f"{what} {dtype}".strip() for what, dtype in want if (what, dtype) not in have]


def by_group(benchmarks: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b["group"]].append(b)
    return groups
