"""Benchmarks (not tests): fewstep measured side by side with its peers.

``fewstep.bench.solvers`` — error against a reference ODE solution by NFE for every
fewstep solver and grid and for diffusers' schedulers on the same model, plus the
solvers' own time per step. Run it with ``fewstep bench solvers`` (see BENCHMARKS.md).
"""
