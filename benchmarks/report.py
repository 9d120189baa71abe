"""Derived numbers for the pytest-benchmark JSON: GFLOP/s, fraction of the machine's roofs, ratios, the targets.

`annotate` runs in the `pytest_benchmark_update_json` hook (benchmarks/conftest.py), so every saved JSON,
the baseline included, carries them in each benchmark's `extra_info`. The roofs are the machine's, measured
in the same run (benchmarks/roofs.py, in `machine_info["roofs"]`): the best GEMM rate of any engine per dtype,
and the read rate (beyond the caches, or of the block's own bytes when they fit in them). A block's roofline
time is the larger of FLOPs / peak and bytes / bandwidth; its fraction is that time over the block's. A
fraction above 1 means a roof is wrong: `roof_violations` lists them and the chart fails the run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

HF = ("hf", "hf-eager", "hf-sdpa")
HOT = {"attention": "impl-fused", "ffn": "impl-fused", "layer": "impl-fused", "forward": "impl", "generate": "impl"}
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
        if "flops" in info:
            info["gflops"] = info["flops"] / t / 1e9
        if "new_tokens" in info:
            info["tokens_per_s"] = info["new_tokens"] / t
        peak = roofs.get(dtype, {}).get("gflops")
        if peak and "flops" in info:
            compute_s = info["flops"] / peak / 1e9
            bw_s = info["bytes"] / info["bandwidth_roof_gbytes_per_s"] / 1e9 if "bytes" in info else 0.0
            info["roofline_fraction"] = max(compute_s, bw_s) / t
            if bw_s:
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


@dataclass
class Target:
    what: str
    value: float
    goal: float
    where: str

    @property
    def met(self) -> bool:
        return self.value >= self.goal * (TIE if self.goal >= 1 and "vs fastest" in self.what else 1.0)


def _best_engine_vs_torch(machine_info: dict, dtype: str, rclass: str) -> float | None:
    """The measured engine table's fastest engine (plain or packed, no second copy) over torch's default."""
    from impl import engines

    timings = machine_info.get("engines") or {}
    try:
        row = timings[dtype][rclass]
        best = []
        for layout in (engines.PLAIN, engines.PACKED):
            try:
                best.append(row[engines.choose(timings, dtype, rclass, layout)])
            except engines.EngineError:
                pass
        return row["torch"] / min(best)
    except (KeyError, TypeError, ZeroDivisionError, ValueError):
        return None


def bf16_prefill_goal(machine_info: dict) -> float:
    """1.8x where the machine's bf16 peak (an engine needing no second copy) is >= 2x its fp32 peak, else 0.95x."""
    from impl import engines

    roofs = machine_info.get("roofs") or {}
    try:
        bf16 = max(v for k, v in roofs["bf16"]["engines"].items() if not engines.ENGINES[k].second_copy)
        return 1.8 if bf16 >= 2 * roofs["fp32"]["gflops"] else 0.95
    except (KeyError, ValueError):
        return 0.95


def targets(benchmarks: list[dict], machine_info: dict) -> list[Target]:
    """Issue 14's targets, one row per (target, group, dtype) that it applies to, for impl's hot variant."""
    out = []
    short_fp32 = _best_engine_vs_torch(machine_info, "fp32", "short")
    bf16_goal = bf16_prefill_goal(machine_info)
    for b in benchmarks:
        info = b["extra_info"]
        if info["implementation"] != HOT.get(info["op"]):
            continue
        where = f"{info['op']} {info['model']} {info['shape']} {info['dtype']}"
        if "vs_best_hf" in info:
            goal = 2.0 if (info["seq"] == 17 and info["past"] == 0 and info["dtype"] == "fp32"
                           and info["op"] in ("attention", "ffn", "layer") and short_fp32 and short_fp32 >= 2) else 1.0
            out.append(Target("impl vs fastest transformers", info["vs_best_hf"], goal, where))
        if info["op"] in ("forward", "generate"):
            continue  # whole models: the ratio above only (their roofs mix every block)
        if info["past"] == 0 and info["seq"] >= 128 and "roofline_fraction" in info:
            out.append(Target("prefill fraction of the true roof", info["roofline_fraction"], 0.80, where))
        if info["past"] > 0 and "bandwidth_fraction" in info:
            out.append(Target("decode fraction of the bandwidth roof", info["bandwidth_fraction"], 0.70, where))
        if info["past"] == 0 and info["seq"] >= 128 and info["dtype"] == "bf16" and "bf16_speedup" in info:
            out.append(Target("bf16 / fp32 prefill", info["bf16_speedup"], bf16_goal, where))
    return out


def by_group(benchmarks: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b["group"]].append(b)
    return groups
