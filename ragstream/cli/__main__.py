"""``python -m ragstream.cli``: the same as the ``ragstream`` command."""

import sys

from ragstream.cli import main

sys.exit(main())
