"""`python -m autotune.cli`: the command line."""
import sys

from autotune.cli import main

sys.exit(main())
