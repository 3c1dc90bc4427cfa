"""``python -m normlab`` (and ``torchrun -m normlab``) run the ``normlab`` command."""

import sys

from .cli import main

# The guard matters: the lab's worker processes start by "spawn", which imports the parent's
# main module again (as __mp_main__); without it every worker would run the command.
if __name__ == "__main__":
    sys.exit(main())
