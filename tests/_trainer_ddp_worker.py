"""The two-process side of tests/test_trainer.py's DDP case: the Trainer on 2 gloo ranks."""
from __future__ import annotations

import os

import torch

from _distributed_worker import spawn  # noqa: F401  (the test starts this module's run with it)


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    # The environment torchrun would set: the Trainer (accelerate) initialises the group.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import test_trainer as t
    from transformers import Trainer

    results = {}
    for optim in ("lowrank_galore_adamw", "lowrank_galore_adamw_layerwise"):
        args = t.layerwise_args(os.path.join(out_dir, optim), optim, ddp_backend="gloo", per_device_train_batch_size=2,
                                save_strategy="no")
        trainer = Trainer(model=t.tiny_model(), args=args, train_dataset=t.TokenData(n=20))
        trainer.train()
        optimizer = t.unwrapped(trainer)
        results[optim] = {
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "wrapper": type(trainer.model_wrapped).__name__,
            "stepped_by_ddp": len(optimizer._ddp_params),
            "grads_left": sum(p.grad is not None for p in trainer.model.parameters()),
        }
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
