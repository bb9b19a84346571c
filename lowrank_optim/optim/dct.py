r"""DCT-AdamW: GaLore's Adam on a DCT subspace, SVD-free (Modoranu et al. 2025,
"SVD-free low-rank adaptive gradient optimization for large language models",
arXiv:2505.17967, first posted as "FFT-based dynamic subspace selection for low-rank
adaptive optimization of large language models"; docs/methods/dct.md#update-rule).

For a weight W (m x n, right side shown; the shorter side by GaLore's ``std`` rule) with
C the orthonormal n x n DCT-II matrix, every ``update_proj_gap`` = T steps

.. math::
    S = G_t C,\qquad I = \operatorname{top-}r_i \lVert S_{:,i}\rVert_2,

and between refreshes, with :math:`C_I` the r selected columns,

.. math::
    R_t = G_t C_I,\quad
    M_t = \beta_1 M_{t-1} + (1-\beta_1) R_t,\quad
    V_t = \beta_2 V_{t-1} + (1-\beta_2) R_t^2,

.. math::
    W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\,
          \frac{\hat M_t}{\sqrt{\hat V_t} + \epsilon}\, C_I^\top .

When a refresh changes I, the columns of M and V whose index survives carry over and
those of new indices start at zero (``on_refresh="project"`` with the projector's index
map: no matmul).  Decay is applied before the update, as in the reference.  The state per
matrix is r integers and two m x r moments; C is shared by all matrices of its size.

Differences from the reference implementation:

- the score is the ℓ2 norm, which minimises :math:`\lVert G - G C_I C_I^\top\rVert_F`
  exactly over all r-subsets (the reference uses ℓ1: ``projector_args={"norm": "l1"}``);
- one cached basis per (size, device, dtype) instead of one sized from the first matrix,
  so models whose projected matrices have different sizes work;
- bf16 models work: scores are computed in fp32 (the FFT path casts, having no bf16
  kernel), the projection runs in the gradient's dtype.

The similarity S is computed by FFT (Makhoul's algorithm) by default, which took about a
third of the time of the product with C on CPU at n = 2048 (bench/bench_dct.py); ``projector_args={"transform":
"matmul"}`` selects the product (the same indices up to ties within fp32 rounding).

Any other optimizer takes the same subspace with ``projector="dct"`` (e.g.
``GaLoreAdamW(..., projector="dct", on_refresh="project")``).
"""
from __future__ import annotations

from .galore import GaLoreAdamW


class DCTAdamW(GaLoreAdamW):
    """DCT-AdamW: GaLore's Adam on a subspace of DCT-II vectors, with no SVD (Modoranu et al., 2025).

    Update rule, for a weight W (m x n; right side shown, the shorter one by ``std``) with C
    the orthonormal n x n DCT-II matrix: every T steps

        I = the r indices i with the largest ‖(G C)_{:,i}‖,   C_I = those r columns of C,

    and at each step GaLore's rule with C_Iᵀ as the basis:

        R = G C_I,   M ← β1 M + (1 − β1) R,   V ← β2 V + (1 − β2) R²,
        W ← W (1 − ηλ) − η α M̂ / (√V̂ + ε) C_Iᵀ.

    The state per matrix is r integers and two m x r moments; C is shared by every matrix of
    its size.  A refresh keeps the moments of the surviving indices and starts new ones at
    zero (``on_refresh="project"``).
    A group without ``rank`` (or ``density``) is plain AdamW, ``torch.optim.AdamW``
    to the bit.
    Page: docs/methods/dct.md#update-rule.

    Args:
        projector: default ``"dct"``; any other name as in ``GaLoreAdamW``.  The DCT's options go in
            ``projector_args``: ``norm`` (``"l2"`` or ``"l1"``) and ``transform``
            (``"fft"`` or ``"matmul"``).
    """

    method_defaults = {**GaLoreAdamW.method_defaults, "projector": "dct", "on_refresh": "project"}
