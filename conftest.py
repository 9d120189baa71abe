"""Project-wide pytest setup. The `--impl` family of options lives in the golden checks' plugin
(golden/pytest_plugin.py) and `--impl-tokenizer` in the tokenizer check's (golden/pytest_tokenizer.py), the
package's pytest11 entry points; they are named here too for a checkout whose installed metadata predates
them (registered under their module names, each loads once either way). pytester runs the plugins' tests."""

import os

pytest_plugins = ["pytester", "golden.pytest_plugin", "golden.pytest_tokenizer"]


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
