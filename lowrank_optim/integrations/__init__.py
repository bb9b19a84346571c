"""Integrations with other libraries (imported lazily: none of them is a hard dependency).

``lowrank_optim.integrations.transformers`` adds every optimizer of this package to the
Hugging Face ``Trainer`` (``optim="lowrank_<name>"``) and provides a factory for
``Trainer(optimizer_cls_and_kwargs=...)``.
"""
