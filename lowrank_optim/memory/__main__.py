"""``python -m lowrank_optim.memory``: see :mod:`lowrank_optim.memory.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:  # bad model / optimizer / dtype: the message lists the valid ones
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
