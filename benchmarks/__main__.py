"""`python -m benchmarks`: run corral's benchmark (see benchmarks/run.py)."""

import sys

from benchmarks.run import main

sys.exit(main())
