"""``python -m sparseffn``: the command line (``sparseffn --help``)."""
import sys

from sparseffn.cli import main

sys.exit(main())
