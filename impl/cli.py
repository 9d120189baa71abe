"""Command line: `python -m impl fetch|tokenize|...`.

Every Llama3GoldenError raised anywhere below is caught here and printed as one line
`error: ...` on stderr with exit code 2; Ctrl-C exits with 130. Heavy modules are imported
inside the subcommands, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from impl.errors import Llama3GoldenError


def cmd_fetch(args: argparse.Namespace) -> int:
    from impl import assets

    for name in args.names:
        print(assets.fetch(name, quiet=args.quiet))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from impl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(args.text, bos=False if args.no_bos else None, allow_special=args.allow_special)
    print(json.dumps(ids))
    return 0


# impl.layout.DTYPES' names, spelled out so that --help and tokenize need not import torch
# (tests/test_impl_cli.py checks they agree).
DTYPE_NAMES = ("bf16", "fp32")


def cmd_generate(args: argparse.Namespace) -> int:
    from impl import engines
    from impl.errors import PromptError, check_prompt
    from impl.generate import generate
    from impl.layout import DTYPES
    from impl.model import prepare_for_generation
    from impl.tokenizer import load_tokenizer
    from impl.weights import load_checkpoint

    check_prompt(args.prompt.strip())  # before loading anything: only emptiness can be told from text
    engines.pinned(), engines.pinned_core()  # a bad LLAMA3_GOLDEN_ENGINE / _ATTENTION, before the prompt is echoed
    if args.max_new_tokens < 1:
        raise PromptError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    ckpt = load_checkpoint(args.model, dtype=DTYPES[args.dtype])
    if ckpt.tokenizer is None:
        raise PromptError(f"{args.model}: no tokenizer found beside the weights")
    tokenizer = load_tokenizer(ckpt.tokenizer)
    ids = tokenizer.encode(args.prompt)
    check_prompt(ids, ckpt.config.max_seq_len, new_tokens=1, model=args.model)
    printed = b""
    out: list[int] = []

    def stream(token: int) -> None:
        # Print whole UTF-8 characters only: a character may span several byte-level tokens.
        nonlocal printed
        out.append(token)
        if token in tokenizer.stop_ids:
            return
        text = tokenizer.decode([t for t in out if t not in tokenizer.stop_ids]).encode()
        if not text.endswith("\ufffd".encode()):
            sys.stdout.write(text[len(printed):].decode(errors="replace"))
            sys.stdout.flush()
            printed = text

    sys.stdout.write(args.prompt)
    # The fast path's own weights: stacked, and packed where that is faster on this CPU (impl.engines). Consumes
    # ckpt.weights layer by layer, so the process never holds two copies of the model.
    weights = prepare_for_generation(ckpt.weights, ckpt.config)
    generate(ids, weights, ckpt.config, args.max_new_tokens, tokenizer.stop_ids, on_token=stream)
    sys.stdout.write("\n")
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    from impl import engines

    pin = engines.pinned()  # a bad LLAMA3_GOLDEN_ENGINE is bad input, said before measuring anything
    core_pin = engines.pinned_core()  # and a bad LLAMA3_GOLDEN_ATTENTION
    if pin and not args.remeasure and not engines.cache_file().is_file():
        # A pinned process never reads the table: nothing to measure for it (run unpinned, or --remeasure).
        print(f"{engines.ENV}={pin}: this process uses that engine wherever it supports the dtype (torch elsewhere); "
              "no measured table for this machine yet")
        return 0
    data = engines.table(remeasure=args.remeasure)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(engines.describe(data))
        if pin:
            print(f"{engines.ENV}={pin}: this process uses that engine wherever it supports the dtype "
                  "(torch elsewhere)")
        if core_pin:
            print(f"{engines.CORE_ENV}={core_pin}: this process uses that attention core")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) like every other bad input (both CLIs use it)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m impl", description="llama3-golden's Llama 3 implementation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    p = sub.add_parser("fetch", help="download and verify assets; print each local folder")
    p.add_argument("names", nargs="+", metavar="NAME", help="llama3-tokenizer, smollm2-135m or meta-llama/...")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("tokenize", help="print the token ids of TEXT as a JSON list")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--model", default="llama3-tokenizer",
                   help="asset name, meta-llama/... id, folder, tokenizer.model/.json or .gguf (default: %(default)s)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the begin-of-text token")
    p.add_argument("--allow-special", action="store_true",
                   help="read special-token text such as <|eot_id|> as the special token (default: plain text)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("generate", help="greedy continuation of a prompt, streamed")
    p.add_argument("--model", default="smollm2-135m",
                   help="preset (smollm2-135m, tiny, meta-llama/...) or a local checkpoint (default: %(default)s)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("engines", help="the GEMM engines measured on this machine, and which the fast path uses")
    p.add_argument("--remeasure", action="store_true", help="measure again (a few seconds) instead of the cache")
    p.add_argument("--json", action="store_true", help="print the cached table as JSON")
    p.set_defaults(func=cmd_engines)
    return parser


def _check_text(args: argparse.Namespace) -> None:
    """Refuse arguments holding lone surrogates: the command line had bytes that are not UTF-8 (Python keeps
    them as U+DC80..U+DCFF), which would be tokenized as U+FFFD or fail when printed."""
    from impl.errors import PromptError

    for name, value in vars(args).items():
        if isinstance(value, str):
            bad = next((i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff"), None)
            if bad is not None:
                label = name.upper() if name == "text" else f"--{name.replace('_', '-')}"  # TEXT is positional
                raise PromptError(f"{label}: not valid UTF-8 text "
                                  f"(a lone surrogate {value[bad]!a} at character {bad})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_text(args)
        return args.func(args)
    except Llama3GoldenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except UnicodeEncodeError as exc:  # stdout that cannot hold the answer (PYTHONIOENCODING=ascii:strict)
        print(f"error: cannot write the output as {exc.encoding}: {exc.reason} ({exc.object[exc.start:exc.end]!a}); "
              "set PYTHONIOENCODING=utf-8", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
