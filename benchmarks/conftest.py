"""Benchmark hooks: derived numbers (GFLOP/s, roofline fraction, bf16/fp32 speedup) go into the saved JSON."""

import os
import resource

from benchmarks import report


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat; (0, 0) where there is none."""
    if not os.path.exists("/proc/stat"):
        return 0, 0
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, *rest = (int(v) for v in f.readline().split()[1:])
    return user + nice + system + sum(rest[:3]), user + nice + system + idle + iowait + sum(rest[:3])


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_START = (_cpu_jiffies(), _own_cpu_seconds())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    report.annotate(output_json["benchmarks"])


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    cpuinfo = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)  # the last CPU's
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("model name", machine_info.get("cpu", {}).get("brand_raw", "unknown"))
    flags = " " + fields.get("flags", "") + " "
    machine_info["torch"] = {
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "avx512_bf16": " avx512_bf16 " in flags,
        "amx_bf16": " amx_bf16 " in flags,
        "other_processes_cpu_share": _other_processes_cpu_share(),
    }


def _other_processes_cpu_share() -> float | None:
    """How much of the machine's CPU time during this run went to other processes (0 = we had it alone).

    On 2 cores with 2 OpenMP threads, any other busy process stalls every parallel region: the timings of
    a run with a share above a few percent are not to be trusted, and the report prints it."""
    (busy0, total0), own0 = _START
    busy1, total1 = _cpu_jiffies()
    if total1 <= total0:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    other = (busy1 - busy0) - (_own_cpu_seconds() - own0) * hz
    return max(0.0, other / (total1 - total0))
