"""The keyword descriptions every optimizer class shares, written once.

A class docstring lists under ``Args:`` only the keywords it describes its own way;
:func:`complete_args` (run for every class by ``LowRankOptimizer.__init_subclass__``) fills
in the others, in the order of the constructor's signature: from the nearest base class that
describes the keyword, else from :data:`SHARED_ARGS`.  ``{default}`` in an entry becomes the
class's own default, so ``help()`` shows every keyword with the right default without a copy
of the same lines per class.
"""
from __future__ import annotations

import re
from typing import Any

#: Keyword -> its ``Args:`` entry (8-space indented, continuation lines 12).
SHARED_ARGS: dict[str, str] = {
    'params': (
        '        params: parameters or param groups (dicts); a group may override any keyword below\n'
        '            except the four of the optimizer as a whole (``layerwise``, ``accumulation_steps``,\n'
        '            ``max_grad_norm``, ``foreach``).\n'
    ),
    'lr': (
        '        lr: η, the learning rate (default {default}).\n'
    ),
    'betas': (
        '        betas: (β1, β2), the decay rates of the moments (default (0.9, 0.999)).\n'
    ),
    'eps': (
        '        eps: ε (default {default}).\n'
    ),
    'weight_decay': (
        '        weight_decay: λ, decoupled (default {default}).\n'
    ),
    'eps_style': (
        '        eps_style: ``"torch"`` (ε added to √V̂, as ``torch.optim.AdamW``) or ``"hf"`` (ε added to\n'
        '            √V, the bias corrections folded into the step size, as ``galore_torch``).\n'
    ),
    'rank': (
        '        rank: r, the rank of every group that sets neither ``rank`` nor ``density`` (default None:\n'
        '            such a group is dense); at most min(m, n) of every matrix in its group.\n'
    ),
    'density': (
        "        density: instead of ``rank``: this fraction of each matrix's projected side.\n"
    ),
    'update_proj_gap': (
        '        update_proj_gap: T, steps between refreshes of the subspace (at steps 0, T, 2T, ...;\n'
        '            default {default}).\n'
    ),
    'scale': (
        '        scale: α, multiplies the projected-back update (default {default}).\n'
    ),
    'proj_type': (
        '        proj_type: the side of the basis: ``"std"`` (the shorter side, default), ``"reverse_std"``,\n'
        '            ``"left"``, ``"right"`` or ``"full"`` (both sides, an r x r state).\n'
    ),
    'projector': (
        '        projector: how P is computed (default {default}): ``"svd"`` (exact), ``"rsvd"``\n'
        '            (randomized), ``"random"``, ``"gaussian"``, ``"dct"``, ``"columns"``, ``"rows"``,\n'
        '            ``"entries"``, ``"blocks"`` or any name given to ``register_projector``.\n'
    ),
    'projector_args': (
        '        projector_args: the projector\'s own options, e.g. ``{"oversample": 8}`` for ``"rsvd"``.\n'
    ),
    'on_refresh': (
        '        on_refresh: the moments when the basis changes (default {default}): ``"keep"``,\n'
        '            ``"reset"`` (zeroed, bias correction restarted) or ``"project"`` (re-expressed in the\n'
        '            new basis).\n'
    ),
    'decay_after_update': (
        "        decay_after_update: True applies the decay after the update (``galore_torch``'s order).\n"
    ),
    'seed': (
        '        seed: base seed of the randomized projectors (the same on every data-parallel rank).\n'
    ),
    'layerwise': (
        '        layerwise: step each parameter inside backward, as soon as its gradient is complete, and\n'
        '            free that gradient (docs/guide.md#layer-wise-mode).\n'
    ),
    'accumulation_steps': (
        '        accumulation_steps: in layer-wise mode, backward passes per optimizer step (default {default}).\n'
    ),
    'max_grad_norm': (
        "        max_grad_norm: in layer-wise mode, clip each parameter's gradient to this norm (None: no\n"
        '            clipping).\n'
    ),
    'foreach': (
        "        foreach: None (default) or True steps a group's parameters together with foreach kernels,\n"
        '            False one at a time (the same arithmetic).\n'
    ),
    'min_8bit_size': (
        '        min_8bit_size: tensors with fewer elements keep fp32 moments, as in bitsandbytes\n'
        '            (default {default}).\n'
    ),
}

_ARGS = re.compile(r"^( *)Args:\n", re.M)


def own_args(doc: str | None) -> dict[str, str]:
    """The ``Args:`` entries ``doc`` writes itself, keyword -> text (8/12-space indented)."""
    match = _ARGS.search(doc or "")
    if match is None:
        return {}
    entry, more = match.group(1) + " " * 4, match.group(1) + " " * 8
    own: dict[str, str] = {}
    key = None
    for line in doc[match.end() :].split("\n"):
        found = re.match(rf"^{entry}(\w+): ", line)
        if found:
            key = found.group(1)
            own[key] = " " * 8 + line[len(entry) :] + "\n"
        elif key is not None and line.startswith(more):
            own[key] += " " * 12 + line[len(more) :] + "\n"
        else:
            break
    return own


def complete_args(doc: str | None, defaults: dict[str, Any], inherited: list[dict[str, str]]) -> str | None:
    """``doc`` with its ``Args:`` block holding an entry for ``params`` and each keyword of
    ``defaults``, in that order: the docstring's own, else the first of ``inherited`` (the
    base classes' own entries, nearest first) that has one, else the shared one; re-indented
    to the docstring's indentation.  A keyword described nowhere is a ``TypeError``."""
    match = _ARGS.search(doc or "")
    if match is None:
        return doc
    own = own_args(doc)
    sources = [own, *inherited, SHARED_ARGS]
    keywords = ["params", *defaults]
    missing = [k for k in keywords if not any(k in source for source in sources)]
    if missing:
        raise TypeError(f"no description of keyword(s) {missing} in the docstring or in SHARED_ARGS")
    indent = match.group(1)

    def entry(key: str) -> str:
        text = next(source[key] for source in sources if key in source)
        if key in defaults:
            text = text.replace("{default}", _shown(defaults[key]))
        return "".join(
            (indent + line[4:] if line.startswith(" " * 8) else line) for line in text.splitlines(keepends=True)
        )

    block = "".join(entry(k) for k in keywords)
    extra = "".join(entry(k) for k in own if k not in keywords)  # documented, not a keyword: kept
    written = sum(text.count("\n") for text in own.values())  # the lines of the own entries
    return doc[: match.end()] + block + extra + "\n".join(doc[match.end() :].split("\n")[written:])


def _shown(value: Any) -> str:
    """A default as the docstrings write it: ``"rsvd"``, 0.25, 1e-08, 11.3137, None."""
    if isinstance(value, str):
        return f'``"{value}"``'
    if isinstance(value, float):
        text = repr(value)
        return text if len(text) <= 8 else f"{value:.6g}"  # √128, not its 17 digits
    return repr(value)
