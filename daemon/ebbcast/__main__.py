"""``python -m ebbcast`` is the same as the ``ebbcast`` command."""

import sys

from ebbcast.cli import main

if __name__ == "__main__":
    sys.exit(main())
