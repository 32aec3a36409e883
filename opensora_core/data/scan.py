"""Scan a folder or an Open-Sora `path,text` CSV into the metadata table and its errors table.

Folder input: media files by extension, recursively; hidden files/folders and other extensions are
skipped (counted), a sidecar `<stem>.txt` is the caption. Paths are stored absolute.
A rescan reuses the rows of files whose size and mtime_ns are unchanged and drops rows of files
that are gone; files that failed before are always probed again (a fixed permission or symlink
does not change the file's mtime).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opensora_core.data.probe import (
    CORRUPT,
    MEDIA_EXTENSIONS,
    PERMISSION,
    MediaInfo,
    ProbeOutcome,
    mp4_index_outcome,
    probe_chunk,
    probe_outcome,
)
from opensora_core.errors import ConfigError

logger = logging.getLogger(__name__)

METADATA_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("text", pa.string()),
        ("num_frames", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("fps", pa.float64()),
        ("aspect_ratio", pa.float64()),
        ("resolution", pa.int64()),
        ("duration", pa.float64()),
        ("codec", pa.string()),
        ("file_size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("is_image", pa.bool_()),
    ]
)
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string())])
METADATA_COLUMNS = tuple(METADATA_SCHEMA.names)

BAD_NAME = "bad name"
# Below this many files a process pool costs more to start than it saves. (Only pooled probing survives
# a decoder that crashes its process; inline probing trusts PyAV/Pillow not to segfault.)
INLINE_BELOW = 12


@dataclass
class ScanResult:
    """Counts of one scan; `n_reprobed` is how many files were probed this run (new, changed or failed)."""

    metadata_path: Path
    errors_path: Path
    n_ok: int
    n_errors: int
    n_reprobed: int
    n_reused: int
    elapsed: float
    n_dropped: int = 0
    n_missing_caption: int = 0
    n_duplicates: int = 0
    n_skipped: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human-readable lines: counts, errors grouped by kind, where the tables are."""
        lines = [
            f"scanned {self.n_ok + self.n_errors} files in {self.elapsed:.1f}s: {self.n_ok} ok, "
            f"{self.n_errors} errors ({self.n_reprobed} probed, {self.n_reused} unchanged, "
            f"{self.n_dropped} dropped as deleted)"
        ]
        extras = []
        if self.n_missing_caption:
            extras.append(f"{self.n_missing_caption} without caption")
        if self.n_duplicates:
            extras.append(f"{self.n_duplicates} duplicate paths ignored")
        if self.n_skipped:
            extras.append(f"{self.n_skipped} non-media files skipped")
        if extras:
            lines.append("  " + ", ".join(extras))
        if self.errors_by_reason:
            reasons = ", ".join(
                f"{k} x{n}" for k, n in sorted(self.errors_by_reason.items(), key=lambda kv: -kv[1])
            )
            lines.append(f"  errors by reason: {reasons}")
        lines.append(f"  metadata: {self.metadata_path}")
        lines.append(f"  errors:   {self.errors_path}")
        return "\n".join(lines)


@dataclass
class _Candidate:
    path: str
    text: str | None  # None: no caption found


@dataclass
class _Listing:
    candidates: list[_Candidate] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # path -> reason, found before probing
    n_duplicates: int = 0
    n_skipped: int = 0


def errors_path_for(output: Path) -> Path:
    """`META.parquet` -> `META.errors.parquet`, beside it."""
    output = Path(output)
    stem = output.name[: -len(".parquet")] if output.name.endswith(".parquet") else output.name
    return output.with_name(f"{stem}.errors.parquet")


def scan(input: Path, output: Path, *, workers: int | None = None, progress: bool = True) -> ScanResult:
    """Probe every media file under INPUT (folder or path,text CSV) and write OUTPUT + its errors table."""
    started = time.perf_counter()
    input, output = Path(input), Path(output)
    errors_path = errors_path_for(output)
    listing = _list_input(input)
    previous = _read_previous(output)

    rows: list[dict] = []
    errors: dict[str, str] = dict(listing.errors)
    to_probe: list[_Candidate] = []
    n_reused = 0
    for cand in listing.candidates:
        old = previous.get(cand.path)
        if old is not None and _unchanged(cand.path, old):
            rows.append({**old, "text": cand.text or ""})
            n_reused += 1
        else:
            to_probe.append(cand)

    texts = {c.path: c.text or "" for c in to_probe}
    for path, info, error in _probe_all([c.path for c in to_probe], workers=workers, progress=progress):
        if info is not None:
            rows.append(_row(info, texts[path]))
        else:
            errors[path] = error

    current = {c.path for c in listing.candidates}
    n_dropped = sum(1 for p in previous if p not in current)
    rows.sort(key=lambda r: r["path"])
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), output)
    error_rows = [{"path": p, "error": e} for p, e in sorted(errors.items())]
    _write_atomic(pa.Table.from_pylist(error_rows, schema=ERRORS_SCHEMA), errors_path)

    result = ScanResult(
        metadata_path=output,
        errors_path=errors_path,
        n_ok=len(rows),
        n_errors=len(error_rows),
        n_reprobed=len(to_probe),
        n_reused=n_reused,
        elapsed=time.perf_counter() - started,
        n_dropped=n_dropped,
        n_missing_caption=sum(1 for c in listing.candidates if not c.text),
        n_duplicates=listing.n_duplicates,
        n_skipped=listing.n_skipped,
        errors_by_reason=dict(Counter(e.split(":", 1)[0] for e in errors.values())),
    )
    print(result.summary())
    return result


# ---------------------------------------------------------------------------------------------
# listing the input


def _list_input(input: Path) -> _Listing:
    if input.is_dir():
        return _list_folder(input)
    if input.is_file() and input.suffix.lower() in (".csv", ".parquet"):
        return _list_table(input)
    raise ConfigError(
        f"{input}: scan input must be a folder of media files or a .csv/.parquet with columns path,text"
    )


def _list_folder(root: Path) -> _Listing:
    listing = _Listing()

    def unreadable_folder(exc: OSError) -> None:
        name = _printable(exc.filename or str(root))
        listing.errors[name] = f"{PERMISSION}: cannot list folder ({exc.strerror or exc})"

    for folder, dirs, files in os.walk(os.path.abspath(root), onerror=unreadable_folder):
        # Hidden folders and files (.git, macOS ._ resource forks) are never dataset content.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = set(files)
        for name in sorted(files):
            if name.startswith("."):
                continue
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext == ".txt":
                continue
            if ext not in MEDIA_EXTENSIONS:
                listing.n_skipped += 1
                continue
            path = os.path.join(folder, name)
            if not _is_utf8(path):
                listing.errors[_printable(path)] = (
                    f"{BAD_NAME}: file name is not valid UTF-8; rename the file"
                )
                continue
            caption = stem + ".txt"
            text = _read_caption(os.path.join(folder, caption)) if caption in names else None
            listing.candidates.append(_Candidate(path, text))
    return listing


def _list_table(table_path: Path) -> _Listing:
    import pandas as pd

    try:
        if table_path.suffix.lower() == ".csv":
            # surrogateescape keeps a non-UTF-8 path byte-exact so it can be reported, not crash the read.
            df = pd.read_csv(table_path, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")
        else:
            df = pd.read_parquet(table_path)
    except Exception as exc:
        raise ConfigError(f"{table_path}: cannot read the scan input table ({exc})") from None
    if "path" not in df.columns:
        raise ConfigError(
            f"{table_path}: no 'path' column (found {', '.join(map(str, df.columns))}); expected columns path,text"
        )
    base = os.path.abspath(table_path.parent)
    texts = df["text"].tolist() if "text" in df.columns else [None] * len(df)
    listing = _Listing()
    seen: set[str] = set()
    for raw, text in zip(df["path"].tolist(), texts, strict=True):
        raw = "" if raw is None else str(raw).strip()
        if not raw:
            continue
        path = os.path.normpath(os.path.join(base, os.path.expanduser(raw)))
        if path in seen:
            listing.n_duplicates += 1
            continue
        seen.add(path)
        if not _is_utf8(path):
            listing.errors[_printable(path)] = f"{BAD_NAME}: file name is not valid UTF-8; rename the file"
            continue
        text = (
            None if text is None or (isinstance(text, float) and math.isnan(text)) else _clean_text(str(text))
        )
        listing.candidates.append(_Candidate(path, text or None))
    if listing.n_duplicates:
        logger.warning("%s: %d duplicate paths ignored (first row kept)", table_path, listing.n_duplicates)
    return listing


def _read_caption(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return _clean_text(data.decode("utf-8", errors="replace")) or None


def _clean_text(text: str) -> str:
    # Parquet strings must be valid UTF-8: undecodable bytes become U+FFFD.
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace").strip()


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str) -> str:
    """A path with undecodable bytes shown as \\xNN so it can be stored and read."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


# ---------------------------------------------------------------------------------------------
# reusing the previous output


def _read_previous(output: Path) -> dict[str, dict]:
    if not output.exists():
        return {}
    try:
        table = pq.read_table(output)
    except Exception as exc:
        logger.warning("%s: cannot read the previous scan (%s); probing every file again", output, exc)
        return {}
    if tuple(table.column_names) != METADATA_COLUMNS:
        logger.warning("%s: previous scan has other columns; probing every file again", output)
        return {}
    return {row["path"]: row for row in table.to_pylist()}


def _unchanged(path: str, old: dict) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == old["file_size"] and st.st_mtime_ns == old["mtime_ns"]


# ---------------------------------------------------------------------------------------------
# probing, in parallel


def _probe_all(paths: list[str], *, workers: int | None, progress: bool) -> list[ProbeOutcome]:
    if not paths:
        return []
    workers = max(1, workers or os.cpu_count() or 1)
    with _ProgressBar(len(paths), enabled=progress) as advance:
        # An MP4/MOV index is read here in ~0.2 ms, less than handing the file to a worker costs; the
        # files that need PyAV or Pillow (~5 ms, and a decoder can crash its process) go to the pool.
        outcomes, rest = [], []
        for p in paths:
            outcome = mp4_index_outcome(p)
            if outcome is None:
                rest.append(p)
            else:
                outcomes.append(outcome)
                advance(1)
        if workers == 1 or len(rest) < INLINE_BELOW:
            for p in rest:
                outcomes.append(probe_outcome(p))
                advance(1)
            return outcomes
        return outcomes + _probe_in_pool(rest, workers, advance)


def _probe_in_pool(paths: list[str], workers: int, advance) -> list[ProbeOutcome]:
    """Probe in chunks across processes. When a file kills its worker (a decoder crash), the pool
    breaks: files that were in progress are retried one by one in a pool of their own (a file that
    kills that one too is recorded as corrupt), the rest of the unfinished chunks run again."""
    outcomes: list[ProbeOutcome] = []
    chunk = max(1, min(256, math.ceil(len(paths) / (workers * 4))))
    pending = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    suspects: list[str] = []
    with tempfile.TemporaryDirectory(prefix="opensora-scan-") as marker_dir:
        while pending:
            failed = _run_chunks(pending, workers, marker_dir, outcomes, advance)
            in_progress = _read_markers(marker_dir)
            if failed and not in_progress and not _pool_starts():
                # The pool itself cannot start (e.g. an unguarded __main__ under forkserver): that says
                # nothing about the files, so probe the rest here rather than call them corrupt.
                logger.warning("probe worker processes cannot start; probing in this process instead")
                for path in (p for c in failed for p in c):
                    outcomes.append(probe_outcome(path))
                    advance(1)
                break
            if failed and not in_progress.intersection(p for c in failed for p in c):
                in_progress = {p for c in failed for p in c}  # culprit unknown: isolate everything left
            suspects.extend(p for c in failed for p in c if p in in_progress)
            pending = [rest for c in failed if (rest := [p for p in c if p not in in_progress])]
        for path in suspects:
            if _run_chunks([[path]], 1, marker_dir, outcomes, advance):
                outcomes.append((path, None, f"{CORRUPT}: the decoder crashed while reading the header"))
                advance(1)
    return outcomes


def _run_chunks(
    chunks: list[list[str]], workers: int, marker_dir: str, outcomes: list, advance
) -> list[list[str]]:
    """Run chunks in one pool, appending outcomes; return the chunks lost to a broken pool."""
    failed: list[list[str]] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_mp_context()) as pool:
        futures: dict[Future, list[str]] = {pool.submit(probe_chunk, c, marker_dir): c for c in chunks}
        not_done = set(futures)
        while not_done:
            done, not_done = wait(not_done, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    outcomes.extend(fut.result())
                    advance(len(futures[fut]))
                except BrokenProcessPool:
                    failed.append(futures[fut])
    return failed


def _pool_starts() -> bool:
    """Whether a one-worker pool can run a trivial call at all."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=_mp_context()) as pool:
            return pool.submit(os.getpid).result(timeout=60) > 0
    except Exception:
        return False


def _read_markers(marker_dir: str) -> set[str]:
    found = set()
    for name in os.listdir(marker_dir):
        marker = os.path.join(marker_dir, name)
        with open(marker, "rb") as f:
            found.add(os.fsdecode(f.read()))
        os.unlink(marker)
    return found


def _mp_context():
    # forkserver: forking a parent that runs threads (Prefect, Ray, MLflow clients) can deadlock.
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Workers fork from a server that has already imported the probe and PyAV, so they start in
    # milliseconds instead of each paying for the imports.
    ctx.set_forkserver_preload(["opensora_core.data.probe", "av", "PIL.Image"])
    return ctx


class _ProgressBar:
    """Context manager yielding advance(n); a rich bar on stderr, or nothing when disabled."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled, self._progress = total, enabled, None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("probing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        task = self._progress.add_task("probe", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


# ---------------------------------------------------------------------------------------------
# writing


def _row(info: MediaInfo, text: str) -> dict:
    return {
        "path": info.path,
        "text": text,
        "num_frames": info.num_frames,
        "height": info.height,
        "width": info.width,
        "fps": info.fps,
        "aspect_ratio": info.aspect_ratio,
        "resolution": info.resolution,
        "duration": info.duration,
        "codec": info.codec,
        "file_size": info.file_size,
        "mtime_ns": info.mtime_ns,
        "is_image": info.is_image,
    }


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write beside the target then os.replace, so a reader sees the old table or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = [
    "ERRORS_SCHEMA",
    "METADATA_COLUMNS",
    "METADATA_SCHEMA",
    "ScanResult",
    "errors_path_for",
    "probe_outcome",
    "scan",
]
