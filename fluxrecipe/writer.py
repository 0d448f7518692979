"""Writing model folders: streamed safetensors shards, small files, and the atomic swap into place.

Knows files, tensor names, dtypes, shapes and bytes; nothing of recipes. A shard's header is computed from
the list of tensors before any data exists, then the data is appended in that order. Every file is hashed
as it is written (for the manifest) and written pages are flushed and let go of as the file grows, so the
page cache holds a few tens of MB of this file, never the model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import FluxRecipeError, OutputError
from .files import name_max, os_errors, read_small
from .text import counted, some_keys
from .formats import gguf_model, is_transformer
from .formats.safetensors import encode_header, read_header
from .linux import SYNC_FILE_RANGE_WAIT_AFTER, SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, sync_file_range

MANIFEST_NAME = "fluxrecipe.manifest.json"  # sha256 and size of every file of an output folder
FLUSH_WINDOW = 16 << 20  # bytes: writeback is started per window and awaited one window later
# The page cache holds file data in folios of up to 2 MiB, and POSIX_FADV_DONTNEED keeps any folio its range
# only partly covers: ranges given to it are rounded to this, or about half of what they cover stays cached.
RELEASE_ALIGN = 2 << 20
WRITTEN_BY = "fluxrecipe.version"  # the metadata every file fluxrecipe writes carries (package.file_metadata)
TEMPORARY_SUFFIXES = (".fluxrecipe-partial", ".fluxrecipe-previous", ".fluxrecipe-lock")  # beside an output, while it is made


def align_down(offset: int) -> int:
    return offset - offset % RELEASE_ALIGN


def align_up(offset: int) -> int:
    return -(-offset // RELEASE_ALIGN) * RELEASE_ALIGN

@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


class WriteBehind:
    """The page cache of a file written front to back, let go behind the writes: writeback is started per
    FLUSH_WINDOW and awaited one window later, and those pages are then dropped, so the file holds about two
    windows of cache whatever its size (the kernel's own writeback would leave it all dirty for a while, and
    a memory cgroup counts dirty pages it cannot reclaim)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._released = 0  # bytes before this offset are on disk and out of the page cache
        self._started = 0  # bytes before this offset have had their writeback started

    def written(self, end: int) -> None:
        """The file is written up to `end` (holes left before it count as written)."""
        if end - self._started >= FLUSH_WINDOW:
            if not sync_file_range(self.fd, self._started, end - self._started, SYNC_FILE_RANGE_WRITE):
                os.fdatasync(self.fd)  # no sync_file_range here: wait for all of it
            settled = align_down(self._started)
            if settled > self._released:
                wait = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
                sync_file_range(self.fd, self._released, settled - self._released, wait)
                os.posix_fadvise(self.fd, self._released, settled - self._released, os.POSIX_FADV_DONTNEED)
                self._released = settled
            self._started = end


class StreamingFile:
    """A new file written front to back, hashed on the way, its written pages released as it goes."""

    def __init__(self, path: Path, expected_size: int | None = None, unhashed: int = 0):
        self.path = path
        self.expected_size = expected_size
        self.unhashed = unhashed  # bytes at the start left out of the hash (a header to be rewritten)
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot create: {e.strerror}") from None
        self.size = 0
        self._hash = hashlib.sha256()
        self._writeback = WriteBehind(self.fd)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        skip = max(0, min(self.unhashed - self.size, len(view)))
        self._hash.update(view[skip:])
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as e:
            raise OutputError(f"{self.path}: write failed: {e.strerror}") from None
        self.size += len(view)
        self._writeback.written(self.size)

    def close(self) -> FileRecord:
        """Flush to disk and close; the record is the file's size and sha256."""
        if self.expected_size is not None and self.size != self.expected_size:
            self.abort()
            raise OutputError(f"{self.path}: wrote {self.size} bytes, expected {self.expected_size}")
        try:
            os.fsync(self.fd)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise OutputError(f"{self.path}: flushing to disk failed: {e.strerror}") from None
        finally:
            self.abort()
        return FileRecord(self.size, self._hash.hexdigest())

    def abort(self) -> None:
        """Close the file, once: a failed close() is aborted again by the caller's cleanup, and an fd number
        closed twice may by then belong to another file (a source being read by a worker thread)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def open_safetensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str], header_size: int = 0) -> StreamingFile:
    """A safetensors file with its header written; the caller appends each tensor's bytes in the order given.

    With `header_size`, the header is padded to that size and left out of the file's hash, so that
    `rewrite_header` can put metadata known only at the end into it; the hash is then the data's."""
    header, data_size = encode_header(tensors, metadata, header_size)
    f = StreamingFile(path, expected_size=len(header) + data_size, unhashed=len(header) if header_size else 0)
    f.write(header)
    return f


def open_gguf(path: Path, header: bytes, size: int) -> StreamingFile:
    """A GGUF file of `size` bytes with its `header` (formats.gguf.encode_header's, padded to the data) written;
    the caller appends the data. The hash is the data's: the header is written again at the end."""
    f = StreamingFile(path, expected_size=size, unhashed=len(header))
    f.write(header)
    return f


def rewrite_header(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str], header_size: int) -> None:
    """Replace the header of a file written by `open_safetensors(..., header_size)` with one holding `metadata`."""
    header, _ = encode_header(tensors, metadata, header_size)
    if len(header) != header_size:
        raise OutputError(f"{path}: the metadata ({len(header)} bytes of header) does not fit the {header_size} bytes reserved for it")
    rewrite_start(path, header)


def rewrite_start(path: Path, header: bytes) -> None:
    """Write `header` over the first bytes of the finished file `path` (a header of the size it was written with)."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, header, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(f"{path}: writing its header failed: {e.strerror}") from None


def write_file(path: Path, data: bytes) -> FileRecord:
    f = StreamingFile(path)
    f.write(data)
    return f.close()


def write_json(path: Path, value: object) -> FileRecord:
    return write_file(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def replace_json(path: Path, value: object) -> None:
    """Write `path` whole or not at all (a temporary file beside it, renamed over it): for files that are
    rewritten in place, which a reader must never see half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def partial_name(target: Path) -> Path:
    return target.parent / f".{target.name}.fluxrecipe-partial"


def _previous_name(target: Path) -> Path:
    return target.parent / f".{target.name}.fluxrecipe-previous"


def _lock_name(target: Path) -> Path:
    return target.parent / f".{target.name}.fluxrecipe-lock"


def check_target(target: Path, overwrite: bool, single_file: bool = False, dry_run: bool = False) -> None:
    """An output may replace only what fluxrecipe itself wrote (a folder its manifest lists whole) or what it
    can prove is a model (a folder of diffusers model files; for a single-file format, a safetensors file),
    never anything else, and never a place of the user's (the working or home folder). A dry run checks the
    place only: that the output exists is what it reports, not a fault."""
    if target.is_symlink():
        raise OutputError(f"{target} is a symbolic link (to {os.readlink(target)}): give the folder it should be as output=..., not a link")
    if (place := _users_place(target)) is not None:
        raise OutputError(f"{target} is {place}: an output never goes there, whatever it holds (overwrite=true would replace the whole folder); choose a folder of its own, e.g. output=merged/NAME")
    longest = max(len(os.fsencode(f".{target.name}{suffix}")) for suffix in TEMPORARY_SUFFIXES)
    if longest > name_max(target.parent):
        room = name_max(target.parent) - (longest - len(os.fsencode(target.name)))
        raise OutputError(f"{target}: the output's name is {len(os.fsencode(target.name))} bytes long, longer than the {room} this folder leaves room for (fluxrecipe writes beside it as .NAME.fluxrecipe-partial)")
    if single_file and target.is_dir():
        raise OutputError(f"{target} is a folder: a single-file format writes one file, so output= names a .safetensors file (output=merged/model.safetensors)")
    if dry_run or not target.exists():
        return
    if not overwrite:
        raise OutputError(f"{target} already exists: choose another output=..., or pass overwrite=true to replace it")
    if not target.is_file() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a file ({_special_kind(target)}): overwrite=true replaces only a model file or folder, never other things")
    if single_file:
        _check_model_file(target)
        return
    reason = _not_replaceable(target)
    if reason:
        raise OutputError(
            f"{target} exists and is not a model folder: overwrite=true replaces only a model folder, never other files ({reason}; "
            f"a model folder is one fluxrecipe wrote, its {MANIFEST_NAME} listing every file, or one of diffusers model files only)"
        )


def _special_kind(path: Path) -> str:
    """What a path that is neither a file nor a folder is, in words."""
    mode = os.stat(path).st_mode
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _users_place(target: Path) -> str | None:
    """What `target` is, if it is the working folder, the home folder, or a folder that holds either: places
    that are the user's, not a model's."""
    resolved = target.resolve()
    for name, folder in (("the working folder", Path.cwd()), ("your home folder", Path.home())):
        folder = folder.resolve()
        if resolved == folder:
            return name
        if resolved in folder.parents:
            return f"a folder that holds {name} ({folder})"
    return None


def _not_replaceable(target: Path) -> str | None:
    """Why `target` is not provably a model (None: it is one, or an empty folder)."""
    if not target.is_dir():
        return None if _is_model_file(target) else "it is a file, not a safetensors model"
    try:
        listed = json.loads(read_small(target / MANIFEST_NAME))["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        listed = {}
    for entry in sorted(target.iterdir()):
        record = listed.get(entry.name)
        if entry.name == MANIFEST_NAME and listed:
            continue
        if isinstance(record, dict) and entry.is_file() and not entry.is_symlink() and entry.stat().st_size == record.get("size"):
            continue
        if not _is_model_file(entry):
            return f"it holds {entry.name!r}, which fluxrecipe did not write" if listed else f"it holds {entry.name!r}, which is not a model file"
    return None


def _is_model_file(path: Path) -> bool:
    """A plain file that is, by its content, part of a diffusers model: a safetensors file whose header parses,
    a safetensors index, or a config.json that names a diffusers class."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        if path.name.endswith(".safetensors"):
            return bool(read_header(str(path)).entries)
        doc = json.loads(read_small(path, 1 << 24))
    except (FluxRecipeError, OSError, ValueError, RecursionError):
        return False
    if path.name.endswith(".safetensors.index.json"):
        return isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict)
    return path.name == "config.json" and isinstance(doc, dict) and "_class_name" in doc and "_diffusers_version" in doc


def _check_model_file(target: Path) -> None:
    """A single-file output replaces only a file fluxrecipe wrote (its metadata says so) or a transformer of a
    family it knows: never a user's LoRA, another kind of model, or a file whose header merely parses."""
    refused = "overwrite=true replaces only a model file (one fluxrecipe wrote, or a FLUX transformer), never other files"
    gguf_file = target.suffix == ".gguf"
    try:
        header = gguf_model.source_header(str(target)) if gguf_file else read_header(str(target))
    except FluxRecipeError:
        raise OutputError(f"{target} exists and is not a {'FLUX GGUF' if gguf_file else 'safetensors'} model: {refused}") from None
    if WRITTEN_BY in header.metadata or is_transformer(str(target), header.entries, header.metadata):
        return
    held = f"{counted(len(header.entries), 'tensor')} ({some_keys(list(header.entries), 3)})" if header.entries else "no tensors"
    raise OutputError(f"{target} exists and is a safetensors file of {held} that is neither a FLUX transformer nor a file fluxrecipe wrote: {refused}")


@contextmanager
def atomic_output(target: Path, overwrite: bool, file_name: str | None = None) -> Iterator[Path]:
    """A fresh folder beside `target` to write into; when the block succeeds, it becomes `target` (or, for
    a single-file output, its file `file_name` does).

    Nothing unfinished ever stands under the target's name. A run killed at any moment leaves its temporary
    folder behind; the next run for the same target holds the lock, so it knows the folder is stale and
    removes it (or, if it died between the two renames of an overwrite, puts the previous output back).
    """
    target = Path(os.path.abspath(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{target.parent}: cannot create the output's parent folder: {e.strerror}") from None
    with _lock(target):
        tmp, previous = partial_name(target), _previous_name(target)
        with os_errors():  # a folder the OS refuses to write in: one line naming the path
            if previous.exists() or previous.is_symlink():
                if target.exists() or target.is_symlink():
                    _remove(previous)
                else:
                    previous.rename(target)
            _remove(tmp)
            check_target(target, overwrite, single_file=file_name is not None)
            tmp.mkdir()
        try:
            yield tmp
            made = tmp / file_name if file_name else tmp
            fsync_dir(tmp)
            if target.exists():
                target.rename(previous)
            made.rename(target)
            fsync_dir(target.parent)
            _remove(previous)
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if previous.exists() and not target.exists():  # interrupted between the two renames
                previous.rename(target)
            raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _lock(target: Path) -> Iterator[None]:
    path = _lock_name(target)
    while True:
        with os_errors():  # a read-only folder refuses the lock file first
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{target}: another fluxrecipe run is writing this output right now") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed the lock file after we opened it: take the new one
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
