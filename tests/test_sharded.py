"""Sharded models: FSDP2 (``fully_shard`` through ``ModelParallelStrategy``) on CPU processes with gloo, and the
sharded strategies that stay refused.

The two-process runs start through ``benchmarks/sharded_fit.py`` (which the GPU check also runs):
``ModelParallelStrategy`` launches its other processes by running the script again, which a pytest process cannot be.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _utils import quiet_trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import sharded_fit
from lightning_jit import JiTUnlearning
from lightning_jit.core.reference import FrozenReference, call_with_state
from lightning_jit.core.weights import WeightSnapshot, is_sharded
from lightning_jit.demo.data import DigitsCNN
from lightning_jit.lightning.distributed import check_strategy_support, shard_model

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "sharded_fit.py"
RUNS = sharded_fit.RUNS


def _fit(state_path: Path, out: Path, devices: int, *flags: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    command = [sys.executable, str(SCRIPT), "--state", str(state_path), "--out", str(out), "--devices", str(devices)]
    done = subprocess.run([*command, *flags], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def fsdp2_runs(_trained_state, tmp_path_factory) -> dict[str, dict]:
    """The three runs of ``sharded_fit.py`` (wrapper, wrapper with ``retain=``, callback), sharded over 2 processes (one
    launch, the three runs one after the other in the same processes) and unsharded in this process."""
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    state_path = tmp_path / "trained.pt"
    torch.save(_trained_state, state_path)
    two = _fit(state_path, tmp_path / "two.pt", 2, "--shard", "--runs", ",".join(RUNS))
    one, _ = sharded_fit.run_all(
        list(RUNS), _trained_state, {"accelerator": "cpu", "devices": 1, "default_root_dir": tmp_path}, shard=False
    )
    return {"one": one, "two": two}


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_on_two_processes_gives_the_one_process_weights_and_outcome(_trained_state, fsdp2_runs, run):
    """The no-knob path under the documented rule (ids, ``seed=``, ``use_distributed_sampler=False``), sharded with
    ``fully_shard`` over 2 CPU processes, against one unsharded process; the launching process holds the outcome."""
    one, two = fsdp2_runs["one"][run], fsdp2_runs["two"][run]
    update = _max_diff(one["weights"], _trained_state)
    assert update > 1e-2  # the run moved the weights
    assert _max_diff(one["weights"], two["weights"]) <= 1e-5 * update
    assert one["summary"]["outcome"] == "forgotten"
    assert two["summary"] == one["summary"]


@pytest.fixture
def one_process_group():
    """A gloo process group of one process (rank 0), for ``fully_shard`` inside the test process."""
    assert not dist.is_initialized()
    port = os.environ.pop("MASTER_PORT", None)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
        if port is not None:
            os.environ["MASTER_PORT"] = port


def test_the_frozen_reference_of_a_sharded_model_evaluates_the_original_weights(one_process_group):
    """``fully_shard`` gathers the module's own shards in its forward, so ``functional_call`` alone would evaluate the
    current weights. Checked against an unsharded copy of the original, with a backward pending on the current one."""
    torch.manual_seed(0)
    model, original = DigitsCNN(), DigitsCNN()
    original.load_state_dict(model.state_dict())
    shard_model(model, one_process_group)
    assert is_sharded(model) and not is_sharded(original)
    x = torch.randn(5, 1, 8, 8)
    frozen, snapshot = FrozenReference(model), WeightSnapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(0.05)
    current = model(x)  # a forward whose backward is still to come
    want = original.eval()(x)
    assert float((current - want).detach().abs().max()) > 1e-2
    torch.testing.assert_close(frozen(x), want)
    torch.testing.assert_close(call_with_state(model, snapshot.state, x), want)
    current.sum().backward()  # the current weights' gradients, after the reference's passes
    shifted = DigitsCNN()
    shifted.load_state_dict({k: v + 0.05 if v.is_floating_point() else v for k, v in original.state_dict().items()})
    shifted(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), shifted.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=name)
    snapshot.restore(model)
    torch.testing.assert_close(model(x), original(x))


def test_fsdp1_is_refused_naming_fsdp2_and_ddp():
    with pytest.raises(MisconfigurationException, match="FSDPStrategy") as err:
        check_strategy_support(FSDPStrategy())
    assert "ModelParallelStrategy(data_parallel_size=" in str(err.value) and "strategy='ddp'" in str(err.value)


def test_tensor_parallelism_is_refused_before_any_step():
    net = DigitsCNN()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = quiet_trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size=1"):
        trainer.fit(JiTUnlearning(net, seed=0), loader)
    assert all(torch.equal(v, start[k]) for k, v in net.state_dict().items())
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size"):
        check_strategy_support(ModelParallelStrategy())  # "auto": the devices of a node, tensor parallel


def test_sharded_checkpoints_that_bypass_the_checkpoint_io_are_refused_at_setup(tmp_path):
    """Distributed checkpoints skip the Trainer's checkpoint IO, where unverified checkpoints are held back."""
    net = DigitsCNN()
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)  # save_distributed_checkpoint=True
    trainer = quiet_trainer(strategy=strategy, enable_checkpointing=True, default_root_dir=tmp_path)
    try:
        with pytest.raises(MisconfigurationException, match="save_distributed_checkpoint=False"):
            trainer.fit(JiTUnlearning(net, seed=0), loader)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not any(tmp_path.rglob("*.ckpt"))


def test_a_sample_requests_projection_refuses_a_sharded_model(one_process_group):
    """Sample requests build their held-out projection from each sample's full gradient, before any step."""
    from lightning_jit.core.errors import JiTSettingError
    from lightning_jit.core.matching import HeldoutProjection

    model = DigitsCNN()
    shard_model(model, one_process_group)
    x, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(JiTSettingError, match="sharded model"):
        HeldoutProjection.build(model, list(model.parameters()), x, labels, lambda out: out)
