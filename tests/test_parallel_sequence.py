"""Ulysses sequence parallelism on 2 gloo processes: same loss and gradients as one process (fp32).

STDiT3 (v1.2) and STDiT (v1.0, fixed size: one model per latent shape) both run sequence parallel.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opensora_core.errors import ConfigError
from opensora_core.models.stdit import STDiT
from opensora_core.models.stdit3 import STDiT3
from opensora_core.parallel.layout import check_heads_divisible, parallel_layout
from opensora_core.parallel.sequence import (
    apply_sequence_parallel,
    new_sequence_parallel_groups,
    parallelize_sequence,
)

# fp32; attention and the all-to-all reorder sums, so values differ from one process in the 7th digit
TOLERANCE = 1e-5


def tiny_model(kind: str = "stdit3", shape: tuple[int, int] = (8, 8)) -> STDiT3 | STDiT:
    torch.manual_seed(0)
    common = dict(
        hidden_size=32,
        depth=2,
        num_heads=4,
        patch_size=(1, 2, 2),
        in_channels=4,
        caption_channels=16,
        model_max_length=6,
        class_dropout_prob=0.0,
    )
    if kind == "stdit":
        model = STDiT(input_size=(3, *shape), **common)
        zeroed = [p for blk in model.blocks for p in (blk.attn_temp.proj.weight, blk.cross_attn.proj.weight)]
    else:
        model = STDiT3(**common)
        zeroed = [
            p
            for blk in model.temporal_blocks
            for p in (blk.attn.proj.weight, blk.cross_attn.proj.weight, blk.mlp.fc2.weight)
        ]
    for p in zeroed:  # zero-initialised; make the temporal and caption paths matter
        torch.nn.init.normal_(p, std=0.05)
    return model.train()


def tiny_batch(height: int, width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    B, T = 2, 3
    return {
        "x": torch.randn(B, 4, T, height, width, generator=g),
        "timestep": torch.tensor([300.0, 800.0]),
        "y": torch.randn(B, 1, 6, 16, generator=g),
        "mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]),
        "x_mask": torch.tensor([[False, True, True], [True, True, True]]),
        "fps": torch.tensor([24.0, 24.0]),
        "height": torch.tensor([float(height * 8)] * B),
        "width": torch.tensor([float(width * 8)] * B),
        "target": torch.randn(B, 8, T, height, width, generator=g),
    }


def loss_and_grads(model: STDiT3, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "target"}
    loss = (model(**inputs) - batch["target"]).pow(2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world_size: int, port: int, shapes: list[tuple[int, int]], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        layout = parallel_layout(rank, world_size, sp_size=world_size)
        sp_group, _ = new_sequence_parallel_groups(layout)
        for kind in KINDS:
            model = tiny_model(kind)
            apply_sequence_parallel(model, sp_group)
            for shape in shapes:
                if kind == "stdit" and shape != (8, 8):  # fixed size: a model of its own
                    model = tiny_model(kind, shape)
                    apply_sequence_parallel(model, sp_group)
                loss, grads = loss_and_grads(model, tiny_batch(*shape))
                # what DeepSpeed does over the data-parallel world: average the ranks' gradients
                for g in grads.values():
                    dist.all_reduce(g)
                    g /= world_size
                out[(rank, kind, shape)] = (loss, grads)
    finally:
        dist.destroy_process_group()


SHAPES = [(8, 8), (6, 10)]  # latent H, W: 16 spatial tokens split evenly; 15 need one padding token
KINDS = ("stdit3", "stdit")


@pytest.fixture(scope="module")
def sequence_parallel_results() -> dict:
    """Loss and SP-averaged gradients of each rank of a 2-process SP group, for every shape (one spawn)."""
    world_size = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world_size, port, SHAPES, out), nprocs=world_size, join=True)
    return dict(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["tokens-divide", "tokens-padded"])
def test_sp2_matches_one_process_loss_and_gradients(sequence_parallel_results, kind, shape):
    reference_loss, reference_grads = loss_and_grads(tiny_model(kind, shape), tiny_batch(*shape))
    for rank in (0, 1):
        loss, grads = sequence_parallel_results[(rank, kind, shape)]
        assert loss == pytest.approx(reference_loss, rel=TOLERANCE)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=TOLERANCE, atol=1e-6, msg=name)


class SingleRankSequenceParallel:
    """A one-rank stand-in: exercises the sequence-parallel hooks and wrappers without torch.distributed."""

    def __init__(self):
        self.calls = []

    def split(self, x, dim):
        self.calls.append("split")
        return x

    def gather(self, x, dim):
        self.calls.append("gather")
        return x

    def tokens_to_heads(self, x):
        self.calls.append("tokens_to_heads")
        return x

    def heads_to_tokens(self, x):
        self.calls.append("heads_to_tokens")
        return x


@pytest.mark.parametrize("grad_checkpoint", [False, True], ids=["plain", "grad-checkpoint"])
def test_sequence_parallel_runs_around_a_plain_model_and_keeps_outputs(grad_checkpoint):
    model = tiny_model()
    model.grad_checkpointing = grad_checkpoint
    batch = tiny_batch(6, 10)
    inputs = {k: v for k, v in batch.items() if k != "target"}
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    with torch.no_grad():
        plain = model(**inputs)
    plain_loss, plain_grads = loss_and_grads(model, batch)
    sp = SingleRankSequenceParallel()
    parallelize_sequence(model, sp)
    with torch.no_grad():
        parallel = model(**inputs)
    assert torch.allclose(plain, parallel, atol=1e-6)
    assert sp.calls.count("split") == 1 and sp.calls.count("gather") == 1
    assert sp.calls.count("tokens_to_heads") == 3 * len(model.spatial_blocks)  # q, k, v of each spatial block
    assert sp.calls.count("heads_to_tokens") == len(model.spatial_blocks)
    loss, grads = loss_and_grads(model, batch)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == layout


def test_layout_groups_consecutive_ranks_for_sp_and_strided_ranks_for_dp():
    layout = parallel_layout(rank=5, world_size=8, sp_size=2)
    assert layout.sp_group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.dp_group_ranks() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert (layout.sp_rank, layout.dp_rank, layout.dp_size) == (1, 2, 4)


def test_sp_size_not_dividing_workers_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sp_size=3 .*valid: \[1, 2, 4\]"):
        parallel_layout(rank=0, world_size=4, sp_size=3)


def test_heads_not_divisible_by_sp_size_is_a_config_error():
    check_heads_divisible(16, 4)
    with pytest.raises(ConfigError, match=r"sp_size=4 must divide model.num_heads=26"):
        check_heads_divisible(26, 4)
