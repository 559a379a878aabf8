"""Distillation: the same total loss whatever the micro-batching, padding or number of processes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from hf_prune import PruningConfig, PruningTrainer
from hf_prune.training.distill import count_positions, kl_sum, logit_positions

from .distill_setup import CONFIG, setup, training_args
from .families import FAMILIES, make_model
from .test_distributed import launch


def one_step(tmp_path, kind: str, batch: int, accumulation: int, config: PruningConfig = CONFIG):
    model, data, collate = setup(kind)
    trainer = PruningTrainer(
        model=model,
        args=training_args(tmp_path / f"{batch}x{accumulation}", batch, accumulation),
        train_dataset=data,
        data_collator=collate,
        pruning_config=config,
    )
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_gradient_accumulation_does_not_change_the_distillation_loss(tmp_path, kind):
    """1 x 16 and 2 x 8 micro-batches (each padded to its own length) give the same loss and the same update."""
    loss_a, weights_a = one_step(tmp_path, kind, 16, 1)
    loss_b, weights_b = one_step(tmp_path, kind, 8, 2)
    assert loss_a > 0.05
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    for key, value in weights_a.items():
        torch.testing.assert_close(weights_b[key], value, atol=1e-5, rtol=0)


def test_intermediate_alpha_mixes_task_loss_and_kl(tmp_path):
    """0 < alpha < 1: the total is (1 - alpha) * task loss + alpha * KL, each measured on its own here."""
    losses = {}
    for alpha in (0.0, 0.3, 1.0):
        model, data, collate = setup("classifier")
        teacher = make_model(FAMILIES["bert"], tf.BertForSequenceClassification, seed=1)
        with torch.no_grad():
            teacher.classifier.weight.mul_(100)  # a confident teacher that disagrees with the model
        extra = {"teacher_model": teacher} if alpha else {}
        trainer = PruningTrainer(
            model=model,
            args=training_args(tmp_path / str(alpha), 16, 1),
            train_dataset=data,
            data_collator=collate,
            pruning_config=PruningConfig(distill_alpha=alpha, distill_temperature=1.0),
            **extra,
        )
        trainer.train()
        losses[alpha] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    task, kl = losses[0.0], losses[1.0]
    assert kl > 0.01 and abs(task - kl) > 0.01  # the mix below is informative
    assert losses[0.3] == pytest.approx(0.7 * task + 0.3 * kl, abs=1e-4)


def test_kl_ignores_padding_and_ignored_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    inputs = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 4, 5, 6, 7], [-100, -100, 3, -100, -100]]),
    }
    valid = logit_positions(inputs, causal=True)
    # position t predicts label t + 1; the last position predicts nothing
    assert valid.tolist() == [[True, True, True, True, False], [False, True, False, False, False]]
    assert count_positions(inputs, causal=True) == (5, 8)
    base = kl_sum(student, teacher, valid, 2.0)
    garbled = teacher.clone()
    garbled[~valid] = torch.randn(int((~valid).sum()), 7) * 10  # whatever the model says at ignored positions
    assert float(kl_sum(student, garbled, valid, 2.0)) == pytest.approx(float(base), rel=1e-6)
    by_hand = sum(
        float(
            torch.nn.functional.kl_div(
                torch.log_softmax(student[b, t] / 2, -1),
                torch.log_softmax(teacher[b, t] / 2, -1),
                log_target=True,
                reduction="sum",
            )
        )
        * 4
        for b, t in valid.nonzero().tolist()
    )
    assert float(base) == pytest.approx(by_hand, rel=1e-5)
    # a classifier: one distribution per example, -100 labels skipped
    cls_valid = logit_positions({"input_ids": torch.ones(3, 4), "labels": torch.tensor([1, -100, 0])}, causal=False)
    assert cls_valid.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="cannot align"):
        kl_sum(torch.randn(3, 4, 2), torch.randn(3, 4, 2), cls_valid, 1.0)


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_world_size_does_not_change_the_distillation_loss(tmp_path, kind):
    """2 processes x 8 (gloo) take the same step as 1 process x 16."""
    results = {}
    for nproc, batch in ((1, 16), (2, 8)):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        launch(out, f"distill-{kind}", str(batch), nproc=nproc)
        results[nproc] = (json.loads((out / "rank0.json").read_text()), load_file(out / "rank0.safetensors"))
    (meta1, w1), (meta2, w2) = results[1], results[2]
    assert meta1["world_size"] == 1 and meta2["world_size"] == 2
    assert meta2["loss"] == pytest.approx(meta1["loss"], abs=1e-5)
    for key, value in w1.items():
        torch.testing.assert_close(w2[key], value, atol=1e-5, rtol=0)
