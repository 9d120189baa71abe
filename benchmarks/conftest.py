"""Benchmark hooks and fixtures: the machine's roofs and engines and the derived numbers go into the saved JSON.

`--impl module:callable` (the project-wide option of the golden checks) puts the user's trace-protocol forward
in the whole-model `forward` groups as `user`; without it, `user` is impl's reference forward.
"""

import os
import resource

import pytest

from benchmarks import report, roofs
from impl import engines


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


@pytest.fixture(scope="session")
def user_forward(request):
    """The `user` implementation of the forward groups: `--impl module:callable`, else impl.model.forward."""
    from golden.check import load_callable

    return load_callable(request.config.getoption("impl"))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    report.annotate(output_json["benchmarks"], output_json["machine_info"])


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    ident = engines.identity()
    flags = " " + ident["cpu_flags"] + " "
    machine_info["torch"] = {
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_model": ident["cpu_model"],
        "cpu_flags": ident["cpu_flags"],
        "cores": os.cpu_count(),
        "avx512_bf16": " avx512_bf16 " in flags,
        "amx_bf16": " amx_bf16 " in flags,
        "other_processes_cpu_share": _other_processes_cpu_share(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    # the roofs the benchmarks were judged by as they ran, and a second measurement now: the higher of each
    machine_info["roofs"] = roofs.best_of(roofs.measured(), roofs.measure())
    table = engines.table()
    machine_info["engines"] = table["timings"]
    machine_info["engines_elements"] = engines.weight_elements(table)  # the measured weights' elements
    machine_info["attention_cores"] = table.get("cores")  # seconds per attention core, dtype and row class
    machine_info["engine_pinned"] = os.environ.get(engines.ENV)


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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A regression against the saved baseline: pytest-benchmark lists the slower benchmarks, then raises, which
    pytest prints as an internal-error traceback. Here it is one line and exit status 1 (tests failed)."""
    from pytest_benchmark.session import PerformanceRegression

    try:
        return (yield)
    except PerformanceRegression:
        session.config.get_terminal_writer().line(
            "error: performance regressed: the benchmarks listed above are more than the allowed percentage slower "
            "than this machine type's saved baseline", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
