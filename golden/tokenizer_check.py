"""Check the user's Llama 3 tokenizer against committed ids: `python -m golden check-tokenizer --impl my_tok:encode`.

The contract: `encode(text: str) -> list[int]`, the ids of `text` in Llama 3's vocabulary, with no BOS (no
128000 in front) and special-token text such as "<|eot_id|>" read as plain text (tiktoken's
`encode(text, disallowed_special=())`), as Meta's tokenizer does by default.

The expected ids (golden/data/tokenizer/llama3.json) were written by Hugging Face `tokenizers` from the
tokenizer.json of the `llama3-tokenizer` asset (`record_expected`, `python -m golden record-tokenizer`), never
by impl's tokenizer. The check compares string by string, per case group of golden.tokenizer_corpus, and
explains the first difference: both sides' token pieces (decoded with the reference vocabulary, Meta's
tokenizer.model, when it is on disk) and the kind of mistake it looks like: a BOS, an EOS, special-token
text read as a special token, ids that do not spell the text, a token across Llama 3's split, or other merges.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from golden.check import DATA, ImplementationError, ProcessExit, raised_where, user_code
from golden.format import GoldenError

EXPECTED = DATA / "tokenizer" / "llama3.json"
FORMAT = "llama3-golden tokenizer ids"
VERSION = 1
ASSET = "llama3-tokenizer"  # the reference files: Meta's tokenizer.model and HF's tokenizer.json of it
N_BASE = 128_000  # ordinary tokens are ids 0..127999; the 256 specials follow
N_VOCAB = 128_256
BOS, EOS_IDS = 128_000, (128_001, 128_008, 128_009)  # <|begin_of_text|>; <|end_of_text|>, <|eom_id|>, <|eot_id|>
CONTRACT = "encode(text) -> list[int]: no BOS, special-token text as plain text"

Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class Case:
    group: str
    index: int  # within its group
    text: str
    ids: tuple[int, ...]  # expected


@dataclass(frozen=True)
class Expected:
    path: Path
    reference: str  # who wrote the ids, e.g. "tokenizers 0.23.3, tokenizer.json of llama3-tokenizer"
    cases: tuple[Case, ...]

    def groups(self) -> dict[str, list[Case]]:
        out: dict[str, list[Case]] = {}
        for case in self.cases:
            out.setdefault(case.group, []).append(case)
        return out


# ---------------------------------------------------------------- the expected ids: read and write
def load_expected(path: str | Path = EXPECTED) -> Expected:
    """The committed expected ids (or another file of the same format); GoldenError if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GoldenError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GoldenError(f"{path}: not a tokenizer ids file ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GoldenError(f"{path}: not a tokenizer ids file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise GoldenError(f"{path}: tokenizer ids version {data.get('version')!r}, this llama3-golden reads {VERSION}")
    groups = data.get("groups")
    cases = []
    for name, pairs in (groups.items() if isinstance(groups, dict) else ()):
        for i, pair in enumerate(pairs if isinstance(pairs, list) else [None]):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], list)
                    and all(type(t) is int and 0 <= t < N_VOCAB for t in pair[1])):
                raise GoldenError(f"{path}: group {name!r} case {i}: expected [text, [ids 0..{N_VOCAB - 1}]]")
            cases.append(Case(name, i, pair[0], tuple(pair[1])))
    if not cases:
        raise GoldenError(f"{path}: no cases (\"groups\" must map a group name to [text, ids] pairs)")
    return Expected(path, str(data.get("reference", "?")), tuple(cases))


def record_expected(out: str | Path = EXPECTED) -> Path:
    """Write the expected ids of golden.tokenizer_corpus with Hugging Face `tokenizers` (the reference).

    Reads the `llama3-tokenizer` asset's tokenizer.json (fetched and sha256-verified if missing) and encodes
    with add_special_tokens=False (no BOS) and encode_special_tokens=True (special-token text as plain text).
    Refuses to write ids that contradict the walk-through's published ones or hold a special token.
    """
    from golden import tokenizer_corpus
    from impl import assets

    try:
        import tokenizers
    except ImportError:
        raise GoldenError("record-tokenizer needs Hugging Face tokenizers: pip install 'llama3-golden[reference]'") \
            from None
    source = assets.asset_file(ASSET, "tokenizer.json")
    data = assets.read_verified(source)  # the pinned bytes, hashed as they are read
    hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    hf.encode_special_tokens = True  # "<|eot_id|>" in the text is 7 plain tokens, not 128009

    def encode(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    for text, ids in tokenizer_corpus.PUBLISHED.items():
        if encode(text) != ids:
            raise GoldenError(f"{source}: tokenizers encodes {text!r} as {encode(text)}, not the published {ids}")
    groups = {name: [(text, encode(text)) for text in texts] for name, texts in tokenizer_corpus.groups().items()}
    special = next(((t, ids) for pairs in groups.values() for t, ids in pairs if any(i >= N_BASE for i in ids)), None)
    if special:
        raise GoldenError(f"{source}: tokenizers encodes {special[0]!r} with a special token: {special[1]}")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "reference": f"tokenizers {tokenizers.__version__}, tokenizer.json of {ASSET} (sha256 "
                     f"{hashlib.sha256(data).hexdigest()[:16]}), add_special_tokens=False, encode_special_tokens=True",
        "contract": CONTRACT,
        "command": "python -m golden record-tokenizer",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_dump(header, groups), encoding="utf-8")
    return out


def _dump(header: dict, groups: dict[str, list[tuple[str, list[int]]]]) -> str:
    """JSON with one case per line, so that a re-recording shows in a diff case by case."""
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in header.items()]
    lines.append('  "groups": {')
    for g, (name, pairs) in enumerate(groups.items()):
        lines.append(f"    {json.dumps(name)}: [")
        lines += [f"      {json.dumps([t, ids], ensure_ascii=False)}{',' if i < len(pairs) - 1 else ''}"
                  for i, (t, ids) in enumerate(pairs)]
        lines.append("    ]" + ("," if g < len(groups) - 1 else ""))
    return "\n".join([*lines, "  }", "}", ""])


# ---------------------------------------------------------------- the reference vocabulary
@dataclass(frozen=True)
class Vocab:
    """id -> the bytes of that token in Llama 3's vocabulary; the names of the specials."""

    token_bytes: Callable[[int], bytes]
    specials: dict[int, str]

    def piece(self, token_id: int) -> bytes | None:
        if not 0 <= token_id < N_VOCAB:
            return None
        if token_id in self.specials:
            return self.specials[token_id].encode()
        return self.token_bytes(token_id)


@cache
def reference_vocab() -> Vocab | None:
    """Meta's tokenizer.model if it is on disk (never fetched: the verdict needs only the committed ids)."""
    from golden.check import tokenizer_on_disk
    from impl.tokenizer import load_llama3

    folder = tokenizer_on_disk(ASSET)
    if folder is None:
        return None
    tok = load_llama3(folder / "tokenizer.model")
    return Vocab(tok.token_bytes, {i: text for text, i in tok.special_tokens.items()})


def special_name(token_id: int) -> str:
    from impl.tokenizer import llama3_special_tokens

    return {i: text for text, i in llama3_special_tokens(N_BASE).items()}.get(token_id, "?")


# ---------------------------------------------------------------- running the user's encode
def run_encode(encode: Encode, case: Case, spec: str) -> tuple[int, ...]:
    """The user's ids for one case; ImplementationError (exit 2, one line) if encode raises or returns no id list."""
    try:
        with user_code():
            got = encode(case.text)
    except (Exception, SystemExit, ProcessExit) as e:  # the user's code: anything it raises or exits with, in one line
        hint = ""
        if isinstance(e, ValueError) and "disallowed special token" in str(e):
            hint = ("; the contract reads special-token text as plain text: tiktoken's encode(text, "
                    "disallowed_special=())")
        raise ImplementationError(
            f"{spec} {raised_where(e, encode)} "
            f"on {case.group} string {case.index} {_escaped(case.text)}{hint}") from None
    if hasattr(got, "tolist"):  # a tensor or an array
        got = got.tolist()
    if isinstance(got, (str, bytes)) or not isinstance(got, Iterable):
        raise ImplementationError(f"{spec} returned {type(got).__name__} for {case.group} string {case.index}, "
                                  f"expected a list of int ids ({CONTRACT})")
    ids = list(got)
    bad = next((t for t in ids if isinstance(t, bool) or not hasattr(type(t), "__index__")), _ALL_INTS)
    if bad is not _ALL_INTS:
        raise ImplementationError(f"{spec} returned a {type(got).__name__} holding {type(bad).__name__} "
                                  f"for {case.group} string {case.index}, expected int ids ({CONTRACT})")
    return tuple(operator.index(t) for t in ids)


_ALL_INTS = object()


# ---------------------------------------------------------------- comparing and explaining
@dataclass(frozen=True)
class Mismatch:
    case: Case
    got: tuple[int, ...]
    position: int  # the first token index where the two lists differ
    kind: str  # bos, eos, special, vocabulary, text, split, merges, pieces-unknown
    why: str


@dataclass(frozen=True)
class GroupResult:
    name: str
    total: int
    agree: int
    first: Mismatch | None


@dataclass(frozen=True)
class TokenizerReport:
    impl: str
    expected: Expected
    groups: tuple[GroupResult, ...]
    kinds: dict[str, int]  # mismatch kind -> how many strings
    first: Mismatch | None
    vocab: Vocab | None

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups)

    @property
    def agree(self) -> int:
        return sum(g.agree for g in self.groups)

    @property
    def passed(self) -> bool:
        return self.agree == self.total


def first_difference(got: Sequence[int], expected: Sequence[int]) -> int:
    """The first token index where the two lists differ (the shorter one's length if it is a prefix of the other)."""
    pairs = enumerate(zip(got, expected, strict=False))
    return next((i for i, (a, b) in pairs if a != b), min(len(got), len(expected)))


def explain(case: Case, got: tuple[int, ...], vocab: Vocab | None) -> tuple[str, str]:
    """(kind, why) of a case where the ids differ: the first of the contract's known mistakes that fits."""
    exp = case.ids
    if got[:1] == (BOS,) and got[1:] in (exp, exp + got[-1:]) and exp[:1] != (BOS,):
        return "bos", f"starts with {BOS} ({special_name(BOS)}): the contract is no BOS"
    if got[:-1] == exp and got[-1] in EOS_IDS:
        return "eos", f"ends with {got[-1]} ({special_name(got[-1])}): the contract is no EOS"
    special = next((t for t in got if N_BASE <= t < N_VOCAB), None)
    shaped = re.search(r"<\|[^|<>\s]+\|>", case.text)  # any vocabulary's naming: Llama 3.0 and 3.1 differ
    if special is not None and shaped:
        name = special_name(special) if special_name(special) in case.text else shaped.group()
        return "special", (f"reads the text {name!r} as the special token {special}: the contract reads "
                           f"special-token text as plain text (tiktoken: disallowed_special=(), no allowed_special)")
    if got[:1] == (BOS,) and exp[:1] != (BOS,):
        return "bos", f"starts with {BOS} ({special_name(BOS)}): the contract is no BOS"
    if got[-1:] != exp[-1:] and got[-1:] and got[-1] in EOS_IDS:
        return "eos", f"ends with {got[-1]} ({special_name(got[-1])}): the contract is no EOS"
    if special is not None:
        return "special", f"holds the special token {special} ({special_name(special)}), which the text does not spell"
    unknown = next((t for t in got if not 0 <= t < N_VOCAB), None)
    if unknown is not None:
        return "vocabulary", f"id {unknown} is not in Llama 3's vocabulary (0..{N_VOCAB - 1})"
    if vocab is None:
        return "pieces-unknown", f"(pieces not shown: python -m impl fetch {ASSET})"
    spelled = b"".join(vocab.piece(t) for t in got)
    if spelled != case.text.encode("utf-8"):
        return "text", (f"your ids spell {_escaped_bytes(spelled)}, not the text: every byte of the UTF-8 text, "
                        f"unnormalized, must be in the tokens")
    split = split_mistake(case.text, got, case.ids, vocab)
    if split:
        return "split", split
    return "merges", ("every token lies inside one piece of Llama 3's split, but the tokens differ: BPE merges not "
                      "taken lowest rank first, or another vocabulary")


def _ends(lengths: Iterable[int]) -> list[int]:
    """Byte offsets where each of a run of pieces ends."""
    out, pos = [], 0
    for n in lengths:
        pos += n
        out.append(pos)
    return out


def split_mistake(text: str, got: Sequence[int], expected: Sequence[int], vocab: Vocab) -> str:
    """Why the user's tokens cannot come from Llama 3's split (Meta's pat_str), or "": one of their tokens
    crosses a boundary of the split, or cuts a piece of the split that is one token of the vocabulary."""
    import regex

    from impl.tokenizer import LLAMA3_PATTERN

    raw = text.encode("utf-8")
    pieces = regex.findall(LLAMA3_PATTERN, text)
    piece_ends = _ends(len(p.encode("utf-8")) for p in pieces)
    got_ends = _ends(len(vocab.piece(t)) for t in got)
    cut = "the split pattern is not Meta's pat_str"
    for t, start, end in zip(got, [0, *got_ends], got_ends, strict=False):
        inside = [b for b in piece_ends if start < b < end]
        if inside:
            left = raw[start:inside[0]].decode("utf-8", "replace")
            right = raw[inside[0]:end].decode("utf-8", "replace")
            digits = left[-1:].isdigit() and right[:1].isdigit()
            digits = " (Llama 3 splits digit runs in groups of 3)" if digits else ""
            return (f"your token {t} {_piece_text(vocab.piece(t))!r} crosses Llama 3's split between {left!r} and "
                    f"{right!r}: {cut}{digits}")
    expected_ends = set(_ends(len(vocab.piece(t)) for t in expected))
    for piece, start, end in zip(pieces, [0, *piece_ends], piece_ends, strict=False):
        # the piece is exactly one expected token: it starts and ends at token ends, and no token ends inside it
        whole = start in expected_ends | {0} and end in expected_ends
        whole = whole and not any(start < b < end for b in expected_ends)
        yours = [t for t, e in zip(got, got_ends, strict=False) if start < e <= end]
        if whole and len(yours) > 1:
            shown = " ".join(repr(_piece_text(vocab.piece(t))) for t in yours)
            digits = " (Llama 3 splits digit runs in groups of 3)" if piece.isdigit() else ""
            return (f"your tokens {shown} cut Llama 3's split piece {piece!r}, which is one token of the vocabulary: "
                    f"{cut} (yours splits finer){digits}")
    return ""


def check_tokenizer(encode: Encode, expected: Expected, spec: str = "?", groups: Iterable[str] | None = None,
                    vocab: Vocab | None | bool = True) -> TokenizerReport:
    """Run `encode` on every case (of `groups`, default all) and compare. vocab=True: the reference vocabulary
    if it is on disk (reference_vocab())."""
    vocab = reference_vocab() if vocab is True else vocab or None
    by_group = expected.groups()
    names = list(by_group) if groups is None else list(groups)
    unknown = [n for n in names if n not in by_group]
    if unknown:
        raise GoldenError(f"{expected.path}: no case group {unknown[0]!r}; groups: {', '.join(by_group)}")
    results, kinds, first = [], Counter(), None
    for name in names:
        agree, group_first = 0, None
        for case in by_group[name]:
            got = run_encode(encode, case, spec)
            if got == case.ids:
                agree += 1
                continue
            kind, why = explain(case, got, vocab)
            kinds[kind] += 1
            if group_first is None:
                group_first = Mismatch(case, got, first_difference(got, case.ids), kind, why)
        results.append(GroupResult(name, len(by_group[name]), agree, group_first))
        first = first or group_first
    return TokenizerReport(spec, expected, tuple(results), dict(kinds.most_common()), first, vocab)


# ---------------------------------------------------------------- text helpers for the report
def _piece_text(raw: bytes | None) -> str | bytes:
    """A token's text where its bytes are whole UTF-8, else the bytes (a token may hold part of a character)."""
    if raw is None:
        return "<not in the vocabulary>"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _escaped(text: str, limit: int = 100) -> str:
    """The text as a Python literal (control characters and invisible ones escaped), cut to about `limit`."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _escaped_bytes(raw: bytes, limit: int = 100) -> str:
    text = raw.decode("utf-8", "backslashreplace")
    return _escaped(text, limit)
