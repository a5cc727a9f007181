"""Regenerate benchmarks/results/solvers.{json,md,png} (the numbers in BENCHMARKS.md).

    python benchmarks/bench_solvers.py            # the full run (about 15 minutes on 2 CPU cores)
    python benchmarks/bench_solvers.py --quick    # under two minutes

Same options as ``fewstep bench solvers`` (this script is that command); the benchmark
itself lives in ``fewstep.bench.solvers``.
"""
import sys

from fewstep.cli import main

if __name__ == "__main__":
    main(["bench", "solvers", *sys.argv[1:]], prog_name="bench_solvers.py")
