"""Run the benchmark harness from a checkout: ``python benchmarks/run.py [multibn bench options]``.

The harness itself is :mod:`multibn.cli.bench` (so that ``multibn bench`` works from an installed package); this
script only makes the checkout importable and forwards the arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from multibn.cli import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args()))
