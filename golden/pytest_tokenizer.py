"""`pytest --impl-tokenizer my_tok:encode`: the tokenizer check (golden.tokenizer_check) as tests, one per case group.

A pytest11 plugin (pyproject.toml's `[project.entry-points.pytest11]`), so the option exists wherever
llama3-golden is installed, in the user's own project and CI too. Without the option it adds nothing and
imports nothing heavy. With it, pytest runs these tests only: no test file is collected (unless `--impl`
asks for golden's model checks as well). The callable is imported once, at start-up; a bad spec is a
usage error in one line.
"""

from __future__ import annotations

import sys

import pytest

OPTION = "--impl-tokenizer"
_LOADED = pytest.StashKey[tuple]()  # (encode, Expected)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("llama3-golden").addoption(
        OPTION, dest="impl_tokenizer", metavar="MODULE:CALLABLE", default=None,
        help="check your Llama 3 tokenizer (module:callable or path/to/file.py:callable; encode(text) -> list[int], "
             "no BOS, special-token text as plain text) against the committed ids, one test per case group")


def _spec(config: pytest.Config) -> str | None:
    return config.getoption("impl_tokenizer", default=None)


def pytest_configure(config: pytest.Config) -> None:
    spec = _spec(config)
    if spec is None:
        return
    from golden import tokenizer_check
    from golden.check import load_callable
    from impl.errors import Llama3GoldenError

    # `pytest` (unlike `python -m pytest`) leaves the working folder off sys.path, where my_tok.py usually is.
    folder = str(config.invocation_params.dir)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        config.stash[_LOADED] = (load_callable(spec, option=OPTION), tokenizer_check.load_expected())
    except Llama3GoldenError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    """With --impl-tokenizer alone, no test file: the run is the tokenizer check."""
    if _spec(config) is not None and getattr(config.option, "impl", None) is None:
        return True
    return None


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect, so that they apply to these tests too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if _spec(config) is not None:
        # genitems reports the collection, so that pytest counts these tests as collected
        items.extend(session.genitems(TokenizerChecks.from_parent(session, name="tokenizer", nodeid="tokenizer")))


class TokenizerChecks(pytest.Collector):
    """The tokenizer check's tests: one per case group of the committed ids."""

    def collect(self):
        _, expected = self.config.stash[_LOADED]
        for group in expected.groups():
            yield TokenizerGroup.from_parent(self, name=group, group=group)


class TokenizerMismatch(AssertionError):
    """A case group where the user's ids differ from the expected ones; its message is the whole report."""


class TokenizerGroup(pytest.Item):
    """One case group of the corpus: passes when the user's encode gives the expected ids for every string."""

    def __init__(self, *, group: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.group = group

    def runtest(self) -> None:
        from golden import report, tokenizer_check

        encode, expected = self.config.stash[_LOADED]
        r = tokenizer_check.check_tokenizer(encode, expected, spec=_spec(self.config), groups=[self.group])
        if not r.passed:
            raise TokenizerMismatch(report.tokenizer_failure_message(r))

    def repr_failure(self, excinfo, style=None):
        from impl.errors import Llama3GoldenError

        if isinstance(excinfo.value, TokenizerMismatch):
            return str(excinfo.value)
        if isinstance(excinfo.value, Llama3GoldenError):  # the user's encode raised or returned no id list
            return f"error: {excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"tokenizer case group {self.group}"
