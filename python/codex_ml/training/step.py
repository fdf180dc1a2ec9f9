"""One optimizer step: grad_accum_steps micro-batches forward and backward, then clip and update."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from codex_ml.training.config import TrainerConfig
from codex_ml.training.optim import LRSchedule
from codex_ml.training.setup import ProcessInfo

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepOutcome:
    loss: float  # the mean over micro-batches (and processes)
    grad_norm: float  # before clipping
    finite: bool  # False: the update was skipped
    lr: float
    tokens_per_s: float = 0.0  # timed by the caller


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated transformer blocks, the unit of FSDP sharding and of activation checkpointing: the
    native GPT's `blocks`, a Hugging Face model's decoder `layers` (`h` in GPT-2 style models); [] if none."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in ("blocks", "layers",
                                                                                                  "h"):
            return list(module)
    return []


def checkpoint_activations(model: torch.nn.Module) -> int:
    """Makes each transformer block recompute its activations in the backward pass instead of keeping them
    (torch.utils.checkpoint, non-reentrant, RNG preserved: dropout draws the same masks again). The block's own
    forward is wrapped, so parameter names and FSDP's per-block hooks are unchanged. Returns the number of blocks."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation and generation: nothing to recompute
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def shard_model(model: torch.nn.Module, config: TrainerConfig, process: ProcessInfo) -> None:
    """FSDP2 (torch.distributed.fsdp.fully_shard) in place: each transformer block, then the root (embeddings, final
    norm, head), sharded over all processes. A block's parameters are all-gathered just before its forward and
    freed after it (and again for the backward; the last block's stay gathered in between), so each process holds
    1/N of the parameters, gradients and optimizer state plus one block at a time. Parameters that do not train (a
    LoRA base) are sharded too. On the CPU the collectives are gloo_fsdp's.

    Mixed precision (bf16 parameters in compute, fp32 gradient reduction) where precision = 'bf16' on a GPU that
    has bf16; on the CPU, bf16 comes from autocast as without FSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from codex_ml.training.gloo_fsdp import GlooAllGather, GlooReduceScatter

    device = process.device
    mesh = init_device_mesh(device.type, (process.world_size,))
    bf16 = config.precision == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if config.fsdp_cpu_offload else OffloadPolicy()
    blocks = transformer_blocks(model)
    for block in blocks:
        # The last block's backward follows its forward at once: gathering its parameters again would be wasted.
        fully_shard(block, mesh=mesh, mp_policy=mixed, offload_policy=offload,
                    reshard_after_forward=block is not blocks[-1])
    fully_shard(model, mesh=mesh, mp_policy=mixed, offload_policy=offload)
    if device.type == "cpu":  # gloo: collectives that avoid its slow reduce-scatter and reuse their buffers
        all_gather, reduce_scatter = GlooAllGather(), GlooReduceScatter()
        for module in [*blocks, model]:
            module.set_custom_all_gather(all_gather)
            module.set_custom_reduce_scatter(reduce_scatter)


def data_parallel(model: torch.nn.Module, config: TrainerConfig, process: ProcessInfo) -> torch.nn.Module | None:
    """Prepares the model for training across processes; call it before the optimizer is built (FSDP replaces the
    parameters). With config.activation_checkpointing the blocks recompute their activations (any process count).

    parallelism 'ddp': returns the model wrapped in DistributedDataParallel (each process keeps a full copy and
    gradients are averaged). 'fsdp': shards the model in place (shard_model) and returns None, as for a single
    process."""
    if config.activation_checkpointing:
        checkpoint_activations(model)
    if process.world_size == 1:
        return None
    if config.parallelism == "fsdp":
        shard_model(model, config, process)
        return None
    from torch.nn.parallel import DistributedDataParallel

    device = process.device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `model` was sharded by shard_model (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clips the gradients of `params` to a global L2 norm of `max_norm`; returns the norm before clipping. Under
    FSDP the gradients are shards (DTensors): the norm is that of the whole gradient, over all processes, the same
    on each (so every process takes the same decision on a non-finite norm)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class TrainStep:
    """The model as the step runs it (DDP-wrapped or FSDP-sharded under torchrun, torch.compile'd if asked), its
    optimizer, schedule and fp16 loss scaler. `model` stays the module checkpoints save (sharded under FSDP);
    `ddp` is what data_parallel(model, ...) returned, before the optimizer was built."""

    def __init__(self, config: TrainerConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: LRSchedule, process: ProcessInfo, ddp: torch.nn.Module | None = None):
        self.config, self.optimizer, self.schedule, self.process = config, optimizer, schedule, process
        self.model = model
        self.autocast_dtype = AUTOCAST_DTYPES[config.precision]
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.ddp = ddp
        self.sharded = is_sharded(model)
        step_model = self.ddp if self.ddp is not None else model
        self.step_model = torch.compile(step_model) if config.compile else step_model

    def __call__(self, step: int, batches: Iterator[dict[str, Any]]) -> StepOutcome:
        """Optimizer step `step` (0-based) over the next grad_accum_steps batches.

        A non-finite loss or gradient norm skips the update (with fp16 the loss scaler itself skips
        updates whose gradients overflowed, so only the loss is checked then)."""
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self._forward_backward(batches)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.clip_grad_norm if self.config.clip_grad_norm else math.inf
        grad_norm = clip_grad_norm(params, max_norm) if params else torch.zeros(())
        loss_value, norm_value = loss.item(), float(grad_norm)
        finite = math.isfinite(loss_value) and (self.scaler is not None or math.isfinite(norm_value))
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss_value, norm_value, finite, lr)

    def _forward_backward(self, batches: Iterator[dict[str, Any]]) -> torch.Tensor:
        """Accumulates the gradients of grad_accum_steps micro-batches (DDP and FSDP reduce gradients on the last
        one only); returns the mean loss over them and over processes."""
        accum, device = self.config.grad_accum_steps, self.process.device
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next(batches)
            inputs = batch["input_ids"].to(device, non_blocking=True)
            targets = batch["targets"].to(device, non_blocking=True)
            last = micro == accum - 1
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    _, loss = self.step_model(inputs, targets)
                scaled = loss.float() / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        mean_loss = loss_sum / accum
        if self.process.world_size > 1:
            dist.all_reduce(mean_loss)  # A sum: gloo has no average.
            mean_loss /= self.process.world_size
        return mean_loss
