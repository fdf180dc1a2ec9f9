"""The Trainer: assembles model, data, optimizer, checkpoints and reporting from a TrainerConfig, and runs the
training loop."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from codex_ml.checkpoint import (
    CheckpointError,
    CheckpointManager,
    latest_valid_checkpoint,
    load_model_state,
    load_state_file,
)
from codex_ml.checkpoint.sharded import is_sharded_checkpoint, load_sharded_state
from codex_ml.data import DataError
from codex_ml.eval import evaluate
from codex_ml.training.config import ConfigError, TrainerConfig
from codex_ml.training.optim import build_optimizer
from codex_ml.training.reporting import Reporter
from codex_ml.training.resume import check_compatible, reshard_data_state, resolve_resume, resume_state
from codex_ml.training.run_dir import run_dir_lock
from codex_ml.training.setup import (
    ProcessInfo,
    is_collective_failure,
    peak_memory_mb,
    process_group_failure,
    rng_state,
    seed_everything,
    set_rng_state,
)
from codex_ml.training.signals import GracefulStop
from codex_ml.training.step import StepOutcome, TrainStep, data_parallel


@dataclass
class TrainResult:
    """What a call to Trainer.fit() achieved."""

    status: str  # "finished", "interrupted" (signal) or "stopped_nonfinite"
    step: int
    tokens: int
    train_losses: dict[int, float] = field(default_factory=dict)  # step -> loss, for the steps run in this call
    val_metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None


class Trainer:
    """Trains a causal language model: forward(input_ids, targets) -> (logits, loss).

    `data` provides `batches(split, *, batch_size, seq_len, seed, rank, world_size)`, iterators of
    {"input_ids", "targets"} (int64 [B, T]) with state_dict()/load_state_dict(), and optionally a
    `tokenizer` (sha256, model_path). `process` comes from setup_process(config).

    Run directory: operative_config.gin, metrics.ndjson, metrics.csv, mlflow.db and
    checkpoints/step_XXXXXXXX/ (see codex_ml.checkpoint). Only rank 0 writes there, holding the directory's lock
    (training/run_dir.py) for the whole of fit(): a second live run on the same directory is refused.
    """

    def __init__(self, config: TrainerConfig, *, model: torch.nn.Module, data: Any, run_dir: str | os.PathLike,
                 process: ProcessInfo, operative_config: str | Callable[[], str] = "",
                 model_config: dict[str, Any] | None = None):
        _check_model_fits(config, model)
        self.config, self.process, self.data, self.run_dir = config, process, data, Path(run_dir)
        self.operative_config = operative_config  # the gin text, or a function that returns it
        flops_fn = getattr(model, "flops_per_token", None)
        self.report = Reporter(config, process, self.run_dir,
                               float(flops_fn(config.seq_len)) if callable(flops_fn) else None, data=data)
        self.eval_batches = config.eval_batches  # at most the val split's batches: a wrap would count some twice
        if config.eval_batches > 0:
            self._check_val_split()
        self.model = model.to(process.device)
        self.model_config = model_config if model_config is not None else _model_config_of(model)
        ddp = data_parallel(model, config, process)  # before the optimizer: FSDP replaces the parameters
        self.optimizer = build_optimizer(model, config.optimizer, learning_rate=config.learning_rate,
                                         weight_decay=config.weight_decay, betas=config.betas,
                                         momentum=config.momentum)
        self.train_step = TrainStep(config, model, self.optimizer, config.lr_schedule(), process, ddp)
        self.sharded_checkpoints = config.parallelism == "fsdp"  # at any process count: they reshard
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=config.keep_last, keep_best=config.keep_best)
        tokenizer = getattr(data, "tokenizer", None)
        self.tokenizer_sha256 = getattr(tokenizer, "sha256", None)
        self.tokenizer_path = getattr(tokenizer, "model_path", None)
        self.step = 0
        self.tokens = 0
        self.best_val_loss = math.inf
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0  # skipped updates in a row (checkpointed: a resume does not reset it)

    def _check_val_split(self) -> None:
        """Found now rather than at the first evaluation, after the training it would lose."""
        try:
            batches = self._batches("val")
            next(iter(batches))
        except (DataError, StopIteration) as e:
            reason = str(e) or "the val split gives no batch"
            raise DataError(f"Evaluation is on (Trainer.eval_batches = {self.config.eval_batches}) but {reason}; or "
                            "give the val split a larger share (prepare_data.splits), or set Trainer.eval_batches = "
                            "0 to train without evaluation.") from e
        available = getattr(batches, "batches_per_epoch", None)  # an iterator that wraps into another epoch
        if available is not None and available < self.eval_batches:
            self._say(f"Note: Trainer.eval_batches = {self.eval_batches} but the val split holds {available} "
                      f"batch(es) of this size: evaluating on those {available}, each once.")
            self.eval_batches = available

    # ------------------------------------------------------------------------------------------- the run
    def fit(self, resume: str | os.PathLike | None = "auto") -> TrainResult:
        """Trains up to max_steps. `resume`: "auto" (newest valid checkpoint in run_dir, if any), "never", or a
        checkpoint path; neither starts afresh over checkpoints already in run_dir (a refusal changes nothing
        there). Returns when done, on SIGTERM/SIGINT (after a checkpoint), or on a non-finite loss with
        nan_policy="stop" (the last good checkpoint stays the newest)."""
        with run_dir_lock(self.run_dir, self.process):  # refused (RunDirLocked) while another run trains there
            seed_everything(self.config.seed + self.process.rank)
            train_iter = self._batches("train")
            if self.process.is_main:  # a complete checkpoint moved aside by an interrupted re-save goes back first
                self.checkpoints.remove_stale_temporaries()
            checkpoint = resolve_resume(resume, self.run_dir, self.process, self._say)
            changes = self._load_checkpoint(checkpoint, train_iter) if checkpoint is not None else []
            # Only once the resume is accepted is anything written: a refusal leaves the run directory as it was.
            self.report.open(self._config_text(), start_step=self.step)
            if checkpoint is not None:
                self.report.resumed(self.step, checkpoint, changes)
            status = "failed"
            try:
                result = self._loop(train_iter)
                status = result.status
                return result
            except RuntimeError as e:
                if self.process.world_size == 1 or not is_collective_failure(e):
                    raise
                raise process_group_failure(e, self.process, self.run_dir) from e
            finally:
                self.report.close(status)

    def _loop(self, train_iter: Any) -> TrainResult:
        result = TrainResult(status="finished", step=self.step, tokens=self.tokens)
        self.report.start_progress(self.step)
        self.model.train()
        with GracefulStop(report=self._say) as stop:
            while self.step < self.config.max_steps:
                outcome = self._run_step(train_iter)
                if not outcome.finite and self._stop_for_nonfinite(outcome):
                    result.status = "stopped_nonfinite"
                    break
                result.train_losses[self.step] = outcome.loss
                # Every process's peak memory, with the system metrics: what sharding saves is seen per process.
                memory = (self._gather(peak_memory_mb(self.process.device))
                          if self._due(self.config.system_metrics_every) else None)
                self.report.train(self.step, self.tokens, outcome, memory)
                done = self.step >= self.config.max_steps
                interrupted = self._any_rank(stop.requested)
                val_loss = self._evaluate_if_due(done, result)
                if done or interrupted or self._due(self.config.checkpoint_every):
                    result.last_checkpoint = self.save_checkpoint(train_iter, val_loss)
                if interrupted and not done:  # a signal during the last step: the run is complete all the same
                    self._stop_for_signal(result.last_checkpoint)
                    result.status = "interrupted"
                    break
        result.step, result.tokens = self.step, self.tokens
        return result

    # --------------------------------------------------------------------------------- the loop's steps
    def _run_step(self, train_iter: Any) -> StepOutcome:
        """One optimizer step, counted (tokens, non-finite steps in a row)."""
        started = time.perf_counter()
        outcome = self.train_step(self.step, train_iter)
        tokens_per_step = self.config.batch_size * self.config.seq_len * self.config.grad_accum_steps
        outcome.tokens_per_s = tokens_per_step / max(time.perf_counter() - started, 1e-9)
        self.step += 1
        self.tokens += tokens_per_step
        if outcome.finite:
            self.consecutive_nonfinite = 0
        else:
            self.nonfinite_skipped += 1
            self.consecutive_nonfinite += 1
        return outcome

    def _stop_for_nonfinite(self, outcome: StepOutcome) -> bool:
        """nan_policy: whether a non-finite step ends the run ("stop", or too many skipped in a row) or is skipped."""
        message = f"step {self.step}: non-finite loss {outcome.loss} / grad norm {outcome.grad_norm}"
        policy = self.config.nan_policy
        if policy == "stop" or self.consecutive_nonfinite > self.config.max_consecutive_nonfinite:
            last_good = latest_valid_checkpoint(self.run_dir) if self.process.is_main else ""
            self._say(f"{message}: stopping (nan_policy={policy!r}); the last good checkpoint is {last_good}.")
            self.report.event(self.step, "nonfinite_stop", message)
            return True
        self._say(f"{message}: update skipped ({self.nonfinite_skipped} so far).")
        self.report.event(self.step, "nonfinite_skip", message)
        return False

    def _evaluate_if_due(self, done: bool, result: TrainResult) -> float | None:
        """Validation at every eval_every steps and at the end; returns the validation loss if it ran."""
        if self.config.eval_batches == 0 or not (done or self._due(self.config.eval_every)):
            return None
        result.val_metrics = self.evaluate()
        val_loss = result.val_metrics.get("loss")
        if val_loss is not None and val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
        self.report.validation(self.step, result.val_metrics)
        return val_loss

    def _stop_for_signal(self, checkpoint: Path | None) -> None:
        self._say(f"Stopped by signal after step {self.step}; checkpoint {checkpoint}. "
                  "Run the same command again to resume.")
        self.report.event(self.step, "interrupted", checkpoint)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over `eval_batches` batches of the "val" split (the same batches every time; no more
        than the split holds)."""
        return evaluate(self.model, self._batches("val"), num_batches=self.eval_batches,
                        metrics=self.config.metrics, device=self.process.device,
                        autocast_dtype=self.train_step.autocast_dtype)

    # ----------------------------------------------------------------------------------------- helpers
    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    def _say(self, text: str) -> None:
        self.report.say(text)

    def _config_text(self) -> str:
        return self.operative_config() if callable(self.operative_config) else self.operative_config

    def _batches(self, split: str):
        world_size = self.process.world_size
        return self.data.batches(split, batch_size=self.config.batch_size // world_size, seq_len=self.config.seq_len,
                                 seed=self.config.seed, rank=self.process.rank, world_size=world_size)

    def _gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (on every rank)."""
        if self.process.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.process.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def _any_rank(self, flag: bool) -> bool:
        if self.process.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.process.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, train_iter: Any, val_loss: float | None) -> Path | None:
        """Writes a checkpoint of the current step (every rank contributes its RNG/data state). Under FSDP every
        rank writes its own shards (a sharded checkpoint); otherwise rank 0 writes the whole checkpoint."""
        rng_states = self._gather(rng_state())
        data_states = self._gather(train_iter.state_dict())
        if self.sharded_checkpoints:
            contents = self._checkpoint_contents(rng_states, data_states, val_loss)
            path = self.checkpoints.save_sharded(self.step, is_main=self.process.is_main,
                                                 sharded_state=self._sharded_state(), **contents)
            self.report.event(self.step, "checkpoint", path)
            return path
        error, path = None, None
        if self.process.is_main:
            try:
                path = self._write_checkpoint(rng_states, data_states, val_loss)
            except CheckpointError as e:
                error = str(e)
        if self.process.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise CheckpointError(error)
        self.report.event(self.step, "checkpoint", path)
        return path

    def _checkpoint_contents(self, rng_states: list, data_states: list, val_loss: float | None) -> dict[str, Any]:
        """What a checkpoint holds besides the model weights and the optimizer state."""
        world_size, scaler = self.process.world_size, self.train_step.scaler
        torch_states = {"scheduler": {"step": self.step, **self.train_step.schedule.state_dict()},
                        "rng": {"ranks": rng_states}}
        if scaler is not None:
            torch_states["scaler"] = scaler.state_dict()
        trainer_state = {"step": self.step, "tokens": self.tokens, "world_size": world_size,
                         "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
                         "nonfinite_skipped": self.nonfinite_skipped,
                         "consecutive_nonfinite": self.consecutive_nonfinite, **resume_state(self.config)}
        extra = {"tokens": self.tokens, "tokenizer_sha256": self.tokenizer_sha256, "world_size": world_size}
        if val_loss is not None and math.isfinite(val_loss):
            extra["val_loss"] = val_loss
        return dict(model_config=self.model_config, tokenizer_path=self.tokenizer_path, torch_states=torch_states,
                    json_states={"trainer_state": trainer_state, "data_state": {"ranks": data_states}},
                    operative_config=self._config_text(), manifest_extra=extra)

    def _write_checkpoint(self, rng_states: list, data_states: list, val_loss: float | None) -> Path:
        contents = self._checkpoint_contents(rng_states, data_states, val_loss)
        contents["torch_states"] = {"optimizer": self.optimizer.state_dict(), **contents["torch_states"]}
        return self.checkpoints.save(self.step, model_state=self.model.state_dict(), **contents)

    def _sharded_state(self) -> dict[str, Any]:
        """This rank's model and optimizer state keyed by parameter name (shards under FSDP): what a sharded
        checkpoint stores, and the structure a resume fills in at this run's process count."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=_state_options())
        return {"model": model_state, "optimizer": optimizer_state}

    def _load_checkpoint(self, path: Path, train_iter: Any) -> list[tuple[str, Any, Any]]:
        """Restores the run from checkpoint `path`; returns the settings changed under Trainer.allow_changed."""
        changes = check_compatible(path, now=resume_state(self.config), model_config=self.model_config,
                                   tokenizer_sha256=self.tokenizer_sha256, world_size=self.process.world_size,
                                   data_now=train_iter.state_dict(), rank=self.process.rank,
                                   allow_changed=self.config.allow_changed)
        if is_sharded_checkpoint(path):
            self._load_sharded(path)
        elif self.sharded_checkpoints and self.process.world_size > 1:
            raise ConfigError(f"Cannot resume from {path}: it was written without FSDP (Trainer.parallelism = "
                              "'ddp'), whose whole-model checkpoint a sharded run does not read. Resume it with "
                              "Trainer.parallelism = 'ddp', or start afresh in another --run_dir.")
        else:
            self._load_whole(path)
        if self.train_step.scaler is not None and (path / "scaler.pt").is_file():
            self.train_step.scaler.load_state_dict(load_state_file(path, "scaler"))
        state = load_state_file(path, "trainer_state")
        self.step, self.tokens = state["step"], state["tokens"]
        self.best_val_loss = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        self.nonfinite_skipped = state["nonfinite_skipped"]
        self.consecutive_nonfinite = state.get("consecutive_nonfinite", 0)
        data_states, rng_states = load_state_file(path, "data_state")["ranks"], load_state_file(path, "rng")["ranks"]
        rank, world_size = self.process.rank, self.process.world_size
        same_world = len(data_states) == world_size
        train_iter.load_state_dict(data_states[rank] if same_world else
                                   reshard_data_state(data_states, train_iter.state_dict()))
        if rank < len(rng_states):  # a rank new to the run (resharded onto more processes) keeps its fresh seed
            set_rng_state(rng_states[rank])
        self._say(f"Resumed from {path} at step {self.step} ({self.tokens:,} tokens).")
        if self.step >= self.config.max_steps:
            self._say(f"Nothing to train: the checkpoint is at step {self.step} and Trainer.max_steps = "
                      f"{self.config.max_steps}; raise Trainer.max_steps to train further.")
        return changes


    def _load_whole(self, path: Path) -> None:
        """The weights and optimizer state of a single-process (or DDP) checkpoint."""
        try:
            self.model.load_state_dict(load_model_state(path, self.process.device))
        except RuntimeError as e:
            raise ConfigError(f"Cannot resume from {path}: its weights do not fit this model ({e}).") from e
        try:
            self.optimizer.load_state_dict(load_state_file(path, "optimizer"))
        except (KeyError, TypeError, ValueError) as e:  # a checkpoint from before the optimizer was recorded
            raise ConfigError(
                f"Cannot resume from {path}: its optimizer state does not fit Trainer.optimizer = "
                f"{self.config.optimizer!r} ({type(e).__name__}: {e}). Resume with the optimizer of that run, or "
                "start afresh in another --run_dir."
            ) from e

    def _load_sharded(self, path: Path) -> None:
        """The weights and optimizer state of a sharded checkpoint, written at any process count: each rank reads
        the pieces of its own shards (the whole tensors without FSDP)."""
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._sharded_state()
        try:
            load_sharded_state(path, state)
        except (CheckpointException, RuntimeError, ValueError) as e:  # CheckpointException carries each rank's error
            raise ConfigError(f"Cannot resume from {path}: its shards do not fit this model and optimizer "
                              f"({str(e)[:500]}). Use the model and Trainer.optimizer of that run, or start afresh "
                              "in another --run_dir.") from e
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=_state_options())


def _state_options() -> Any:
    """The options of the state_dict API for sharded checkpoints: strict=False, as a LoRA model's state_dict holds
    its adapters alone (the frozen base is the model folder's, as in whole checkpoints)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)


def _check_model_fits(config: TrainerConfig, model: torch.nn.Module) -> None:
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_len is None:  # HFCausalLM keeps it on the model (its HFModelConfig has none)
        max_len = getattr(model, "max_seq_len", None)
    if isinstance(max_len, int) and config.seq_len > max_len:
        raise ConfigError(f"Trainer.seq_len = {config.seq_len} exceeds the model's max_seq_len = {max_len}; lower "
                          "seq_len or raise the model's max_seq_len.")


def _model_config_of(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    return {**to_dict(), "architecture": f"codex_ml.{type(model).__name__}"}
