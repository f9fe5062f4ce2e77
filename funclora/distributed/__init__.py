"""Multi-process adapter training on ``torch.distributed``: data parallel and FSDP2-sharded bases.

funclora brings no runtime of its own. Launch with ``torchrun``, call
``torch.distributed.init_process_group``, then pick one of:

* **the helper**: every rank holds the frozen base and the same adapter; after the backward
  (or ``torch.func.grad``), :func:`all_reduce_grads` averages the adapter's gradients across
  ranks in one flattened bucket. Only the adapter is communicated.
* **DDP over the façade**: ``DistributedDataParallel(fl.get_peft_model(model, config))``. The
  façade's parameters are the adapter alone (the base model is not a registered submodule), so
  DDP broadcasts and all-reduces exactly the adapter.
* **FSDP2 base**: ``fully_shard`` the base model's blocks and the model; ``lora(adapter, x)``
  then applies the replicated adapter to each unit's all-gathered weights (see
  :func:`funclora.distributed.fsdp.sharded_forward`), and :func:`all_reduce_grads` averages the adapter's gradients.

Example (inside a process group):
    >>> import torch, funclora as fl
    >>> from funclora.distributed import all_reduce_grads
    >>> def step(lora, adapter, optimizer, x, y):
    ...     loss = torch.nn.functional.nll_loss(lora(adapter, x), y)
    ...     optimizer.zero_grad()
    ...     loss.backward()
    ...     all_reduce_grads(adapter)     # every rank now holds the mean gradient
    ...     optimizer.step()
    ...     return loss
"""

from __future__ import annotations

from .collectives import all_reduce_grads, broadcast_adapter
from .fsdp import fsdp_units, sharded_forward

__all__ = ["all_reduce_grads", "broadcast_adapter", "fsdp_units", "sharded_forward"]
