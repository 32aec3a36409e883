"""Where bucket snapshots and checkpoints live: a local path, or a URI that `pyarrow.fs` opens.

A plain path is written in place (`os.rename` / `os.replace`). A URI (`file:///abs/path`,
`s3://bucket/prefix?region=...`, `gs://...`, `hdfs://...`) is written through its pyarrow
filesystem: the directory is built on local disk, copied up with `pyarrow.fs.copy_files`, and the
file that marks it complete is written last as one object (a PUT is atomic on object stores).
Snapshot shards are read straight from the store; checkpoints, which DeepSpeed loads from local
files, are fetched into a mirror of the URI under `OPENSORA_CACHE` (default `~/.cache/opensora`).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from opensora_core.errors import ConfigError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
URI_EXAMPLES = "file:///abs/path, s3://bucket/prefix, gs://bucket/prefix, hdfs://host/path"


def is_uri(target: str | Path | Location) -> bool:
    """Whether `target` names storage through a filesystem URI rather than a plain local path."""
    return isinstance(target, Location) or (isinstance(target, str) and bool(_URI.match(target)))


def join(uri: str, *names: str) -> str:
    """`uri` with `names` appended to its path; a query string (`?region=...`) stays at the end."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=posixpath.join(parts.path or "/", *names)))


@dataclass(frozen=True)
class Location:
    """A file or directory on a pyarrow filesystem, and the URI a person knows it by."""

    filesystem: pafs.FileSystem
    path: str  # the filesystem's own path (no scheme, no query)
    uri: str

    def __truediv__(self, name: str) -> Location:
        return Location(self.filesystem, posixpath.join(self.path, name), join(self.uri, name))

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def _type(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def children(self) -> list[Location]:
        """The entries directly inside this directory (none when it does not exist)."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self / posixpath.basename(info.path) for info in infos]

    def glob(self, pattern: str) -> list[Location]:
        """The entries directly inside this directory whose names match `pattern` (fnmatch)."""
        return [child for child in self.children() if fnmatch.fnmatchcase(child.name, pattern)]

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        """Write the whole file as one object (atomic on object stores: readers see old or new)."""
        self.filesystem.create_dir(posixpath.dirname(self.path), recursive=True)
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(text.encode())


def location(target: str | Path | Location) -> Location:
    """`target` (a local path, a URI, or a Location) as a Location; a bad URI is a ConfigError."""
    if isinstance(target, Location):
        return target
    if not is_uri(target):
        path = Path(target).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), path.as_posix(), str(path))
    try:
        filesystem, path = pafs.FileSystem.from_uri(str(target))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        from opensora_core.config.credentials import redact_url  # (imports the config reader)

        shown = redact_url(str(target))
        reason = str(err).splitlines()[0].replace(str(target), shown)
        raise ConfigError(
            f"storage URI {shown!r}: {reason}; use a local path or a "
            f"URI pyarrow.fs opens ({URI_EXAMPLES}); credentials come from the environment"
        ) from None
    if isinstance(filesystem, pafs.LocalFileSystem):
        path = posixpath.normpath(path)
    return Location(filesystem, path.rstrip("/") or "/", str(target))


def pathlike(target: str | Path | Location) -> Path | Location:
    """`target` as a Path when it is a plain local path (written in place), else as a Location."""
    return location(target) if is_uri(target) else Path(target)


def cache_dir() -> Path:
    """Root of the local copies of shared storage (`OPENSORA_CACHE`, default `~/.cache/opensora`)."""
    return Path(os.environ.get("OPENSORA_CACHE") or "~/.cache/opensora").expanduser().resolve()


def local_mirror(target: str | Path | Location) -> Path:
    """Where `target` has its local copy: the path itself when it is local, else a mirror of the URI
    under `cache_dir()` (`s3://bucket/runs` -> `~/.cache/opensora/s3/bucket/runs`)."""
    if not is_uri(target):
        return Path(target)
    loc = location(target)
    parts = urlsplit(loc.uri)
    scheme = re.sub(r"[^A-Za-z0-9.-]", "-", parts.scheme) or "fs"
    return cache_dir() / scheme / loc.path.lstrip("/")


def upload_dir(source: Path, dest: Location, *, skip: tuple[str, ...] = ()) -> None:
    """Copy the local directory `source` into `dest` (merging with what is there), leaving out the
    top-level entries named in `skip`. Entries go one after another; a directory's files in parallel."""
    local = pafs.LocalFileSystem()
    dest.filesystem.create_dir(dest.path, recursive=True)
    for entry in sorted(source.iterdir()):
        if entry.name in skip:
            continue
        if entry.is_dir():  # copy_files creates the directories below a source, not its own
            dest.filesystem.create_dir((dest / entry.name).path, recursive=True)
        pafs.copy_files(
            entry.as_posix(),
            (dest / entry.name).path,
            source_filesystem=local,
            destination_filesystem=dest.filesystem,
        )


def upload_file(source: Path, dest: Location) -> None:
    """Copy one local file to `dest` (one object: complete or absent)."""
    dest.filesystem.create_dir(posixpath.dirname(dest.path), recursive=True)
    pafs.copy_files(
        source.as_posix(),
        dest.path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=dest.filesystem,
    )


def fetch_dir(source: Location, marker: str) -> Path:
    """A complete local copy of the directory `source` (its file `marker` present), downloaded once.

    Processes on one machine share the copy: the first downloads it under a temporary name and
    renames it; the others wait on a file lock and find it there.
    """
    from filelock import FileLock

    target = local_mirror(source)
    if (target / marker).is_file():
        return target
    if not (source / marker).is_file():
        raise FileNotFoundError(f"{source}: no {marker} (not there, or not complete)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / marker).is_file():  # another process fetched it meanwhile
            return target
        tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            pafs.copy_files(
                source.path,
                tmp.as_posix(),
                source_filesystem=source.filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
            )
            if target.exists():  # an incomplete copy from an interrupted fetch
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
