"""Text <-> token ids, with tiktoken for every format.

Llama 3's `tokenizer.model` is tiktoken's own format, read as Meta's `llama_models/llama3/tokenizer.py`
(llama-models 0.3.0) reads it: the same split pattern, the same 256 special tokens after the 128,000
ranks, the same policy that special-token text in user text is plain text unless asked otherwise, and
the same cutting of very long inputs so that tiktoken's regex never sees more than 25,000 whitespace
or non-whitespace characters in a row.

A byte-level BPE in Hugging Face's `tokenizer.json` or in GGUF metadata is turned into a tiktoken
Encoding: each token's GPT-2 "bytes as unicode" spelling back to raw bytes, its id as its rank, the
pre-tokenizer as one regex, the added/control tokens as specials. tiktoken merges the pair whose
result has the lowest rank, Hugging Face the pair with the earliest merge; the two agree when ids
follow merge order, which holds for vocabularies trained with BPE (and the parity tests check).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tiktoken

from impl import assets
from impl.errors import AssetError

# Meta's pat_str (Llama 3 and later): contractions in any case, letters with one leading non-letter,
# numbers in groups of up to 3 digits, punctuation runs with their trailing newlines, whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GPT-2's split, used by Hugging Face's ByteLevel pre-tokenizer when use_regex=True.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# SmolLM (llama.cpp's pre "smollm"; StarCoder-style tokenizer.json): Digits(individual_digits=True)
# then ByteLevel(use_regex=True). Hugging Face runs those as two passes, so a digit ends the piece
# before it: a whitespace run in front of a digit stays whole, where GPT-2's `\s+(?!\S)` alone would
# leave its last space for the next piece. `\s+(?=\p{N})` reproduces that in one regex.
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"

# GGUF `tokenizer.ggml.pre` -> split pattern (the names llama.cpp's converter writes).
GGUF_PRE_PATTERNS = {
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "llama-v3": LLAMA3_PATTERN,
    "smollm": SMOLLM_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "gpt2": GPT2_PATTERN,
}

LLAMA3_NUM_SPECIAL = 256
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)

# Texts that end generation in the vocabularies we know, whichever of them a tokenizer has.
_STOP_TEXTS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>")

# tiktoken's regex can fail on very long inputs: Meta cuts at 400k characters, and inside those at
# 25k consecutive whitespace or non-whitespace characters (openai/tiktoken#195).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


class Tokenizer:
    """A tiktoken Encoding plus the ids a model needs: bos, eos, the stop set, the vocabulary size."""

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        *,
        bos_id: int | None,
        eos_id: int,
        stop_ids: Iterable[int] = (),
        add_bos: bool = True,
        n_vocab: int | None = None,
    ) -> None:
        self.encoding = encoding
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = frozenset({eos_id, *stop_ids})
        self.add_bos = add_bos and bos_id is not None  # what encode(bos=None) does: the model's own habit
        self.special_tokens: dict[str, int] = {
            text: encoding.encode_single_token(text) for text in sorted(encoding.special_tokens_set)
        }
        # Bytes a vocabulary lacks get ranks from n_vocab up (tiktoken needs every byte); encode drops
        # them, as Hugging Face's BPE does for a symbol it does not know when there is no unk token.
        self.n_vocab = encoding.n_vocab if n_vocab is None else n_vocab

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids for `text`. bos=None follows the model (Llama 3: yes; SmolLM2: no).

        Special-token text in `text` is plain text unless allow_special=True (Meta: disallowed_special=()).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_whitespaces_or_nonwhitespaces(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                              MAX_NO_WHITESPACES_CHARS):
                ids.extend(self.encoding.encode(piece, allowed_special=allowed, disallowed_special=()))
        if self.n_vocab < self.encoding.n_vocab:
            ids = [t for t in ids if t < self.n_vocab]
        if bos if bos is not None else self.add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no bos token")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`; special ids decode to their text, broken UTF-8 to U+FFFD."""
        return self.encoding.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a token may hold part of a UTF-8 character)."""
        return self.encoding.decode_single_token_bytes(token_id)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.encoding.name!r}, n_vocab={self.n_vocab}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)})")


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Meta's cut: pieces of `s` with at most `max_len` consecutive whitespace or non-whitespace characters."""
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_len:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


# ---- Meta tokenizer.model ----------------------------------------------------------------------


def load_llama3(path: str | os.PathLike) -> Tokenizer:
    """Meta's `tokenizer.model` (or a folder holding one): 128,000 ranks, then 256 special tokens."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise AssetError(f"tokenizer file not found: {path}")
    # Not tiktoken.load.load_tiktoken_bpe: it reads $TMPDIR/data-gym-cache/<sha1 of the path> when that
    # exists, a file any local user can plant. We parse the bytes we hashed.
    ranks = parse_tiktoken_bpe(assets.read_verified(path), str(path))
    specials = llama3_special_tokens(len(ranks))
    encoding = _encoding(path.name, LLAMA3_PATTERN, ranks, specials, str(path))
    return Tokenizer(
        encoding,
        bos_id=specials["<|begin_of_text|>"],
        eos_id=specials["<|end_of_text|>"],
        stop_ids=(specials["<|eom_id|>"], specials["<|eot_id|>"]),
    )


def llama3_special_tokens(n_base: int = 128_000) -> dict[str, int]:
    """Llama 3's 256 special tokens, text -> id, right after the `n_base` ranks (Meta's tokenizer.py)."""
    names = list(LLAMA3_NAMED_SPECIALS) + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED_SPECIALS))
    ]
    return {name: n_base + i for i, name in enumerate(names)}


def parse_tiktoken_bpe(data: bytes, source: str) -> dict[bytes, int]:
    """tiktoken's BPE format: one `base64(token) rank` per line. Ranks must be 0..n-1 and hold every byte."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError(f"{len(parts)} fields, expected 2")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as exc:
            raise AssetError(f"{source} is not a tiktoken BPE file: line {number}: {exc}") from None
        if token in ranks:
            raise AssetError(f"{source} is not a tiktoken BPE file: line {number}: token {token!r} listed twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise AssetError(f"{source} is not a tiktoken BPE file: its {len(ranks)} ranks are not 0..{len(ranks) - 1}")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise AssetError(f"{source} is not a tiktoken BPE file: not every single byte has a rank")
    return ranks


def _encoding(name: str, pattern: str, ranks: dict[bytes, int], specials: Mapping[str, int],
              source: str) -> tiktoken.Encoding:
    try:
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=dict(specials))
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a special token's id is also a rank
        raise AssetError(f"{source}: not a usable vocabulary ({exc})") from None


# ---- byte-level BPE from tokenizer.json or GGUF ------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def _byte_level_encoding(
    name: str, pattern: str, tokens: Mapping[str, int], specials: Mapping[str, int], source: str
) -> tuple[tiktoken.Encoding, int]:
    """A tiktoken Encoding from byte-level spellings; returns it and the true vocabulary size."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for spelling, token_id in [*tokens.items(), *specials.items()]:
        if not isinstance(spelling, str) or isinstance(token_id, bool) or not isinstance(token_id, int) \
                or not 0 <= token_id < 2**31:
            raise AssetError(f"{source}: token {spelling!r} has id {token_id!r}, not an integer in 0..2**31-1")
    for spelling, token_id in tokens.items():
        if spelling in specials:
            continue
        try:
            raw = bytes(byte_of[c] for c in spelling)
        except KeyError:
            raise AssetError(f"{source}: token {spelling!r} (id {token_id}) is not in byte-level spelling") from None
        if raw in ranks:
            raise AssetError(f"{source}: two tokens spell the bytes {raw!r}")
        ranks[raw] = token_id
    ids = [*ranks.values(), *specials.values()]
    if not ranks or len(set(ids)) != len(ids):
        raise AssetError(f"{source}: {'no tokens' if not ranks else 'two tokens share an id'}")
    n_vocab = max(ids) + 1
    # tiktoken needs a rank for every single byte; give missing ones ids past the vocabulary (dropped by encode).
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = n_vocab + b
    return _encoding(name, pattern, ranks, specials, source), n_vocab


def _pattern_from_pre_tokenizer(pre: dict | None, source: str) -> str:
    """The one regex equal to a tokenizer.json pre_tokenizer we know (Split+ByteLevel, ByteLevel, Digits+ByteLevel)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and "Regex" in steps[0]["pattern"]:
        if steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return steps[0]["pattern"]["Regex"]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")):
        return SMOLLM_PATTERN
    raise AssetError(f"{source}: unsupported pre_tokenizer {json.dumps(pre)[:200]}")


def from_tokenizer_json(path: str | os.PathLike) -> Tokenizer:
    """A Hugging Face byte-level BPE `tokenizer.json` as a tiktoken-backed Tokenizer."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    spec = _read_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise AssetError(f"{path}: not a tokenizer.json (expected an object with a \"model\" object)")
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        raise AssetError(f"{path}: only byte-level BPE without a normalizer is supported")
    if not isinstance(model.get("vocab"), dict):
        raise AssetError(f"{path}: model.vocab must be an object of token -> id")
    if not isinstance(model.get("merges", []), list):
        raise AssetError(f"{path}: model.merges must be a list")
    added = spec.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str) and "id" in t
                                                 for t in added):
        raise AssetError(f"{path}: added_tokens must be a list of objects with content and id")
    pre = spec.get("pre_tokenizer")
    try:
        pattern = _pattern_from_pre_tokenizer(pre, str(path))
    except (AttributeError, TypeError, KeyError, IndexError):  # a pre_tokenizer of the wrong shape
        raise AssetError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:200]}") from None
    specials = {t["content"]: t["id"] for t in added}
    encoding, n_vocab = _byte_level_encoding(path.name, pattern, model["vocab"], specials, str(path))
    bos, eos = _bos_eos_from_config(path.parent / "tokenizer_config.json", specials)
    return Tokenizer(encoding, bos_id=bos, eos_id=eos, stop_ids=_stop_ids(specials), n_vocab=n_vocab,
                     add_bos=bos is not None and bos == specials.get("<|begin_of_text|>"))


def _read_json(path: Path):
    """Parsed JSON from the verified bytes of `path`; AssetError for anything unreadable, however deep."""
    try:
        return json.loads(assets.read_verified(path))
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested 100,000 deep
        raise AssetError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


def _bos_eos_from_config(config: Path, specials: Mapping[str, int]) -> tuple[int | None, int]:
    """bos/eos from a neighbouring tokenizer_config.json, else the Llama 3 or GPT-2 names."""
    names: dict = {}
    if config.is_file():
        names = _read_json(config)
        if not isinstance(names, dict):
            raise AssetError(f"{config}: expected a JSON object")

    def pick(key: str, fallbacks: tuple[str, ...]) -> int | None:
        value = names.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        for name in (value, *fallbacks):
            if isinstance(name, str) and name in specials:
                return specials[name]
        return None

    bos = pick("bos_token", ("<|begin_of_text|>",))
    eos = pick("eos_token", ("<|end_of_text|>", "<|endoftext|>"))
    if eos is None:
        raise AssetError(f"{config.parent}: cannot tell the eos token (no tokenizer_config.json and no known name)")
    return bos, eos


def _stop_ids(specials: Mapping[str, int]) -> list[int]:
    return [specials[t] for t in _STOP_TEXTS if t in specials]


def from_gguf(path: str | os.PathLike) -> Tokenizer:
    """The byte-level BPE ("gpt2") tokenizer stored in a GGUF file's metadata."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/OSError/struct errors on a bad file
        raise AssetError(f"cannot read GGUF {path}: {type(exc).__name__}: {exc}") from None
    assets.check_pinned(path, reader.data)  # the mapped bytes the metadata below is read from

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise AssetError(f"{path.name}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_PATTERNS:
        raise AssetError(f"{path.name}: unsupported tokenizer.ggml.pre {pre!r}; known: {', '.join(GGUF_PRE_PATTERNS)}")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise AssetError(f"{path.name}: {len(tokens)} tokens but {len(types)} token types")
    # 3 = CONTROL (e.g. <|im_end|>), 4 = USER_DEFINED: both are matched whole, so both are specials here.
    specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind in (3, 4)}
    encoding, n_vocab = _byte_level_encoding(path.name, GGUF_PRE_PATTERNS[pre],
                                             {t: i for i, t in enumerate(tokens)}, specials, path.name)
    eos = field("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise AssetError(f"{path.name}: no tokenizer.ggml.eos_token_id")
    bos = field("tokenizer.ggml.bos_token_id")
    return Tokenizer(encoding, bos_id=bos, eos_id=eos, stop_ids=_stop_ids(specials), n_vocab=max(n_vocab, len(tokens)),
                     add_bos=bool(field("tokenizer.ggml.add_bos_token", True)))


# ---- one entry point ---------------------------------------------------------------------------


def load_tokenizer(name_or_path: str | os.PathLike = "llama3-tokenizer") -> Tokenizer:
    """A registry name, `meta-llama/...` id, folder (tokenizer.model, tokenizer.json or one .gguf) or file."""
    name = str(name_or_path)
    if name.startswith("meta-llama/") and not Path(name).exists():
        return load_llama3(assets.asset_file(name, "tokenizer.model"))  # only that file, not the checkpoint
    path = assets.resolve(name_or_path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "tokenizer.model").is_file():
            return load_llama3(path / "tokenizer.model")
        if (path / "tokenizer.json").is_file():
            return from_tokenizer_json(path / "tokenizer.json")
        if len(ggufs) == 1:
            return from_gguf(ggufs[0])
        raise AssetError(f"{path}: no tokenizer.model, tokenizer.json or single .gguf file in this folder")
    if path.suffix == ".gguf":
        return from_gguf(path)
    if path.suffix == ".json":
        return from_tokenizer_json(path)
    return load_llama3(path)
