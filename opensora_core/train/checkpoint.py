"""Training checkpoints: one directory per save, written under a temporary name and renamed whole.

{outputs}/epoch{E}-global_step{G}/
    model.safetensors       consolidated fp32 weights, the model's own key names
    ema.safetensors         fp32 EMA weights (what sampling uses)
    ds/                     DeepSpeed state: ZeRO optimizer shards, LR scheduler, step counters
    ds_{name}/, {name}.safetensors   the same for each extra engine (a VAE's discriminator)
    config.json, vae_2d/    a VAE's architecture, so the directory is its `from_pretrained`
    sampler.json            bucket sampler position
    rng_state_rank{R}.pt    torch / numpy / python RNG states of each rank
    running_states.json     epoch, step, global_step, batch_size, model_type, rng states file
    config.py               the resolved config

With `upload_to` (a URI, see `opensora_core.storage`) a checkpoint saved locally is then copied to
shared storage, `running_states.json` last; `load_checkpoint` and `read_running_states` take such a
URI too (the checkpoint is fetched into the local mirror first).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from opensora_core import storage
from opensora_core.errors import CheckpointError, StorageError, first_line, is_disk_full

RUNNING_STATES = "running_states.json"
RNG_STATES = "rng_state_rank{rank}.pt"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class RunningStates:
    """Where training stands: `step` optimizer steps done in `epoch`, `global_step` in total."""

    epoch: int
    step: int
    global_step: int
    batch_size: int | None
    model_type: str
    rng_states: str = RNG_STATES


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"epoch{epoch}-global_step{global_step}"


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a DeepSpeed engine's module, on the CPU.

    ZeRO keeps the fp32 master weights partitioned across ranks (the module holds bf16 copies when
    training in bf16), so every rank must call this: each parameter is gathered with a collective.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        full = safe_get_full_fp32_param(tensor) if isinstance(tensor, nn.Parameter) else None
        value = (full if full is not None else tensor).detach()
        if value.is_floating_point():
            value = value.float()
        state[name] = value.cpu().contiguous().clone()
    return state


def save_checkpoint(
    output_dir: str | Path,
    *,
    engine: Any,
    ema: nn.Module | None,
    sampler_state: dict[str, Any],
    states: RunningStates,
    config_text: str,
    rank: int,
    upload_to: str | storage.Location | None = None,
    extra_engines: dict[str, Any] | None = None,
    model_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint; every rank calls this. Returns the final (local) directory.

    `extra_engines` (name -> DeepSpeed engine, e.g. a VAE's discriminator) are saved beside the model's
    engine; `model_files(directory)` writes files the model needs to load from the checkpoint (rank 0).

    The directory appears under its final name only once every file is in place, so a reader
    (evaluation, a resumed run) never sees half a checkpoint. `upload_to` (a run directory on shared
    storage) receives a copy under the same name, complete once its running_states.json is there.
    """
    output_dir = Path(output_dir)
    final = output_dir / checkpoint_name(states.epoch, states.global_step)
    tmp = output_dir / f"{TMP_PREFIX}{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run that died while saving
        tmp.mkdir(parents=True)
    _barrier()

    try:
        engine.save_checkpoint(str(tmp / "ds"), tag=f"global_step{states.global_step}")
        for name, extra in (extra_engines or {}).items():
            extra.save_checkpoint(str(tmp / f"ds_{name}"), tag=f"global_step{states.global_step}")
        torch.save(_rng_states(), tmp / states.rng_states.format(rank=rank))
        weights = consolidated_state_dict(engine)  # collective: all ranks, rank 0 keeps the result
        extra_weights = {name: consolidated_state_dict(e) for name, e in (extra_engines or {}).items()}

        if rank == 0:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            for name, state in extra_weights.items():
                save_file(state, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
            if model_files is not None:
                model_files(tmp)
            if ema is not None:
                ema_state = {k: v.detach().float().cpu().contiguous() for k, v in ema.state_dict().items()}
                save_file(ema_state, str(tmp / "ema.safetensors"), metadata={"format": "pt"})
            (tmp / "sampler.json").write_text(json.dumps(sampler_state, indent=2) + "\n")
            (tmp / "config.py").write_text(config_text)
            # running_states.json last: its presence marks a complete checkpoint even before the rename
            (tmp / RUNNING_STATES).write_text(json.dumps(asdict(states), indent=2) + "\n")
    except Exception as err:
        full = is_disk_full(err, output_dir)  # before the partial files go: they hold the space
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint is never left to be found
        if full:
            raise _disk_full_error(final) from None
        raise
    _barrier()  # every rank's shards and RNG states are on disk
    if rank == 0:
        if final.exists():  # an earlier run reached the same step; the newer state wins
            stale = output_dir / f"{TMP_PREFIX}stale-{final.name}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        if upload_to is not None:  # a re-save of the same step: not complete until re-uploaded
            marker = storage.location(upload_to) / final.name / RUNNING_STATES
            if marker.exists():
                marker.filesystem.delete_file(marker.path)
    _barrier()
    if upload_to is not None:
        upload_checkpoint(final, storage.location(upload_to) / final.name, rank=rank)
    return final


def upload_checkpoint(final: Path, dest: storage.Location, *, rank: int) -> None:
    """Copy a checkpoint just saved to `dest`; every rank calls this, running_states.json goes last.

    Each machine's disk holds the files its ranks wrote: rank 0's machine the renamed directory,
    another machine without a shared disk its `.tmp-` directory. The first rank on each machine
    copies its machine's files up; once all have, rank 0 adds running_states.json.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", rank))  # set by Ray Train (and torchrun)
    source = final if rank == 0 else final.parent / f"{TMP_PREFIX}{final.name}"
    if local_rank == 0 and source.is_dir():
        storage.upload_dir(source, dest, skip=(RUNNING_STATES,))
        if rank != 0:
            shutil.rmtree(source, ignore_errors=True)  # this machine's part lives on at `dest`
    _barrier()
    if rank == 0:
        storage.upload_file(final / RUNNING_STATES, dest / RUNNING_STATES)
    _barrier()


def fetch_checkpoint(path: str | Path | storage.Location) -> Path:
    """A local directory holding the checkpoint `path`: itself, or for a URI its local mirror,
    downloaded once per machine."""
    if not storage.is_uri(path):
        return Path(path)
    source = storage.location(path)
    read_running_states(source)  # a missing or incomplete checkpoint is named as such, not downloaded
    try:
        return storage.fetch_dir(source, RUNNING_STATES)
    except OSError as err:
        raise CheckpointError(f"{source}: cannot download the checkpoint: {err}") from None


def read_running_states(path: str | Path | storage.Location) -> RunningStates:
    """running_states.json of a complete checkpoint (a local path or a URI), or CheckpointError naming
    what is missing."""
    path = storage.pathlike(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if path.name.startswith(TMP_PREFIX):
        raise CheckpointError(
            f"{path}: an unfinished checkpoint (a run died while saving it); use an earlier one"
        )
    states_file = path / RUNNING_STATES
    if not states_file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {RUNNING_STATES})")
    try:
        return RunningStates(**json.loads(states_file.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{states_file}: unreadable running states: {err}") from None


def load_checkpoint(
    path: str | Path | storage.Location,
    engine: Any,
    ema: nn.Module | None,
    sampler: Any | None,
    *,
    model_type: str | None = None,
    rank: int = 0,
    restore_position: bool = True,
    universal_dir: Path | None = None,
    extra_engines: dict[str, Any] | None = None,
) -> RunningStates:
    """Restore model, optimizer, LR scheduler, EMA, sampler position and this rank's RNG states.

    Every rank calls this. `model_type` (the config's model.type) must match the checkpoint's.
    `restore_position=False` (Open-Sora's `start_from_scratch`) keeps the weights, EMA and optimizer
    moments but not the LR schedule, sampler position or RNG states. A URI is fetched to local disk first.

    A checkpoint saved by another number of ranks than this run's (see `needs_resharding`) is loaded
    through DeepSpeed's universal checkpoint: `universal_dir` (a directory of this machine, the same
    for all its ranks) receives that form of its ZeRO state, and the engine must have been created
    with `"checkpoint": {"load_universal": True}` in its config.
    """
    path = fetch_checkpoint(path)
    states = read_running_states(path)
    if model_type is not None and states.model_type != model_type:
        raise CheckpointError(
            f"{path}: checkpoint of model {states.model_type!r}, but model.type is {model_type!r}; "
            "load a checkpoint of the same model type (or set model.from_pretrained to start from weights)"
        )
    ds_dir, tag = path / "ds", None
    if universal_dir is not None:
        ds_dir, tag = universal_dir, universal_checkpoint(path, universal_dir).name
    try:
        load_path, _ = engine.load_checkpoint(str(ds_dir), tag=tag, load_lr_scheduler_states=restore_position)
    except RuntimeError as err:  # shape mismatches: same type name, different sizes
        raise CheckpointError(f"{path}: weights do not fit the configured model: {first_line(err)}") from None
    if load_path is None:
        raise CheckpointError(f"{path / 'ds'}: no DeepSpeed state found")
    for name, extra in (extra_engines or {}).items():
        _load_extra_engine(path, name, extra, universal=universal_dir is not None, restore=restore_position)
    if ema is not None and (path / "ema.safetensors").is_file():
        # non-strict as in Open-Sora: an EMA saved before a model change keeps what still fits
        ema.load_state_dict(load_file(str(path / "ema.safetensors")), strict=False)
    if not restore_position:
        return states
    if sampler is not None and (path / "sampler.json").is_file():
        sampler.load_state_dict(json.loads((path / "sampler.json").read_text()))
    rng_file = path / states.rng_states.format(rank=rank)
    if rng_file.is_file():
        _set_rng_states(torch.load(rng_file, weights_only=False))
    return states


def _load_extra_engine(path: Path, name: str, engine: Any, *, universal: bool, restore: bool) -> None:
    """An extra engine's state (`ds_{name}/`); a checkpoint from before it existed starts it afresh, as
    train_vae.py does for a checkpoint without a discriminator."""
    ds_dir = path / f"ds_{name}"
    if not ds_dir.is_dir():
        return
    if universal:
        raise CheckpointError(
            f"{path}: its {name}'s optimizer state was saved by another number of ranks; resume it on "
            "the same number of training workers"
        )
    try:
        loaded, _ = engine.load_checkpoint(str(ds_dir), load_lr_scheduler_states=restore)
    except RuntimeError as err:
        raise CheckpointError(f"{ds_dir}: does not fit the configured {name}: {first_line(err)}") from None
    if loaded is None:
        raise CheckpointError(f"{ds_dir}: no DeepSpeed state found")


def saved_zero_ranks(path: str | Path) -> int:
    """How many ranks the ZeRO optimizer state of checkpoint `path` is split over (0: not split, ddp)."""
    return len(list((Path(path) / "ds").glob("*/zero_pp_rank_*_optim_states.pt")))


def needs_resharding(path: str | Path | storage.Location, world_size: int, zero_stage: int) -> bool:
    """Whether checkpoint `path` was saved with its ZeRO optimizer state split over another number of
    ranks than `world_size` (DeepSpeed loads such a state only as a universal checkpoint)."""
    saved = saved_zero_ranks(fetch_checkpoint(path))
    return zero_stage > 0 and saved > 0 and saved != world_size


def universal_checkpoint(path: Path, workdir: Path) -> Path:
    """DeepSpeed's universal form of checkpoint `path`'s ZeRO state (each parameter's fp32 weights and
    Adam moments whole, so any number of ranks can take its share), written once under `workdir`.

    The ranks of one machine share it: the first converts under a temporary name and renames it,
    the others wait on a file lock and find it there.
    """
    import contextlib
    import io
    import uuid
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from filelock import FileLock

    tag = (path / "ds" / "latest").read_text().strip()
    target = workdir / f"{tag}_universal"
    workdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(workdir / f".{target.name}.lock")):
        if (target / "zero").is_dir():  # another rank of this machine converted it
            return target
        tmp = workdir / f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
        args = Namespace(
            input_folder=str(path / "ds" / tag),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # the parameter layout, which our saves do not add by hand
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines, one per parameter
                ds_to_universal(args)
            os.replace(tmp, target)
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"{path}: cannot convert its DeepSpeed state for another number of ranks: {first_line(err)}"
            ) from None
    return target


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest global step under `output_dir`, if any."""
    found = []
    for child in Path(output_dir).glob("epoch*-global_step*"):
        if (child / RUNNING_STATES).is_file():
            found.append((read_running_states(child).global_step, child))
    return max(found)[1] if found else None


def _disk_full_error(final: Path) -> StorageError:
    previous = latest_checkpoint(final.parent)
    lost = f"{final}: no space left on device while writing this checkpoint; its partial files were removed"
    if previous is None:
        return StorageError(f"{lost} (no earlier checkpoint in {final.parent}); free space and run again")
    return StorageError(
        f"{lost} and the latest complete checkpoint, {previous}, is intact; free space, then resume "
        f"with --load {previous}"
    )


def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
