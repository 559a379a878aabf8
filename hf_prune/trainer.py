"""PruningTrainer: prune on a schedule and recover by fine-tuning, inside ``transformers.Trainer``.

Three pieces, so users can pick what fits their own trainer:

* :class:`PruningCallback` holds the schedule and the masks. At each scheduled event it scores, allocates and cuts
  structure (then rebuilds the optimizer and LR scheduler through the trainer it is bound to) and recomputes
  unstructured masks; after every optimizer step it re-applies the masks so pruned weights stay exactly zero.
* :class:`PruningMixin` adds it to any ``Trainer`` subclass (``class T(PruningMixin, Seq2SeqTrainer)``), plus
  distillation from the dense model in ``compute_loss``, pruning statistics in the logs, and
  ``resume_from_checkpoint`` that replays the pruned structure before the checkpoint's weights load.
* :class:`PruningTrainer` = ``PruningMixin`` + ``Trainer``.

Why a callback *and* a mixin instead of callbacks only (transformers' usual extension point): callbacks cannot
replace the trainer's optimizer, change ``compute_loss`` or run before checkpoint weights load, all of which
structural pruning needs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .allocate import allocate
from .architectures import get_adapter
from .calibration import iter_batches
from .config import KEEP_TARGETS, PruningConfig
from .criteria import input_norms, structured_scores
from .latency_model import LatencyTable, profile_latency
from .masks import (
    MaskApplier,
    compute_masks,
    prunable_linears,
    sparsity_report,
    to_module_layout,
    weight_scores,
)
from .measure import count_parameters, encoder_flops, prunable_parameters
from .reconstruct import apply_plan_with_compensation
from .schedules import Event, build_events, resolve_window
from .surgery import STATE_KEY, _record, apply_layer_shapes

logger = logging.get_logger(__name__)

STATE_FILE = "hf_prune_state.json"
MASKS_FILE = "hf_prune_masks.safetensors"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class PruningCallback(TrainerCallback):
    """Runs the pruning schedule of ``config`` for the trainer it is bound to (see module docstring)."""

    def __init__(self, config: PruningConfig, trainer: Trainer | None = None, calibration_dataset: Any = None):
        self.config = config
        self.trainer = trainer
        self.calibration_dataset = calibration_dataset
        self.events: list[Event] = []
        self.done_steps: list[int] = []
        self.masks: dict[str, torch.Tensor] = {}
        self._applier: MaskApplier | None = None
        self.progress = 0.0
        self.original: dict[str, float] = {}
        self.latency: LatencyTable | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = self._model(kwargs)
        get_adapter(model)  # unknown architecture: fail before training starts
        steps_per_epoch = max(1, math.ceil(state.max_steps / max(1, state.num_train_epochs or 1)))
        start, end = resolve_window(
            self.config.schedule,
            state.max_steps,
            steps_per_epoch,
            self.config.start_step,
            self.config.end_step,
            self.config.start_epoch,
            self.config.end_epoch,
        )
        self.events = build_events(self.config.schedule, start, end, self.config.frequency, steps_per_epoch)
        if not self.original:
            self.original = self._counts(model)
        if state.global_step == 0:
            self._run_due_events(model, state.global_step)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.masks:
            if self._applier is None:
                self._applier = MaskApplier(self._model(kwargs), self.masks)
            self._applier()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._run_due_events(self._model(kwargs), state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and (not _distributed() or torch.distributed.get_rank() == 0):
            self.save_state(folder)
        return control

    # ---- state --------------------------------------------------------------------------------------------
    def save_state(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        state = {"done_steps": self.done_steps, "progress": self.progress, "original": self.original}
        if self.latency is not None:  # a resumed run allocates with the same measured table, not a new one
            state["latency_table"] = self.latency.to_dict()
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        if self.masks:
            save_file({k: v.to(torch.uint8).cpu().contiguous() for k, v in self.masks.items()}, folder / MASKS_FILE)

    def load_state(self, folder: str | os.PathLike, device: torch.device | None = None) -> None:
        folder = Path(folder)
        if not (folder / STATE_FILE).exists():
            return
        state = json.loads((folder / STATE_FILE).read_text())
        self.done_steps = list(state["done_steps"])
        self.progress = float(state["progress"])
        self.original = dict(state["original"])
        if "latency_table" in state:
            self.latency = LatencyTable.from_dict(state["latency_table"])
        if (folder / MASKS_FILE).exists():
            self.masks = {k: v.bool().to(device or "cpu") for k, v in load_file(folder / MASKS_FILE).items()}
            self._applier = None

    def stats(self, model: nn.Module) -> dict[str, Any]:
        """Numbers logged at every logging step."""
        adapter = get_adapter(model)
        shapes = adapter.layer_shapes(model)
        return {
            "pruning/progress": self.progress,
            "pruning/sparsity": sparsity_report(model)["overall"],
            "pruning/params": count_parameters(model),
            "pruning/flops_ratio": self.original.get("flops", 0)
            / max(1, encoder_flops(model, self.config.seq_len).total),
            "pruning/kept_heads": str([s.heads for s in shapes]),
            "pruning/kept_ffn": str([s.ffn for s in shapes]),
        }

    # ---- events -------------------------------------------------------------------------------------------
    def _model(self, kwargs: dict[str, Any]) -> nn.Module:
        if self.trainer is not None:
            return self.trainer.model
        return kwargs["model"]

    def _latency_table(self, model: nn.Module) -> LatencyTable:
        """Measured once, on the model as training starts; every later event allocates with the same table."""
        if self.latency is None:
            c = self.config
            table = profile_latency(model, c.latency_batch_size, c.seq_len, multiple=c.ffn_multiple)
            self.latency = _all_reduce_table(table, next(model.parameters()).device)
        return self.latency

    def _counts(self, model: nn.Module) -> dict[str, float]:
        shapes = get_adapter(model).layer_shapes(model)
        counts = {
            "units": sum(s.kv_heads for s in shapes),
            "ffn": sum(s.ffn for s in shapes),
            "flops": encoder_flops(model, self.config.seq_len).total,
            "params": prunable_parameters(model),
        }
        if self.config.keep_target == "latency":
            counts["latency"] = self._latency_table(model).model_ms(shapes)
        return counts

    def _run_due_events(self, model: nn.Module, step: int) -> None:
        for event in self.events:
            if event.step == step and step not in self.done_steps:
                self._prune(model, event)
                self.done_steps.append(step)

    def _calibration(self, model: nn.Module):
        device = next(model.parameters()).device
        data = self.calibration_dataset
        if data is None and self.trainer is not None:
            data = self.trainer.train_dataset
        if data is None:
            raise ValueError("data-driven pruning during training needs a calibration_dataset or a train_dataset")
        if self.trainer is not None:
            # the trainer's own collator and column handling; a sequential loader consumes no training RNG
            loader = self.trainer.get_eval_dataloader(data)
            return iter_batches(loader, max_samples=self.config.max_samples, device=device)
        return iter_batches(data, self.config.batch_size, self.config.max_samples, device=device)

    def _step_config(self, model: nn.Module, progress: float) -> PruningConfig | None:
        """The one-event config that brings the model from where it is to ``progress`` of the final target."""
        final, now = self.config, self._counts(model)
        changes: dict[str, Any] = {}
        key = final.keep_target
        if key is not None:
            final_keep = getattr(final, f"target_{key}")
            keep_now = (1 - progress * (1 - final_keep)) * self.original[key] / now[key]
            if keep_now >= 0.999:
                return None
            changes[f"target_{key}"] = max(1e-6, min(1.0, keep_now))
        else:
            for field, unit in (("heads", "units"), ("ffn", "ffn")):
                want_kept = (1 - progress * getattr(final, field)) * self.original[unit]
                frac = 1 - want_kept / now[unit] if now[unit] else 0.0
                changes[field] = min(max(0.0, frac), 0.999) if frac > 1e-9 else 0.0
            if not changes["heads"] and not changes["ffn"]:
                return None
        base = {k: v for k, v in final.to_dict().items() if k not in ("heads", "ffn", *KEEP_TARGETS)}
        return PruningConfig(**{**base, **changes, "sparsity": 0.0, "pattern": "unstructured"})

    def _prune(self, model: nn.Module, event: Event) -> None:
        self.progress = event.progress
        config = self.config
        structural = config.structured and (step_config := self._step_config(model, event.progress)) is not None
        was_training = model.training
        with torch.random.fork_rng(devices=[]):
            if structural:
                needs = config.criterion in ("taylor", "fisher")
                batches = self._calibration(model) if needs else None
                scores = structured_scores(
                    model, config.criterion, batches, config.max_samples, config.seed, progress=False
                )
                scores = _all_reduce_scores(scores)
                # timing differs per process, so under DDP the table alone decides (it is averaged over ranks)
                plan = allocate(model, scores, step_config, latency=self.latency, verify_latency=not _distributed())
                if config.reconstruct:
                    reduce = _all_reduce_sum if _distributed() else None
                    apply_plan_with_compensation(model, plan, self._calibration(model), reduce=reduce)
                else:
                    plan.apply(model)
                self._applier = None  # surgery replaced the parameters the applier points at
                if self.trainer is not None:
                    _rebuild_optimizer(self.trainer)
            if config.effective_sparsity > 0:
                self._update_masks(model, event.progress)
        model.train(was_training)
        logger.info(
            "hf_prune: pruning event at progress %.2f: %s",
            event.progress,
            {k: v for k, v in self.stats(model).items() if k != "pruning/progress"},
        )

    def _update_masks(self, model: nn.Module, progress: float) -> None:
        config = self.config
        nm = config.nm if progress >= 1.0 else None
        sparsity = config.effective_sparsity * progress
        modules = prunable_linears(model)
        norms = None
        if config.sparsity_criterion == "activation":
            norms = input_norms(model, modules, self._calibration(model), config.max_samples, progress=False)
            norms = _all_reduce_dict(norms, square=True)
        scores = weight_scores(modules, config.sparsity_criterion, norms)
        scope = config.sparsity_scope if nm is None else "row"
        self.masks = to_module_layout(compute_masks(scores, sparsity, scope, nm), modules)
        self._applier = MaskApplier(model, self.masks)
        self._applier()


def _all_reduce_scores(scores):
    """Sum scores over processes so every rank allocates the same plan (data-parallel calibration shards)."""
    if not _distributed():
        return scores
    for tensors in (scores.heads, scores.ffn):
        for t in tensors:
            if t.numel():
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return scores


def _all_reduce_table(table: LatencyTable, device: torch.device) -> LatencyTable:
    """Average a latency table over processes: each rank timed its own device, all must allocate alike."""
    if not _distributed():
        return table
    # on the model's device: NCCL reduces CUDA tensors only (gloo takes either)
    values = torch.tensor(table.unit_ms + table.ffn_ms, dtype=torch.float64, device=device)
    values = _all_reduce_sum(values) / torch.distributed.get_world_size()
    n = len(table.unit_ms)
    values = values.cpu()
    return LatencyTable.from_dict({**table.to_dict(), "unit_ms": values[:n].tolist(), "ffn_ms": values[n:].tolist()})


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _all_reduce_dict(norms: dict[str, torch.Tensor], square: bool) -> dict[str, torch.Tensor]:
    if not _distributed():
        return norms
    out = {}
    for name, t in norms.items():
        t = t.pow(2) if square else t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        out[name] = t.sqrt() if square else t
    return out


def _rebuild_optimizer(trainer: Trainer) -> None:
    """New optimizer and LR scheduler over the model's current parameters, keeping the optimizer state of every
    parameter surgery did not replace and the scheduler's position, so training continues seamlessly."""
    old = trainer.optimizer
    if old is None:
        return
    old_inner = getattr(old, "optimizer", old)
    old_state = old_inner.state
    old_sched = trainer.lr_scheduler
    accelerator = trainer.accelerator
    if old in getattr(accelerator, "_optimizers", []):
        accelerator._optimizers.remove(old)
    trainer.optimizer = None
    trainer.create_optimizer()
    new_inner = trainer.optimizer
    for group in new_inner.param_groups:
        for p in group["params"]:
            if p in old_state:
                new_inner.state[p] = old_state[p]
    trainer.optimizer = accelerator.prepare(trainer.optimizer)
    if old_sched is not None:
        max_steps = trainer.state.max_steps
        trainer.lr_scheduler = None
        trainer._created_lr_scheduler = False
        trainer.create_scheduler(num_training_steps=max_steps, optimizer=trainer.optimizer)
        sched = trainer.lr_scheduler
        if hasattr(sched, "last_epoch") and hasattr(old_sched, "last_epoch"):
            sched.last_epoch = old_sched.last_epoch
            last_lrs = old_sched.get_last_lr()
            groups = getattr(trainer.optimizer, "optimizer", trainer.optimizer).param_groups
            for group, lr in zip(groups, last_lrs, strict=True):
                group["lr"] = lr
            sched._last_lr = list(last_lrs)
    if _distributed() and trainer.model_wrapped is not trainer.model:
        # DDP buckets refer to the replaced parameters: wrap the resized model again
        trainer.model_wrapped = accelerator.prepare_model(trainer.model)
    for attr in ("model", "optimizer", "lr_scheduler"):
        setattr(trainer.callback_handler, attr, getattr(trainer, attr))


def _check_teacher(teacher: nn.Module, model: nn.Module) -> None:
    """Distillation compares logits position by position: the teacher must have the same task head."""
    related = isinstance(teacher, type(model)) or isinstance(model, type(teacher))
    t_labels = getattr(getattr(teacher, "config", None), "num_labels", None)
    s_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if not related or t_labels != s_labels:
        raise ValueError(
            f"teacher_model is a {type(teacher).__name__} with num_labels={t_labels} but the model is a "
            f"{type(model).__name__} with num_labels={s_labels}; distillation needs the same task head"
        )


class PruningMixin:
    """Adds scheduled pruning, distillation and pruned-checkpoint resume to a ``transformers.Trainer`` subclass.

    Use as ``class MyTrainer(PruningMixin, SomeTrainer)``. Extra keyword arguments: ``pruning_config`` (a
    :class:`PruningConfig` or dict), ``calibration_dataset`` (defaults to the train dataset) and
    ``teacher_model``: the model distilled from when ``distill_alpha``/``distill_hidden`` are set (default: a
    frozen copy of the model as it is when the trainer is built). Pass a stronger dense model, e.g. one fine-tuned
    for longer, to recover more than the starting point knew.
    """

    def __init__(
        self,
        *args: Any,
        pruning_config: PruningConfig | dict[str, Any] | None = None,
        calibration_dataset: Any = None,
        teacher_model: nn.Module | None = None,
        **kwargs: Any,
    ):
        self.teacher = None
        super().__init__(*args, **kwargs)
        if isinstance(pruning_config, dict):
            pruning_config = PruningConfig.from_dict(pruning_config)
        self.pruning_config = pruning_config or PruningConfig()
        get_adapter(self.model)  # unknown architecture: a clear error before anything runs
        if self.pruning_config.needs_data and calibration_dataset is None and self.train_dataset is None:
            raise ValueError(
                f"criterion={self.pruning_config.criterion!r} needs calibration data: pass calibration_dataset or "
                "train_dataset"
            )
        self.pruning_callback = PruningCallback(self.pruning_config, self, calibration_dataset)
        self.add_callback(self.pruning_callback)
        distill = self.pruning_config.distill_alpha > 0 or self.pruning_config.distill_hidden > 0
        if teacher_model is not None and not distill:
            raise ValueError("teacher_model was given but distill_alpha and distill_hidden are both 0; set one > 0")
        if distill:
            import copy

            if teacher_model is not None:
                _check_teacher(teacher_model, self.model)
            self.teacher = (teacher_model if teacher_model is not None else copy.deepcopy(self.model)).eval()
            self.teacher.to(next(self.model.parameters()).device)
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    # ---- distillation -------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        cfg = self.pruning_config
        want_hidden = cfg.distill_hidden > 0
        loss, outputs = super().compute_loss(
            model, {**inputs, "output_hidden_states": want_hidden} if want_hidden else inputs, True, num_items_in_batch
        )
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            teacher_out = self.teacher(**teacher_inputs, output_hidden_states=want_hidden)
        t = cfg.distill_temperature
        s_logits, t_logits = outputs.logits, teacher_out.logits
        kl = F.kl_div(
            F.log_softmax(s_logits.float() / t, dim=-1).reshape(-1, s_logits.shape[-1]),
            F.log_softmax(t_logits.float() / t, dim=-1).reshape(-1, t_logits.shape[-1]),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        total = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kl
        if want_hidden:
            total = total + cfg.distill_hidden * F.mse_loss(
                outputs.hidden_states[-1].float(), teacher_out.hidden_states[-1].float()
            )
        return (total, outputs) if return_outputs else total

    def _move_model_to_device(self, model, device):
        super()._move_model_to_device(model, device)
        if getattr(self, "teacher", None) is not None:
            self.teacher.to(device)

    # ---- DDP re-wrap after structural pruning -------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        # The training loop holds its own reference to the wrapped model; after a structural event under DDP the
        # trainer re-wrapped the resized model, and that wrapper must be the one that runs.
        if _distributed() and self.model_wrapped is not model and self.model_wrapped is not self.model:
            model = self.model_wrapped
        return super().training_step(model, inputs, num_items_in_batch)

    # ---- logging ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and (self.pruning_config.structured or self.pruning_config.effective_sparsity > 0):
            logs = {**logs, **self.pruning_callback.stats(self.model)}
        super().log(logs, *args, **kwargs)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        config_file = Path(resume_from_checkpoint) / "config.json"
        target = model if model is not None else self.model
        if config_file.exists():
            state = json.loads(config_file.read_text()).get(STATE_KEY)
            if state and state.get("layers"):
                # replay the structure so the checkpoint's smaller tensors fit, then let the stock loader run
                apply_layer_shapes(target, state["layers"])
                _record(target, get_adapter(target), state)
                if self.teacher is not None:
                    self.teacher.to(next(target.parameters()).device)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        device = next(target.parameters()).device
        self.pruning_callback.load_state(resume_from_checkpoint, device)


class PruningTrainer(PruningMixin, Trainer):
    """``transformers.Trainer`` that prunes on the schedule of ``pruning_config`` and recovers by fine-tuning.

    Example::

        trainer = PruningTrainer(model=model, args=TrainingArguments(...), train_dataset=train,
                                 pruning_config=PruningConfig(target_flops=0.5, criterion="fisher",
                                                              scope="global", distill_alpha=0.5))
        trainer.train()
        trainer.save_model("pruned")       # reload with hf_prune.from_pretrained
    """
