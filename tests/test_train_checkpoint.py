"""Checkpoints of a DeepSpeed ZeRO-2 engine (one process, gloo): layout, atomic write, exact resume."""

import errno
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from opensora_core.errors import CheckpointError
from opensora_core.parallel.deepspeed_config import deepspeed_config
from opensora_core.train import checkpoint as ckpt
from opensora_core.train.checkpoint import (
    RunningStates,
    latest_checkpoint,
    load_checkpoint,
    read_running_states,
    save_checkpoint,
)
from opensora_core.train.ema import create_ema, update_ema
from opensora_core.train.lr import build_lr_scheduler

MODEL_TYPE = "STDiT3-XL/2"


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """A world of one on gloo, adopted by DeepSpeed as in the training loop."""
    env = {
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }  # as Ray Train sets them
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    import deepspeed

    from opensora_core.parallel.deepspeed_config import skip_cpu_shm_kernel

    skip_cpu_shm_kernel()
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    yield
    # through DeepSpeed: it also drops its clone of the world group, which the next test module's
    # world (this fixture is imported by other test files) could not use
    deepspeed.comm.destroy_process_group()
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        self.register_buffer("table", torch.arange(4.0))

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


class Sampler:
    def __init__(self):
        self.state = None

    def load_state_dict(self, state):
        self.state = state


def make_engine(seed: int, load_universal: bool = False):
    import deepspeed

    torch.manual_seed(seed)
    model = Toy()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-8)
    scheduler = build_lr_scheduler(optimizer, 3)
    config = deepspeed_config("zero2", "fp32", 1.0, micro_batch_size=2)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    return engine


def train(engine, ema, steps: int, start: int) -> list[float]:
    losses = []
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(2, 4, generator=g), torch.randn(2, 1, generator=g)
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()
        update_ema(ema, engine.module, decay=0.5)
        losses.append(loss.item())
    return losses


def save(engine, ema, out, global_step):
    states = RunningStates(
        epoch=0, step=global_step, global_step=global_step, batch_size=2, model_type=MODEL_TYPE
    )
    sampler_state = {"seed": 1, "epoch": 0, "consumed_batches": global_step}
    return save_checkpoint(
        out,
        engine=engine,
        ema=ema,
        sampler_state=sampler_state,
        states=states,
        config_text="lr = 0.01\n",
        rank=0,
    )


def test_checkpoint_holds_every_part_under_its_step_name(tmp_path):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train(engine, ema, 2, 0)
    path = save(engine, ema, tmp_path, 2)

    assert path == tmp_path / "epoch0-global_step2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0-global_step2"]
    names = {p.name for p in path.iterdir()}
    assert {
        "model.safetensors",
        "ema.safetensors",
        "ds",
        "sampler.json",
        "running_states.json",
        "config.py",
    } <= names
    assert "rng_state_rank0.pt" in names
    assert json.loads((path / "running_states.json").read_text()) == {
        "epoch": 0,
        "step": 2,
        "global_step": 2,
        "batch_size": 2,
        "model_type": MODEL_TYPE,
        "rng_states": "rng_state_rank{rank}.pt",
    }
    assert (path / "config.py").read_text() == "lr = 0.01\n"


def test_model_weights_are_the_full_fp32_state_dict_with_the_models_names(tmp_path):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train(engine, ema, 2, 0)
    path = save(engine, ema, tmp_path, 2)
    weights = load_file(str(path / "model.safetensors"))
    expected = engine.module.state_dict()
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], tensor)
    ema_weights = load_file(str(path / "ema.safetensors"))
    assert torch.equal(ema_weights["proj.weight"], ema.proj.weight)


def test_resumed_engine_repeats_the_next_losses(tmp_path):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train(engine, ema, 3, 0)
    path = save(engine, ema, tmp_path, 3)
    next_random = torch.rand(3)
    uninterrupted = train(engine, ema, 3, 3)

    resumed_engine = make_engine(123)  # other initial weights: everything must come from the checkpoint
    resumed_ema = create_ema(resumed_engine.module)
    sampler = Sampler()
    marker = tmp_path / "config_in_checkpoint_ran"
    (path / "config.py").write_text(f"open({str(marker)!r}, 'w').close()\n")  # resuming never runs it
    states = load_checkpoint(path, resumed_engine, resumed_ema, sampler, model_type=MODEL_TYPE)
    assert not marker.exists()

    assert torch.equal(torch.rand(3), next_random)  # RNG states restored
    assert (states.epoch, states.step, states.global_step) == (0, 3, 3)
    assert sampler.state == {"seed": 1, "epoch": 0, "consumed_batches": 3}
    assert resumed_engine.lr_scheduler.last_epoch == engine.lr_scheduler.last_epoch - 3
    assert torch.equal(resumed_ema.proj.weight, load_file(str(path / "ema.safetensors"))["proj.weight"])
    assert train(resumed_engine, resumed_ema, 3, 3) == uninterrupted


def test_a_save_that_dies_midway_leaves_no_checkpoint(tmp_path, monkeypatch):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train(engine, ema, 1, 0)
    first = save(engine, ema, tmp_path, 1)

    def io_error(*args, **kwargs):  # a full disk: tests/test_faults.py
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt, "save_file", io_error)
    with pytest.raises(OSError, match="Input/output error"):
        save(engine, ema, tmp_path, 2)

    assert not (tmp_path / "epoch0-global_step2").exists()
    assert not (tmp_path / ".tmp-epoch0-global_step2").exists()
    assert latest_checkpoint(tmp_path) == first


def test_checkpoint_of_another_model_type_is_refused(tmp_path):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train(engine, ema, 1, 0)
    path = save(engine, ema, tmp_path, 1)
    with pytest.raises(CheckpointError, match="STDiT2-XL/2"):
        load_checkpoint(path, engine, ema, None, model_type="STDiT2-XL/2")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_running_states(tmp_path / "epoch0-global_step9")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="running_states.json"):
        read_running_states(tmp_path / "half")


def test_start_from_scratch_keeps_weights_but_not_the_position(tmp_path):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train(engine, ema, 3, 0)
    path = save(engine, ema, tmp_path, 3)

    fresh = make_engine(123)
    sampler = Sampler()
    load_checkpoint(
        path, fresh, create_ema(fresh.module), sampler, model_type=MODEL_TYPE, restore_position=False
    )
    assert torch.equal(fresh.module.proj.weight, engine.module.proj.weight)
    assert sampler.state is None
    assert fresh.lr_scheduler.last_epoch == 0


def test_a_universal_copy_of_a_checkpoint_resumes_it_exactly(tmp_path):
    """A checkpoint saved by another number of ranks loads through DeepSpeed's universal form (the
    two-worker case is in test_train_distributed); in one process it must give the same next losses."""
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train(engine, ema, 2, 0)
    path = save(engine, ema, tmp_path / "run", 2)
    reference = train(engine, ema, 3, 2)

    assert ckpt.saved_zero_ranks(path) == 1
    assert ckpt.needs_resharding(path, world_size=2, zero_stage=2)
    assert not ckpt.needs_resharding(path, world_size=1, zero_stage=2)
    assert not ckpt.needs_resharding(path, world_size=2, zero_stage=0)  # ddp: no split state to load

    resumed = make_engine(1, load_universal=True)
    resumed_ema = create_ema(resumed.module)
    load_checkpoint(path, resumed, resumed_ema, Sampler(), universal_dir=tmp_path / "universal")
    assert train(resumed, resumed_ema, 3, 2) == pytest.approx(reference, rel=1e-6, abs=0)
    assert (tmp_path / "universal" / "global_step2_universal" / "zero").is_dir()


def test_a_checkpoint_that_cannot_be_converted_is_one_line_naming_it(tmp_path):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train(engine, ema, 1, 0)
    path = save(engine, ema, tmp_path / "run", 1)
    (shard,) = (path / "ds").glob("*/zero_pp_rank_*_optim_states.pt")
    shard.write_bytes(b"not a torch file")

    with pytest.raises(CheckpointError) as err:
        ckpt.universal_checkpoint(path, tmp_path / "universal")
    message = str(err.value)
    assert str(path) in message and "another number of ranks" in message and "\n" not in message
    assert not [p for p in (tmp_path / "universal").iterdir() if not p.name.endswith(".lock")]
