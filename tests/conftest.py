"""Session fixtures: the committed goldens, the implementation under test, and its reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from golden import check as golden_check
from golden.format import load_golden

GOLDEN_DATA = Path(__file__).resolve().parent.parent / "golden" / "data"
GOLDEN_MODELS = ("tiny", "tiny-scaled", "smollm2-135m")
DTYPES = ("fp32", "bf16")


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

    def run(fn, model: str, dtype: str, partial: bool = False):
        ckpt, weights = models(model, dtype)
        return check_golden(fn, goldens(model, dtype), goldens(model, "fp32"), ckpt.config, weights, partial)

    return run


@pytest.fixture(scope="session")
def implementation(request):
    """The implementation under test: impl's forward, or the user's `--impl module:callable`."""
    return golden_check.load_callable(request.config.getoption("--impl"))


@pytest.fixture(scope="session")
def partial(request) -> bool:
    """`pytest --partial`: check only the stages the implementation reports (it must still report logits)."""
    return request.config.getoption("--partial")


@pytest.fixture(scope="session")
def reports(implementation, check_against, partial):
    """(model, dtype) -> the Report for the implementation under test, computed once."""
    cache = {}

    def get(model: str, dtype: str):
        if (model, dtype) not in cache:
            cache[model, dtype] = check_against(implementation, model, dtype, partial=partial)
        return cache[model, dtype]

    return get
