"""``python -m prefork``: the ``prefork`` command. Runs in: master."""

import sys

from prefork.cli import main

if __name__ == "__main__":
    sys.exit(main())
