"""Derived numbers for the pytest-benchmark JSON: GFLOP/s, roofline fraction, bf16/fp32 speedup, the targets.

`annotate` runs in the `pytest_benchmark_update_json` hook (benchmarks/conftest.py), so every saved JSON,
the baseline included, carries them in each benchmark's `extra_info`. The roofs are measured in the same
run: `roof-mm` does the block's FLOPs as plain matmuls, `roof-bw` reads the block's bytes; the roofline
time of a block is the larger of the two (in its dtype), and its fraction is that time over the block's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

HF = ("hf", "hf-eager", "hf-sdpa")


# The fastest round, not the median: on a shared 2-core machine another process only ever adds time, and with
# two OpenMP threads a single busy core stalls a whole parallel region for a scheduler slice.
STAT = "min"


def _time(b: dict) -> float:
    return b["stats"][STAT]


def annotate(benchmarks: list[dict]) -> None:
    """Add gflops, gbytes_per_s, roofline_fraction, bound, bf16_speedup (and vs_best_hf for impl) in place."""
    by_key = {(b["group"], b["extra_info"]["implementation"], b["extra_info"]["dtype"]): b for b in benchmarks}
    for b in benchmarks:
        info, t = b["extra_info"], _time(b)
        group, name, dtype = b["group"], info["implementation"], info["dtype"]
        info["gflops"] = info["flops"] / t / 1e9
        info["gbytes_per_s"] = info["bytes"] / t / 1e9
        mm, bw = by_key.get((group, "roof-mm", dtype)), by_key.get((group, "roof-bw", dtype))
        if mm and bw:
            roof = max(_time(mm), _time(bw))
            info["roofline_fraction"] = roof / t
            info["bandwidth_fraction"] = _time(bw) / t
            info["bound"] = "compute" if _time(mm) >= _time(bw) else "memory"
        fp32, bf16 = by_key.get((group, name, "fp32")), by_key.get((group, name, "bf16"))
        if fp32 and bf16:
            info["bf16_speedup"] = _time(fp32) / _time(bf16)
        hf = [_time(by_key[k]) for k in ((group, h, dtype) for h in HF) if k in by_key]
        if name not in HF and name not in ("roof-mm", "roof-bw") and hf:
            info["vs_best_hf"] = min(hf) / t


@dataclass
class Target:
    what: str
    value: float
    goal: float
    where: str

    @property
    def met(self) -> bool:
        return self.value >= self.goal


def targets(benchmarks: list[dict], impl: str = "impl-fused") -> list[Target]:
    """Issue 5's targets, one row per (target, group, dtype) that it applies to."""
    out = []
    for b in benchmarks:
        info = b["extra_info"]
        if info["implementation"] != impl:
            continue
        where = f"{info['op']} {info['model']} {info['shape']} {info['dtype']}"
        if "vs_best_hf" in info:
            goal = 1.5 if info["seq"] == 17 and info["dtype"] == "fp32" else 1.0
            out.append(Target("impl vs fastest transformers", info["vs_best_hf"], goal, where))
        if info["past"] == 0 and info["seq"] >= 128 and "roofline_fraction" in info:
            out.append(Target("prefill roofline fraction", info["roofline_fraction"], 0.85, where))
        if info["past"] > 0 and "bandwidth_fraction" in info:
            out.append(Target("decode bandwidth-roof fraction", info["bandwidth_fraction"], 0.70, where))
        if info["past"] == 0 and info["seq"] >= 128 and info["dtype"] == "bf16" and "bf16_speedup" in info:
            out.append(Target("bf16 / fp32 speedup", info["bf16_speedup"], 2.0, where))
    return out


def by_group(benchmarks: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b["group"]].append(b)
    return groups
