"""Expert parallelism inside Lightning: DDP with every MoE layer's experts sharded over EP groups.

``--set devices=N strategy=ddp expert_parallel=M`` (or ``ddp_spawn``; ``num_nodes`` and the
usual torchrun/SLURM environment as for DDP). The communication itself is in
``bench/models/expert_parallel.py``; this strategy only decides *when*:

- setup: EP and replica groups are made, each rank keeps its shard, and DDP is told to leave the
  shards alone (it still averages every replicated parameter);
- each optimizer step: shard gradients are reduced over their replicas before clipping
  (``BenchModule.configure_gradient_clipping`` then clips by the norm over all shards);
- checkpoints: model and optimizer state hold every expert (gathered), and a sharded run loads
  its slice of them, so a run resumes under another EP size (or none);
- end of training: experts are gathered back on every rank, so the final evaluation and the saved
  model are those of a plain run.
"""
from __future__ import annotations

from typing import Any, Callable

from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from bench.models.expert_parallel import (expert_parameter_names, full_optimizer_state, full_state_dict,
                                          local_optimizer_state, new_expert_shards, shard_experts,
                                          sync_expert_grads, unshard_experts)


class ExpertParallelStrategy(DDPStrategy):
    def __init__(self, expert_parallel: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.expert_parallel = expert_parallel
        self.shard = None

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self.shard = new_expert_shards(self.expert_parallel)

    def _setup_model(self, model):
        if self.shard is not None and not expert_parameter_names(model):
            shard_experts(model, self.shard)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
        return super()._setup_model(model)

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        def closure_then_sync():
            result = closure()  # forward + backward; clipping and the step come after this returns
            sync_expert_grads(self.lightning_module)
            return result

        return super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return full_state_dict(self.lightning_module, super().lightning_module_state_dict())

    def optimizer_state(self, optimizer) -> dict:
        return full_optimizer_state(self.lightning_module, getattr(optimizer, "_optimizer", optimizer))

    def load_optimizer_state_dict(self, checkpoint) -> None:
        states = [local_optimizer_state(self.lightning_module, opt, state)
                  for opt, state in zip(self.optimizers, checkpoint["optimizer_states"])]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})

    def on_train_end(self) -> None:
        unshard_experts(self.lightning_module)
        super().on_train_end()


__all__ = ["ExpertParallelStrategy"]
