"""``python -m fewstep ...`` is the ``fewstep`` command (also for ``torchrun -m fewstep``)."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="fewstep")
