"""Run an unmodified Hugging Face training script with this package's optimizers registered.

    python -m lowrank_optim.hf run_clm.py --optim lowrank_galore_adamw \\
        --optim_target_modules ".*\\.(self_attn|mlp)\\..*" --optim_args "rank=128" ...
    python -m lowrank_optim.hf -m my_package.train --optim lowrank_galore_adamw_layerwise ...
    torchrun --nproc_per_node 8 -m lowrank_optim.hf run_clm.py --optim lowrank_fira_adamw ...

transformers checks ``--optim`` against its own list of names when the script builds its
``TrainingArguments`` (or ``HfArgumentParser``), so ``lowrank_*`` names must be registered
first, in the same process: this launcher calls
:func:`lowrank_optim.integrations.transformers.register` and then runs the script as
``__main__`` with the remaining arguments, exactly as ``python SCRIPT.py ...`` would
(``sys.argv[0]`` is the script, its directory leads ``sys.path``).
"""
from __future__ import annotations

import os
import runpy
import sys

USAGE = (
    "usage: python -m lowrank_optim.hf SCRIPT.py [script arguments...]\n"
    "       python -m lowrank_optim.hf -m MODULE [script arguments...]\n"
    "Registers the lowrank_* optimizer names with transformers' Trainer, then runs the script."
)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    from .integrations.transformers import register

    register()
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
        module, rest = argv[1], argv[2:]
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script, rest = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(f"lowrank_optim.hf: no such script: {script}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
