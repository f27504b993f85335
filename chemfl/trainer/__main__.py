"""`python -m chemfl.trainer ...` is `chemfl trainer ...` (torchrun -m chemfl.trainer starts ranks this way)."""

import sys

from chemfl.trainer.cli import main

sys.exit(main())
