"""Save a pytest-benchmark JSON as the baseline `tox -e bench` compares with, without the per-round samples.

    python -m benchmarks.save_baseline results.json [benchmarks/baseline/cpu-2core-avx512bf16.json]

--benchmark-compare reads only each benchmark's summary stats, so the raw rounds (most of the file) go.
"""

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).parent / "baseline" / "cpu-2core-avx512bf16.json"


def main(argv: list[str]) -> int:
    src, dst = Path(argv[0]), Path(argv[1]) if len(argv) > 1 else DEFAULT
    data = json.loads(src.read_text())
    for b in data["benchmarks"]:
        b["stats"].pop("data", None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {dst} ({dst.stat().st_size // 1024} KB, {len(data['benchmarks'])} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
