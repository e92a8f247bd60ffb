"""``python -m dist_stab.bench.optim_step``: the optimizer-step benchmark (the name issue #4 uses);
see :mod:`dist_stab.bench.optim`."""
from .optim import main

if __name__ == "__main__":
    main()
