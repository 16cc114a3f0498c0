"""A checkpoint file read front to back once, through its manifest hash: :class:`InOrder`.

A thread reads the file ahead of the caller into a few reused page-aligned buffers (:class:`_ReadAhead`); the
caller copies each byte where it belongs and hashes it, in file order. Large files are read with ``O_DIRECT``:
measured on these VMs (docs/performance.md, "Why load_vs_raw_read varied"), a cold buffered read of 1 GB
took 0.57-3.4 s from one round to the next, because every page the page cache takes must first be
allocated and the host may have taken those pages back; the same bytes read with ``O_DIRECT`` into reused
buffers took 0.51-0.54 s every round. Reading ahead on a thread keeps the disk busy while the caller copies
and hashes (``O_DIRECT`` gets no read-ahead from the kernel). Where ``O_DIRECT`` is refused (tmpfs on old
kernels, some network file systems, macOS), the same thread reads through the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading

import torch

from runner.storage import checksum

#: Bytes per read of the read-ahead thread: a multiple of every block size ``O_DIRECT`` may require.
CHUNK = 8 << 20
#: Reads the thread may be ahead of the caller (buffers of CHUNK bytes each).
DEPTH = 4
#: Files from this size on are read with ``O_DIRECT``; smaller ones are likely still in the page cache
#: (a tiny model's checkpoint, just written) and cost nothing to read through it.
DIRECT_MIN = 64 << 20
#: Copies from this size on go through torch (its threads, and the GIL released).
_TORCH_COPY = 1 << 20

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _copy(dest: memoryview, source: memoryview) -> None:
    if len(source) >= _TORCH_COPY:
        torch.frombuffer(dest, dtype=torch.uint8).copy_(torch.frombuffer(source, dtype=torch.uint8))
    else:
        dest[:] = source


class Ring:
    """The read-ahead buffers, allocated once per reader and reused for every file it reads (touching fresh
    memory costs ~2 s/GiB on these VMs, see /work/shared/notes/bench.md)."""

    def __init__(self) -> None:
        self.buffers = [mmap.mmap(-1, CHUNK) for _ in range(DEPTH)]  # page-aligned, as O_DIRECT needs


class _ReadAhead:
    """Reads ``path`` from its start to ``size`` on a thread, into the ring's buffers in turn; :meth:`next`
    hands them out in order. A buffer goes back to the thread when the next one is taken."""

    def __init__(self, path: str, size: int, ring: Ring, direct: bool) -> None:
        self._buffers = ring.buffers
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        # (buffer, bytes in it), then None at the end, or the error that stopped the thread
        self._full: queue.SimpleQueue[tuple[int, int] | BaseException | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._held: int | None = None
        for i in range(len(self._buffers)):
            self._free.put(i)
        self._thread = threading.Thread(
            target=self._run, args=(path, size, direct), name="ckpt-read-ahead", daemon=True
        )
        self._thread.start()

    def _run(self, path: str, size: int, direct: bool) -> None:
        fd = -1
        try:
            fd, direct = _open(path, direct)
            offset = 0
            while offset < size:
                i = self._free.get()
                if self._stop.is_set():
                    return
                view, done = memoryview(self._buffers[i])[: min(CHUNK, size - offset)], 0
                while done < len(view):
                    try:
                        n = os.preadv(fd, [view[done:]], offset + done)
                    except OSError as error:
                        if not (direct and error.errno == errno.EINVAL):
                            raise
                        os.close(fd)  # NOTE: the file system refuses this O_DIRECT read: use the page cache
                        fd, direct = -1, False
                        fd, _ = _open(path, False)
                        continue
                    if n == 0:
                        break
                    done += n
                self._full.put((i, done))
                if done < len(view):
                    break  # the file ends early; the caller says so
                offset += done
            self._full.put(None)
        except BaseException as error:  # NOTE: handed to the caller, raised on its thread
            self._full.put(error)
        finally:
            if fd >= 0:
                os.close(fd)

    def next(self) -> memoryview:
        """The next bytes of the file (empty at the end of the ``size`` bytes asked for, or of the file)."""
        if self._held is not None:
            self._free.put(self._held)
            self._held = None
        item = self._full.get()
        if item is None or isinstance(item, BaseException):
            self._full.put(item)  # the thread has ended: the same answer at every later call
            if item is None:
                return memoryview(b"")
            raise item
        self._held, n = item
        return memoryview(self._buffers[self._held])[:n]

    def close(self) -> None:
        self._stop.set()
        for i in range(len(self._buffers)):  # wake the thread if it waits for a buffer
            self._free.put(i)
        self._thread.join()


def _open(path: str, direct: bool) -> tuple[int, bool]:
    """(fd, whether it is O_DIRECT): O_DIRECT if asked for and the file system allows it."""
    if direct and _O_DIRECT:
        try:
            return os.open(path, os.O_RDONLY | _O_DIRECT), True
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False


class InOrder:
    """One file, read once through one hash in file order (see the module docstring). Bytes may be *peeked*
    before the hash reaches them (a record's first bytes, to find its tensor): those are read through the page
    cache with ``fd``, and hashed when the pass reaches them like every other byte, exactly once. ``direct``:
    read with ``O_DIRECT`` (default: if the file has at least DIRECT_MIN bytes)."""

    def __init__(self, fd: int, path: str, size: int, algorithm: str, ring: Ring, direct: bool | None = None) -> None:
        self.fd = fd
        self.digest = checksum.hasher(algorithm)
        self.algorithm = algorithm
        self.pos = 0
        self._ahead = _ReadAhead(path, size, ring, direct=size >= DIRECT_MIN if direct is None else direct)
        self._rest = memoryview(b"")

    def close(self) -> None:
        self._ahead.close()

    def __enter__(self) -> InOrder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def peek(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``, not hashed (they will be when the pass reaches them)."""
        buf = bytearray(n)
        done = 0
        while done < n:
            got = os.preadv(self.fd, [memoryview(buf)[done:]], offset + done)
            if got == 0:
                raise EOFError(f"file ends at {offset + done} bytes, expected at least {offset + n}")
            done += got
        return bytes(buf)

    def _take(self, n: int) -> memoryview:
        """Up to ``n`` next bytes (at least one), hashed."""
        if not self._rest:
            self._rest = self._ahead.next()
            if not self._rest:
                raise EOFError(f"file ends at {self.pos} bytes, expected more")
        piece, self._rest = self._rest[:n], self._rest[n:]
        self.digest.update(piece)
        self.pos += len(piece)
        return piece

    def read_into(self, view: memoryview) -> None:
        """The next ``len(view)`` bytes into ``view``."""
        done = 0
        while done < len(view):
            piece = self._take(len(view) - done)
            _copy(view[done : done + len(piece)], piece)
            done += len(piece)

    def read(self, n: int) -> bytearray:
        buf = bytearray(n)
        self.read_into(memoryview(buf))
        return buf

    def skip_to(self, end: int) -> None:
        """Hash the bytes up to ``end`` (a gap between records, a record's zip headers, the file's rest)."""
        while self.pos < end:
            self._take(end - self.pos)

    @property
    def checksum(self) -> str:
        return f"{self.algorithm}:{self.digest.hexdigest()}"
