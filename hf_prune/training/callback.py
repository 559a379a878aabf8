"""PruningCallback: the pruning schedule inside any ``transformers.Trainer``.

At each scheduled event it runs the one pruning step (:mod:`hf_prune.step`) to that event's share of the target:
structure is cut (the pruned parameters take the old ones' places inside the optimizer, their Adam moments sliced
with the same indices, see :mod:`hf_prune.training.optim`) and unstructured masks are recomputed; after every
optimizer step
it re-applies the masks so pruned weights stay exactly zero. It decides *when* and *how much*; the step decides *what*.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ..architectures import get_adapter
from ..compat import replace_prepared_model
from ..config import KEEP_TARGETS, PruningConfig
from ..measure import encoder_flops, model_summary, prunable_parameters
from ..planning.latency_search import check_latency_reachable
from ..planning.latency_table import LatencyTable, profile_latency
from ..planning.units import HeadUnits, head_unit_mode
from ..scoring.calibration import CalibrationSet, calibration_set
from ..sparsity.masks import MaskApplier
from ..step import mask_step, structural_step
from ..structure.slicing import record_slices
from ..utils import atomic_write, atomic_write_json, model_device, restored_mode
from .distributed import all_reduce_sum, is_distributed, world_size
from .fsdp import check_backend  # re-exported: trainer.py and tests import it from here
from .lora import base_model, keep_masks
from .optim import remap_optimizer
from .schedules import Event, build_events, resolve_window

logger = logging.get_logger(__name__)

STATE_FILE = "hf_prune_state.json"
MASKS_FILE = "hf_prune_masks.safetensors"


class PruningCallback(TrainerCallback):
    """Runs the pruning schedule of ``config`` for a ``transformers.Trainer`` (see module docstring).

    Bound to a trainer (as :class:`PruningMixin` does), it also re-wraps DDP after structural events. Added on its own
    to any ``Trainer`` (``trainer.add_callback(PruningCallback(config, calibration_dataset=...))``), it works in a
    single process: it swaps the pruned parameters inside the trainer's optimizer (their Adam moments sliced along),
    and needs ``calibration_dataset`` for data-driven criteria. Under DDP it needs the trainer (use the mixin) and
    says so before training starts.

    Why its state is saved in its own files next to each checkpoint rather than through the Trainer's stateful
    callbacks: masks are tensors (``trainer_state.json`` holds JSON only) and the structure must be replayed before
    the checkpoint's weights load, which happens regardless of ``restore_callback_states_from_checkpoint``.
    """

    def __init__(self, config: PruningConfig, trainer: Trainer | None = None, calibration_dataset: Any = None):
        config = PruningConfig.coerce(config, "PruningCallback(config=...)")
        if config.prunes_depth:
            # removing blocks (or attention sublayers) mid-training would orphan their optimizer state and change the
            # model under the optimizer; depth is a one-shot decision, made before training starts
            raise ValueError(
                ", ".join(
                    f"{k}={getattr(config, k)}"
                    for k in ("layers", "max_layers", "attention_layers")
                    if getattr(config, k)
                )
                + " (depth pruning) "
                "is not scheduled by the trainer: remove the blocks first with "
                "hf_prune.prune(model, PruningConfig(layers=..., layer_criterion=...), calibration_data=...) or "
                "hf_prune.prune_layers(model, [...]), then train with a config without `layers`"
            )
        self.config = config
        self.trainer = trainer
        self.calibration_dataset = calibration_dataset
        self.events: list[Event] = []
        self.done_steps: list[int] = []
        self.masks: dict[str, torch.Tensor] = {}
        self._applier: MaskApplier | None = None
        self._calibration_set: CalibrationSet | None = None
        self._optimizer: Any = None
        self._state: TrainerState | None = None
        self.progress = 0.0
        self.original: dict[str, float] = {}
        self.latency: LatencyTable | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = self._model(kwargs)
        get_adapter(model, structural=self.config.removes_structure)  # unknown architecture: fail before training
        check_backend(args, self.config, self.trainer)
        self._remember(state, kwargs)
        if self.trainer is None:
            self._check_standalone()
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
        if state.global_step > 0 and not self.done_steps:
            self._resumed_state(args, state, model)
        if not self.original:
            self.original = self._counts(model)
        if self.config.keep_target == "latency" and state.global_step == 0 and not self.done_steps:
            # an unreachable target fails now, not at the last pruning event after hours of training (under FSDP it
            # was checked before sharding, see prune_before_sharding)
            check_latency_reachable(model, self.config, self._latency_table(model))
        if state.global_step == 0:
            self._run_due_events(model, state.global_step)
        if self.masks and self._applier is None:  # resumed: the LoRA deltas must be masked from the first step
            self._install_masks(model)
        elif not self.masks:  # a sparse model wrapped by stock peft: its LoRA deltas keep the base's zeros
            keep_masks(model)
        return control

    def prune_before_sharding(self) -> None:
        """FSDP: run the one-shot structural event (step 0) on the bound trainer's model before ``Trainer.train``
        shards it, since surgery cannot resize sharded parameters; :meth:`on_train_begin` then finds step 0 done.
        The event runs where the model is (FSDP leaves it where it was built until sharding). See
        :mod:`hf_prune.training.fsdp`."""
        if not self.config.structured or 0 in self.done_steps:
            return
        model = self._model({})
        get_adapter(model, structural=True)
        self.original = self._counts(model)
        if self.config.keep_target == "latency":
            check_latency_reachable(model, self.config, self._latency_table(model))
        self._prune(model, Event(0, 1.0))
        self.done_steps.append(0)
        self._applier = None  # sharding replaces the parameters it points at: rebuilt on the sharded model

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.masks:
            if self._applier is None:
                self._install_masks(self._model(kwargs))
            self._applier()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._remember(state, kwargs)
        self._run_due_events(self._model(kwargs), state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            self.save_state(folder)
        return control

    def _remember(self, state: TrainerState, kwargs: dict[str, Any]) -> None:
        self._state = state
        if kwargs.get("optimizer") is not None:
            self._optimizer = kwargs["optimizer"]

    def _check_standalone(self) -> None:
        """Without a bound trainer the callback cannot re-wrap DDP nor reach the trainer's eval dataloader."""
        if self.config.structured and is_distributed():
            raise ValueError(
                "PruningCallback without a trainer cannot prune structure under DDP (the DDP wrapper must be rebuilt "
                "around the resized model); use PruningTrainer or `class MyTrainer(PruningMixin, Trainer)`"
            )
        if self.config.needs_data and self.calibration_dataset is None:
            raise ValueError(
                f"PruningCallback without a trainer needs calibration_dataset for criterion={self.config.criterion!r}"
                f" / sparsity_criterion={self.config.sparsity_criterion!r} / reconstruct={self.config.reconstruct}"
            )

    def _resumed_state(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        """A resumed run whose trainer did not restore the callback (a stock Trainer): read the checkpoint's state."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if (folder / STATE_FILE).exists():
            self.load_state(folder, model_device(model))
        elif any(e.step < state.global_step for e in self.events):
            raise ValueError(
                f"training resumes at step {state.global_step}, after pruning events, but {folder} holds no "
                f"{STATE_FILE}; resume pruning runs with PruningTrainer or PruningMixin"
            )

    # ---- state --------------------------------------------------------------------------------------------
    def save_state(self, folder: str | os.PathLike) -> None:
        """Write the schedule position, masks and latency table into a checkpoint folder (atomically)."""
        folder = Path(folder)
        state = {"done_steps": self.done_steps, "progress": self.progress, "original": self.original}
        if self.latency is not None:  # a resumed run allocates with the same measured table, not a new one
            state["latency_table"] = self.latency.to_dict()
        atomic_write_json(folder / STATE_FILE, state)
        if self.masks:
            masks = {k: v.to(torch.uint8).cpu().contiguous() for k, v in self.masks.items()}
            atomic_write(folder / MASKS_FILE, lambda p: save_file(masks, p))

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
        """Numbers logged at every logging step (from :func:`~hf_prune.measure.model_summary`)."""
        summary = model_summary(model, self.config.seq_len)
        return {
            "pruning/progress": self.progress,
            "pruning/sparsity": summary["sparsity"],
            "pruning/params": summary["parameters"],
            "pruning/flops_ratio": self.original.get("flops", 0) / max(1, summary["encoder_flops"]),
            "pruning/kept_heads": str([layer["heads"] for layer in summary["layers"]]),
            "pruning/kept_ffn": str([layer["ffn"] for layer in summary["layers"]]),
        }

    # ---- events -------------------------------------------------------------------------------------------
    def _model(self, kwargs: dict[str, Any]) -> nn.Module:
        """The model pruned: the trainer's, or for a peft model its base (LoRA layers inside; cutting them there
        cuts the adapters along, see :mod:`hf_prune.training.lora`)."""
        return base_model(self.trainer.model if self.trainer is not None else kwargs["model"])

    def _install_masks(self, model: nn.Module) -> None:
        """Masks into force: the applier that re-zeroes pruned weights, and LoRA deltas that add ``mask * BA``."""
        self._applier = MaskApplier(model, self.masks)
        keep_masks(model, self.masks)

    def _latency_table(self, model: nn.Module) -> LatencyTable:
        """Measured once, on the model as training starts; every later event allocates with the same table."""
        if self.latency is None:
            c = self.config
            table = profile_latency(
                model, c.latency_batch_size, c.seq_len, multiple=c.ffn_multiple, head_unit=c.head_unit
            )
            self.latency = _average_table(table, model_device(model))
        return self.latency

    def _counts(self, model: nn.Module) -> dict[str, float]:
        shapes = get_adapter(model, structural=False).layer_shapes(model)
        counts = {
            "units": sum(HeadUnits(head_unit_mode(model, self.config.head_unit)).count(s) for s in shapes),
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
                self._restart_best_tracking()

    def _restart_best_tracking(self) -> None:
        """Checkpoints from before an event hold another model (other shapes or fewer zeros): ``load_best_model_at_end``
        must choose among checkpoints of the final pruned model only, so the running best restarts here."""
        if self._state is not None and self._state.best_model_checkpoint is not None:
            logger.info(
                "hf_prune: best-checkpoint tracking restarts after the pruning event (previous best %s was a "
                "different model)",
                self._state.best_model_checkpoint,
            )
        if self._state is not None:
            self._state.best_metric = None
            self._state.best_model_checkpoint = None
            self._state.best_global_step = None

    def _calibration(self, model: nn.Module) -> CalibrationSet:
        """The calibration sample, drawn once (a generator is read once) and reused at every event and pass."""
        if self._calibration_set is None:
            data = self.calibration_dataset
            if data is None and self.trainer is not None:
                data = self.trainer.train_dataset
            if data is None:
                raise ValueError("data-driven pruning during training needs a calibration_dataset or a train_dataset")
            c = self.config
            if self.trainer is not None and (
                isinstance(data, torch.utils.data.Dataset) or hasattr(data, "column_names")
            ):
                # the trainer's own collator and column handling (sharded per process); a sequential loader consumes
                # no training RNG
                data = self.trainer.get_eval_dataloader(data)
            self._calibration_set = calibration_set(data, model, c.batch_size, c.max_samples)
        return self._calibration_set.to(model_device(model))

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
        with restored_mode(model), torch.random.fork_rng(devices=[]):
            if structural:
                self._cut_structure(model, step_config)
            if config.effective_sparsity > 0:
                self._update_masks(model, event.progress)
        logger.info(
            "hf_prune: pruning event at progress %.2f: %s",
            event.progress,
            {k: v for k, v in self.stats(model).items() if k != "pruning/progress"},
        )

    def _cut_structure(self, model: nn.Module, step_config: PruningConfig) -> None:
        needs = self.config.needs_gradients or self.config.reconstruct
        calibration = self._calibration(model) if needs else None
        with record_slices() as slices:
            # timing differs per process, so under DDP the (rank-averaged) table alone decides
            structural_step(model, step_config, calibration, self.latency, is_distributed(), progress=False)
        self._applier = None  # surgery replaced the parameters the applier points at
        optimizer = self.trainer.optimizer if self.trainer is not None else self._optimizer
        if optimizer is not None:
            remap_optimizer(optimizer, slices)
        if self.trainer is not None:
            _rewrap_ddp(self.trainer)

    def _update_masks(self, model: nn.Module, progress: float) -> None:
        config = self.config
        needs = config.sparsity_criterion == "activation"
        self.masks = mask_step(
            model,
            config,
            config.effective_sparsity * progress,
            config.nm if progress >= 1.0 else None,
            self._calibration(model) if needs else None,
            is_distributed(),
            progress=False,
        )
        self._install_masks(model)


def _average_table(table: LatencyTable, device: torch.device) -> LatencyTable:
    """Average a latency table over processes: each rank timed its own device, all must allocate alike."""
    if not is_distributed():
        return table
    values = torch.tensor(table.unit_ms + table.ffn_ms, dtype=torch.float64, device=device)
    values = (all_reduce_sum(values) / world_size()).cpu()
    n = len(table.unit_ms)
    return LatencyTable.from_dict({**table.to_dict(), "unit_ms": values[:n].tolist(), "ffn_ms": values[n:].tolist()})


def _rewrap_ddp(trainer: Trainer) -> None:
    """Wrap the resized model in a new DDP (the old one's buckets and hooks refer to the replaced parameters).

    The wrapper is built with the accelerator's own DDP kwargs. ``accelerator.prepare_model`` is not called again:
    under native AMP it would wrap the model's forward in a second autocast.
    """
    old = trainer.model_wrapped
    if not is_distributed() or old is trainer.model or not isinstance(old, nn.parallel.DistributedDataParallel):
        return
    accelerator = trainer.accelerator
    handler = getattr(accelerator, "ddp_handler", None)
    kwargs = handler.to_kwargs() if handler is not None else {}
    device = model_device(trainer.model)
    ids = [device.index] if device.type != "cpu" and device.index is not None else None
    new = nn.parallel.DistributedDataParallel(
        trainer.model, device_ids=ids, output_device=ids[0] if ids else None, **kwargs
    )
    # accelerate lists prepared models (for save_state/free_memory) and has no public call to swap one
    replace_prepared_model(accelerator, old, new)
    trainer.model_wrapped = new
    trainer.callback_handler.model = trainer.model
