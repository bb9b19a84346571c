"""Kernels behind the ``torch.ops.lowrank_optim`` ops.

- ``reference``: the default pure-PyTorch kernels, registered for every device (also the
  test oracle);
- ``int4``: the INT4-stored basis record (``Int4Basis``) and, for CUDA tensors, the measured
  choice between the fused INT4 product and dequantize + matmul;
- ``extension``: loads the compiled CUDA extension ``lowrank_optim._C`` (``csrc/``), whose
  kernels override the defaults for CUDA tensors; warns once and falls back when it cannot;
- ``toolkit``: where a build finds cuBLAS/cuSOLVER/cuSPARSE (the toolkit, else torch's
  NVIDIA wheels), for setup.py and ``extension.build_jit``;
- ``triton_int4``: an optional Triton kernel of the fused INT4 products (needs ``triton``;
  not registered unless asked for).

The dispatch model, build modes and environment variables are in docs/kernels.md.
"""
