"""The keyword descriptions every optimizer class shares, written once.

A class docstring lists under ``Args:`` only the keywords it describes its own way;
:func:`complete_args` (run for every class by ``LowRankOptimizer.__init_subclass__``)
fills in the others from :data:`SHARED_ARGS`, in the order of the constructor's
signature, so ``help()`` shows every keyword without twelve copies of the same lines.
"""
from __future__ import annotations

import re

#: Keyword -> its ``Args:`` entry (8-space indented, continuation lines 12).
SHARED_ARGS: dict[str, str] = {
    'params': (
        '        params: parameters or param groups (dicts); a group may override any keyword below\n'
        '            except the four of the optimizer as a whole (``layerwise``, ``accumulation_steps``,\n'
        '            ``max_grad_norm``, ``foreach``).\n'
    ),
    'lr': (
        '        lr: η, the learning rate (default 1e-3).\n'
    ),
    'betas': (
        '        betas: (β1, β2), the decay rates of the moments (default (0.9, 0.999)).\n'
    ),
    'eps': (
        '        eps: ε (default 1e-8).\n'
    ),
    'weight_decay': (
        "        weight_decay: λ, decoupled (default 1e-2; all four are ``torch.optim.AdamW``'s defaults).\n"
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
        '            default 200).\n'
    ),
    'scale': (
        "        scale: α, multiplies the projected-back update (default 0.25, the paper's).\n"
    ),
    'proj_type': (
        '        proj_type: the side of the basis: ``"std"`` (the shorter side, default), ``"reverse_std"``,\n'
        '            ``"left"``, ``"right"`` or ``"full"`` (both sides, an r x r state).\n'
    ),
    'projector': (
        '        projector: how P is computed (default ``"rsvd"``): ``"svd"`` (exact), ``"rsvd"``\n'
        '            (randomized), ``"random"``, ``"gaussian"``, ``"dct"``, ``"columns"``, ``"rows"``,\n'
        '            ``"entries"``, ``"blocks"`` or any name given to ``register_projector``.\n'
    ),
    'projector_args': (
        '        projector_args: the projector\'s own options, e.g. ``{"oversample": 8}`` for ``"rsvd"``.\n'
    ),
    'on_refresh': (
        '        on_refresh: the moments when the basis changes (default ``"keep"``): ``"keep"``,\n'
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
        '        accumulation_steps: in layer-wise mode, backward passes per optimizer step (default 1).\n'
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
        '            (default 4096).\n'
    ),
    'scaling': (
        '        scaling: ``"column"`` (one factor per channel of the kept side; needs a one-sided\n'
        '            ``proj_type``, default) or ``"matrix"`` (one Frobenius ratio).\n'
    ),
    'norm_growth_limit': (
        '        norm_growth_limit: γ ≥ 1, the largest growth of ‖S‖ from one step to the next (default\n'
        '            1.01); None disables the limiter.\n'
    ),
    'reference_compat': (
        "        reference_compat: ``apollo_torch``'s arithmetic (its limiter, α after it; default False).\n"
    ),
}


def complete_args(doc: str | None, keywords: list[str]) -> str | None:
    """``doc`` with its ``Args:`` block holding an entry for each of ``keywords``, in that
    order: the docstring's own entry where it has one, else the shared one (re-indented to
    the docstring's own indentation).  A keyword described nowhere is a ``TypeError``."""
    match = re.search(r"^( *)Args:\n", doc or "", re.M)
    if match is None:
        return doc
    indent = match.group(1)
    entry, more = indent + " " * 4, indent + " " * 8
    head, rest = doc[: match.end()], doc[match.end() :]
    own: dict[str, str] = {}
    lines = rest.split("\n")
    end, key = len(lines), None
    for index, line in enumerate(lines):
        found = re.match(rf"^{entry}(\w+): ", line)
        if found:
            key = found.group(1)
            own[key] = line + "\n"
        elif key is not None and line.startswith(more):
            own[key] += line + "\n"
        else:
            end = index
            break
    missing = [k for k in keywords if k not in own and k not in SHARED_ARGS]
    if missing:
        raise TypeError(f"no description of keyword(s) {missing} in the docstring or in SHARED_ARGS")

    def shared(key: str) -> str:
        text = SHARED_ARGS[key].replace("\n" + " " * 12, "\n" + more)
        return entry + text[8:]

    block = "".join(own.get(k) or shared(k) for k in keywords)
    extra = "".join(v for k, v in own.items() if k not in keywords)  # documented, not a keyword: kept
    return head + block + extra + "\n".join(lines[end:])
