"""`python -m golden ...`: record goldens, diff two of them (and, from the suite, check impl against one).

This module only wires arguments: golden.check runs checks and diffs, golden.report renders them,
golden.record records. Exit codes: 0 a full pass (or a --partial check that passed), 1 a check failed or
is incomplete (drift beyond tolerance, stages not reported), 2 bad input, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM). Every Llama3GoldenError is caught here and printed as one line `error: ...` on
stderr; Ctrl-C prints `interrupted` and SIGTERM `terminated`, after the `finally` blocks below have removed
what a half-done recording wrote. Output files are checked for writability before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from impl.cli import OneLineParser
from impl.errors import Llama3GoldenError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `finally` and context manager on the
    way out runs (temp folders, the recorder's temp HF copy, locks) and code that lets Ctrl-C through
    lets this through too."""


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --plot: writable, and a plot format we write, before any work is done."""
    from golden import report

    if getattr(args, "plot", None):
        report.plot_format(args.plot)
    for option in ("json", "plot"):
        if getattr(args, option, None):
            report.check_writable(getattr(args, option), f"--{option}")


def cmd_diff(args: argparse.Namespace) -> int:
    from golden import check, report

    _check_outputs(args)
    d = check.diff(args.a, args.b)
    print(report.format_diff(d.report, d.a.path, d.b.path, d.prompt_check, d.decode))
    if args.json:
        report.write_json(report.diff_json(d.report, d.a.path, d.b.path, d.decode), args.json)
    if args.plot:
        report.plot_diff(d.report, d.a.path, d.b.path, args.plot)
    return 0 if d.passed else 1


def cmd_check(args: argparse.Namespace) -> int:
    from golden import check, report

    _check_outputs(args)
    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    outcomes = check.check(args.golden, args.impl, dtypes, partial=args.partial, model=args.model,
                           qk_layout=args.qk_layout)
    for o in outcomes:
        print(report.format_report(o))
    if len({o.golden.model_name for o in outcomes}) > 1:
        print(report.format_summary(outcomes))
    if args.json:
        report.write_json(report.check_json(outcomes), args.json)
    if args.plot:
        report.plot_check(outcomes, args.plot)
    return 0 if all(o.passed for o in outcomes) else 1


def cmd_check_tokenizer(args: argparse.Namespace) -> int:
    from golden import check, report
    from golden import tokenizer_check as tc

    expected = tc.load_expected(args.expected)
    encode = check.load_callable(args.impl)
    r = tc.check_tokenizer(encode, expected, spec=args.impl)
    print(report.format_tokenizer_report(r))
    return 0 if r.passed else 1


def cmd_record_tokenizer(args: argparse.Namespace) -> int:
    from golden import tokenizer_check as tc

    out = tc.record_expected(args.out)
    print(f"wrote {out} ({len(tc.load_expected(out).cases):,} strings, {out.stat().st_size / 1e3:.0f} kB)")
    return 0


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
    from golden.record import plan_from, record

    device_map = _device_map(args.device_map)
    if args.offload_folder:
        _check_folder(args.offload_folder, "--offload-folder")
    plan = plan_from(args.decode_from) if args.decode_from else None
    out = record(args.model, args.prompt, args.dtype, args.attn, out=args.out, device_map=device_map,
                 offload_folder=args.offload_folder, progress=not args.quiet, decode_steps=args.decode_steps,
                 decode_plan=plan)
    print(f"wrote {out} ({_size(out) / 1e6:.2f} MB)")
    return 0


def _check_folder(folder: str, option: str) -> None:
    """A folder to write into: an existing folder, or one that can be created."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise Llama3GoldenError(f"{option} {folder}: exists and is not a folder")
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise Llama3GoldenError(f"{option} {folder}: cannot be created ({p} is not a folder)")


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
    from golden.decode import DEFAULT_STEPS
    from golden.record import ATTN_IMPLEMENTATIONS, BASELINES, DATA_DIR

    p = OneLineParser(prog="python -m golden", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    r = sub.add_parser("record", help="run transformers on a prompt and write every stage to a golden folder")
    r.add_argument("--model", required=True, help="preset (tiny, tiny-varied, tiny-scaled, tiny-tied, smollm2-135m), "
                   "meta-llama/... or path")
    r.add_argument("--prompt", required=True)
    r.add_argument("--dtype", required=True, choices=("fp32", "bf16"))
    r.add_argument("--attn", default="eager", choices=ATTN_IMPLEMENTATIONS)
    r.add_argument("--out", required=True, help="the golden folder to write (replaced if it is a golden)")
    r.add_argument("--device-map", help="passed to from_pretrained: 'auto', 'cpu', or a JSON object")
    r.add_argument("--offload-folder", help="passed to from_pretrained, for models larger than memory")
    r.add_argument("--decode-steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"KV-cache decoding steps after the prompt, greedy (default {DEFAULT_STEPS}; 0: none)")
    r.add_argument("--decode-from", metavar="FP32_GOLDEN",
                   help="bf16: feed the decode tokens of this fp32 golden (default: load the model in fp32 too)")
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

    from golden.check import QK_LAYOUTS

    c = sub.add_parser("check", help="run an implementation on a golden's weights and tokens; compare every stage")
    c.add_argument("golden", nargs="?", default=None,
                   help="a golden folder or a folder of them (default: the committed tiny, tiny-varied, tiny-scaled "
                        "and tiny-tied, fp32 + bf16)")
    c.add_argument("--impl", metavar="MODULE:CALLABLE",
                   help="your implementation (trace protocol; default: impl): module:callable or "
                        "path/to/file.py:callable")
    c.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both", help="which goldens to check")
    c.add_argument("--qk-layout", choices=QK_LAYOUTS, default="meta",
                   help="the layout your q, k, q_rope and k_rope stages are in: meta (interleaved pairs, as the "
                        "goldens) or hf (transformers' rotate-half), converted before comparing")
    c.add_argument("--json", metavar="FILE", help="write every stage's metrics to this file")
    c.add_argument("--plot", metavar="FILE.png", help="draw error against layer per stage, fp32 and bf16 side by side")
    c.add_argument("--partial", action="store_true",
                   help="check only the stages the implementation reports (logits required); default: all of them")
    c.add_argument("--model", metavar="NAME_OR_PATH",
                   help="the model to run (default: the golden's, if it is a preset or an asset); needed for goldens "
                        "of a local path or a Hub id, verified against the golden's weights digest")
    c.set_defaults(func=cmd_check)

    from golden.tokenizer_check import CONTRACT, EXPECTED

    t = sub.add_parser("check-tokenizer", help="run your Llama 3 encode over the tokenizer corpus; compare with the "
                                               "committed ids of Hugging Face tokenizers")
    t.add_argument("--impl", required=True, metavar="MODULE:CALLABLE",
                   help=f"your tokenizer, module:callable or path/to/file.py:callable ({CONTRACT})")
    t.add_argument("--expected", default=str(EXPECTED), metavar="FILE", help="the expected ids (default: %(default)s)")
    t.set_defaults(func=cmd_check_tokenizer)

    rt = sub.add_parser("record-tokenizer", help="write the expected ids of the tokenizer corpus with Hugging Face "
                                                 "tokenizers (needs the reference extras)")
    rt.add_argument("--out", default=str(EXPECTED), help="the file to write (default: %(default)s)")
    rt.set_defaults(func=cmd_record_tokenizer)

    return p


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated for as long as the command runs (main thread only, as signal needs)."""
    def handler(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _unencodable_escaped() -> Iterator[None]:
    """Print what stdout/stderr cannot encode as backslash escapes (a path with undecodable bytes under
    PYTHONIOENCODING=utf-8:strict, a C locale) instead of failing with UnicodeEncodeError."""
    restore = []
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) in ("strict", None):
            with contextlib.suppress(Exception):  # an exotic stream keeps its settings
                stream.reconfigure(errors="backslashreplace")
                restore.append((stream, "strict"))
    try:
        yield
    finally:
        for stream, errors in restore:
            with contextlib.suppress(Exception):
                stream.reconfigure(errors=errors)


def main(argv: Sequence[str] | None = None) -> int:
    with _unencodable_escaped():
        args = build_parser().parse_args(argv)
        with _sigterm_raises():
            try:
                return args.func(args)
            except Llama3GoldenError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return exc.exit_code
            except Terminated:
                print("terminated", file=sys.stderr)
                return 143
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
