"""One optimizer step: grad_accum_steps micro-batches forward and backward, then clip and update."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

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


def data_parallel(model: torch.nn.Module, process: ProcessInfo) -> torch.nn.Module | None:
    """The model wrapped for training across processes (DistributedDataParallel: each process keeps a full copy and
    gradients are averaged), or None for a single process."""
    if process.world_size == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    device = process.device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class TrainStep:
    """The model as the step runs it (DDP-wrapped under torchrun, torch.compile'd if asked), its optimizer,
    schedule and fp16 loss scaler. `model` stays the plain module: it is what checkpoints save."""

    def __init__(self, config: TrainerConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: LRSchedule, process: ProcessInfo):
        self.config, self.optimizer, self.schedule, self.process = config, optimizer, schedule, process
        self.model = model
        self.autocast_dtype = AUTOCAST_DTYPES[config.precision]
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.ddp = data_parallel(model, process)
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
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
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
        """Accumulates the gradients of grad_accum_steps micro-batches (DDP syncs on the last one only); returns
        the mean loss over them and over processes."""
        accum, device = self.config.grad_accum_steps, self.process.device
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next(batches)
            inputs = batch["input_ids"].to(device, non_blocking=True)
            targets = batch["targets"].to(device, non_blocking=True)
            last = micro == accum - 1
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
