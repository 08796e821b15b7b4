"""`python -m speeder_platform ...` = the `speeder` console script."""

import sys

from speeder_platform.cli import main

if __name__ == "__main__":
    sys.exit(main())
