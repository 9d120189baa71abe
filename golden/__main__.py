"""`python -m golden`: see golden.cli."""

import sys

from golden.cli import main

sys.exit(main())
