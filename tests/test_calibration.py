"""Calibration data in every form users have: one bounded sample, drawn once, reused by every pass."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from datasets import Dataset
from torch.utils.data import DataLoader

import hf_prune
from hf_prune import PruningConfig, prune
from hf_prune.scoring.calibration import ACCEPTED_FORMS, calibration_set, pad_collate
from hf_prune.scoring.criteria import mask_gradient_scores

from .families import FAMILIES, VOCAB, make_model


def model_and_examples(name: str = "bert", n: int = 24, seed: int = 0):
    family = FAMILIES[name]
    cls = next(c for c in family.classes if "ForSequenceClassification" in c.__name__)
    model = make_model(family, cls)
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(5, 17, (1,), generator=g))  # ragged lengths
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "label": i % 2, "sentence": f"text {i}", "idx": i})
    return model, examples


def ready_batches(examples, size: int = 8, pad_id: int = 0) -> list[dict]:
    """What ``tokenizer(texts[i:i+size], padding=True, return_tensors="pt") | {"labels": ...}`` gives: each batch
    padded to its own longest row."""
    out = []
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, e in enumerate(chunk):
            ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[row, : len(e["input_ids"])] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in chunk])})
    return out


def test_ready_batches_of_different_lengths_are_batches_not_examples():
    model, examples = model_and_examples()
    batches = ready_batches(examples)
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # the shape that used to fail in collation
    sample = calibration_set(batches, model, max_samples=20)
    assert [b["input_ids"].shape[0] for b in sample] == [8, 8, 4]  # cut at max_samples, batches kept as given
    assert [b["input_ids"].shape[1] for b in sample] == [b["input_ids"].shape[1] for b in batches]


@pytest.mark.parametrize(
    "form", ["examples", "examples+collator", "batches", "generator", "dataloader", "dataset", "single-batch"]
)
def test_every_form_gives_the_same_fisher_scores(form):
    """Padding is masked out, so scores depend only on the examples, never on how they were batched or padded."""
    model, examples = model_and_examples()
    reference = mask_gradient_scores(model, calibration_set(examples, model, batch_size=1), "fisher", progress=False)
    if form == "examples":
        data = examples
    elif form == "examples+collator":
        data = examples  # with an explicit collate_fn below
    elif form == "batches":
        data = ready_batches(examples)
    elif form == "generator":
        data = (b for b in ready_batches(examples))
    elif form == "dataloader":
        data = DataLoader(
            [{"input_ids": e["input_ids"], "labels": e["label"]} for e in examples],
            batch_size=8,
            collate_fn=pad_collate(0),
        )
    elif form == "dataset":
        data = Dataset.from_list(examples)  # extra text and id columns are dropped
    else:
        data = ready_batches(examples, size=len(examples))[0]
    collate = pad_collate(0) if form == "examples+collator" else None
    sample = calibration_set(data, model, batch_size=8, collate_fn=collate)
    assert sample.num_examples == len(examples)
    assert all(set(b) <= {"input_ids", "attention_mask", "token_type_ids", "labels"} for b in sample)
    scores = mask_gradient_scores(model, sample, "fisher", progress=False)
    for got, want in zip(scores.heads + scores.ffn, reference.heads + reference.ffn, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
@pytest.mark.parametrize("form", ["batches", "generator"])
def test_prune_with_batches_and_generators_including_reconstruct(criterion, form):
    """A generator is read once: scoring, the least-squares refit and the OBS pass all see the same sample."""
    results = []
    for make in ("list", form):
        model, examples = model_and_examples()
        batches = ready_batches(examples)
        data = batches if make == "list" else (b for b in ready_batches(examples))
        config = PruningConfig(target_flops=0.6, criterion=criterion, scope="global", reconstruct=True, seq_len=16)
        report = prune(model, config, calibration_data=data)
        assert report.flops_after < report.flops_before
        probe = batches[0]
        with torch.no_grad():
            results.append((report.plan, model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1].logits, results[1][1].logits)


def test_generator_feeds_unstructured_reconstruction_and_activation_norms():
    for sparsity_criterion in ("activation",):
        model, examples = model_and_examples()
        data = (b for b in ready_batches(examples))
        config = PruningConfig(sparsity=0.5, sparsity_criterion=sparsity_criterion, reconstruct=True)
        report = prune(model, config, calibration_data=data)
        assert report.sparsity == pytest.approx(0.5, abs=0.01)


def test_ragged_examples_are_padded_with_the_models_pad_token_and_masked():
    model, examples = model_and_examples("roberta")  # pad_token_id = 1
    batch = next(iter(calibration_set(examples[:4], model, batch_size=4)))
    lengths = [len(e["input_ids"]) for e in examples[:4]]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert bool((batch["input_ids"][row, n:] == 1).all())
    assert batch["labels"].tolist() == [0, 1, 0, 1] and "sentence" not in batch and "idx" not in batch


@pytest.mark.parametrize(
    "bad",
    [42, "some text", ["a", "b"], [{"text": "no ids"}], {"text": "no ids"}, torch.zeros(3, dtype=torch.long)],
)
def test_unsupported_forms_get_one_clear_error(bad):
    model, _ = model_and_examples()
    with pytest.raises(TypeError) as err:
        calibration_set(bad, model)
    assert ACCEPTED_FORMS in str(err.value)


def test_empty_data_is_an_error_not_a_silent_zero():
    model, _ = model_and_examples()
    for empty in ([], (b for b in [])):
        with pytest.raises(ValueError, match="empty"):
            calibration_set(empty, model)
    with pytest.raises(ValueError, match="needs calibration_data"):
        prune(model, PruningConfig(heads=0.5, criterion="fisher"))


def test_trainer_takes_a_generator_as_calibration_dataset(tmp_path):
    from .test_trainer import args, toy_data, toy_model

    model = toy_model()
    data = toy_data()
    batches = ready_batches([{"input_ids": r["input_ids"], "label": r["labels"]} for r in data], size=16)
    config = PruningConfig(
        heads=0.5, ffn=0.5, criterion="fisher", reconstruct=True, schedule="iterative", frequency=4, end_step=8
    )
    trainer = hf_prune.PruningTrainer(
        model=model,
        args=args(tmp_path),
        train_dataset=data,
        calibration_dataset=(b for b in batches),  # read once, reused at all three events
        pruning_config=config,
    )
    trainer.train()
    assert trainer.pruning_callback.done_steps == [0, 4, 8]
    assert [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)] == [2, 2, 2]


def test_stock_tokenizer_batches_work_end_to_end():
    """BatchEncoding (what tokenizers return) is a Mapping, and lists of them are ready batches."""
    model, examples = model_and_examples()
    batches = [tf.BatchEncoding(b) for b in ready_batches(examples)]
    report = prune(model, PruningConfig(heads=0.5, criterion="taylor"), calibration_data=batches)
    assert report.layers_after[0]["heads"] == 2


def test_a_whole_tokenized_set_in_one_mapping_is_cut_into_batches():
    """``tokenizer(all_texts)`` without tensors: a dict of ragged lists, padded, then split by batch_size."""
    model, examples = model_and_examples()
    whole = {"input_ids": [e["input_ids"] for e in examples], "labels": [e["label"] for e in examples]}
    sample = calibration_set(whole, model, batch_size=8, max_samples=20)
    assert [b["input_ids"].shape[0] for b in sample] == [8, 8, 4]
    lengths = [len(e["input_ids"]) for e in examples[:8]]
    width = sample.batches[0]["input_ids"].shape[1]
    assert width == max(len(e["input_ids"]) for e in examples)  # padded once, over the whole set
    assert sample.batches[0]["attention_mask"].sum(1).tolist() == lengths  # padding masked
    scores = mask_gradient_scores(model, sample, "fisher", progress=False)
    reference = mask_gradient_scores(
        model, calibration_set(examples[:20], model, batch_size=1), "fisher", progress=False
    )
    for got, want in zip(scores.heads, reference.heads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_streaming_iterable_dataset_of_examples():
    model, examples = model_and_examples()
    stream = Dataset.from_list(examples).to_iterable_dataset()
    sample = calibration_set(stream, model, batch_size=8, max_samples=16)
    assert sample.num_examples == 16 and len(sample) == 2
    assert set(sample.batches[0]) == {"input_ids", "attention_mask", "labels"}
