"""`python -m golden check-tokenizer` and `pytest --impl-tokenizer`: the user's Llama 3 encode against committed ids.

The committed ids (golden/data/tokenizer/llama3.json) are Hugging Face tokenizers' and must stay the corpus's
and the walk-through's; a correct tiktoken encode passes; each real mistake (another split pattern, special-token
text read as specials, a BOS) is caught and named. The mutations are built here, in-process, from Meta's
tokenizer.model (a fetched asset, as in test_tokenizer.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tiktoken

from golden import cli, report, tokenizer_corpus
from golden import tokenizer_check as tc
from golden.check import ImplementationError, load_callable
from golden.format import GoldenError
from impl import assets
from impl.tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, llama3_special_tokens, parse_tiktoken_bpe

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = tc.load_expected()
GOLDEN_DATA = ROOT / "golden" / "data"
# Llama 3.0's names (the walk-through's, HF's tokenizer.json): 128002-128005 and 128008 reserved, 256 in all.
LLAMA30_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", *[f"<|reserved_special_token_{i}|>" for i in range(4)],
                    "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                    *[f"<|reserved_special_token_{i}|>" for i in range(5, 251)]]


@pytest.fixture(scope="module")
def model_file() -> Path:
    return assets.fetch("llama3-tokenizer", quiet=True) / "tokenizer.model"


@pytest.fixture(scope="module")
def ranks(model_file) -> dict[bytes, int]:
    return parse_tiktoken_bpe(model_file.read_bytes(), str(model_file))


def encoding(ranks, pattern: str = LLAMA3_PATTERN, specials=None) -> tiktoken.Encoding:
    specials = specials or llama3_special_tokens(len(ranks))
    return tiktoken.Encoding("test", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def llama3(ranks) -> tiktoken.Encoding:
    return encoding(ranks)


def plain(enc: tiktoken.Encoding):
    return lambda text: enc.encode(text, disallowed_special=())


# ---------------------------------------------------------------- the committed ids
def test_expected_ids_are_the_corpus_in_order():
    texts = {name: [c.text for c in cases] for name, cases in EXPECTED.groups().items()}
    assert texts == tokenizer_corpus.groups(), "the corpus changed: python -m golden record-tokenizer"


def test_corpus_is_the_same_under_any_hash_seed():
    # A set of strings iterates in another order under each PYTHONHASHSEED; the corpus must not.
    code = "import hashlib; from golden import tokenizer_corpus as t; print(hashlib.sha256(repr(t.groups()).encode())" \
           ".hexdigest())"
    digests = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout.strip() for seed in ("1", "2")}
    assert digests == {hashlib.sha256(repr(tokenizer_corpus.groups()).encode()).hexdigest()}


def test_expected_ids_cover_at_least_1000_strings_in_every_kind():
    assert len(EXPECTED.cases) >= 1000
    assert set(EXPECTED.groups()) == {"facts", "scripts", "code", "emoji", "numbers", "contractions", "punctuation",
                                      "whitespace", "mixed", "special-text", "control"}


def test_corpus_has_digit_runs_of_every_length_1_to_10():
    assert {len(t) for t in tokenizer_corpus.groups()["numbers"] if t.isdigit() and t.isascii()} >= set(range(1, 11))


def test_expected_facts_are_the_published_ids():
    assert {c.text: list(c.ids) for c in EXPECTED.groups()["facts"]} == tokenizer_corpus.PUBLISHED


@pytest.mark.parametrize("model", ["tiny", "tiny-varied", "tiny-tied"])
def test_published_ids_are_the_goldens_tokens(model):
    manifest = json.loads((GOLDEN_DATA / model / "fp32" / "manifest.json").read_text())
    assert [128000, *tokenizer_corpus.PUBLISHED[manifest["prompt"]]] == manifest["tokens"]


def test_expected_ids_hold_no_special_token():
    assert not [c for c in EXPECTED.cases if any(t >= tc.N_BASE for t in c.ids)]


def test_record_expected_with_hf_tokenizers_rewrites_the_committed_ids(tmp_path):
    # The ids, not the header: another tokenizers version (tox's py310) writes its own version there.
    assert tc.load_expected(tc.record_expected(tmp_path / "llama3.json")).cases == EXPECTED.cases


@pytest.mark.parametrize("content", ["not json", '{"format": "other"}', json.dumps(
    {"format": tc.FORMAT, "version": 1, "groups": {"g": [["text", [1, "2"]]]}}), json.dumps(
    {"format": tc.FORMAT, "version": 1, "groups": {}}), json.dumps({"format": tc.FORMAT, "version": 9})],
    ids=["not-json", "other-format", "id-not-int", "no-cases", "version-9"])
def test_load_expected_bad_file_raises_golden_error(tmp_path, content):
    bad = tmp_path / "ids.json"
    bad.write_text(content)
    with pytest.raises(GoldenError, match=str(bad)):
        tc.load_expected(bad)


# ---------------------------------------------------------------- a correct tokenizer, and the mistakes
def test_correct_tiktoken_encode_passes(llama3):
    r = tc.check_tokenizer(plain(llama3), EXPECTED)
    assert r.passed and r.agree == len(EXPECTED.cases), report.format_tokenizer_report(r)


# Each mistake: a function from Meta's ranks (and the correct Encoding, to save building one) to an encode that
# makes it.
def gpt2_split(ranks, llama3=None):
    return plain(encoding(ranks, GPT2_PATTERN))


def digits_not_in_3s(ranks, llama3=None):
    return plain(encoding(ranks, LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}+")))


def case_sensitive_contractions(ranks, llama3=None):
    return plain(encoding(ranks, LLAMA3_PATTERN.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "'s|'t|'re|'ve|'m|'ll|'d")))


def allowed_special(ranks, llama3):
    return lambda text: llama3.encode(text, allowed_special="all")


def allowed_special_llama30_names(ranks, llama3=None):
    enc = encoding(ranks, specials={name: 128000 + i for i, name in enumerate(LLAMA30_SPECIALS)})
    return lambda text: enc.encode(text, allowed_special="all")


def with_bos(ranks, llama3):
    return lambda text: [128000, *plain(llama3)(text)]


def with_eos(ranks, llama3):
    return lambda text: [*plain(llama3)(text), 128001]


def nfc_normalized(ranks, llama3):
    return lambda text: plain(llama3)(unicodedata.normalize("NFC", text))


MUTATIONS = {  # name: (mistake, the kinds of every differing string, what the report must say)
    "gpt2-split": (gpt2_split, {"split", "merges"}, "the split pattern is not Meta's"),
    "digits-not-in-3s": (digits_not_in_3s, {"split"}, "Llama 3 splits digit runs in groups of 3"),
    "case-sensitive-contractions": (case_sensitive_contractions, {"split"}, "crosses Llama 3's split"),
    "allowed-special-all": (allowed_special, {"special"}, "reads the text '<|eot_id|>' as the special token 128009: "
                                                          "the contract reads special-token text as plain text"),
    "allowed-special-llama30-names": (allowed_special_llama30_names, {"special"}, "as the special token"),
    "bos": (with_bos, {"bos"}, "starts with 128000 (<|begin_of_text|>): the contract is no BOS"),
    "eos": (with_eos, {"eos"}, "ends with 128001 (<|end_of_text|>): the contract is no EOS"),
    "nfc-normalized": (nfc_normalized, {"text"}, "your ids spell 'café', not the text"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mistake_is_caught_and_named(ranks, llama3, mutation):
    make, kinds, says = MUTATIONS[mutation]
    r = tc.check_tokenizer(make(ranks, llama3), EXPECTED, spec=mutation)
    text = report.format_tokenizer_report(r)
    assert not r.passed
    assert (set(r.kinds), r.first.kind) == (kinds, max(r.kinds, key=r.kinds.get)), text
    assert says in text


def test_special_text_is_named_as_the_text_spells_it():
    # Llama 3.0's <|reserved_special_token_245|> is 128250, which Llama 3.1 names <|reserved_special_token_240|>
    case = tc.Case("special-text", 0, "x<|reserved_special_token_245|>", (87, 27, 91))
    assert tc.explain(case, (87, 128250), None) == ("special", (
        "reads the text '<|reserved_special_token_245|>' as the special token 128250: the contract reads special-token "
        "text as plain text (tiktoken: disallowed_special=(), no allowed_special)"))


def test_report_shows_the_tokens_around_the_first_difference(ranks):
    r = tc.check_tokenizer(gpt2_split(ranks), EXPECTED, spec="mine", groups=["facts"])
    lines = report.format_tokenizer_report(r).splitlines()
    first = lines.index("  FIRST DIFFERENCE: facts string 4: '<|eot_id|>'")
    assert lines[first + 1 : first + 4] == [
        "    ids differ from token 4:",
        "      yours     ... [2] 68 'e'  [3] 354 'ot'  [4] 62 '_'  [5] 307 'id'  [6] 91 '|'  ... 8 tokens",
        "      expected  ... [2] 68 'e'  [3] 354 'ot'  [4] 851 '_id'  [5] 91 '|'  [6] 29 '>'  (7 tokens)",
    ], lines


def test_report_shows_both_sides_pieces_at_the_first_difference(ranks):
    r = tc.check_tokenizer(digits_not_in_3s(ranks), EXPECTED, spec="mine", groups=["numbers"])
    lines = report.format_tokenizer_report(r).splitlines()
    assert "  FIRST DIFFERENCE: numbers string 9: '1234'" in lines
    assert "      yours     [0] 717 '12'  [1] 1958 '34'  (2 tokens)" in lines
    assert "      expected  [0] 4513 '123'  [1] 19 '4'  (2 tokens)" in lines
    assert lines[-1] == "  FAIL: 77/178 strings agree (0 of 1 groups)"


def test_report_without_the_vocabulary_shows_ids_and_the_fetch_command(llama3):
    bos = [128000]
    r = tc.check_tokenizer(lambda t: bos + llama3.encode(t, disallowed_special=()), EXPECTED, vocab=None)
    assert "yours     [0] 128000  [1] 1820  [2] 4320  ... 17 tokens" in report.format_tokenizer_report(r)
    assert r.first.kind == "bos"  # named without the vocabulary
    bos.clear()
    r = tc.check_tokenizer(lambda t: list(reversed(llama3.encode(t, disallowed_special=()))), EXPECTED, vocab=None)
    assert "python -m impl fetch llama3-tokenizer" in r.first.why


@pytest.mark.parametrize(("encode", "says"), [
    (lambda t: "ids", "returned str for facts string 0, expected a list of int ids"),
    (lambda t: None, "returned NoneType"),
    (lambda t: [1.0], "returned a list holding float"),
    (lambda t: [True], "returned a list holding bool"),
    (lambda t: {}["x"], "raised KeyError: 'x' at tests/test_tokenizer_check.py:"),
    (lambda t: __import__("sys").exit(0), "called sys.exit(0) at tests/test_tokenizer_check.py:"),
    (lambda t: __import__("os")._exit(0), "called os._exit(0) at tests/test_tokenizer_check.py:"),
], ids=["str", "none", "floats", "bools", "raises", "sys-exit", "os-exit"])
def test_encode_that_breaks_the_contract_raises_one_line(encode, says):
    with pytest.raises(ImplementationError) as e:
        tc.check_tokenizer(encode, EXPECTED, spec="mine")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_encode_may_return_a_tuple_or_an_array(llama3):
    import numpy as np

    r = tc.check_tokenizer(lambda t: np.array(llama3.encode(t, disallowed_special=()), dtype=np.int64), EXPECTED,
                           groups=["facts"])
    assert r.passed


def test_walkthrough_encode_hints_at_disallowed_special(llama3):
    says = ("facts string 4 '<|eot_id|>'; the contract reads special-token text as plain text: tiktoken's "
            "encode(text, disallowed_special=())")
    with pytest.raises(ImplementationError) as e:
        tc.check_tokenizer(llama3.encode, EXPECTED, spec="mine")  # tiktoken's default raises on special text
    assert says in str(e.value)


# ---------------------------------------------------------------- the CLI
@pytest.fixture
def example(model_file, monkeypatch) -> str:
    monkeypatch.setenv("LLAMA3_TOKENIZER_MODEL", str(model_file))
    monkeypatch.delitem(sys.modules, "my_tok", raising=False)
    return str(ROOT / "examples" / "my_tok.py") + ":encode"


def test_cli_example_passes(example, capsys):
    assert cli.main(["check-tokenizer", "--impl", example]) == 0
    assert "  PASS: 1,664/1,664 strings agree (11 of 11 groups)" in capsys.readouterr().out


def test_cli_bos_fails_with_exit_1(tmp_path, example, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", [*sys.path])  # bos_tok.py puts examples/ first: not for the tests after this one
    (tmp_path / "bos_tok.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'examples')!r})\n"
                                         "import my_tok\n\n\ndef encode(text):\n"
                                         "    return [128000] + my_tok.encode(text)\n")
    assert cli.main(["check-tokenizer", "--impl", f"{tmp_path}/bos_tok.py:encode"]) == 1
    out = capsys.readouterr().out
    assert "  facts              0/7     FAIL" in out and "WHY: starts with 128000 (<|begin_of_text|>)" in out


@pytest.mark.parametrize(("argv", "says"), [
    (["--impl", "no/such/file.py:encode"], "no file no/such/file.py"),
    (["--impl", "nosuch_tok_module:encode"], "give its file: path/to/nosuch_tok_module.py:encode"),
    (["--impl", "tiktoken:encoding_for_model", "--expected", "/no/such.json"], "/no/such.json: no such file"),
    ([], "the following arguments are required: --impl"),
], ids=["no-file", "no-module", "no-expected", "no-impl"])
def test_cli_bad_input_is_one_line_exit_2(argv, says, capsys):
    try:
        code = cli.main(["check-tokenizer", *argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert (code, err.count("\n")) == (2, 1) and says in err and err.startswith("error: ")


# ---------------------------------------------------------------- --impl path/to/file.py:callable
def test_load_callable_from_a_file_that_imports_its_neighbour(tmp_path):
    (tmp_path / "helper_tok_neighbour.py").write_text("SHIFT = 3\n")
    (tmp_path / "file_tok.py").write_text("from helper_tok_neighbour import SHIFT\n\ndef f(x):\n    return x + SHIFT\n")
    assert load_callable(f"{tmp_path}/file_tok.py:f")(1) == 4


@pytest.mark.parametrize(("name", "content", "says"), [
    ("tok.txt", "", "is not a .py file"),
    ("broken_tok.py", "1/0\n", "cannot import"),
], ids=["not-py", "raises-on-import"])
def test_load_callable_bad_file_raises_implementation_error(tmp_path, name, content, says):
    (tmp_path / name).write_text(content)
    with pytest.raises(ImplementationError, match=says):
        load_callable(f"{tmp_path}/{name}:encode")


# ---------------------------------------------------------------- pytest --impl-tokenizer
@pytest.fixture
def user_project(pytester, model_file, monkeypatch):
    """A user's folder: their tokenizer beside a test of their own."""
    monkeypatch.setenv("LLAMA3_TOKENIZER_MODEL", str(model_file))
    pytester.makepyfile(
        my_tok=(ROOT / "examples" / "my_tok.py").read_text(),
        bos_tok="import my_tok\n\ndef encode(text):\n    return [128000] + my_tok.encode(text)\n",
        test_theirs="def test_theirs():\n    pass\n",
    )
    return pytester


def test_pytest_plugin_without_the_option_collects_nothing(user_project):
    result = user_project.runpytest_inprocess("-p", "golden.pytest_tokenizer", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*tokenizer*")


def test_pytest_plugin_runs_one_test_per_case_group(user_project):
    result = user_project.runpytest_inprocess("-p", "golden.pytest_tokenizer", "--impl-tokenizer", "my_tok:encode",
                                              "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(EXPECTED.groups()))
    result.stdout.fnmatch_lines(["*tokenizer::facts PASSED*", "*tokenizer::special-text PASSED*"])


def test_pytest_plugin_names_the_mistake_per_group(user_project):
    result = user_project.runpytest_inprocess("-p", "golden.pytest_tokenizer", "--impl-tokenizer", "bos_tok.py:encode",
                                              "-k", "facts or numbers", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2, deselected=len(EXPECTED.groups()) - 2)
    result.stdout.fnmatch_lines(["facts: 0/7 strings agree with llama3.json",
                                 "  WHY: starts with 128000 (<|begin_of_text|>): the contract is no BOS"])


def test_pytest_plugin_bad_spec_is_a_usage_error(user_project):
    result = user_project.runpytest_inprocess("-p", "golden.pytest_tokenizer", "--impl-tokenizer", "nosuch_tok:encode",
                                              "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --impl-tokenizer 'nosuch_tok:encode': cannot import nosuch_tok*"])
