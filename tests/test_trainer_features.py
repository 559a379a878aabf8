"""Trainer features people combine with pruning: best-checkpoint loading, a bare callback, unsupported backends."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune import PruningCallback, PruningConfig, PruningTrainer
from hf_prune.training.callback import check_backend

from .test_trainer import args, toy_data, toy_model


def test_load_best_model_at_end_picks_a_checkpoint_of_the_final_pruned_model(tmp_path):
    model = toy_model()
    config = PruningConfig(heads=0.5, ffn=0.5, sparsity=0.4, schedule="iterative", frequency=4, end_step=8)
    training = args(
        tmp_path,
        num_train_epochs=3,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    data = toy_data()
    trainer = PruningTrainer(
        model=model, args=training, train_dataset=data, eval_dataset=toy_data(16, seed=5), pruning_config=config
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and int(best.rsplit("-", 1)[1]) >= 8  # saved after the last event (step 8)
    shapes = [s.heads for s in hf_prune.get_adapter(trainer.model).layer_shapes(trainer.model)]
    assert shapes == [2, 2, 2]
    assert hf_prune.sparsity.masks.sparsity_report(trainer.model)["overall"] == pytest.approx(0.4, abs=0.01)
    # the loaded weights are the best checkpoint's
    best_model = hf_prune.from_pretrained(best, tf.AutoModelForSequenceClassification)
    for key, value in best_model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[key], value)


def test_bare_callback_on_a_stock_trainer_prunes_and_keeps_the_optimizer_live(tmp_path):
    """Without PruningMixin: the callback swaps the pruned parameters inside the trainer's own optimizer."""
    model = toy_model()
    config = PruningConfig(heads=0.5, ffn=0.5, sparsity=0.3, schedule="iterative", frequency=4, end_step=8)
    trainer = tf.Trainer(model=model, args=args(tmp_path), train_dataset=toy_data())
    callback = PruningCallback(config)
    trainer.add_callback(callback)
    stale: list[int] = []  # per step: optimizer tensors that are no longer the model's
    graded: list[bool] = []  # per optimizer step: the current query weight got a non-zero gradient
    weights: dict[int, torch.Tensor] = {}  # the query weight after each step

    def query() -> torch.nn.Parameter:
        return model.bert.encoder.layer[0].attention.self.query.weight

    class Probe(tf.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grad = query().grad
            graded.append(grad is not None and bool(grad.abs().sum() > 0))

        def on_step_end(self, args, state, control, **kwargs):
            inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            live = {id(p) for p in model.parameters()}
            stale.append(sum(id(p) not in live for g in inner.param_groups for p in g["params"]))
            weights[state.global_step] = query().detach().clone()

    trainer.add_callback(Probe())
    first_q = query()
    trainer.train()
    last_q = query()
    assert callback.done_steps == [0, 4, 8]
    assert [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)] == [2, 2, 2]
    assert len(stale) == 16 and not any(stale)  # the optimizer never held a removed tensor after an event
    assert last_q is not first_q and last_q.shape[0] < first_q.shape[0]
    # every step, before and after each event, back-propagated into the query weight the model holds then ...
    assert len(graded) == 16 and all(graded)
    # ... and the tensor made by the last event moved from one step to the next
    after_last = [weights[step] for step in sorted(weights) if weights[step].shape == last_q.shape]
    assert len(after_last) >= 7 and not any(torch.equal(a, b) for a, b in itertools.pairwise(after_last))
    # the optimizer kept training the new tensor: it has Adam state
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert last_q in inner.state and int(inner.state[last_q]["step"]) == 16


def test_bare_callback_needing_data_says_so_before_training(tmp_path):
    trainer = tf.Trainer(model=toy_model(), args=args(tmp_path), train_dataset=toy_data())
    trainer.add_callback(PruningCallback(PruningConfig(heads=0.5, criterion="fisher")))
    with pytest.raises(ValueError, match="needs calibration_dataset"):
        trainer.train()


@pytest.mark.parametrize(
    ("backend", "config"),
    [({"deepspeed": "ds_config.json"}, {"heads": 0.5}), ({"fsdp": "full_shard"}, {"heads": 0.5, "schedule": "cubic"})],
)
def test_deepspeed_and_scheduled_structure_under_fsdp_are_refused_before_training(backend, config):
    # FSDP2 itself is supported (tests/test_fsdp.py): masks on any schedule, structure once before sharding
    fake_args = SimpleNamespace(**{"deepspeed": None, "fsdp": None, **backend})
    with pytest.raises(ValueError, match=r"cannot prune (structure )?under (DeepSpeed|FSDP)"):
        check_backend(fake_args, PruningConfig(**config))
    check_backend(fake_args, PruningConfig())  # nothing to prune: allowed
    trainer_like = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False)
    check_backend(SimpleNamespace(deepspeed=None, fsdp=None), PruningConfig(sparsity=0.5), trainer_like)


def test_callback_state_is_written_by_the_saving_process_only(tmp_path):
    callback = PruningCallback(PruningConfig(sparsity=0.5))
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    state = SimpleNamespace(global_step=4)
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=False), state, None)
    assert not (folder / "hf_prune_state.json").exists()
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=True), state, None)
    assert (folder / "hf_prune_state.json").exists()
    assert not list(folder.glob(".*.tmp"))  # written atomically
