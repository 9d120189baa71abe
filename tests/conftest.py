"""Session fixtures: the committed goldens, impl's reports against them, and a check of any implementation."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from golden import check as golden_check
from golden.format import load_golden

TESTS = Path(__file__).resolve().parent
GOLDEN_DATA = TESTS.parent / "golden" / "data"
GOLDEN_MODELS = ("tiny", "tiny-varied", "tiny-scaled", "tiny-tied", "smollm2-135m")
DTYPES = ("fp32", "bf16")


def pytest_configure(config):
    """A run started as a background job (`cmd &` in a script, nohup) inherits SIGINT ignored, and every CLI the
    tests interrupt with Ctrl-C's signal would ignore it too (a held `golden record` then waited out its 300 s
    sleep). Give this process Python's own handler back, as in a terminal: the CLIs it starts get the default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def golden_dir(model: str, dtype: str) -> Path:
    return GOLDEN_DATA / model / dtype


@pytest.fixture(scope="session")
def goldens():
    """(model, dtype) -> loaded committed golden, loaded once per session (per xdist worker)."""
    cache = {}

    def get(model: str, dtype: str):
        if (model, dtype) not in cache:
            cache[model, dtype] = load_golden(golden_dir(model, dtype))
        return cache[model, dtype]

    return get


@pytest.fixture(scope="session")
def models(goldens):
    """(model, dtype) -> (Checkpoint, weights in dtype) for a golden's model, loaded once. The runner hands
    implementations copies, so what they write into their weights never reaches these."""
    from golden.check import load_model_for

    cache = {}

    def get(model: str, dtype: str):
        if (model, dtype) not in cache:
            g = goldens(model, dtype)
            cache[model, dtype] = load_model_for(g, g.torch_dtype)
        return cache[model, dtype]

    return get


@pytest.fixture(scope="session")
def check_against(goldens, models):
    """(implementation, model, dtype) -> the comparator's Report for that implementation."""
    from golden.check import check_golden

    def run(fn, model: str, dtype: str, partial: bool = False, qk_layout: str = "meta"):
        ckpt, weights = models(model, dtype)
        return check_golden(fn, goldens(model, dtype), goldens(model, "fp32"), ckpt.config, weights, partial,
                            qk_layout)

    return run


@pytest.fixture(scope="session")
def reports(check_against):
    """(model, dtype) -> the Report for impl, computed once. This suite checks impl: a user's implementation is
    checked by `pytest --impl X` without paths (golden/pytest_plugin.py)."""
    cache = {}

    def get(model: str, dtype: str):
        if (model, dtype) not in cache:
            cache[model, dtype] = check_against(golden_check.impl_forward, model, dtype)
        return cache[model, dtype]

    return get


def pytest_collection_modifyitems(config, items):
    """tests/ checks impl and never reads --impl: say so instead of passing impl's checks off as the user's."""
    impl = config.getoption("impl", None)
    if impl and any(Path(item.path).is_relative_to(TESTS) for item in items):
        raise pytest.UsageError(f"tests/ checks this repository's impl, not --impl {impl}: run `pytest --impl {impl}` "
                                f"without test paths for the golden checks of your implementation")
