"""Project-wide pytest options: `--impl module:callable` checks your own implementation, `--partial` only the
stages it reports."""


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
