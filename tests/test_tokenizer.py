"""impl.tokenizer on the real Llama 3 tokenizer.model: pinned ranks, pinned ids, special-token policy.

The pinned facts come from Meta's own test (llama_models/llama3/tests/api/test_tokenizer.py, 0.3.0)
and from the walk-through's published examples, cross-checked against Hugging Face's tokenizer.json
(an independent conversion of the same vocabulary).
"""

from __future__ import annotations

import json

import pytest

from impl import assets, cli
from impl.errors import AssetError, UnknownModelError
from impl.tokenizer import Tokenizer, _split_whitespaces_or_nonwhitespaces, load_llama3, load_tokenizer

WALKTHROUGH_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
WALKTHROUGH_IDS = [128000, 1820, 4320, 311, 279, 17139, 3488, 315, 2324, 11, 279, 15861, 11, 323, 4395, 374, 220]

RANKS_5600 = [b"mitted", b" $('#", b" saw", b" approach", b"ICE", b" saying", b" anyone", b"meta", b"SD", b" song"]

LLAMA3_SPECIALS = [
    ("<|begin_of_text|>", 128000),  # bos: starts every prompt
    ("<|end_of_text|>", 128001),  # eos: end of a document (base models stop here)
    ("<|reserved_special_token_0|>", 128002),
    ("<|reserved_special_token_1|>", 128003),
    ("<|finetune_right_pad_id|>", 128004),  # padding during fine-tuning (3.1+)
    ("<|step_id|>", 128005),
    ("<|start_header_id|>", 128006),  # opens a role header: system / user / assistant / ipython
    ("<|end_header_id|>", 128007),  # closes it
    ("<|eom_id|>", 128008),  # end of message: the model expects a tool result next
    ("<|eot_id|>", 128009),  # end of turn: instruct models stop here
    ("<|python_tag|>", 128010),  # a tool call follows
    ("<|image|>", 128011),  # image placeholder (3.2 vision)
    ("<|reserved_special_token_2|>", 128012),  # first of the 244 unnamed reserved tokens
    ("<|reserved_special_token_245|>", 128255),  # the last special token
]


@pytest.fixture(scope="session")
def llama3_folder():
    return assets.fetch("llama3-tokenizer", quiet=True)


@pytest.fixture(scope="session")
def llama3(llama3_folder) -> Tokenizer:
    return load_llama3(llama3_folder / "tokenizer.model")


def test_llama3_has_128000_ranks_and_256_specials(llama3):
    assert min(llama3.special_tokens.values()) == 128_000  # specials start right after the last rank
    assert len(llama3.special_tokens) == 256
    assert llama3.n_vocab == 128_256
    assert llama3.token_bytes(127_999)  # the last rank is a real token


def test_llama3_ranks_5600_to_5609_are_the_published_ones(llama3):
    assert [llama3.token_bytes(i) for i in range(5600, 5610)] == RANKS_5600


def test_llama3_ranks_5600_to_5609_agree_with_tokenizer_json(llama3_folder):
    vocab = json.loads((llama3_folder / "tokenizer.json").read_text())["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    # tokenizer.json spells bytes GPT-2 style: a leading space is "Ġ".
    assert [by_id[i] for i in range(5600, 5610)] == [t.decode().replace(" ", "Ġ") for t in RANKS_5600]


def test_llama3_encode_walkthrough_prompt(llama3):
    assert llama3.encode(WALKTHROUGH_PROMPT) == WALKTHROUGH_IDS


def test_llama3_decode_2983_is_42(llama3):
    assert llama3.decode([2983]) == "42"


def test_llama3_encode_meta_sentence_with_bos_and_eos(llama3):
    # Meta's test_encode
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001,
    ]


def test_llama3_decode_meta_sentence_keeps_special_text(llama3):
    # Meta's test_decode
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


@pytest.mark.parametrize(("text", "token_id"), LLAMA3_SPECIALS, ids=[t.strip("<|>") for t, _ in LLAMA3_SPECIALS])
def test_llama3_special_token_id(llama3, text, token_id):
    assert llama3.special_tokens[text] == token_id


def test_llama3_bos_eos_and_stop_ids(llama3):
    assert (llama3.bos_id, llama3.eos_id) == (128000, 128001)
    assert llama3.stop_ids == frozenset({128001, 128008, 128009})  # end_of_text, eom_id, eot_id


def test_llama3_encode_without_bos_has_no_128000(llama3):
    assert llama3.encode(WALKTHROUGH_PROMPT, bos=False) == WALKTHROUGH_IDS[1:]


def test_llama3_special_text_is_plain_text_by_default(llama3):
    ids = llama3.encode("<|eot_id|>", bos=False)
    assert ids == [27, 91, 68, 354, 851, 91, 29]  # "<", "|", "e", "ot", "_id", "|", ">"
    assert llama3.decode(ids) == "<|eot_id|>"


def test_llama3_special_text_is_special_with_opt_in(llama3):
    assert llama3.encode("<|start_header_id|>user<|end_header_id|>", bos=False, allow_special=True) == [
        128006, 882, 128007,  # Meta's test_encode_message header
    ]


@pytest.mark.parametrize(
    "text",
    ["", "a", "ab  cd", " " * 9, "x" * 9 + " " * 9 + "y" * 20, "\n\n\tabc def\n"],
    ids=["empty", "one", "short", "spaces", "long-runs", "mixed"],
)
def test_split_whitespaces_or_nonwhitespaces_caps_runs_and_keeps_text(text):
    pieces = list(_split_whitespaces_or_nonwhitespaces(text, 4))
    assert "".join(pieces) == text
    for piece in pieces:
        run = 1
        for prev, ch in zip(piece, piece[1:], strict=False):
            run = run + 1 if prev.isspace() == ch.isspace() else 1
            assert run <= 4, (text, pieces)


def test_llama3_encode_long_run_round_trips(llama3):
    text = ("ab" * 20_000) + " " * 30_000 + "end"  # longer runs than Meta's 25,000-character cut
    assert llama3.decode(llama3.encode(text, bos=False)) == text


def test_load_tokenizer_default_is_llama3(llama3_folder, llama3):
    assert load_tokenizer().encode(WALKTHROUGH_PROMPT) == WALKTHROUGH_IDS


def test_load_tokenizer_folder_prefers_tokenizer_model(llama3_folder):
    assert load_tokenizer(llama3_folder).encoding.name == "tokenizer.model"


def test_load_tokenizer_unknown_name_raises_unknown_model_error():
    with pytest.raises(UnknownModelError):
        load_tokenizer("no-such-tokenizer")


def test_load_tokenizer_empty_folder_raises_asset_error(tmp_path):
    with pytest.raises(AssetError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)


def test_load_llama3_wrong_file_raises_asset_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\x0bnot base64 at all\n")
    with pytest.raises(AssetError, match="not a tiktoken BPE file"):
        load_llama3(bad)


def test_cli_tokenize_prints_json_ids(llama3_folder, capsys):
    assert cli.main(["tokenize", "--model", str(llama3_folder), "This is a test sentence."]) == 0
    assert json.loads(capsys.readouterr().out) == [128000, 2028, 374, 264, 1296, 11914, 13]


def test_cli_tokenize_flags(llama3_folder, capsys):
    assert cli.main(["tokenize", "--model", str(llama3_folder), "--no-bos", "--allow-special", "<|eot_id|>"]) == 0
    assert json.loads(capsys.readouterr().out) == [128009]
