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
def implementation(request):
    """The implementation under test: impl's forward, or the user's `--impl module:callable`."""
    return golden_check.load_callable(request.config.getoption("--impl"))


@pytest.fixture(scope="session")
def reports(goldens, implementation):
    """(model, dtype) -> the comparator's Report for the implementation under test."""
    from golden import compare
    from golden.check import load_model_for, run_implementation

    cache = {}

    def get(model: str, dtype: str):
        if (model, dtype) not in cache:
            g, truth = goldens(model, dtype), goldens(model, "fp32")
            ckpt, weights = load_model_for(g, g.torch_dtype)
            actual = run_implementation(implementation, g.tokens, weights, ckpt.config)
            cache[model, dtype] = compare.compare(truth.tensors, actual, dtype, g.tensors if dtype == "bf16" else None)
        return cache[model, dtype]

    return get
