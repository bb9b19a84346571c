"""What a projector takes through ``projector_args``: the declared options and their checks,
how a group records them and a checkpoint reads them back, and the one option every
dense-basis projector shares, the dtype of its products (docs/methods/projectors.md)."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from .._validate import Check, check_known_keys, check_values, choice

#: ``product_dtype``, an option of the projectors that multiply by a dense basis (svd, rsvd,
#: random, gaussian): the dtype of their products with an fp32 (or fp64) gradient and update.
#: ``"gradient"``: the gradient's own; ``"bfloat16"``: bf16 operands, the basis rounded to bf16
#: when it is computed (and kept so), the result back in the gradient's dtype; ``"auto"``: bf16
#: from rank :data:`BF16_PRODUCT_MIN_RANK`, the gradient's dtype below
#: (docs/methods/projectors.md#product-precision).
PRODUCT_DTYPE_CHECK = choice("gradient", "bfloat16", "auto")

#: The rank from which ``product_dtype="auto"`` multiplies an fp32 gradient in bf16.  From
#: there a product is bound by its r multiply-adds per gradient entry, which bf16 units run
#: 2-4x faster, and that pays for the pass that rounds G; below it (APOLLO-Mini's rank 1 is a
#: matrix-vector product, bound by memory) the rounding pass costs more than it saves
#: (measured: docs/methods/projectors.md#product-precision).
BF16_PRODUCT_MIN_RANK = 16


class ProjectorOptions:
    """The option side of :class:`~.base.Projector`: declarations a projector class fills in,
    and the class methods the optimizer calls with a group's ``projector_args``."""

    name: ClassVar[str]
    #: Options the projector accepts through ``projector_args`` and their defaults.
    option_defaults: ClassVar[dict[str, Any]] = {}
    option_checks: ClassVar[dict[str, Check]] = {}
    #: Options whose default has changed, with the one a group had before.  The optimizer
    #: records the current default in each group's ``projector_args``, so a checkpoint that
    #: lacks the option predates the change and resumes with the former default.
    former_defaults: ClassVar[dict[str, Any]] = {}
    #: Options whose values keep the same state (a checkpoint resumes across them).
    interchangeable_options: ClassVar[tuple[str, ...]] = ()
    #: The products' dtype (see :data:`PRODUCT_DTYPE_CHECK`): projectors that offer the option
    #: set it per group; the others multiply in the gradient's dtype.
    product_dtype: str = "gradient"

    # ------------------------------------------------------------------ validation
    @classmethod
    def validate_options(cls, owner: str, options: Mapping[str, Any] | None, where: str) -> None:
        options = dict(options or {})
        check_known_keys(owner, options, cls.option_defaults, f"projector_args key for projector={cls.name!r}")
        check_values(owner, options, cls.option_checks, where)

    @classmethod
    def recorded_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """A group's ``projector_args`` with the options of :attr:`former_defaults` written in."""
        if not cls.former_defaults:
            return options
        return {**{key: cls.option_defaults[key] for key in cls.former_defaults}, **(options or {})}

    @classmethod
    def saved_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """A checkpoint's ``projector_args`` as they were meant when it was written."""
        if not cls.former_defaults:
            return options
        return {**cls.former_defaults, **(options or {})}

    @classmethod
    def same_state_options(cls, saved: Mapping[str, Any] | None, built: Mapping[str, Any] | None) -> bool:
        """Whether a checkpoint's options keep the state the optimizer's would (they differ
        at most in :attr:`interchangeable_options`)."""
        saved, built = {**cls.option_defaults, **(saved or {})}, {**cls.option_defaults, **(built or {})}
        return all(saved[key] == built[key] for key in saved if key not in cls.interchangeable_options)

    def product_dtype_for(self, rank: int, dtype: torch.dtype) -> torch.dtype:
        """The dtype the products of a rank-``rank`` basis with a ``dtype`` tensor run in (and
        a stored basis is kept in): bf16 where ``product_dtype`` asks for it and ``dtype`` is
        wider; a bf16 or fp16 tensor multiplies in its own dtype."""
        choice = self.product_dtype
        bf16 = choice == "bfloat16" or (choice == "auto" and rank >= BF16_PRODUCT_MIN_RANK)
        return torch.bfloat16 if bf16 and dtype in (torch.float32, torch.float64) else dtype
