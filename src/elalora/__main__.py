"""``python -m elalora``: the ``elalora`` command line.

Imports: :mod:`elalora.cli.main` (the top of the import order).
"""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
