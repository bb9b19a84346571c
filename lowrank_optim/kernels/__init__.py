"""Kernels behind the ``torch.ops.lowrank_optim`` ops: ``reference`` holds the default
pure-PyTorch ones (also the test oracle); compiled device kernels override them per device."""
