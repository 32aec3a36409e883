"""The driver's training progress bar, fed by rank 0 through a small Ray actor.

Ray Train hands the driver a worker's metrics only at `ray.train.report`, a barrier the loop calls on
checkpoint steps alone. Rank 0 instead sends each step to a `TrainingProgress` actor (a call it does not
wait for) and the driver reads that actor twice a second. The loss and samples/s are those of the last
logged step: other steps have no host sync (opensora_core.train.metrics).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

POLL_S = 0.5


class TrainingProgress:
    """The latest position rank 0 reported: epoch, step, global_step, steps_per_epoch, loss, samples_per_s."""

    def __init__(self) -> None:
        self.state: dict[str, float] = {}

    def update(self, **fields: float) -> None:
        self.state.update(fields)

    def read(self) -> dict[str, float]:
        return dict(self.state)


def start_progress_actor() -> Any:
    """A `TrainingProgress` actor reserving no CPU (the training workers need them all)."""
    import ray

    return ray.remote(num_cpus=0)(TrainingProgress).remote()


class TrainingBar:
    """The bar: steps of `max_steps` when set (the whole run's time left), else steps of the epoch."""

    def __init__(self, bar: Any, *, max_steps: int | None, epochs: int) -> None:
        self.bar, self.max_steps, self.epochs = bar, max_steps, epochs
        self.task = bar.add_task("train", total=max_steps, loss="", samples="")
        self.epoch: int | None = None

    def show(self, state: dict[str, float]) -> None:
        """Draw the last state rank 0 sent (nothing before its first step)."""
        if "global_step" not in state:
            return
        epoch = int(state["epoch"])
        if self.max_steps is not None:
            total, done = self.max_steps, int(state["global_step"])
        else:
            total, done = int(state["steps_per_epoch"]), int(state["step"])
            if epoch != self.epoch:
                self.bar.reset(self.task, total=total)  # each epoch's own rate and time left
        self.epoch = epoch
        fields = {}
        if "loss" in state:
            fields = {
                "loss": f"loss {state['loss']:.4f}",
                "samples": f"{state['samples_per_s']:.1f} samples/s",
            }
        self.bar.update(
            self.task,
            total=total,
            completed=done,
            description=f"train epoch {epoch + 1}/{self.epochs}",
            **fields,
        )


@contextmanager
def training_progress(*, max_steps: int | None, epochs: int) -> Iterator[Any]:
    """Yields the progress actor for the workers' job; a thread draws its state on a rich bar meanwhile."""
    import ray

    from opensora_core.console import progress_bar

    actor = start_progress_actor()
    stop = threading.Event()
    with progress_bar("loss", "samples", unit="steps") as bar:
        drawn = TrainingBar(bar, max_steps=max_steps, epochs=epochs)

        def poll() -> None:
            while not stop.wait(POLL_S):
                try:
                    drawn.show(ray.get(actor.read.remote()))
                except ray.exceptions.RayError:  # the bar stops; the training goes on and reports itself
                    return

        thread = threading.Thread(target=poll, name="training-progress", daemon=True)
        thread.start()
        try:
            yield actor
        finally:
            stop.set()
            thread.join()
            drawn.show(ray.get(actor.read.remote()))  # the last step, after the workers are done
            ray.kill(actor)
