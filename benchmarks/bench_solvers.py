"""Regenerate benchmarks/results/solvers.{json,md,png} (the numbers in BENCHMARKS.md).

    python benchmarks/bench_solvers.py --model gmm-mnist            # the full run on the exact model (~7 min)
    python benchmarks/bench_solvers.py --model gmm-sd-v             # exact narrow modes, scaled-linear betas, v
    python benchmarks/bench_solvers.py --model gmm-cosine           # exact narrow modes, cosine betas, eps
    python benchmarks/bench_solvers.py --quick                      # mnist-teacher (8 samples) + defaults check
                                                                    # on gmm-sd-v and gmm-cosine

Same options as ``fewstep bench solvers`` (this script is that command); the benchmark
itself lives in ``fewstep.bench.solvers``.
"""
import sys

from fewstep.cli import main

if __name__ == "__main__":
    main(["bench", "solvers", *sys.argv[1:]], prog_name="bench_solvers.py")
