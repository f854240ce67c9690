"""Entry point: ``python -m ec_dit.geneval``."""
import sys

from ec_dit.geneval.cli import main

sys.exit(main())
