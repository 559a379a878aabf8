"""PruningTrainer: prune on a schedule and recover by fine-tuning, inside ``transformers.Trainer``.

Three pieces, so users can pick what fits their own trainer:

* :class:`~hf_prune.training.callback.PruningCallback` holds the schedule and the masks and runs the pruning step at
each
  event (works on its own on a stock ``Trainer`` in one process).
* :class:`PruningMixin` adds it to any ``Trainer`` subclass (``class T(PruningMixin, Seq2SeqTrainer)``), plus the DDP
  re-wrap after structural events, distillation from the dense model in ``compute_loss``, pruning statistics in the
  logs, and ``resume_from_checkpoint`` that replays the pruned structure before the checkpoint's weights load.
* :class:`PruningTrainer` = ``PruningMixin`` + ``Trainer``.

Why a callback *and* a mixin instead of callbacks only (transformers' usual extension point): callbacks cannot
re-wrap DDP around a resized model, change ``compute_loss`` or run before checkpoint weights load, all of which
structural pruning under the Trainer needs. The few private ``Trainer`` methods the mixin overrides are marked
``@overrides_private`` and listed, with why no public hook serves, in :data:`hf_prune.compat.PRIVATE_TRAINER_METHODS`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..architectures import get_adapter
from ..compat import float_weights, overrides_private
from ..config import PruningConfig
from ..io.save import add_remote_code, save_pretrained
from ..structure.remote_code import recorded_state
from ..structure.state import pruning_state
from ..structure.surgery import apply_layer_shapes
from ..utils import model_device
from .callback import MASKS_FILE, STATE_FILE, PruningCallback, check_backend
from .distill import (
    count_positions,
    cross_entropy_sum,
    hidden_mse_sum,
    is_causal_lm,
    kl_sum,
    logit_positions,
    token_positions,
)
from .distributed import all_reduce_sum, is_distributed, world_size
from .lora import LORA_BASE_DIR, base_model, check_maskable, is_peft_model, load_base_weights

logger = logging.get_logger(__name__)

__all__ = ["MASKS_FILE", "STATE_FILE", "PruningCallback", "PruningMixin", "PruningTrainer"]


def _check_teacher(teacher: nn.Module, model: nn.Module) -> None:
    """Distillation compares logits position by position: the teacher must have the same task head. A peft student
    is compared through its base model (a dense teacher has no adapters)."""
    model = base_model(model)
    teacher = base_model(teacher)
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
    :class:`PruningConfig` or dict), ``calibration_dataset`` (defaults to the train dataset; any form
    :func:`~hf_prune.scoring.calibration.calibration_set` accepts) and ``teacher_model``: the model distilled from when
    ``distill_alpha``/``distill_hidden`` are set (default: a frozen copy of the model as it is when the trainer is
    built). Pass a stronger dense model, e.g. one fine-tuned for longer, to recover more than the starting point knew.

    Distillation is normalised over the valid positions of the whole accumulated batch on all processes (see
    :mod:`hf_prune.training.distill`), so the loss is the same for 1 x 16 and 2 x 8 micro-batches and for 1 or 2
    processes.
    With ``load_best_model_at_end`` the best checkpoint is chosen among those saved after the last pruning event.
    Under FSDP2 the structure is cut once, before the model is sharded, and masks follow any schedule
    (:mod:`hf_prune.training.fsdp`); the teacher stays an unsharded copy on each process's device.

    The model may be a peft model (:func:`hf_prune.get_peft_model`): its base is what is scored, cut and masked,
    the adapters are cut along and their deltas keep the masks (:mod:`hf_prune.training.lora`); checkpoints of a
    run that reshaped the base keep it next to the adapter, so resuming rebuilds it.
    """

    def __init__(
        self,
        *args: Any,
        pruning_config: PruningConfig | dict[str, Any] | None = None,
        calibration_dataset: Any = None,
        teacher_model: nn.Module | None = None,
        **kwargs: Any,
    ):
        # checked before Trainer.__init__ places the model and builds the accelerator
        config = PruningConfig() if pruning_config is None else PruningConfig.coerce(pruning_config, "pruning_config")
        self.teacher = None
        self._distill_counts: torch.Tensor | None = None
        self._in_training_step = False
        # before Trainer.__init__, which refuses a model still marked as quantized even when its weights are float
        given = kwargs["model"] if "model" in kwargs else (args[0] if args else None)
        float_weights(base_model(given) if given is not None else None)
        super().__init__(*args, **kwargs)
        self.pruning_config = config
        # unknown architecture: a clear error before anything runs (weight sparsity alone needs no adapter)
        get_adapter(base_model(self.model), structural=self.pruning_config.removes_structure)
        check_backend(self.args, self.pruning_config, self)
        if self.pruning_config.effective_sparsity > 0:
            check_maskable(self.model)
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
            self.teacher.to(model_device(self.model))
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self._causal = is_causal_lm(self.model)
            self.add_callback(_TeacherFollowsModel(self))
            # compute_loss returns a loss already normalised over the accumulated batch (see hf_prune.training.distill)
            self.loss_is_scaled_for_ga = True

    # ---- distillation -------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.teacher is not None:
            counts = [count_positions(b, self._causal) for b in batch_samples]
            local = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)], dtype=torch.float64)
            self._distill_counts = all_reduce_sum(local.to(device))
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        cfg = self.pruning_config
        want_hidden = cfg.distill_hidden > 0
        valid = logit_positions(inputs, self._causal)
        tokens = token_positions(inputs)
        in_loop = self._in_training_step and self._distill_counts is not None
        if in_loop:
            # sums over this micro-batch / counts over the accumulated all-process batch; DDP averages gradients over
            # processes, hence the world size
            n_logits, n_tokens = (float(c) for c in self._distill_counts)
            scale = world_size()
        else:  # called outside the training loop: this batch is all there is
            n_logits = float(valid.sum()) if valid is not None else float(inputs["input_ids"].shape[0])
            n_tokens, scale = float(tokens.sum()), 1
        extra = {"output_hidden_states": True} if want_hidden else {}
        if self._own_task_loss(inputs):
            # cross-entropy normalised like the distillation terms. Not the model's own loss: classifiers in
            # transformers 5 accept loss kwargs yet ignore num_items_in_batch, so the stock Trainer sums their
            # micro-batch means under gradient accumulation
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, **extra)
            loss = cross_entropy_sum(outputs.logits, inputs["labels"], valid, self._causal, self.args)
            loss = loss * scale / max(n_logits, 1.0)
        else:
            loss, outputs = super().compute_loss(model, {**inputs, **extra}, True, num_items_in_batch)
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
            if not scaled and in_loop:
                loss = loss / self.current_gradient_accumulation_steps  # what the stock training_step would do
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            teacher_out = self.teacher(**teacher_inputs, **extra)
        kl = kl_sum(outputs.logits, teacher_out.logits, valid, cfg.distill_temperature) * scale / max(n_logits, 1.0)
        total = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kl
        if want_hidden:
            mse = hidden_mse_sum(outputs.hidden_states[-1], teacher_out.hidden_states[-1], tokens)
            total = total + cfg.distill_hidden * mse * scale / max(n_tokens, 1.0)
        return (total, outputs) if return_outputs else total

    def _own_task_loss(self, inputs: dict[str, Any]) -> bool:
        """Integer class labels with a custom loss nowhere in sight: hf_prune computes the cross-entropy itself."""
        labels = inputs.get("labels")
        return (
            self.compute_loss_func is None
            and labels is not None
            and not labels.is_floating_point()
            and getattr(self.model.config, "problem_type", None) in (None, "single_label_classification")
            and getattr(self.model.config, "num_labels", 2) > 1
        )

    # ---- FSDP: structure is cut before the model is sharded -----------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; under FSDP the structure is cut first, on the unwrapped model
        (:meth:`cut_before_sharding`)."""
        if getattr(self, "is_fsdp_enabled", False):
            self.cut_before_sharding(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def cut_before_sharding(self, resume_from_checkpoint: str | bool | None = None) -> None:
        """Cut the structure while the model is still whole: ``Trainer.train`` shards it (FSDP2) before any callback
        event, and sharded parameters cannot be resized (see :mod:`hf_prune.training.fsdp`). A fresh run takes its
        one-shot structural event here; a resumed one replays the shapes its checkpoint recorded, so the smaller
        tensors load into the sharded model."""
        if not self.pruning_config.structured:
            return
        if not resume_from_checkpoint:
            self.pruning_callback.prune_before_sharding()
            return
        folder = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        state = _checkpoint_state(folder) if folder else None  # no checkpoint: Trainer.train says so
        if state and state.get("layers"):
            apply_layer_shapes(base_model(self.model), state["layers"], state)

    # ---- DDP re-wrap after structural pruning -------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        # The training loop holds its own reference to the wrapped model; after a structural event under DDP the
        # trainer re-wrapped the resized model, and that wrapper must be the one that runs.
        if is_distributed() and self.model_wrapped is not model and self.model_wrapped is not self.model:
            model = self.model_wrapped
        self._in_training_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False

    # ---- logging ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and (self.pruning_config.structured or self.pruning_config.effective_sparsity > 0):
            logs = {**logs, **self.pruning_callback.stats(base_model(self.model))}
        super().log(logs, *args, **kwargs)

    # ---- checkpoints --------------------------------------------------------------------------------------
    @overrides_private
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        # checkpoints and save_model() load without hf_prune too, like hf_prune.save_pretrained's folders; a rank
        # that only joined the gathers of a model sharded at load time returns from _save without writing
        if not self.args.should_save:
            return
        model, folder = self.accelerator.unwrap_model(self.model), Path(output_dir or self.args.output_dir)
        if is_peft_model(model):
            # the stock save wrote the adapter only; a base the run reshaped goes next to it, or resume has nothing
            # to rebuild it from
            if pruning_state(base_model(model)):
                save_pretrained(model, folder / LORA_BASE_DIR)
        else:
            add_remote_code(model, folder)

    @overrides_private
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = model if model is not None else self.model
        lora_base = Path(resume_from_checkpoint) / LORA_BASE_DIR
        state = _checkpoint_state(lora_base if lora_base.is_dir() else resume_from_checkpoint)
        if state and state.get("layers"):
            # replay the structure so the checkpoint's smaller tensors fit, then let the stock loader run
            apply_layer_shapes(base_model(target), state["layers"], state)
        if lora_base.is_dir():  # a LoRA run's reshaped base: the stock loader restores the adapter only
            load_base_weights(target, lora_base)
            if self.teacher is not None:
                self.teacher.to(model_device(target))
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.pruning_callback.load_state(resume_from_checkpoint, model_device(target))

    @overrides_private
    def _load_best_model(self) -> None:
        # the callback restarts best tracking at every pruning event, so this only trips on a hand-edited state
        best = self.state.best_model_checkpoint
        saved = (_checkpoint_state(best) or {}).get("layers") if best else None
        current = (pruning_state(base_model(self.model)) or {}).get("layers")
        if saved != current:
            base = base_model(self.model)
            shapes = [s.to_dict() for s in get_adapter(base, structural=False).layer_shapes(base)]
            raise ValueError(
                f"load_best_model_at_end: the best checkpoint {best} holds layer shapes {saved}, but the model now "
                f"has {shapes}; load it with hf_prune.from_pretrained({best!r}, ...) instead"
            )
        super()._load_best_model()


class _TeacherFollowsModel(TrainerCallback):
    """Moves the distillation teacher to the model's device when training begins: ``Trainer.train`` may move the
    model after the teacher was placed (a ``model_init`` model, ``fp16_full_eval``/``bf16_full_eval``), and the teacher
    only runs during training."""

    def __init__(self, trainer: PruningMixin):
        self.trainer = trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        model = kwargs.get("model")
        if self.trainer.teacher is not None and model is not None:
            self.trainer.teacher.to(model_device(model))
        return control


def _checkpoint_state(folder: str | os.PathLike) -> dict[str, Any] | None:
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        return None
    return recorded_state(json.loads(config_file.read_text()))


class PruningTrainer(PruningMixin, Trainer):
    """``transformers.Trainer`` that prunes on the schedule of ``pruning_config`` and recovers by fine-tuning.

    Example::

        trainer = PruningTrainer(model=model, args=TrainingArguments(...), train_dataset=train,
                                 pruning_config=PruningConfig(target_flops=0.5, criterion="fisher",
                                                              scope="global", distill_alpha=0.5))
        trainer.train()
        trainer.save_model("pruned")       # reload with hf_prune.from_pretrained
    """
