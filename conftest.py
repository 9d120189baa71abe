"""Project-wide pytest options: `--impl module:callable` checks your own implementation, `--partial` only the
stages it reports."""

import os


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        action="store",
        default=None,
        metavar="MODULE:CALLABLE",
        help="run the golden checks against this implementation (trace protocol, see README) instead of impl",
    )
    parser.addoption(
        "--partial",
        action="store_true",
        default=False,
        help="check only the stages the implementation reports (logits still required); without it a stage "
             "not reported fails",
    )


def benchmarks_timed(config) -> bool:
    """Whether this run times the benchmarks (`--benchmark-enable`, as `tox -e bench` does)."""
    return bool(config.getoption("benchmark_enable", False)) or not config.getoption("benchmark_disable", True)


def pytest_configure(config):
    # A test run never measures GEMM engines (seconds) into the user's cache: the fast path runs the engine that
    # LLAMA3_GOLDEN_ENGINE pins, torch's default unless the caller pinned another (tests/test_engines.py tests the
    # measured choice itself; tests/test_model_fastpath.py runs every engine). A timed benchmark run uses the
    # engines measured on the machine, as `impl generate` does.
    if not benchmarks_timed(config):
        os.environ.setdefault("LLAMA3_GOLDEN_ENGINE", "torch")
