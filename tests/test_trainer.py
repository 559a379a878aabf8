"""PruningTrainer / PruningMixin / PruningCallback on tiny models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import transformers as tf
from datasets import Dataset

import hf_prune
from hf_prune import PruningCallback, PruningConfig, PruningMixin, PruningTrainer
from hf_prune.sparsity.masks import prunable_linears, sparsity_report
from hf_prune.training.schedules import build_events, resolve_window

from .families import FAMILIES, make_model


def toy_data(n: int = 64, seq: int = 12, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, seq), generator=g)
    labels = (ids[:, 0] > 50).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels.tolist()})


def toy_model(name: str = "bert"):
    family = FAMILIES[name]
    cls = next(c for c in family.classes if "ForSequenceClassification" in c.__name__)
    return make_model(family, cls).train()


def args(tmp_path, **kw) -> tf.TrainingArguments:
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "num_train_epochs": 2,
        "learning_rate": 1e-3,
        "report_to": "none",
        "logging_steps": 2,
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        # the fused CPU AdamW kernel costs ~80 ms per step even on a tiny model; results are the same
        "optim": "adamw_torch",
    }
    base.update(kw)
    return tf.TrainingArguments(**base)


class StepRecorder(tf.TrainerCallback):
    """Checks after every optimizer step that masked weights are exactly zero and the optimizer only holds live
    parameters."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.max_masked_abs = 0.0
        self.stale_optimizer_params = 0
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        model = self.trainer.model
        modules = dict(model.named_modules())
        for name, mask in self.trainer.pruning_callback.masks.items():
            w = modules[name].weight
            masked = w.detach()[~mask]
            if masked.numel():
                self.max_masked_abs = max(self.max_masked_abs, float(masked.abs().max()))
        live = {id(p) for p in model.parameters()}
        inner = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        self.stale_optimizer_params += sum(id(p) not in live for g in inner.param_groups for p in g["params"])
        self.stale_optimizer_params += sum(id(p) not in live for p in inner.state)


# ---- schedules ------------------------------------------------------------------------------------------
def test_schedules():
    assert build_events("oneshot", 0, 0, "epoch", 10) == [hf_prune.training.schedules.Event(0, 1.0)]
    iterative = build_events("iterative", 0, 20, 10, 10)
    assert [(e.step, round(e.progress, 3)) for e in iterative] == [(0, 0.333), (10, 0.667), (20, 1.0)]
    cubic = build_events("cubic", 0, 100, 10, 50)
    progress = [e.progress for e in cubic]
    assert progress == sorted(progress) and progress[-1] == 1.0 and cubic[0].step == 10
    gains = [b - a for a, b in itertools.pairwise(progress)]
    assert gains == sorted(gains, reverse=True)  # cubic: big steps first, gentle near the end
    assert resolve_window("iterative", 100, 50, None, None, None, None) == (0, 50)
    # Zhu & Gupta (2017), eq. 1 with initial sparsity 0: s_t = s_f * (1 - (1 - (t - t0) / (n * dt)) ** 3)
    t0, dt, n = 5, 7, 6
    zhu_gupta = build_events("cubic", t0, t0 + n * dt, dt, 50)
    assert [e.step for e in zhu_gupta] == [t0 + k * dt for k in range(1, n + 1)]
    for k, event in enumerate(zhu_gupta, start=1):
        assert event.progress == pytest.approx(1 - (1 - k * dt / (n * dt)) ** 3, abs=1e-12)
    assert resolve_window("oneshot", 100, 50, None, None, 1.0, None) == (50, 50)
    with pytest.raises(ValueError, match="window is empty"):
        resolve_window("iterative", 100, 50, 60, 10, None, None)


# ---- default behaviour equals the stock Trainer ---------------------------------------------------------
def test_no_pruning_is_identical_to_stock_trainer(tmp_path):
    data = toy_data()
    losses = []
    for trainer_cls, extra in ((tf.Trainer, {}), (PruningTrainer, {"pruning_config": PruningConfig()})):
        model = toy_model()
        trainer = trainer_cls(model=model, args=args(tmp_path, logging_steps=1), train_dataset=data, **extra)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 16
    assert losses[0] == losses[1]


# ---- structured + unstructured on every schedule --------------------------------------------------------
@pytest.mark.parametrize("schedule", ["oneshot", "iterative", "cubic"])
@pytest.mark.parametrize("kind", ["structured", "unstructured", "both"])
def test_schedules_reach_their_targets(tmp_path, schedule, kind):
    model = toy_model()
    dense_params = hf_prune.count_parameters(model)
    structured = {"heads": 0.5, "ffn": 0.5, "criterion": "taylor"} if kind != "unstructured" else {}
    sparse = {"sparsity": 0.5} if kind != "structured" else {}
    config = PruningConfig(schedule=schedule, frequency=2, **structured, **sparse)
    trainer = PruningTrainer(model=model, args=args(tmp_path), train_dataset=toy_data(), pruning_config=config)
    recorder = StepRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    shapes = hf_prune.get_adapter(model).layer_shapes(model)
    if structured:
        assert [s.heads for s in shapes] == [2, 2, 2]
        assert [s.ffn for s in shapes] == [24, 24, 24]  # 40 * 0.5 = 20, rounded to the multiple of 8
        assert hf_prune.count_parameters(model) < dense_params
    if sparse:
        assert sparsity_report(model)["overall"] == pytest.approx(0.5, abs=0.01)
        assert recorder.max_masked_abs == 0.0
    events = trainer.pruning_callback.events
    assert trainer.pruning_callback.done_steps == [e.step for e in events]
    # 16 steps, default window [0, 8], an event every 2 steps (the cubic schedule has nothing to remove at step 0)
    expected_steps = {"oneshot": [0], "iterative": [0, 2, 4, 6, 8], "cubic": [2, 4, 6, 8]}[schedule]
    assert [e.step for e in events] == expected_steps and events[-1].progress == 1.0
    assert recorder.stale_optimizer_params == 0
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[-1]["pruning/progress"] == 1.0 and "pruning/kept_heads" in logged[-1]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)


def test_target_flops_with_fisher_global_iterative(tmp_path):
    model = toy_model()
    config = PruningConfig(target_flops=0.6, criterion="fisher", scope="global", schedule="iterative", frequency=3)
    trainer = PruningTrainer(model=model, args=args(tmp_path), train_dataset=toy_data(), pruning_config=config)
    before = trainer.pruning_callback  # original counts are measured at train begin
    trainer.train()
    ratio = before.original["flops"] / hf_prune.encoder_flops(model, config.seq_len).total
    assert 1 / ratio == pytest.approx(0.6, abs=0.012)


def test_gradient_accumulation_and_bf16_keep_working(tmp_path):
    model = toy_model()
    config = PruningConfig(heads=0.5, ffn=0.5, schedule="iterative", frequency=1, sparsity=0.3)
    trainer = PruningTrainer(
        model=model,
        args=args(tmp_path, gradient_accumulation_steps=2, bf16=True, num_train_epochs=1),
        train_dataset=toy_data(),
        pruning_config=config,
    )
    recorder = StepRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert trainer.state.global_step == 4 and recorder.steps == 4
    assert recorder.max_masked_abs == 0.0 and recorder.stale_optimizer_params == 0


def test_optimizer_state_survives_structural_events(tmp_path):
    """Untouched parameters keep their Adam state; sliced ones keep the moments of their kept rows/columns."""
    model = toy_model()
    config = PruningConfig(heads=0.5, ffn=0.5, schedule="oneshot", start_step=4)
    trainer = PruningTrainer(
        model=model, args=args(tmp_path, num_train_epochs=1), train_dataset=toy_data(), pruning_config=config
    )
    seen = {}

    def inner():
        return getattr(trainer.optimizer, "optimizer", trainer.optimizer)

    def layer0():
        block = model.bert.encoder.layer[0]
        return block.attention.self.query.weight, block.attention.output.dense.weight, block.intermediate.dense.weight

    class Probe(tf.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 3:  # the 4th optimizer step, before the event at step 4
                seen["before"] = [{k: v.clone() for k, v in inner().state[p].items()} for p in layer0()]

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:  # runs after the PruningCallback's event at this step
                emb = model.bert.embeddings.word_embeddings.weight
                seen["emb_steps"] = int(inner().state[emb]["step"]) if emb in inner().state else 0
                seen["after"] = [{k: v.clone() for k, v in inner().state[p].items()} for p in layer0()]
                seen["lr"] = inner().param_groups[0]["lr"]
                seen["sched_lr"] = trainer.lr_scheduler.get_last_lr()[0]
                seen["kept_heads"] = model.config.hf_prune["kept_heads"][0]
                seen["live"] = all(any(p is q for g in inner().param_groups for q in g["params"]) for p in layer0())

    trainer.add_callback(Probe())
    trainer.train()
    assert seen["emb_steps"] == 4  # Adam moments of unchanged parameters carried over
    assert seen["live"]  # the optimizer optimises the new, smaller parameters
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in seen["kept_heads"]])
    (q0, o0, f0), (q1, o1, f1) = seen["before"], seen["after"]
    assert len(seen["kept_heads"]) == 2 and q1["exp_avg"].shape[0] == 2 * head_dim
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(q1[key], q0[key][rows])  # query rows of the kept heads
        assert torch.equal(o1[key], o0[key][:, rows])  # output-projection columns of the kept heads
        assert f1[key].shape[0] < f0[key].shape[0]
        # every kept FFN row's moments appear unchanged among the old rows
        matches = (f1[key][:, None, :] == f0[key][None, :, :]).all(-1).any(1)
        assert bool(matches.all())
    assert int(q1["step"]) == int(q0["step"]) == 4
    assert seen["lr"] == pytest.approx(seen["sched_lr"]) and seen["lr"] < 1e-3  # schedule position kept


# ---- distillation ---------------------------------------------------------------------------------------
def test_distillation_adds_a_kl_term_against_the_dense_teacher(tmp_path):
    model = toy_model()
    trainer = PruningTrainer(
        model=model,
        args=args(tmp_path),
        train_dataset=toy_data(),
        pruning_config=PruningConfig(distill_alpha=1.0, distill_hidden=0.5),
    )
    batch = trainer.data_collator([toy_data()[i] for i in range(8)])
    model.train()
    # student == teacher before any pruning: pure distillation loss is zero
    assert float(trainer.compute_loss(model, batch).detach()) == pytest.approx(0.0, abs=1e-6)
    hf_prune.prune_heads(model, {0: [0, 1, 2, 3], 1: [0, 1, 2]})
    hf_prune.prune_ffn(model, {0: list(range(30)), 2: list(range(30))})
    got = float(trainer.compute_loss(model, batch).detach())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s_out = model(**inputs, output_hidden_states=True)
        t_out = trainer.teacher(**inputs, output_hidden_states=True)
    t = trainer.pruning_config.distill_temperature
    kl = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s_out.logits / t, -1), torch.softmax(t_out.logits / t, -1), reduction="batchmean"
        )
        * t
        * t
    )
    mse = torch.nn.functional.mse_loss(s_out.hidden_states[-1], t_out.hidden_states[-1])
    assert float(mse) > 1e-5
    # float32 KL of near-identical distributions carries ~1e-7 absolute rounding noise
    assert got == pytest.approx(float(kl + 0.5 * mse), abs=1e-6)
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert hf_prune.get_adapter(trainer.teacher).layer_shape(trainer.teacher, 0).heads == 4


# ---- save / reload / resume -----------------------------------------------------------------------------
def test_saved_model_reloads_with_stock_keys_and_real_zeros(tmp_path):
    model = toy_model()
    config = PruningConfig(target_flops=0.5, criterion="magnitude", schedule="iterative", frequency=4, sparsity=0.4)
    trainer = PruningTrainer(model=model, args=args(tmp_path), train_dataset=toy_data(), pruning_config=config)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    dense_keys = set(toy_model().state_dict())
    assert set(model.state_dict()) == dense_keys  # no masks, no parametrizations
    reloaded = hf_prune.from_pretrained(tmp_path / "final", tf.AutoModelForSequenceClassification).eval()
    batch = trainer.data_collator([toy_data()[i] for i in range(4)])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, atol=0, rtol=0)
    assert sparsity_report(reloaded)["overall"] == pytest.approx(sparsity_report(model)["overall"])
    # BERT's config cannot state pruned head counts, so save_model also wrote the remote code for stock loaders
    assert (tmp_path / "final" / "hf_prune_modeling.py").exists()
    stock = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    assert "modules" not in model.config.hf_prune and not hasattr(model.config, "auto_map")


@pytest.mark.parametrize("save_step", [3, 5])
def test_resume_from_mid_pruning_checkpoint_is_bit_identical(tmp_path, save_step):
    config = PruningConfig(heads=0.5, ffn=0.5, criterion="taylor", schedule="iterative", frequency=2, sparsity=0.4)
    data = toy_data()

    full_model = toy_model()
    full = PruningTrainer(
        model=full_model,
        args=args(tmp_path / "a", save_strategy="steps", save_steps=save_step),
        train_dataset=data,
        pruning_config=config,
    )
    full.train()

    resumed_model = toy_model()
    resumed = PruningTrainer(model=resumed_model, args=args(tmp_path / "b"), train_dataset=data, pruning_config=config)
    checkpoint = tmp_path / "a" / "out" / f"checkpoint-{save_step}"
    assert (checkpoint / "hf_prune_state.json").exists()
    resumed.train(resume_from_checkpoint=str(checkpoint))

    a, b = full_model.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.pruning_callback.done_steps == resumed.pruning_callback.done_steps


# ---- mixin / callback on other trainers -----------------------------------------------------------------
def test_mixin_works_with_another_trainer_subclass(tmp_path):
    class MySeq2SeqPruner(PruningMixin, tf.Seq2SeqTrainer):
        pass

    model = toy_model("distilbert")
    trainer = MySeq2SeqPruner(
        model=model,
        args=tf.Seq2SeqTrainingArguments(**args(tmp_path).to_dict() | {"output_dir": str(tmp_path / "s2s")}),
        train_dataset=toy_data(),
        pruning_config=PruningConfig(heads=0.5, ffn=0.25, schedule="oneshot"),
    )
    trainer.train()
    assert [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)] == [2, 2, 2]


def test_plain_callback_on_a_stock_trainer_keeps_masks(tmp_path):
    model = toy_model("gpt2")
    trainer = tf.Trainer(model=model, args=args(tmp_path), train_dataset=toy_data())
    callback = PruningCallback(
        PruningConfig(sparsity=0.6, sparsity_scope="global", schedule="cubic", frequency=2), trainer
    )
    trainer.add_callback(callback)
    trainer.train()
    assert sparsity_report(model)["overall"] == pytest.approx(0.6, abs=0.01)
    modules = prunable_linears(model)
    assert all(
        torch.equal(modules[n].weight[~m], torch.zeros_like(modules[n].weight[~m])) for n, m in callback.masks.items()
    )


def test_bad_trainer_inputs_fail_early(tmp_path):
    with pytest.raises(ValueError, match=r"PruningConfig\.heads=1\.5"):
        PruningTrainer(model=toy_model(), args=args(tmp_path), train_dataset=toy_data(), pruning_config={"heads": 1.5})
    with pytest.raises(ValueError, match="unknown key 'shedule'"):
        PruningTrainer(
            model=toy_model(), args=args(tmp_path), train_dataset=toy_data(), pruning_config={"shedule": "cubic"}
        )
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    )
    # removing heads needs an adapter (weight sparsity alone does not: tests/test_generic.py)
    with pytest.raises(ValueError, match="model_type='t5'"):
        PruningTrainer(model=t5, args=args(tmp_path), train_dataset=toy_data(), pruning_config=PruningConfig(heads=0.5))
    with pytest.raises(ValueError, match="needs calibration data"):
        PruningTrainer(
            model=toy_model(), args=args(tmp_path), pruning_config=PruningConfig(heads=0.5, criterion="fisher")
        )


def test_copy_of_trainer_model_is_not_pruned_teacher(tmp_path):
    # The teacher is a frozen snapshot of the dense model, independent of later surgery on the student.
    model = toy_model()
    snapshot = copy.deepcopy(model.state_dict())
    trainer = PruningTrainer(
        model=model,
        args=args(tmp_path, num_train_epochs=1),
        train_dataset=toy_data(),
        pruning_config=PruningConfig(heads=0.5, distill_alpha=0.5),
    )
    trainer.train()
    teacher_state = trainer.teacher.state_dict()
    assert all(torch.equal(snapshot[k], teacher_state[k]) for k in snapshot)


def test_structured_reconstruct_runs_at_every_event(tmp_path, monkeypatch):
    import hf_prune.structure.refit as reconstruct_module

    calls = []
    real = reconstruct_module.apply_plan_with_compensation

    def spy(model, plan, batches, **kw):
        calls.append(plan.num_heads_removed + plan.num_neurons_removed)
        return real(model, plan, batches, **kw)

    # PruningPlan.apply(model, calibration=...) refits through this function
    monkeypatch.setattr(reconstruct_module, "apply_plan_with_compensation", spy)
    model = toy_model()
    config = PruningConfig(
        heads=0.5, ffn=0.5, ffn_multiple=1, schedule="iterative", frequency=3, end_step=9, reconstruct=True
    )
    trainer = PruningTrainer(model=model, args=args(tmp_path), train_dataset=toy_data(), pruning_config=config)
    trainer.train()
    assert len(calls) == len(trainer.pruning_callback.done_steps) >= 3 and all(n > 0 for n in calls)
    shapes = hf_prune.get_adapter(model).layer_shapes(model)
    assert [s.heads for s in shapes] == [2, 2, 2] and [s.ffn for s in shapes] == [20, 20, 20]


def test_distillation_uses_the_given_teacher_model(tmp_path):
    teacher = toy_model()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = toy_model()
    trainer = PruningTrainer(
        model=model,
        args=args(tmp_path),
        train_dataset=toy_data(),
        pruning_config=PruningConfig(distill_alpha=1.0),
        teacher_model=teacher,
    )
    assert trainer.teacher is teacher and all(not p.requires_grad for p in teacher.parameters())
    batch = trainer.data_collator([toy_data()[i] for i in range(8)])
    model.train()
    # the student differs from this teacher, so pure distillation is no longer zero (it is with the default copy)
    assert float(trainer.compute_loss(model, batch).detach()) > 1e-4


def test_teacher_model_mismatches_fail_early(tmp_path):
    with pytest.raises(ValueError, match="distill_alpha and distill_hidden are both 0"):
        PruningTrainer(model=toy_model(), args=args(tmp_path), train_dataset=toy_data(), teacher_model=toy_model())
    config = FAMILIES["bert"].make_config()
    config.num_labels = 3
    three_labels = tf.BertForSequenceClassification(config)
    with pytest.raises(ValueError, match="num_labels=3 but the model is a BertForSequenceClassification"):
        PruningTrainer(
            model=toy_model(),
            args=args(tmp_path),
            train_dataset=toy_data(),
            pruning_config=PruningConfig(distill_alpha=0.5),
            teacher_model=three_labels,
        )
