"""What a command shows: one progress bar, warnings a user should act on, and a short summary.

Everything else (Ray's, DeepSpeed's, transformers' and our own INFO logs, and what Ray workers print) goes
to a log file under the command's output directory, named once on the console. `--verbose` shows it all
on the console as well. The library functions never print: they log, and the CLI decides where it goes.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
# A line a Ray worker printed with our format (`log_to_stderr` below): the driver re-logs it at its level
WORKER_RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (opensora_core[\w.]*): (.*)$")
# Ray's loggers keep their own console handlers and do not propagate; these are routed like any other
RAY_LOGGERS = ("ray", "ray.data", "ray.train")
# Loggers of the output Ray workers print (their stdout and stderr), as the driver receives it
WORKER_OUTPUT_LOGGER = "worker_output"


@dataclass
class Routing:
    """Where this process's logs go: set up once by the CLI (`start`), the file opened by `log_to`."""

    verbose: bool
    console: logging.Handler
    destination: Path | None = None  # the log file `log_to` named
    file: logging.FileHandler | None = None
    pending: list[logging.LogRecord] | None = None  # records logged before the file was opened


_routing: Routing | None = None


def for_the_user(record: logging.LogRecord) -> bool:
    """Whether a record belongs on a quiet console: our warnings and anyone's errors."""
    if record.levelno >= logging.ERROR:
        return True
    return record.levelno >= logging.WARNING and record.name.startswith("opensora_core")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted: a rich progress bar replaces it while
    it runs, and lines written through its replacement appear above the bar instead of through it."""

    def __init__(self, level: int | str = logging.NOTSET) -> None:
        super().__init__()
        self.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Pending(logging.Handler):
    """Keeps the records logged before the log file's place is known (config loading), for the file."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def start(*, verbose: bool, level: str = "INFO") -> None:
    """Route this process's logging: the console gets `for_the_user` records (all of them if `verbose`),
    the log file, once `log_to` opens it, everything at `level` and above."""
    global _routing
    stop()  # a second command in one process (tests): its own handlers and file
    root = logging.getLogger()
    root.setLevel(level)
    console = _StderrHandler(level)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    if not verbose:
        console.addFilter(for_the_user)
    pending: list[logging.LogRecord] = []
    root.addHandler(console)
    root.addHandler(_Pending(pending))
    logging.captureWarnings(True)  # Python warnings become `py.warnings` records: the log file has them
    _routing = Routing(verbose=verbose, console=console, pending=pending)
    route_ray_loggers()


def stop() -> None:
    """Undo `start`: its handlers removed and its log file closed."""
    global _routing
    if _routing is None:
        return
    root = logging.getLogger()
    for handler in [_routing.console, _routing.file, *_pending_handlers()]:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
    logging.captureWarnings(False)
    _routing = None


def log_to(directory: Path, command: str) -> Path | None:
    """Name this command's log file, `{directory}/logs/{command}-{time}.log`; it is created by `open_log`
    (when Ray starts, or at the summary), so a command refused before doing anything writes nothing. Until
    then records wait in memory. Without `start` (a library caller) nothing changes."""
    routing = _routing
    if routing is None:
        return None
    if routing.destination is None:
        routing.destination = Path(directory) / "logs" / f"{command}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    return routing.destination


def open_log() -> Path | None:
    """Create the log file `log_to` named, with every record logged so far; later ones follow."""
    routing = _routing
    if routing is None or routing.destination is None or routing.file is not None:
        return log_file()
    path = routing.destination
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.getLogger().level)  # Ray Data's logger passes on its DEBUG records
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root = logging.getLogger()
    for pending in _pending_handlers():
        root.removeHandler(pending)
    for record in routing.pending or []:
        handler.handle(record)
    root.addHandler(handler)
    routing.file, routing.pending = handler, None
    return path


def _pending_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, _Pending)]


def log_file() -> Path | None:
    """The log file `log_to` opened, if any."""
    return Path(_routing.file.baseFilename) if _routing and _routing.file else None


def route_ray_loggers() -> None:
    """Ray's loggers send to our handlers rather than their own console handlers (Ray's documented way
    to change its logging: modify the `ray` logger). Their session-directory file handlers stay."""
    if _routing is None:
        return
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def route_ray_worker_output() -> None:
    """What Ray workers print reaches the driver (`ray.init(log_to_driver=True)`); here it becomes log
    records: our own workers' records at their level and logger (so their warnings reach the console),
    every other line an INFO record of `worker_output` (the log file). Called after `ray.init`.

    Ray offers no public hook for this: it prints each batch of lines through the handler named
    `ray_print_logs` of its stdstream dispatcher, which is replaced here.
    """
    if _routing is None:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    route_ray_loggers()  # `import ray.data` installs its console handler again
    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler("ray_print_logs", relay_worker_lines)


def relay_worker_lines(batch: dict[str, Any]) -> None:
    """One batch of a Ray worker's output lines (Ray's dict: pid, actor_name/task_name, lines) as records."""
    from ray._private.worker import filter_autoscaler_events

    who = batch.get("actor_name") or batch.get("task_name") or ""
    prefix = f"({who} pid={batch.get('pid')})".replace("( ", "(")
    output = logging.getLogger(WORKER_OUTPUT_LOGGER)
    lines = batch.get("lines", [])
    if batch.get("pid") == "autoscaler":  # as Ray prints it: its events, not its periodic status report
        lines = list(filter_autoscaler_events(lines))
    for line in lines:
        if line.startswith("{") and "__ray_tqdm_magic_token__" in line:
            continue  # ray.experimental.tqdm_ray state, not text
        match = WORKER_RECORD.match(line)
        if match:
            logging.getLogger(match[2]).log(logging.getLevelName(match[1]), "%s %s", prefix, match[3])
        else:
            output.info("%s %s", prefix, line)


def log_to_stderr(logger_name: str = "opensora_core") -> None:
    """In a Ray worker: our records printed as `LEVEL name: message`, so the driver's `relay_worker_lines`
    gives them their level again. Ray Train's own root handler prints only the message."""
    logger = logging.getLogger(logger_name)
    if any(getattr(h, "_opensora_worker", False) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    handler._opensora_worker = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def progress_console() -> Console:
    """The rich console progress bars draw on: stderr, so stdout keeps only a command's results. Written to
    a file or a pipe, the bar is drawn once, when it ends, on one line that is not cut at 80 columns."""
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=160)


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed columns count bytes)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"? {self.unit}/s")


def progress_bar(*fields: str, unit: str = "it", transient: bool = False) -> Progress:
    """A rich Progress with done/total, rate and time left, plus `fields` of each task (`task.fields`)."""
    extra = [TextColumn(f"{{task.fields[{name}]}}") for name in fields]
    return Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(), RateColumn(unit),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), *extra,
        console=progress_console(), transient=transient,
    )  # fmt: skip


@contextmanager
def counting(description: str, total: int, *, unit: str = "it", enabled: bool = True) -> Iterator[Any]:
    """A one-task progress bar over `total` items; yields advance(n)."""
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    with progress_bar(unit=unit) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def duration(seconds: float) -> str:
    """`seconds` as a person reads it: 42.1 s, 3 min 12 s, 2 h 05 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def summary(*lines: str) -> None:
    """A command's closing lines, on stderr beside its bar (stdout keeps the machine-readable result), and
    where its log file is. An error a user can fix stays one line: it has no summary."""
    path = open_log()
    for line in (*lines, *([f"log: {path}"] if path else [])):
        print(line, file=sys.stderr)
