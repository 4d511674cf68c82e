"""``python -m bench_lib`` (what ``scripts/bench`` runs)."""

import sys

from bench_lib.cli import main

sys.exit(main(sys.argv[1:]))
