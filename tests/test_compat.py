"""hf_prune.compat: every private API of another library that hf_prune relies on still exists with the shape hf_prune
expects, and each helper that reaches one does its job. A failure names the entry and points at hf_prune/compat.py."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import accelerate
import peft
import pytest
import torch
import transformers as tf
from torch import nn
from transformers import GgufConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

from hf_prune import PruningConfig, PruningMixin, PruningTrainer
from hf_prune.compat import (
    CHECKED_AGAINST,
    PRIVATE_ATTRIBUTES,
    PRIVATE_TRAINER_METHODS,
    REMOTE_CODE_PRIVATE_APIS,
    PrivateAttribute,
    auto_class_mapping,
    overrides_private,
    packed_weights,
    replace_prepared_model,
    swap_class,
)
from hf_prune.structure.remote_code import make_empty

from .test_trainer import args, toy_data, toy_model

VERSIONS = {
    "transformers": tf.__version__,
    "accelerate": accelerate.__version__,
    "torch": torch.__version__,
    "peft": peft.__version__,
}


def _removed(library: str, what: str, why: str) -> str:
    return (
        f"{library} {VERSIONS.get(library, '?')} removed {what}, which hf_prune uses: {why} (checked against "
        f"{library} {CHECKED_AGAINST.get(library, '?')}); see hf_prune/compat.py"
    )


# ---- private Trainer methods ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_METHODS))
def test_private_trainer_methods_still_exist_with_the_parameters_hf_prune_overrides(name):
    entry = PRIVATE_TRAINER_METHODS[name]
    stock = getattr(tf.Trainer, name, None)
    assert callable(stock), _removed("transformers", f"Trainer.{name}", entry.why)
    params = tuple(inspect.signature(stock).parameters)
    assert params == entry.params, (
        f"transformers {tf.__version__} changed Trainer.{name} to take {params}; hf_prune's override expects "
        f"{entry.params} ({entry.why}); see hf_prune/compat.py"
    )
    ours = vars(PruningMixin).get(name)
    assert ours is not None, f"PRIVATE_TRAINER_METHODS lists {name}, which PruningMixin no longer overrides"
    assert tuple(inspect.signature(ours).parameters) == entry.params


def test_every_private_trainer_method_pruning_mixin_overrides_is_registered():
    overridden = {
        name
        for name, value in vars(PruningMixin).items()
        if callable(value) and name.startswith("_") and not name.startswith("__") and hasattr(tf.Trainer, name)
    }
    assert overridden == set(PRIVATE_TRAINER_METHODS), (
        f"PruningMixin overrides the private Trainer methods {sorted(overridden)}; hf_prune.compat lists "
        f"{sorted(PRIVATE_TRAINER_METHODS)}"
    )
    with pytest.raises(RuntimeError, match=r"_train_batch_size.*not listed in hf_prune\.compat"):

        @overrides_private
        def _train_batch_size(self):
            pass


# ---- private attributes ---------------------------------------------------------------------------------------------
def _auto_classes() -> list[type]:
    return [getattr(tf, n) for n in dir(tf) if n.startswith("AutoModel")]


def _accelerator(tmp_path) -> Any:
    return tf.Trainer(model=toy_model(), args=args(tmp_path)).accelerator


PROBES = {  # (owner, attribute) -> the objects that must carry it, built from the installed libraries
    ("transformers.AutoModel* classes", "_model_mapping"): lambda tmp: _auto_classes(),
    ("accelerate.Accelerator (instance)", "_models"): lambda tmp: [_accelerator(tmp)],
    ("transformers GgufHfQuantizer (instance)", "packed_modules"): lambda tmp: [
        GgufHfQuantizer(GgufConfig(dequantize=True))
    ],
    ("Python object model", "__class__"): lambda tmp: [nn.Linear(2, 2)],
    ("peft LoRA layer (instance; and peft.tuners.lora.layer.LoraVariant)", "lora_variant"): lambda tmp: [
        _peft_lora_layer()
    ],
}


def _peft_lora_layer() -> nn.Module:
    from peft.tuners.lora.layer import Linear, LoraVariant

    hooks = ("init", "merge_safe", "merge_unsafe", "unmerge", "forward")
    assert all(callable(getattr(LoraVariant, h, None)) for h in hooks), _removed(
        "peft", f"LoraVariant.{{{', '.join(hooks)}}}", "hf_prune.compat.mask_lora_delta's masked LoRA delta"
    )
    from peft import LoraConfig

    return Linear(nn.Linear(4, 4), "default", config=LoraConfig(r=2), r=2)


@pytest.mark.parametrize("entry", PRIVATE_ATTRIBUTES + REMOTE_CODE_PRIVATE_APIS, ids=lambda e: f"{e.owner}.{e.name}")
def test_private_attributes_still_exist(entry: PrivateAttribute, tmp_path):
    probe = PROBES.get((entry.owner, entry.name))
    assert probe is not None, f"hf_prune.compat lists {entry.owner}.{entry.name}; add a probe for it to PROBES"
    library = entry.owner.split(".")[0].split(" ")[0]
    missing = [
        o.__name__ if isinstance(o, type) else type(o).__name__
        for o in probe(tmp_path)
        if getattr(o, entry.name, None) is None
    ]
    assert not missing, _removed(library, f"{entry.name} (on {', '.join(missing[:3])})", f"{entry.where}: {entry.why}")


# ---- the helpers --------------------------------------------------------------------------------------------------
def test_auto_class_mapping_resolves_a_config_like_the_public_names_table():
    mapping = auto_class_mapping(tf.AutoModelForSequenceClassification)
    assert mapping[tf.BertConfig].__name__ == MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES["bert"]
    assert mapping[tf.LlamaConfig] is tf.LlamaForSequenceClassification
    assert auto_class_mapping(tf.BertModel) is None  # not an auto class


def test_replace_prepared_model_swaps_only_the_prepared_entry(tmp_path):
    accelerator = _accelerator(tmp_path)
    old, new, stranger = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    prepared = accelerator.prepare_model(old)
    before = list(accelerator._models)
    assert any(m is prepared for m in before)
    replace_prepared_model(accelerator, prepared, new)
    after = accelerator._models
    assert len(after) == len(before) and any(m is new for m in after) and not any(m is prepared for m in after)
    replace_prepared_model(accelerator, stranger, nn.Linear(2, 2))  # never prepared: nothing changes
    assert [id(m) for m in accelerator._models] == [id(m) for m in after]


def test_swap_class_moves_along_the_hierarchy_only():
    class Shaped(nn.Linear):
        pass

    layer = Shaped(3, 2)
    weight = layer.weight
    swap_class(layer, nn.Linear)
    assert type(layer) is nn.Linear and layer.weight is weight
    with pytest.raises(TypeError, match=r"swap_class: Embedding is not in the class hierarchy of the Linear"):
        swap_class(layer, nn.Embedding)
    assert type(layer) is nn.Linear  # refused before anything changed


def test_remote_code_empty_block_is_a_subclass_with_the_same_tensors():
    block = nn.Sequential(nn.Linear(4, 3))
    keys = list(block.state_dict())
    make_empty(block, "ffn", "0")
    assert isinstance(block, nn.Sequential) and type(block) is not nn.Sequential
    assert list(block.state_dict()) == keys
    out = block(torch.zeros(2, 4))
    assert torch.equal(out, block[0].bias.detach().expand(2, 3))  # only the output bias is left


def test_packed_weights_names_integer_weights_and_the_quantizers_packed_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.zeros(4, 2, dtype=torch.uint8), requires_grad=False)  # GGUF blocks
    assert packed_weights(model) == ["0.weight"]
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.hf_quantizer.packed_modules = {"2.weight": model[2]}
    assert packed_weights(model) == ["0.weight", "2"]


# ---- public replacements --------------------------------------------------------------------------------------------
def _distilling_trainer(tmp_path, **kw: Any) -> PruningTrainer:
    config = PruningConfig(heads=0.25, criterion="magnitude", distill_alpha=0.5)
    return PruningTrainer(
        model=toy_model(), args=args(tmp_path, **kw), train_dataset=toy_data(16), pruning_config=config
    )


def test_teacher_follows_the_model_when_training_begins(tmp_path):
    trainer = _distilling_trainer(tmp_path)
    follower = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "_TeacherFollowsModel")
    moved = copy.deepcopy(trainer.model).to("meta")  # stands for a model Trainer.train moved after __init__
    follower.on_train_begin(trainer.args, trainer.state, trainer.control, model=moved)
    assert {p.device.type for p in trainer.teacher.parameters()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: Trainer.train moves the model there")
def test_teacher_follows_a_model_that_train_moves_to_the_gpu(tmp_path):
    # fp16_full_eval: __init__ leaves the model (and the teacher copied from it) on the CPU; train() moves the model
    trainer = _distilling_trainer(tmp_path, use_cpu=False, fp16_full_eval=True, max_steps=2)
    assert trainer.teacher.device.type == "cpu"
    trainer.train()
    assert trainer.teacher.device == trainer.model.device and trainer.model.device.type == "cuda"
