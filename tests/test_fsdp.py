"""FSDP2 (torch ``fully_shard``): masks on sharded weights, structure cut before sharding, and the clear refusals.

The two-process job (gloo, CPU) drives the callback and PruningTrainer's pre-sharding cut step by step the way
``Trainer`` does (tests/fsdp_worker.py): the stock Trainer refuses FSDP without CUDA ("Using fsdp only works in
distributed training"), so the Trainer's own FSDP path runs in the CUDA tier at the end of this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as tf

from hf_prune import PruningConfig
from hf_prune.training.callback import check_backend
from hf_prune.training.fsdp import cuts_after_start, fsdp_version

from .test_distributed import _free_port


def launch_fsdp(out: Path, mode: str, nproc: int = 2) -> list[dict]:
    """Run ``fsdp_worker.py out mode`` in ``nproc`` processes under torch.distributed.run; the ranks' results."""
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(worker), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(nproc)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return launch_fsdp(tmp_path_factory.mktemp("fsdp"), "cpu")


# ---- (a) masks on sharded weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["magnitude-iterative", "activation-global-root", "nm-oneshot", "magnitude-lora"])
def test_masks_hold_on_every_shard_and_match_one_process(two_ranks, scenario):
    for rank in two_ranks:
        r = rank[scenario]
        assert rank["world_size"] == 2
        assert r["sharded_type"] == "DTensor"  # the applier really ran on sharded parameters
        assert r["masked_abs"] == {"local": 0.0, "whole": 0.0}, r["masked_abs"]  # exactly zero, every step
        assert r["ref_masked_abs"] == {"local": 0.0, "whole": 0.0}
        assert r["done_steps"] == r["ref_done_steps"] and r["done_steps"]
        # masks chosen from gathered weights: the same as one process chooses, and whole (not this rank's chunk)
        assert r["masks_equal"] and r["masks_whole"] and r["n_masks"] == 3 * 7
        assert r["max_weight_diff"] < 1e-5, r["max_weight_diff"]  # the same training, up to reduction order
        # sparsity counted over all shards (a sharded count is this rank's share until reduced)
        assert r["sparsity"] == pytest.approx(r["ref_sparsity"]) and r["sparsity"] > 0.3
    assert two_ranks[0][scenario]["saved_masks_whole"]  # the checkpoint's mask file: whole matrices


# ---- (b) one-shot structure before sharding ------------------------------------------------------------------
def test_structure_is_cut_once_before_sharding_and_kept(two_ranks):
    r0, r1 = (rank["structure"] for rank in two_ranks)
    assert r0["cut"] != r0["dense"]
    assert all(c["ffn"] < d["ffn"] and c["heads"] < d["heads"] for c, d in zip(r0["cut"], r0["dense"], strict=True))
    # every rank cut alike (scores summed over ranks) before the shards were taken from the whole model
    assert r0["cut"] == r1["cut"] and r0["cut_digest"] == r1["cut_digest"]
    assert r0["after"] == r0["cut"] and r1["after"] == r1["cut"]  # train begin and the steps cut nothing more
    assert r0["done_steps"] == [0]
    assert r0["weights_digest"] == r1["weights_digest"]
    assert r0["masked_abs"] == {"local": 0.0, "whole": 0.0} and r0["masks_whole"]
    assert r0["sparsity"] == pytest.approx(0.3, abs=0.02)
    # distillation: the teacher is the dense, unsharded copy; the student's losses stay finite
    assert not r0["teacher_sharded"] and r0["teacher_shapes"] == r0["dense"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))


# ---- (c) refusals, before any work ----------------------------------------------------------------------------
def fsdp_args(tmp_path, version: int = 2) -> tf.TrainingArguments:
    return tf.TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config={"version": version}, report_to="none")


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"heads": 0.5, "schedule": "iterative"}, r"heads=0\.5 with schedule='iterative', start_step=None"),
        ({"target_flops": 0.5, "schedule": "cubic"}, r"target_flops=0\.5 with schedule='cubic'"),
        ({"ffn": 0.3, "start_step": 10}, r"ffn=0\.3 with schedule='oneshot', start_step=10"),
        ({"ffn": 0.3, "start_epoch": 1.0}, r"start_epoch=1\.0"),
    ],
)
def test_structure_after_step_zero_under_fsdp_is_refused_naming_the_values(tmp_path, config, named):
    config = PruningConfig(**config)
    assert cuts_after_start(config)
    with pytest.raises(ValueError, match=named) as err:
        check_backend(fsdp_args(tmp_path), config)
    assert "schedule='oneshot'" in str(err.value) and "hf_prune.prune(" in str(err.value)


def mixin_like(version: int = 2, **kw) -> SimpleNamespace:
    """What check_backend reads of a PruningMixin trainer under FSDP: its accelerator's FSDP version, the cut hook."""
    plugin = SimpleNamespace(fsdp_version=version)
    return SimpleNamespace(
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
        cut_before_sharding=lambda resume_from_checkpoint=None: None,
        **kw,
    )


def test_what_fsdp2_allows(tmp_path):
    args = fsdp_args(tmp_path)
    assert fsdp_version(args) == 2
    masks_only = (
        PruningConfig(sparsity=0.5, schedule="cubic", frequency=2),  # masks follow any schedule
        PruningConfig(pattern="2:4", schedule="iterative"),
        PruningConfig(),
    )
    one_shot = (
        PruningConfig(heads=0.5, ffn=0.3, sparsity=0.5),  # one-shot at step 0: PruningTrainer cuts before sharding
        PruningConfig(ffn=0.3, start_step=0),
    )
    for config in masks_only:
        check_backend(args, config)  # a PruningCallback on a stock Trainer included
    for config in (*masks_only, *one_shot):
        check_backend(args, config, mixin_like())
        check_backend(SimpleNamespace(fsdp=None, deepspeed=None), config, mixin_like())  # the accelerator says FSDP
    # structure needs the mixin's cut before sharding: a bare callback would first see the model sharded
    with pytest.raises(ValueError, match=r"heads=0\.5, ffn=0\.3\) under FSDP only through PruningTrainer"):
        check_backend(args, one_shot[0])
    with pytest.raises(ValueError, match="model_init"):
        check_backend(args, one_shot[0], mixin_like(model_init=lambda: None))
    with pytest.raises(ValueError, match="version=1"):  # what the accelerator runs wins over the arguments
        check_backend(args, masks_only[0], mixin_like(version=1))


def test_fsdp1_is_refused_when_pruning(tmp_path):
    args = fsdp_args(tmp_path, version=1)
    with pytest.raises(ValueError, match=r"FSDP version 2 only, but fsdp_config version=1.*'version': 2"):
        check_backend(args, PruningConfig(sparsity=0.5))
    check_backend(args, PruningConfig())  # nothing to prune


@pytest.mark.parametrize("config", [{"sparsity": 0.5}, {"heads": 0.5}])
def test_deepspeed_is_refused_naming_fsdp(config):
    # TrainingArguments(deepspeed=...) needs the deepspeed package; check_backend reads the attribute only
    args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": 3}}, fsdp=None)
    with pytest.raises(ValueError, match=r"cannot prune under DeepSpeed.*fsdp_config=\{'version': 2\}"):
        check_backend(args, PruningConfig(**config))
    check_backend(args, PruningConfig())
    with pytest.raises(ValueError, match="FSDP version 2"):
        check_backend(
            SimpleNamespace(deepspeed=None, fsdp=None),
            PruningConfig(**config),
            SimpleNamespace(is_deepspeed_enabled=True),
        )


# ---- CUDA tier: the Trainer's own FSDP2 path -----------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the stock Trainer refuses FSDP on CPU)")
def test_pruning_trainer_under_fsdp2_on_gpus(tmp_path):
    """PruningTrainer(fsdp=True, fsdp_config={"version": 2}) under torchrun: cut before sharding, masks and
    distillation while sharded, and a resumed run that replays the cut before sharding again."""
    nproc = min(2, torch.cuda.device_count())
    for r in launch_fsdp(tmp_path, "trainer", nproc=nproc):
        assert r["fsdp"] and r["sharded"]
        assert r["after"] != r["dense"] and r["done_steps"] == [0]
        assert r["masked_abs"] == {"local": 0.0, "whole": 0.0}
        assert r["loss"] is not None and r["loss"] == r["loss"]
        assert r["resumed_after"] == r["after"]
        assert r["resumed_masked_abs"] == {"local": 0.0, "whole": 0.0}
