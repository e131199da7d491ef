"""The qmemman client: the memory manager on Qubes, where qmemman balances memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Final

from dispoold.backend import Backend, BackendError
from dispoold.config import MemorySettings
from dispoold.memory.base import ManagerBase
from dispoold.memory.port import MemoryManagerError, NoMemory, ShrinkResult
from dispoold.memory.rules import DOMAIN_OVERHEAD_MIB, MIB

log = logging.getLogger("dispoold.memory")

#: qmemman's longest answer is ``INVALID_ARG\n``; a longer line is not qmemman talking.
MAX_ANSWER_BYTES: Final = 64
#: qmemman's available-memory file holds one decimal number of bytes.
MAX_AVAIL_FILE_BYTES: Final = 64


class _Answer(Enum):
    OK = "OK"
    FAIL = "FAIL"
    INVALID_ARG = "INVALID_ARG"


def _parse_answer(untrusted_line: bytes) -> _Answer | None:
    untrusted_text = untrusted_line.strip().decode("ascii", errors="replace")
    for answer in _Answer:
        if untrusted_text == answer.value:
            return answer
    return None


def _read_avail_file(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MAX_AVAIL_FILE_BYTES + 1)


class QmemmanClient(ManagerBase):
    """The memory manager on Qubes: qmemman balances memory, this asks it.

    The protocol (qmemman's client socket): one request per connection, an ASCII line:

    - ``<bytes>\\n``: free that much hypervisor memory for a domain about to be created.
      qmemman takes its global lock, balloons other domains down, answers, and keeps the
      lock (no balancing at all) until the client closes the connection; so
      :meth:`allocation` keeps it open until the domain exists.
    - ``<domid>:<bytes> ...\\n``: set those domains' memory, 0 meaning "preferred".
      qmemman keeps setting the target and polling until actual / target <= 1.1, or fails
      after 3 s when the last second moved less than 100 MiB. It can only shrink this
      way: a domain already under the target counts as done at once.

    Answers: ``OK``, ``FAIL``, ``INVALID_ARG``. qmemman serves one connection at a time
    and a request it chokes on (an unknown domid) ends the connection with no answer.
    All requests of this daemon go through one lock, so it never has more than one
    connection open to qmemman (five or more at once locked it up: Qubes #9917).
    """

    manager_name = "qmemman"

    def __init__(self, settings: MemorySettings, backend: Backend) -> None:
        super().__init__(settings, backend)
        self._request_lock = asyncio.Lock()
        self._reachable: bool | None = None

    async def open(self) -> None:
        if not self.settings.qmemman_socket.exists():
            log.warning(
                "qmemman's socket %s does not exist: allocations will fail and preloads "
                "will not be shrunk until qmemman runs",
                self.settings.qmemman_socket,
            )

    async def close(self) -> None:
        pass

    async def available_mib(self) -> int:
        """qmemman's published figure: free memory plus what running domains hold above
        their preferred size, less what the others need to reach theirs. It can be
        negative (memory is short); that is 0 here."""
        path = self.settings.qmemman_avail_file
        try:
            untrusted_raw = await asyncio.to_thread(_read_avail_file, path)
        except FileNotFoundError:
            raise self._failure(
                f"available memory: {path} does not exist (is qmemman running?)"
            ) from None
        except OSError as exc:
            raise self._failure(f"available memory: cannot read {path}: {exc.strerror}") from None
        untrusted_text = untrusted_raw.decode("ascii", errors="replace").strip()
        if len(untrusted_raw) > MAX_AVAIL_FILE_BYTES or not untrusted_text.lstrip("-").isdigit():
            raise self._failure(
                f"available memory: {path} holds {untrusted_text[:32]!r}, not a number of bytes"
            )
        available_bytes = int(untrusted_text)
        mib = max(0, available_bytes // MIB)
        self._last_available_mib = mib
        return mib

    def allocation(self, name: str, mib: int) -> AbstractAsyncContextManager[None]:
        return self._allocation(name, mib)

    @asynccontextmanager
    async def _allocation(self, name: str, mib: int) -> AsyncIterator[None]:
        what = f"allocate {mib} MiB for {name}"
        request = f"{(mib + DOMAIN_OVERHEAD_MIB) * MIB}\n"
        async with self._request_lock:
            writer, answer = await self._ask(request, what)
            try:
                if answer is _Answer.FAIL:
                    raise NoMemory(f"{what}: qmemman could not free that much (FAIL)")
                if answer is _Answer.INVALID_ARG:
                    raise self._failure(
                        f"{what}: qmemman rejected {request.strip()!r} (INVALID_ARG)"
                    )
                # qmemman holds its global lock until this connection closes: the memory
                # stays free until the domain exists.
                yield
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def shrink(self, name: str) -> ShrinkResult:
        start = asyncio.get_running_loop().time()
        with self._recording_failures(name):
            try:
                info = await self.backend.domain_info(name)
            except BackendError as exc:
                raise MemoryManagerError(f"shrink {name}: {exc}") from None
            if info is None:
                raise MemoryManagerError(f"shrink {name}: no such domain")
            what = f"shrink {name}"
            request = f"{info.domid}:0\n"
            async with self._request_lock:
                writer, answer = await self._ask(request, what)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if answer is _Answer.INVALID_ARG:
                raise self._failure(f"{what}: qmemman rejected {request.strip()!r} (INVALID_ARG)")
            if answer is _Answer.FAIL:
                # qmemman already gave up by its own rule (too slow): say where it stopped.
                now = await self._memory(name, "shrink")
                return self._result(name, start, now.target_mib, now.actual_mib, False)
            # OK: qmemman saw it converge (or skipped a guest that reports no use yet);
            # check with the hypervisor so the result tells the truth.
            now = await self._memory(name, "shrink")
            actual, converged = await self._follow(name, now.target_mib)
            return self._result(name, start, now.target_mib, actual, converged)

    def include(self, name: str) -> None:
        # qmemman gives running domains memory itself, from what they report using; it
        # skips paused ones itself too (since the fix of Qubes #11121). Nothing to ask.
        super().include(name)

    def status(self) -> dict[str, Any]:
        figures = super().status()
        figures["qmemman_reachable"] = self._reachable
        figures["socket"] = str(self.settings.qmemman_socket)
        return figures

    # -- the wire -----------------------------------------------------------------

    async def _ask(self, request: str, what: str) -> tuple[asyncio.StreamWriter, _Answer]:
        """One request on a new connection, with the request lock held by the caller.
        Returns the open connection and the answer; the caller closes it. On any failure
        the connection is closed before the error propagates."""
        path = self.settings.qmemman_socket
        connect_timeout = self.settings.qmemman_connect_timeout
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_ANSWER_BYTES)
        except FileNotFoundError:
            raise self._unreachable(
                f"{what}: qmemman is not running ({path} does not exist)"
            ) from None
        except ConnectionRefusedError:
            raise self._unreachable(f"{what}: nothing listens on {path} (qmemman died?)") from None
        except TimeoutError:
            raise self._unreachable(
                f"{what}: qmemman did not accept a connection within {connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise self._unreachable(f"{what}: cannot connect to {path}: {exc.strerror}") from None
        answer_timeout = self.settings.qmemman_answer_timeout
        done = False
        try:
            writer.write(request.encode("ascii"))
            async with asyncio.timeout(answer_timeout):
                await writer.drain()
                untrusted_line = await reader.readuntil(b"\n")
            answer = _parse_answer(untrusted_line)
            if answer is None:
                text = untrusted_line.strip().decode("ascii", errors="replace")[:32]
                raise self._failure(f"{what}: qmemman answered {text!r}, not OK/FAIL/INVALID_ARG")
            done = True
        except TimeoutError:
            raise self._unreachable(
                f"{what}: qmemman did not answer within {answer_timeout:g} s"
            ) from None
        except asyncio.IncompleteReadError:
            raise self._failure(
                f"{what}: qmemman closed the connection without answering (see its log)"
            ) from None
        except asyncio.LimitOverrunError:
            raise self._failure(f"{what}: qmemman's answer is too long") from None
        except OSError as exc:
            raise self._unreachable(f"{what}: connection to qmemman failed: {exc}") from None
        finally:
            if not done:
                writer.close()
        self._reachable = True
        return writer, answer

    def _unreachable(self, message: str) -> MemoryManagerError:
        self._reachable = False
        return self._failure(message)

    def _failure(self, message: str) -> MemoryManagerError:
        self._last_error = message
        return MemoryManagerError(message)
