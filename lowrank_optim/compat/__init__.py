"""Compatibility namespaces: our optimizers under another package's names, keywords and defaults.

* :mod:`lowrank_optim.compat.galore_torch`: ``GaLoreAdamW``, ``GaLoreAdamW8bit`` and
  ``GaLoreAdafactor`` with ``galore_torch`` 1.0's constructors, defaults and arithmetic, so
  that a script written for ``galore_torch`` changes only its import
  (docs/guide.md#drop-in-for-galore_torch).

The submodules are imported on use (``from lowrank_optim.compat.galore_torch import ...``):
none of them is needed by the rest of the package.
"""
