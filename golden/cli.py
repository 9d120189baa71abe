"""`python -m golden ...`: record goldens, diff two of them (and, from the suite, check impl against one).

This module only wires arguments: golden.check runs checks and diffs, golden.report renders them,
golden.record records. Exit codes: 0 pass, 1 a check failed (drift beyond tolerance), 2 bad
input. Every Llama3GoldenError is caught here and printed as one line `error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from impl.errors import Llama3GoldenError


def cmd_diff(args: argparse.Namespace) -> int:
    from golden import check, report

    d = check.diff(args.a, args.b)
    print(report.format_diff(d.report, d.a.path, d.b.path))
    if args.json:
        report.write_json(report.diff_json(d.report, d.a.path, d.b.path), args.json)
    if args.plot:
        report.plot_diff(d.report, d.a.path, d.b.path, args.plot)
    return 0 if d.report.passed else 1


def cmd_check(args: argparse.Namespace) -> int:
    from golden import check, report

    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    outcomes = check.check(args.golden, args.impl, dtypes)
    for o in outcomes:
        print(report.format_report(o))
    if len({o.golden.model_name for o in outcomes}) > 1:
        print(report.format_summary(outcomes))
    if args.json:
        report.write_json(report.check_json(outcomes), args.json)
    if args.plot:
        report.plot_check(outcomes, args.plot)
    return 0 if all(o.report.passed for o in outcomes) else 1


# ---------------------------------------------------------------- record
def _device_map(value: str | None):
    """'auto' / 'cpu' / ... as is; a JSON object ({"model.layers.0": 0, ...}) parsed."""
    if value is None or not value.startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise Llama3GoldenError(f"--device-map: not valid JSON ({e.msg})") from None


def cmd_record(args: argparse.Namespace) -> int:
    from golden.record import record

    out = record(args.model, args.prompt, args.dtype, args.attn, args.out, device_map=_device_map(args.device_map),
                 offload_folder=args.offload_folder, progress=not args.quiet)
    print(f"wrote {out} ({_size(out) / 1e6:.2f} MB)")
    return 0


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def cmd_record_baselines(args: argparse.Namespace) -> int:
    from golden.record import record_baselines

    folders = record_baselines(args.out, args.only or None, progress=not args.quiet)
    for f in folders:
        print(f"{f}: {_size(f) / 1e6:.2f} MB")
    print(f"total in {args.out}: {_size(Path(args.out)) / 1e6:.2f} MB")
    return 0


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from golden.record import ATTN_IMPLEMENTATIONS, BASELINES, DATA_DIR

    p = argparse.ArgumentParser(prog="python -m golden", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("record", help="run transformers on a prompt and write every stage to a golden folder")
    r.add_argument("--model", required=True, help="preset (tiny, tiny-varied, tiny-scaled, tiny-tied, smollm2-135m), "
                   "meta-llama/... or path")
    r.add_argument("--prompt", required=True)
    r.add_argument("--dtype", required=True, choices=("fp32", "bf16"))
    r.add_argument("--attn", default="eager", choices=ATTN_IMPLEMENTATIONS)
    r.add_argument("--out", required=True, help="the golden folder to write (replaced if it is a golden)")
    r.add_argument("--device-map", help="passed to from_pretrained: 'auto', 'cpu', or a JSON object")
    r.add_argument("--offload-folder", help="passed to from_pretrained, for models larger than memory")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_record)

    d = sub.add_parser("diff", help="compare two goldens stage by stage; exit 1 on drift beyond tolerance")
    d.add_argument("a", help="the expected golden (e.g. the committed one)")
    d.add_argument("b", help="the golden to compare (e.g. re-recorded after an upgrade)")
    d.add_argument("--json", help="write every stage's metrics to this file")
    d.add_argument("--plot", metavar="FILE.png", help="draw b's error against layer per stage")
    d.set_defaults(func=cmd_diff)

    bl = sub.add_parser("record-baselines", help=f"re-record the committed baselines ({', '.join(BASELINES)})")
    bl.add_argument("--out", default=str(DATA_DIR), help="folder holding one golden per baseline")
    bl.add_argument("--only", nargs="+", choices=tuple(BASELINES), help="just these baselines")
    bl.add_argument("--quiet", action="store_true", help="no progress bar")
    bl.set_defaults(func=cmd_record_baselines)

    c = sub.add_parser("check", help="run an implementation on a golden's weights and tokens; compare every stage")
    c.add_argument("golden", nargs="?", default=None,
                   help="a golden folder or a folder of them (default: the committed tiny, tiny-varied, tiny-scaled "
                        "and tiny-tied, fp32 + bf16)")
    c.add_argument("--impl", metavar="MODULE:CALLABLE", help="your implementation (trace protocol; default: impl)")
    c.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both", help="which goldens to check")
    c.add_argument("--json", metavar="FILE", help="write every stage's metrics to this file")
    c.add_argument("--plot", metavar="FILE.png", help="draw error against layer per stage, fp32 and bf16 side by side")
    c.set_defaults(func=cmd_check)

    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Llama3GoldenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
