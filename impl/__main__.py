"""`python -m impl ...`: see impl.cli."""

import sys

from impl.cli import main

sys.exit(main())
