"""``python -m normlab`` (and ``torchrun -m normlab``) run the ``normlab`` command."""

import sys

from .cli import main

sys.exit(main())
