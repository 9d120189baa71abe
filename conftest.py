"""Project-wide pytest options: `--impl module:callable` checks your own implementation."""


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        action="store",
        default=None,
        metavar="MODULE:CALLABLE",
        help="run the golden checks against this implementation (trace protocol, see README) instead of impl",
    )
