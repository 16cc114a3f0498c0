"""Loading a checkpoint safely, and in one pass over its bytes.

Safe: DCP's ``.metadata`` is unpickled with an allow-list (:class:`SafeReader`), tensor records with torch's
``weights_only`` unpickler, and pickled non-tensor entries are refused (:class:`SafeLoadPlanner`).

One pass (:class:`OnePassReader`): verifying a checkpoint and then loading it read every byte twice, and
DCP's ``FileSystemReader`` is slow at the second read: it ``torch.load``\\ s each tensor record from a file
view (a dozen small reads per record, the tensor copied twice). Here each data file is read front to back
once (see READ_THREADS; a thread reads ahead, with ``O_DIRECT`` for large files: :mod:`.stream`), every byte
goes through the manifest's hash in file order, and each tensor's bytes are copied straight into the
destination tensor (or, when they cannot be, into one staging buffer and copied once more). A record is a
``torch.save`` zip; where its tensor's bytes start is found in its first bytes (its ``data.pkl``, which only
describes the tensor, then a few small members and the storage's local header), so files are read strictly
in order, and the guess is confirmed by the zip data descriptor that follows the bytes (else by the zip
directory). The pickle is read by a C unpickler that resolves nothing but two describing classes: the
tensor is described, never built. Records of any other form (compressed, several storages, DCP transforms,
big-endian) are read whole and ``torch.load``\\ ed with ``weights_only=True``, as DCP does.

NOTE: the checksum of a file is known only once all of it has been read, so a corrupt file is found after some
of its tensors were copied into the destination. :class:`CorruptCheckpoint` therefore means "the destination
holds garbage": the caller loads another checkpoint into it or rebuilds it (see :mod:`.resume`).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import queue
import sys
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from runner import distributed
from runner.checkpoint.errors import CheckpointError, CorruptCheckpoint, UnsafeCheckpointError, one_line
from runner.checkpoint.layout import rank_file
from runner.checkpoint.manifest import CheckpointRef
from runner.checkpoint.state import TrainState
from runner.checkpoint.stream import InOrder, Ring
from runner.storage import checksum

log = logging.getLogger("runner.checkpoint")

#: Data files read at once, each by one thread. NOTE: one, measured: with two files of a 1 GB checkpoint read
#: side by side the disk here served them slower and less evenly (median 0.75-0.88 s over 8-10 cold loads)
#: than one after the other (0.65-0.72 s); the kernel's read-ahead already overlaps the disk with the hashing.
READ_THREADS = 1
#: Records up to this size are read whole and parsed in memory.
SMALL_RECORD = 1 << 20
#: Bytes of a record searched for where its tensor's bytes start (a few hundred in practice).
HEAD = 16 << 10


# --------------------------------------------------------------------------- safe loading
_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` only: its dataclasses, dtypes and sizes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module in _ALLOWED_MODULES and isinstance(getattr(sys.modules.get(module), name, None), type)) or (
            module,
            name,
        ) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"checkpoint metadata references {module}.{name}: refusing to load it")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        self._check_metadata(os.path.basename(path), data)
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check_metadata(self, name: str, data: bytes) -> None:
        """Hook for :class:`OnePassReader`: check the bytes before they are unpickled."""


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(
            f"checkpoint holds a pickled object at {read_item.dest_index.fqn!r}; runner checkpoints keep "
            "non-tensor state in JSON, so this file was not written by runner: refusing to unpickle it"
        )


# --------------------------------------------------------------------------- one pass
@dataclass(frozen=True)
class _Layout:
    """Where a ``torch.save``\\ d tensor's bytes are in its record, and how to view them."""

    data_start: int
    nbytes: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    def plain(self) -> bool:
        """Contiguous from the storage's first byte to its last."""
        numel = 1
        for n in self.size:
            numel *= n
        expected, step = [], 1
        for n in reversed(self.size):
            expected.append(step)
            step *= n
        return (
            self.storage_offset == 0
            and numel * self.dtype.itemsize == self.nbytes
            and all(s == e for s, e, n in zip(self.stride, reversed(expected), self.size, strict=True) if n > 1)
        )


class _RecordFile(io.RawIOBase):
    """A record as a read-only file for :mod:`zipfile`: its end from the bytes already peeked, the rest by
    ``pread`` (the few local headers zipfile looks at)."""

    def __init__(self, peek: Any, start: int, length: int, tail: bytes) -> None:
        self._peek, self._start, self._length, self._tail = peek, start, length, tail
        self._tail_from = length - len(tail)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._length if n is None or n < 0 else min(self._length, self._pos + n)
        if end <= self._pos:
            return b""
        if self._pos >= self._tail_from:
            data = self._tail[self._pos - self._tail_from : end - self._tail_from]
        else:
            data = self._peek(self._start + self._pos, end - self._pos)
        self._pos = end
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _local_header(buf: bytes, at: int = 0) -> tuple[bytes, int]:
    """(member name, as far as ``buf`` holds it; offset of the member's bytes) for the zip local file header
    at ``at`` in ``buf``."""
    if buf[at : at + 4] != b"PK\x03\x04" or len(buf) < at + 30:
        raise ValueError(f"no zip local header at {at}")
    name_len = int.from_bytes(buf[at + 26 : at + 28], "little")
    extra_len = int.from_bytes(buf[at + 28 : at + 30], "little")
    return buf[at + 30 : at + 30 + name_len], at + 30 + name_len + extra_len


def _member(record: _RecordFile, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(offset of ``info``'s bytes in the record, their length); stored members only."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{info.filename} is compressed")
    record.seek(info.header_offset)
    _, data_start = _local_header(record.read(30))
    return info.header_offset + data_start, info.file_size


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


class _TensorSpec:
    """What ``torch._utils._rebuild_tensor_v2`` would build, described instead of built. Its parameters are
    that function's, in its order: the pickle calls it with them."""

    def __init__(
        self,
        storage: _Storage,
        storage_offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        requires_grad: bool = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> None:
        if not isinstance(storage, _Storage) or backward_hooks or metadata:
            raise pickle.UnpicklingError("not a plain tensor")
        self.storage = storage
        self.storage_offset, self.size, self.stride = int(storage_offset), tuple(size), tuple(stride)


class _RecordUnpickler(pickle.Unpickler):
    """Reads a record's ``data.pkl`` as torch.save writes it for one plain tensor, and nothing else: the only
    callables it resolves are the two harmless classes above, so the tensor is described, never built.
    Anything else raises, and the record is read the generic way (``torch.load(weights_only=True)``)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorSpec
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name == "UntypedStorage":
            return _StorageType(torch.uint8)
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(torch.storage._get_dtype_from_pickle_storage_type(name))  # KeyError if unknown
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor record")

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError("not a storage reference")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise pickle.UnpicklingError("not a storage type")
        return _Storage(kind.dtype, key.decode() if isinstance(key, bytes) else str(key), int(numel))


def _describe(pickled: bytes) -> tuple[_TensorSpec, int]:
    """The tensor a record's ``data.pkl`` describes, and the pickle's length in bytes."""
    stream = io.BytesIO(pickled)
    spec = _RecordUnpickler(stream).load()
    if not isinstance(spec, _TensorSpec):
        raise ValueError("not a single plain tensor")
    return spec, stream.tell()


def _layout_of(spec: _TensorSpec, data_start: int) -> _Layout:
    nbytes = spec.storage.numel * spec.storage.dtype.itemsize
    return _Layout(data_start, nbytes, spec.storage.dtype, spec.size, spec.stride, spec.storage_offset)


def _layout(record: _RecordFile) -> _Layout:
    """Parse a ``torch.save`` record of one tensor; raises ValueError (or zipfile's errors) on any other form."""
    infos = zipfile.ZipFile(record).infolist()
    by_suffix = {info.filename.rsplit("/", 1)[-1]: info for info in infos if "/data/" not in info.filename}
    storages = {info.filename.rsplit("/", 1)[-1]: info for info in infos if "/data/" in info.filename}
    if "data.pkl" not in by_suffix or "byteorder" not in by_suffix or len(storages) != 1:
        raise ValueError("not a one-tensor torch.save record")
    start, n = _member(record, by_suffix["byteorder"])
    record.seek(start)
    if record.read(n) != sys.byteorder.encode():
        raise ValueError("byte order differs from this machine's")
    start, n = _member(record, by_suffix["data.pkl"])
    record.seek(start)
    spec, _ = _describe(record.read(n))
    if spec.storage.key not in storages:
        raise ValueError("data.pkl names a storage the record does not hold")
    data_start, nbytes = _member(record, storages[spec.storage.key])
    layout = _layout_of(spec, data_start)
    if data_start + nbytes > record.seek(0, io.SEEK_END) or layout.nbytes != nbytes:
        raise ValueError("storage size disagrees with the record")
    return layout


def _copy(target: torch.Tensor, source: torch.Tensor, item: ReadItem) -> None:
    if target.size() != source.size():
        where = item.storage_index.fqn
        raise ValueError(f"{where}: stored as {tuple(source.shape)}, loading into {tuple(target.shape)}")
    target.copy_(source)


def _try(parse: Callable[[], _Layout]) -> _Layout | None:
    """``parse()``, or None if the record is not in the form it expects (it is then read the generic way)."""
    try:
        return parse()
    except Exception:
        return None


def _guess(head: bytes) -> _Layout:
    """The layout of a ``torch.save`` record from its first bytes: its ``data.pkl`` comes first (torch writes
    it first) and the storage's local header follows a few small members. Checked later by :func:`_layout`."""
    name, start = _local_header(head)
    if not name.endswith(b"/data.pkl"):
        raise ValueError("data.pkl is not the first member")
    spec, pickle_len = _describe(head[start:])
    member = name[: -len("data.pkl")] + b"data/" + spec.storage.key.encode()
    at = head.find(b"PK\x03\x04", start + pickle_len)
    while at >= 0:
        found, data_start = _local_header(head, at)
        if found == member:
            return _layout_of(spec, data_start)
        at = head.find(b"PK\x03\x04", at + 4)
    raise ValueError("storage header not in the record's first bytes")


def _ends_at_descriptor(layout: _Layout, after: bytes | bytearray) -> bool:
    """True if the bytes after the storage's are its zip data descriptor, recording the size we read: torch
    writes one after each member (flag bit 3), so a right guess of where the storage starts is confirmed
    without parsing the zip directory (:func:`_layout` does that when this says no)."""
    if after[:4] != b"PK\x07\x08" or len(after) < 16:
        return False
    n = layout.nbytes
    zip32 = int.from_bytes(after[8:12], "little") == n and int.from_bytes(after[12:16], "little") == n
    zip64 = int.from_bytes(after[8:16], "little") == n and int.from_bytes(after[16:24], "little") == n
    return zip32 or zip64


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor, as bytes."""
    return tensor.detach().view(-1).view(torch.uint8).numpy().data


class OnePassReader(SafeReader):
    """``SafeReader`` that verifies every file it reads against the manifest's checksums while reading it
    once (see the module docstring). ``files`` is the manifest's ``files`` table."""

    def __init__(self, path: str, files: dict[str, dict[str, Any]], threads: int = READ_THREADS) -> None:
        super().__init__(path)
        self.files = files
        self.threads = threads
        self._metadata: dict[Any, Any] = {}
        self._rings: queue.SimpleQueue[Ring] = queue.SimpleQueue()  # one per reading thread, reused per file

    def expected(self, name: str) -> tuple[int, str]:
        """(size, checksum) the manifest gives ``name``; a file it does not list is not the checkpoint's."""
        info = self.files.get(name)
        if info is None:
            raise CorruptCheckpoint(f"{name} is read by the checkpoint but not listed in its manifest")
        return int(info["size"]), str(info["checksum"])

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """Read, checked and unpickled once: :func:`runner.checkpoint.load` looks at it before DCP does."""
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            self._metadata[rank] = super().read_metadata(*args, **kwargs)
        return self._metadata[rank]

    def _check_metadata(self, name: str, data: bytes) -> None:
        self.check_bytes(name, data)

    def check_bytes(self, name: str, data: bytes) -> None:
        """A small file read whole (``.metadata``, ``rank_<r>.json``) against the manifest."""
        size, expected = self.expected(name)
        if len(data) != size:
            raise CorruptCheckpoint(f"{name} has {len(data)} bytes, manifest says {size}")
        if checksum.of_bytes(data, checksum.algorithm_of(expected)) != expected:
            raise CorruptCheckpoint(f"{name} fails its checksum")

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, dict[tuple[int, int], list[ReadItem]]] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            records = per_file.setdefault(info.relative_path, {})
            records.setdefault((info.offset, info.length), []).append(item)
        # NOTE: destinations are resolved here, on the calling thread; the planner is not thread-safe.
        targets = {
            id(item): planner.resolve_tensor(item).detach() for item in plan.items if item.type != LoadItemType.BYTE_IO
        }
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max(1, min(self.threads, len(per_file))), thread_name_prefix="ckpt-read") as pool:
            futures = [pool.submit(self._read_file, name, recs, targets, planner) for name, recs in per_file.items()]
            for future in futures:
                if (error := future.exception()) is not None:
                    errors.append(error)
        if errors:  # NOTE: corruption first: it tells the caller the destination is garbage.
            raise next((e for e in errors if isinstance(e, CorruptCheckpoint)), errors[0])
        for item in plan.items:
            if item.type != LoadItemType.BYTE_IO:
                planner.commit_tensor(item, targets[id(item)])
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_file(
        self,
        name: str,
        records: dict[tuple[int, int], list[ReadItem]],
        targets: dict[int, torch.Tensor],
        planner: LoadPlanner,
    ) -> None:
        size, expected = self.expected(name)
        path = os.path.join(self.path, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            ring = self._rings.get_nowait()
        except queue.Empty:
            ring = Ring()
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise CorruptCheckpoint(f"{name} has {actual} bytes, manifest says {size}")
            with InOrder(fd, path, size, checksum.algorithm_of(expected), ring) as stream:
                self._read_records(name, stream, size, expected, records, targets, planner)
        finally:
            os.close(fd)
            self._rings.put(ring)

    def _read_records(
        self,
        name: str,
        stream: InOrder,
        size: int,
        expected: str,
        records: dict[tuple[int, int], list[ReadItem]],
        targets: dict[int, torch.Tensor],
        planner: LoadPlanner,
    ) -> None:
        failure: Exception | None = None
        try:
            for (offset, length), items in sorted(records.items()):
                if offset < stream.pos or offset + length > size:
                    raise ValueError(f"record at {offset} (+{length}) overlaps another or the file's end")
                stream.skip_to(offset)
                self._read_record(stream, offset, length, items, targets, planner)
        except Exception as error:
            failure = error
        # Whatever went wrong (a zip that does not parse, a shape that does not fit), a file that fails
        # its checksum is reported as that: it is the cause, the rest is its consequence.
        try:
            stream.skip_to(size)
        except EOFError:
            raise CorruptCheckpoint(f"{name} is shorter than its manifest says") from None
        except OSError:
            if failure is None:
                raise
            raise failure from None
        if stream.checksum != expected:
            raise CorruptCheckpoint(f"{name} fails its checksum") from None
        if failure is not None:
            raise failure

    def _read_record(
        self,
        stream: InOrder,
        offset: int,
        length: int,
        items: list[ReadItem],
        targets: dict[int, torch.Tensor],
        planner: LoadPlanner,
    ) -> None:
        plain_items = all(
            item.type != LoadItemType.BYTE_IO and not self.storage_data[item.storage_index].transform_descriptors
            for item in items
        )
        if length <= SMALL_RECORD or not plain_items:
            whole = stream.read(length)
            layout = None
            if plain_items:
                guess = _try(lambda: _guess(bytes(whole[:HEAD])))
                if guess is not None and _ends_at_descriptor(guess, whole[guess.data_start + guess.nbytes :]):
                    layout = guess
                else:  # the record is all in memory: zipfile reads it from there
                    layout = _try(lambda: _layout(_RecordFile(stream.peek, offset, length, bytes(whole))))
            if layout is None:
                self._read_record_generic(bytes(whole), items, targets, planner)
            else:
                start = layout.data_start
                self._place(
                    torch.frombuffer(whole, dtype=torch.uint8)[start : start + layout.nbytes], layout, items, targets
                )
            return
        # A large record is read front to back like the rest of the file (no seek to its end and back, which
        # costs the kernel's read-ahead): where the tensor's bytes start is found in the record's first bytes,
        # and checked against the bytes that follow them (see _ends_at_descriptor), else the zip directory.
        guess = _try(lambda: _guess(stream.peek(offset, min(HEAD, length))))
        if guess is None:
            self._read_record_generic(bytes(stream.read(length)), items, targets, planner)
            return
        stream.skip_to(offset + guess.data_start)
        direct = self._direct_target(guess, items, targets)
        staging = torch.empty(guess.nbytes, dtype=torch.uint8) if direct is None else None
        stream.read_into(_bytes_of(direct if direct is not None else staging))  # type: ignore[arg-type]
        tail = bytes(stream.read(offset + length - stream.pos))
        confirmed = _ends_at_descriptor(guess, tail) or (
            _try(lambda: _layout(_RecordFile(stream.peek, offset, length, tail))) == guess
        )
        if not confirmed:
            # NOTE: the record is not what its first bytes said: load it as DCP would, from the page cache (it
            # was hashed above), over whatever was copied into the destination.
            self._read_record_generic(stream.peek(offset, length), items, targets, planner)
        elif staging is not None:
            self._place(staging, guess, items, targets)

    def _direct_target(
        self, layout: _Layout, items: list[ReadItem], targets: dict[int, torch.Tensor]
    ) -> torch.Tensor | None:
        """The destination tensor the record's bytes can be read straight into, if there is one."""
        if len(items) != 1 or not layout.plain():
            return None
        item, target = items[0], targets[id(items[0])]
        whole = all(o == 0 for o in item.storage_offsets) and tuple(item.lengths) == layout.size
        if whole and target.device.type == "cpu" and target.dtype == layout.dtype and target.is_contiguous():
            return target if tuple(target.shape) == layout.size else None
        return None

    def _place(
        self, data: torch.Tensor, layout: _Layout, items: list[ReadItem], targets: dict[int, torch.Tensor]
    ) -> None:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        if data.storage_offset() % layout.dtype.itemsize:
            data = data.clone()  # NOTE: a view as a wider dtype must start on an element boundary
        typed = data.view(layout.dtype) if layout.nbytes else torch.empty(0, dtype=layout.dtype)
        # NOTE: as_strided's offset counts from the start of the storage, not of the view.
        tensor = typed.as_strided(layout.size, layout.stride, typed.storage_offset() + layout.storage_offset)
        for item in items:
            piece = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
            _copy(targets[id(item)], piece, item)

    def _read_record_generic(
        self, record: bytes, items: list[ReadItem], targets: dict[int, torch.Tensor], planner: LoadPlanner
    ) -> None:
        """DCP's own way: the record through DCP's transforms, then ``torch.load(weights_only=True)``."""
        from torch.distributed._shard._utils import narrow_tensor_by_index

        for item in items:
            info = self.storage_data[item.storage_index]
            source = self.transforms.transform_load_stream(item, info.transform_descriptors or (), io.BytesIO(record))
            data = io.BytesIO(source.read(-1))
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, data)
                continue
            tensor = narrow_tensor_by_index(
                torch.load(data, map_location="cpu", weights_only=True), item.storage_offsets, item.lengths
            )
            _copy(targets[id(item)], tensor, item)


# --------------------------------------------------------------------------- load into a run
def load(ref: CheckpointRef, state: TrainState) -> None:
    """Load the local checkpoint ``ref`` into ``state`` in place, checking every file this rank reads against
    the manifest as it reads it (:class:`OnePassReader`). A remote checkpoint is downloaded first, by
    :func:`runner.checkpoint.resume.fetch` (the only download path).

    Raises :class:`CorruptCheckpoint` (on every rank) if a file fails its checksum: ``state`` is then partly
    overwritten and must be loaded again from another checkpoint, or rebuilt (see :mod:`.resume`).
    """
    local_dir = ref.url
    rank, world = distributed.rank(), distributed.world_size()
    name = rank_file(rank) if rank_file(rank) in ref.manifest["files"] else rank_file(0)
    saved_world = int(ref.manifest.get("world_size", 1))
    if saved_world != world and rank == 0:
        log.warning(
            "checkpoint %s was saved by %d ranks and loads into %d: weights and optimizer state are exact, the "
            "data position is rank 0's for every rank (this epoch's sample order differs from an uninterrupted "
            "run)",
            ref.source,
            saved_world,
            world,
        )
    reader = OnePassReader(local_dir, ref.manifest["files"])
    dest = state.load_destination()
    error = None
    try:
        with open(os.path.join(local_dir, name), "rb") as f:
            data = f.read()
        reader.check_bytes(name, data)
        meta = json.loads(data)
        check_tensor_layout(reader.read_metadata(), dest, ref.url)
    except CorruptCheckpoint as e:
        error = str(e)
    # NOTE: agreed before DCP's collectives, so a rank that found a bad file does not leave the others
    # waiting in dcp.load; a bad file found inside dcp.load is raised on every rank by DCP itself.
    error = distributed.first_error(error)
    if error is not None:
        raise CorruptCheckpoint(error)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=".*process group.*")
        try:
            dcp.load(dest, storage_reader=reader, planner=SafeLoadPlanner())
        except CheckpointException as e:  # NOTE: a BaseException; turn it into one of ours
            causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
            corrupt = next((c for c in causes if isinstance(c, CorruptCheckpoint)), None)
            if corrupt is not None:
                raise CorruptCheckpoint(str(corrupt)) from None
            if any(isinstance(c, pickle.UnpicklingError) for c in causes):
                raise UnsafeCheckpointError(
                    f"{ref.url} holds tensor data that is not a plain tensor (refused by weights_only "
                    "loading): it was not written by runner; refusing to unpickle it"
                ) from None
            unsafe = next((c for c in causes if isinstance(c, UnsafeCheckpointError)), None)
            if unsafe is not None:
                raise UnsafeCheckpointError(str(unsafe)) from None
            raise CheckpointError(f"loading {ref.url} failed: {one_line(e)}") from None
    state.restore(dest, meta)


def check_tensor_layout(metadata: Any, dest: dict[str, Any], where: str) -> None:
    """Before DCP reads anything: every entry we load must be stored as a tensor of the same shape.

    Besides catching a model/config mismatch with a readable message, this refuses checkpoints that
    store a pickled object where a tensor belongs (DCP would unpickle it with ``weights_only=False``).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = metadata.state_dict_metadata
    for top, section in dest.items():
        for key, tensor in section.items():
            fqn = f"{top}.{key}"
            meta = stored.get(fqn)
            if meta is None:
                raise CheckpointError(f"{where} has no {fqn!r}: was it saved from a different model or optimizer?")
            if not isinstance(meta, TensorStorageMetadata):
                raise UnsafeCheckpointError(
                    f"{where} stores a pickled object at {fqn!r} where a tensor belongs: refusing to unpickle it"
                )
            if tuple(meta.size) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{where}: {fqn!r} has shape {tuple(meta.size)}, the model has {tuple(tensor.shape)}; "
                    "the checkpoint is from a different model configuration"
                )


def read_tensors(path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint folder whose flattened key starts with ``prefix``, whole (shards of
    a sharded checkpoint joined), in one process without a process group: for export, reports and tests."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = SafeReader(path)
    metadata = reader.read_metadata()
    dest = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and key.startswith(prefix)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # NOTE: no_dist: this process reads every shard itself, even where a process group exists (a rank
        # running it alone must not enter a collective the others are not in).
        dcp.load(dest, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=True)
    return dest
