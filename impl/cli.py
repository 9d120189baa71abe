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


# ---- generate: the lead adds it here ------------------------------------------------------------
# def cmd_generate(args): from impl.generate import ...   (import inside the function, not at module top)
# and in build_parser(): sub.add_parser("generate", ...).set_defaults(func=cmd_generate)
# -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m impl", description="llama3-golden's Llama 3 implementation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    # generate: see the marked place above.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Llama3GoldenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
