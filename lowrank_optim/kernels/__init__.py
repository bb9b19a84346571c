"""Kernels behind the ``torch.ops.lowrank_optim`` ops.

- ``reference``: the default pure-PyTorch kernels, registered for every device (also the
  test oracle);
- ``extension``: loads the compiled CUDA extension ``lowrank_optim._C`` (``csrc/``), whose
  kernels override the defaults for CUDA tensors; warns once and falls back when it cannot;
- ``triton_int4``: an optional Triton kernel of the fused INT4 projection (needs ``triton``;
  not registered unless asked for).

The dispatch model, build modes and environment variables are in docs/kernels.md.
"""
