"""A backend double that can save a prepared domain and restore copies of it.

Like Xen: the guest reports that it is prepared some time after it booted (it runs its
prerun script), a save takes time and writes a real file (the saved domain's memory and
template), leaving the domain shut down without any death being reported; a restore
takes time, reads the file back and fails on anything it cannot read; a restored guest
reports ready a little later. Loadable as ``tests.savefile_doubles:SavingBackend``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from dispoold.backend import BackendError, Marker, NotReady, Provision
from dispoold.config import TemplateSettings
from tests.doubles import FakeBackend

#: What a saved image starts with; anything else is not one.
MAGIC = "fake xen saved domain\n"


class SavingBackend(FakeBackend):
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        #: Seconds from ready to prepared (the prerun script), to save, and to restore.
        self.prepare_delay = float(options.pop("prepare_delay", 2.0))
        self.save_delay = float(options.pop("save_delay", 1.0))
        self.restore_delay = float(options.pop("restore_delay", 0.5))
        #: Seconds a restored guest takes to report ready once unpaused.
        self.restored_ready_delay = float(options.pop("restored_ready_delay", 0.2))
        super().__init__(options)
        self.saved: list[str] = []
        self.restored: list[str] = []
        #: The next restore fails (as a damaged stream or a libxl error would).
        self.fail_restore = False

    async def wait_prepared(self, name: str, timeout: float) -> int:
        self._record("wait_prepared", name)
        await self.wait_ready(name, timeout)
        domain = self.domains.get(name)
        if domain is None or not domain.provision.save_request:
            raise NotReady("wait_prepared", name, "no save was requested of this domain")
        await asyncio.sleep(self.prepare_delay)
        if domain.shutdown or name not in self.domains:
            raise NotReady("wait_prepared", name, "the domain died while preparing")
        return domain.used_mib

    async def save(self, name: str, path: Path) -> None:
        domain = await self._op("save", name)
        if domain.shutdown:
            raise BackendError("save", name, "the domain is not running")
        image = {"template": domain.template, "memory_mib": domain.target_mib, "name": name}
        with path.open("x") as f:  # created, must not exist; written as it goes
            f.write(MAGIC + json.dumps(image) + "\n")
            f.flush()
            await asyncio.sleep(self.save_delay)
            f.write("\0" * 4096)
        domain.shutdown = True  # suspended: no death to report
        domain.paused_by_backend = False
        self.saved.append(name)

    async def restore(
        self,
        name: str,
        template: TemplateSettings,
        marker: Marker,
        provision: Provision,
        *,
        path: Path,
        memory_mib: int,
    ) -> int:
        self._record("restore", name)
        await asyncio.sleep(self.restore_delay)
        try:
            text = await asyncio.to_thread(path.read_text)
        except OSError as exc:
            raise BackendError("restore", name, f"{path}: {exc.strerror}") from None
        if self.fail_restore or not text.startswith(MAGIC):
            self.fail_restore = False
            raise BackendError("restore", name, "restoring domain: the stream is not valid")
        image = json.loads(text[len(MAGIC) :].splitlines()[0])
        if image["template"] != marker.template:
            raise BackendError("restore", name, "the stream is of another template")
        self.ready_delays[name] = self.restored_ready_delay
        domid = await super().create(name, template, marker, provision)
        self.domains[name].target_mib = self.domains[name].memory_mib = memory_mib
        self.restored.append(name)
        return domid
