"""Benchmarks (not tests): fewstep measured side by side with its peers.

``fewstep bench solvers`` — error against a reference ODE solution by NFE for every fewstep
solver and grid (the model's tuned grids too, where it ships them) and for diffusers' schedulers
on the same model, plus the solvers' own time per step (see BENCHMARKS.md). By what it does:

  models.py    the benchmark models (exact Gaussian mixture, fewstep and diffusers folders)
  runner.py    one configuration: fewstep on a grid, diffusers' own loop, the reference solve
  overhead.py  the solvers' own time per step with the model excluded
  report.py    the targets, the markdown tables and the plot
  solvers.py   the plan and the run: ``run()``, behind the command
"""
