"""Faults, each tried on this machine, and what each loses (the goal: nothing that was complete).

- `opensora bucket` SIGKILLed (with its local Ray) while writing shards: nothing. CURRENT keeps the
  previous snapshot, the half-written `.tmp-` directory is never opened, and the next build removes it.
- `opensora train` SIGKILLed (driver, local Ray, training worker) while writing a checkpoint: the
  steps since the last complete checkpoint (CKPT_EVERY here); `--load` of that checkpoint redoes
  them with the same losses. A killed *worker* is tests/test_train_distributed.py.
- Disk full while writing a checkpoint (model weights or DeepSpeed shards): that checkpoint; the run
  stops with a one-line StorageError, the previous checkpoint is intact and loads.
- Disk full while writing a bucket shard: that snapshot; CURRENT keeps the previous one and the CLI
  says so in one line (exit code 2).
"""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import grey_clip as write_video
from safetensors import SafetensorError
from test_data_snapshot import metadata_table
from test_data_video_io import write_image
from test_train_checkpoint import MODEL_TYPE, make_engine, one_process_group, save  # noqa: F401
from test_train_checkpoint import train as train_steps

from opensora_core.cli import main as cli_main
from opensora_core.config import load_config
from opensora_core.data import bucket_build
from opensora_core.data.batches import SnapshotBatches
from opensora_core.data.manifest import MANIFEST_NAME
from opensora_core.data.scan import scan
from opensora_core.data.snapshot import CURRENT_NAME, open_snapshot
from opensora_core.data.snapshot_check import check_snapshot
from opensora_core.errors import CheckpointError, StorageError
from opensora_core.models.tiny_random import create_tiny_pretrained
from opensora_core.stages import build_buckets
from opensora_core.train import checkpoint as ckpt
from opensora_core.train.checkpoint import latest_checkpoint, load_checkpoint, read_running_states
from opensora_core.train.ema import create_ema

pytestmark = pytest.mark.slow

OPENSORA = str(Path(sys.executable).with_name("opensora"))
MARKER = "OPENSORA_FAULT_TEST"  # set in each launched command's environment: Ray's processes inherit it
BUCKETS = '{"240p": {1: (0.5, 8), 16: (1.0, 4), 51: (1.0, 2)}, "144p": {1: (1.0, 16), 16: (0.5, 8)}}'
MAX_STEPS, CKPT_EVERY = 12, 3  # 6 steps per epoch: the resumed run crosses an epoch boundary
CHECKPOINT_FILES = {
    "model.safetensors",
    "ema.safetensors",
    "ds",
    "sampler.json",
    "rng_state_rank0.pt",
    "running_states.json",
    "config.py",
}


def write_config(path: Path, outputs: Path, pretrained: Path | None = None, buckets: str = BUCKETS) -> Path:
    """A tiny STDiT3 training config on synthetic clips (the snapshot only satisfies the CLI)."""
    text = f"""
dataset = dict(type="VariableVideoTextDataset", data_path="unused: --snapshot is given")
bucket_config = {buckets}
model = dict(type="STDiT3-XL/2", hidden_size=32, depth=1, num_heads=2, enable_flash_attn=False,
             enable_layernorm_kernel=False, freeze_y_embedder=True)
scheduler = dict(type="rflow", use_timestep_transform=True, sample_method="logit-normal")
outputs = {str(outputs)!r}
seed = 42
"""
    if pretrained is not None:
        text += f"""
vae = dict(type="VideoAutoencoderKL", from_pretrained={str(pretrained / "vae")!r}, local_files_only=True)
text_encoder = dict(type="t5", from_pretrained={str(pretrained / "t5")!r}, model_max_length=8,
                    local_files_only=True)
mask_ratios = {{"random": 0.2, "quarter_head": 0.2, "image_head": 0.2}}
synthetic_data = dict(num_batches=6, batch_size=2, num_frames=2, height=32, width=32)
dtype = "fp32"
plugin = "zero2"
num_train_workers = 1
grad_clip = 1.0
lr = 1e-3
warmup_steps = 2
ema_decay = 0.9
adam_eps = 1e-15
epochs = 5
max_steps = {MAX_STEPS}
log_every = 1
ckpt_every = {CKPT_EVERY}
"""
    path.write_text(text)
    return path


@pytest.fixture
def build_without_ray(monkeypatch):
    """In-process builds assign buckets here; the killed CLI build below runs Ray Data for real."""

    def assign_locally(keys, cfg, frame_interval, seed, epoch, *args):
        return bucket_build.bucket_indices(keys, cfg, frame_interval, seed, epoch)

    monkeypatch.setattr(bucket_build, "_assign_in_ray", assign_locally)


# --- launching a command in its own process group, and making sure nothing of it survives ---------


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries `MARKER=marker`: the command and every Ray process."""
    tag = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                environ = Path(entry.path, "environ").read_bytes()
            except OSError:  # gone meanwhile, or a zombie
                continue
            if tag in environ.split(b"\0"):
                found.append(int(entry.name))
    return found


def send(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return ""


class Launched:
    """One command started with a private Ray temp dir and a marker, in a new session (process group)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.marker = uuid.uuid4().hex
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
        env = {
            k: v
            for k, v in os.environ.items()
            # the in-process DeepSpeed world of this module, and services other tests point at
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")
        }
        env.update({MARKER: self.marker, "RAY_TMPDIR": str(self.ray_tmp), "DS_ACCELERATOR": "cpu"})
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def kill_when(self, condition: Callable[[], bool], timeout: float, *, everything: bool = False) -> None:
        """SIGKILL the command's process group as soon as `condition()` holds (polled every 2 ms).

        Ray starts its workers in process groups of their own: they notice their raylet is gone and
        exit on their own a moment later. `everything=True` kills them at the same instant too, as a
        machine that loses power would: all are stopped at the fault point first, then killed.
        """
        deadline, known, next_scan = time.monotonic() + timeout, [], 0.0
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"exited with {self.proc.returncode} before the fault:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no fault point within {timeout} s:\n{self.tail()}")
            if everything and time.monotonic() > next_scan:  # known beforehand: stopped without delay
                known, next_scan = marked_processes(self.marker), time.monotonic() + 0.5
            time.sleep(0.002)
        os.killpg(self.proc.pid, signal.SIGSTOP)  # frozen at the fault point while we look at it
        send(known, signal.SIGSTOP)
        self.at_kill = [command_line(pid) for pid in marked_processes(self.marker)]
        if everything:
            send(marked_processes(self.marker), signal.SIGKILL)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        send(known, signal.SIGCONT)  # any left (none with everything=True) go on and must exit by themselves

    def wait(self, timeout: float) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s:\n{self.tail()}")
        assert self.proc.returncode == 0, self.tail()
        return self.log.read_text()

    def survivors(self, timeout: float = 60) -> list[str]:
        """Command lines of its processes still alive after `timeout` s (they are then killed)."""
        deadline = time.monotonic() + timeout
        while marked_processes(self.marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = marked_processes(self.marker)
        commands = [command_line(pid) for pid in left]
        send(left, signal.SIGKILL)
        return commands

    def worker_losses(self) -> dict[int, float]:
        """global step -> loss, from the training worker's own log files (complete even when killed)."""
        losses = {}
        for path in sorted(self.ray_tmp.glob("ray/session_*/logs/worker-*")):
            for match in re.finditer(r"global_step (\d+) loss ([0-9.]+)", path.read_text(errors="replace")):
                losses[int(match[1])] = float(match[2])
        return losses

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.survivors(timeout=10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def launch(tmp_path):
    launched: list[Launched] = []

    def start(*args: str) -> Launched:
        run = Launched([OPENSORA, *args], tmp_path / f"command-{len(launched)}.log")
        launched.append(run)
        return run

    yield start
    for run in launched:
        run.close()


# --- a bucket build killed mid-way -----------------------------------------------------------------


def test_bucket_build_killed_midway_keeps_current_and_the_next_build_removes_its_leftovers(
    tmp_path, launch, build_without_ray, capsys
):
    config = write_config(tmp_path / "config.py", tmp_path / "outputs")
    cfg = load_config(config)
    pq.write_table(metadata_table(n=2000), tmp_path / "meta.parquet")
    root = tmp_path / "buckets"
    first = build_buckets(cfg, tmp_path / "meta.parquet", root, epoch=0)
    first_rows = open_snapshot(root).full_table()

    build = launch("bucket", str(config), "--meta", str(tmp_path / "meta.parquet"), "--output", str(root),
                   "--epoch", "1")  # fmt: skip
    build.kill_when(lambda: any(root.glob(".tmp-*")), timeout=240)  # shards are being written
    assert any("raylet" in c for c in build.at_kill)  # the CLI had started its local Ray
    assert build.survivors() == []  # and none of Ray's processes outlives the kill

    [leftover] = root.glob(".tmp-*")
    assert leftover.name.endswith(f"-pid{build.proc.pid}@{socket.gethostname()}")
    assert (root / CURRENT_NAME).read_text().strip() == first.path.name
    reader = open_snapshot(root)
    assert reader.path == first.path
    assert reader.full_table().equals(first_rows)
    assert [p.name for p in root.iterdir() if (p / MANIFEST_NAME).is_file()] == [first.path.name]
    check = check_snapshot(root, tmp_path / "meta.parquet", first.manifest.config_hash, seed=42, epoch=0)
    assert check.is_current
    assert cli_main(["bucket", "--output", str(root), "--report"]) == 0
    assert capsys.readouterr().out.startswith(f"snapshot {first.path.name} ")

    running_here = root / f".tmp-running-pid{os.getpid()}@{socket.gethostname()}"  # a live build's
    other_host = root / ".tmp-running-pid1@another-host"
    running_here.mkdir()
    other_host.mkdir()
    second = build_buckets(cfg, tmp_path / "meta.parquet", root, epoch=1)
    assert (root / CURRENT_NAME).read_text().strip() == second.path.name
    assert open_snapshot(root).manifest.epoch == 1
    assert open_snapshot(root).full_table().num_rows == 2000
    assert sorted(p.name for p in root.glob(".tmp-*")) == sorted([running_here.name, other_host.name])


# --- a training reader while a scheduled rebuild switches CURRENT ----------------------------------


def write_media(folder: Path, names: range) -> set[str]:
    """144p clips (20 frames) and stills with captions; returns their paths."""
    folder.mkdir(exist_ok=True)
    paths = set()
    for i in names:
        for path in (
            write_video(folder / f"clip{i}.mp4", 20, height=144, width=256),
            write_image(folder / f"still{i}.png", 144, 256),
        ):
            path.with_suffix(".txt").write_text(f"caption {path.name}\n")
            paths.add(str(path))
    return paths


def test_training_reader_finishes_its_epoch_on_its_snapshot_while_a_rebuild_switches_current(
    tmp_path, build_without_ray
):
    cfg = load_config(
        write_config(
            tmp_path / "config.py", tmp_path / "outputs", buckets='{"144p": {1: (1.0, 2), 16: (1.0, 2)}}'
        )
    )
    media, meta, root = tmp_path / "media", tmp_path / "meta.parquet", tmp_path / "buckets"
    old_files = write_media(media, range(4))
    scan(media, meta, workers=1, progress=False)
    old = build_buckets(cfg, meta, root)
    reader = SnapshotBatches(  # what each training worker holds: dataset, bucket sampler, DataLoader
        str(root), cfg.dataset.as_dict(), rank=0, world_size=1, seed=42, num_workers=1
    )
    reader.set_epoch(0)
    batches = iter(reader)
    read = [next(batches)]

    new_files = write_media(media, range(4, 8))  # new media arrive; the scheduled rebuild rescans
    scan(media, meta, workers=1, progress=False)
    new = build_buckets(cfg, meta, root)
    assert (root / CURRENT_NAME).read_text().strip() == new.path.name != old.path.name
    assert open_snapshot(root).manifest.num_samples == 16
    read += list(batches)  # the rest of the epoch, after the switch

    assert len(read) == len(reader) == 4  # 4 clips and 4 stills in batches of 2
    assert all(batch is not None and batch["num_dropped"] == 0 for batch in read)
    assert {path for batch in read for path in batch["path"]} == old_files
    assert not new_files & {path for batch in read for path in batch["path"]}
    assert reader.skipped == 0


# --- the whole training process killed -------------------------------------------------------------


def test_training_killed_while_saving_resumes_from_the_last_complete_checkpoint(
    tmp_path, launch, build_without_ray
):
    """SIGKILL of `opensora train` (driver, its local Ray and the worker) while a checkpoint is written.

    Lost: the steps since the last complete checkpoint (CKPT_EVERY = 3), nothing else. Every
    checkpoint directory left is complete, the half-written one keeps its `.tmp-` name and is never
    chosen, and `--load` of the latest resumes at the next step with the killed run's losses.
    """
    config = write_config(
        tmp_path / "config.py", tmp_path / "runs", create_tiny_pretrained(tmp_path / "pt").root
    )
    meta = tmp_path / "meta.parquet"
    pq.write_table(metadata_table(n=50), meta)
    snapshot = build_buckets(load_config(config), meta, tmp_path / "buckets").path
    exp_dir = tmp_path / "runs" / "000-STDiT3-XL-2"

    def saving_after_a_complete_checkpoint() -> bool:
        names = [p.name for p in exp_dir.iterdir()] if exp_dir.is_dir() else []
        return any(n.startswith("epoch") for n in names) and any(n.startswith(".tmp-epoch") for n in names)

    killed = launch("train", str(config), "--snapshot", str(snapshot))
    killed.kill_when(saving_after_a_complete_checkpoint, timeout=300, everything=True)
    assert any("ray::RayTrainWorker" in c for c in killed.at_kill)
    assert killed.survivors() == []

    saved = sorted(exp_dir.glob("epoch*"))
    for path in saved:
        assert CHECKPOINT_FILES <= {p.name for p in path.iterdir()}, path
        assert any((path / "ds").iterdir())
    latest = latest_checkpoint(exp_dir)
    assert latest == max(saved, key=lambda p: read_running_states(p).global_step)
    last_step = read_running_states(latest).global_step
    [half] = exp_dir.glob(".tmp-*")
    assert half.name.endswith(f"-global_step{last_step + CKPT_EVERY}")  # the next save, cut short
    with pytest.raises(CheckpointError, match="unfinished"):
        read_running_states(half)

    before = killed.worker_losses()
    lost = sorted(step for step in before if step > last_step)
    assert lost == list(range(last_step + 1, last_step + CKPT_EVERY + 1))

    resumed = launch("train", str(config), "--snapshot", str(snapshot), "--load", str(latest))
    result = json.loads(resumed.wait(timeout=300).strip().splitlines()[-1])
    assert result["global_step"] == MAX_STEPS
    after = resumed.worker_losses()
    assert sorted(after) == list(range(last_step + 1, MAX_STEPS + 1))
    # the log prints 5 decimals
    assert [after[step] for step in lost] == pytest.approx([before[step] for step in lost], abs=1e-5)
    resumed_dir = Path(result["checkpoint"]).parent
    steps = range(last_step + CKPT_EVERY, MAX_STEPS + 1, CKPT_EVERY)
    assert sorted(p.name for p in resumed_dir.iterdir() if p.name.startswith(("epoch", ".tmp"))) == sorted(
        f"epoch{(step - 1) // 6}-global_step{step}" for step in steps
    )
    assert resumed.survivors() == []  # a run that ends leaves no Ray process either


# --- disk full ---------------------------------------------------------------------------------------


def no_space_in_safetensors(*args, **kwargs):
    """What safetensors raises on a full disk (it carries no errno)."""
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def no_space_in_torch_save(*args, **kwargs):
    """What torch.save (DeepSpeed's shards) raises on a full disk: a short write and nothing more."""
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("fails", ["model weights", "deepspeed shards"])
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, fails):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train_steps(engine, ema, 2, 0)
    previous = save(engine, ema, tmp_path, 2)
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    train_steps(engine, ema, 2, 2)

    if fails == "model weights":
        monkeypatch.setattr(ckpt, "save_file", no_space_in_safetensors)
    else:
        monkeypatch.setattr(torch, "save", no_space_in_torch_save)
        full = shutil.disk_usage(tmp_path)._replace(free=0)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    with pytest.raises(StorageError) as raised:
        save(engine, ema, tmp_path, 4)
    monkeypatch.undo()

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'epoch0-global_step4'}: no space left on device")
    assert f"the latest complete checkpoint, {previous}, is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0-global_step2"]  # no .tmp- left
    assert latest_checkpoint(tmp_path) == previous
    fresh = make_engine(1)
    states = load_checkpoint(previous, fresh, create_ema(fresh.module), None, model_type=MODEL_TYPE)
    assert states.global_step == 2
    for name, value in fresh.module.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_the_first_checkpoint_failing_for_space_says_there_is_no_earlier_one(tmp_path, monkeypatch):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train_steps(engine, ema, 1, 0)
    monkeypatch.setattr(ckpt, "save_file", no_space_in_safetensors)
    with pytest.raises(StorageError, match="no earlier checkpoint in"):
        save(engine, ema, tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train_steps(engine, ema, 1, 0)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ckpt, "save_file", read_only)
    with pytest.raises(OSError, match="Read-only file system"):
        save(engine, ema, tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


def put_a_shard_on_a_full_disk(monkeypatch) -> None:
    """The sitting-out shard fails as pyarrow fails on a full disk; the bucket shards are written."""
    write_table = pq.ParquetWriter.write_table

    def write_or_fail(writer, table, *args, **kwargs):
        if "sitting_out" in str(writer.where):
            detail = "Error writing bytes to file. Detail: [errno 28] No space left on device"
            raise OSError(errno.ENOSPC, detail)
        return write_table(writer, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_or_fail)


def test_disk_full_while_writing_a_shard_keeps_current(tmp_path, build_without_ray, monkeypatch):
    cfg = load_config(write_config(tmp_path / "config.py", tmp_path / "outputs"))
    pq.write_table(metadata_table(n=600), tmp_path / "meta.parquet")
    root = tmp_path / "buckets"
    first = build_buckets(cfg, tmp_path / "meta.parquet", root, epoch=0)
    put_a_shard_on_a_full_disk(monkeypatch)

    with pytest.raises(StorageError) as raised:
        build_buckets(cfg, tmp_path / "meta.parquet", root, epoch=1)

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"bucket snapshot {root}: no space left on device while writing ")
    assert message.endswith(f"CURRENT still names {first.path.name}; free space and build again")
    assert sorted(p.name for p in root.iterdir()) == sorted([CURRENT_NAME, first.path.name])
    assert open_snapshot(root).full_table().num_rows == 600


def test_cli_reports_a_full_disk_in_one_line(tmp_path, build_without_ray, monkeypatch, capsys):
    config = write_config(tmp_path / "config.py", tmp_path / "outputs")
    pq.write_table(metadata_table(n=100), tmp_path / "meta.parquet")
    put_a_shard_on_a_full_disk(monkeypatch)

    args = ["bucket", str(config), "--meta", str(tmp_path / "meta.parquet"), "--output", str(tmp_path / "b")]
    assert cli_main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: bucket snapshot {tmp_path / 'b'}: no space left on device")
    assert lines[0].endswith("there is no CURRENT snapshot yet; free space and build again")
