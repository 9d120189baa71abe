"""Saved baselines, one per machine type: a run is only ever compared with a baseline from the same kind of CPU.

    python -m benchmarks.baseline save results.json      # -> benchmarks/baseline/<machine type>.json, no raw rounds
    python -m benchmarks.baseline run [pytest args...]   # time the benchmarks, comparing with this machine's baseline

The machine type is the CPU's model name, the instruction-set features that change which GEMM kernels run
(AVX2, AVX512, AVX512-BF16, AMX) and the core count, e.g. `amd-epyc-2core-avx512-avx512bf16`. `run` passes
`--benchmark-compare` only when that file exists; otherwise it says so in one line and times without comparing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from impl import engines

FOLDER = Path(__file__).parent / "baseline"
FEATURES = (("avx2", "avx2"), ("avx512f", "avx512"), ("avx512_bf16", "avx512bf16"), ("amx_bf16", "amx"))


def machine_type(ident: dict[str, str] | None = None) -> str:
    ident = ident or engines.identity()
    flags = set(ident["cpu_flags"].split())
    model = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*", "", ident["cpu_model"].lower())
    model = re.sub(r"[^a-z0-9]+", "-", model).strip("-") or "unknown-cpu"
    features = [name for flag, name in FEATURES if flag in flags]
    return "-".join([model, f"{ident['cores']}core", *features])


def path_for(ident: dict[str, str] | None = None) -> Path:
    return FOLDER / f"{machine_type(ident)}.json"


def save(src: Path, dst: Path | None = None) -> Path:
    """Write a pytest-benchmark JSON as this machine type's baseline, without the per-round samples."""
    data = json.loads(src.read_text())
    for b in data["benchmarks"]:
        b["stats"].pop("data", None)
    dst = dst or path_for()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {dst} ({dst.stat().st_size // 1024} KB, {len(data['benchmarks'])} benchmarks)")
    return dst


def run(pytest_args: list[str]) -> int:
    baseline = path_for()
    compare = []
    if baseline.is_file():
        compare = [f"--benchmark-compare={baseline}", "--benchmark-compare-fail=min:15%"]
        print(f"comparing with {baseline.relative_to(Path.cwd()) if baseline.is_relative_to(Path.cwd()) else baseline}")
    else:
        print(f"no baseline for this machine type ({machine_type()}): timing without comparison "
              f"(save one with `python -m benchmarks.baseline save results.json`)")
    return subprocess.call([sys.executable, "-m", "pytest", "benchmarks", *compare, *pytest_args])


def main(argv: list[str]) -> int:
    if argv[:1] == ["save"] and len(argv) in (2, 3):
        save(Path(argv[1]), Path(argv[2]) if len(argv) == 3 else None)
        return 0
    if argv[:1] == ["run"]:
        return run(argv[1:])
    if argv[:1] == ["type"]:
        print(machine_type())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
