"""The doubles' own knobs: steps, delays, injected failures, holds, guests' behaviour.

What the doubles promise as a backend is the contract suite's business
(``tests/test_backend_contract.py``); this is about the handles tests use to steer them.
"""

from __future__ import annotations

import asyncio

import pytest

from dispoold.backend import BackendError, DomainEventKind, Marker, NotReady
from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory import MemoryManagerError, NoMemory
from tests.doubles import BACKEND_STEPS, FakeBackend, FakeMemory
from tests.virtual_time import run

OWNER = "test"
TEMPLATE = TemplateSettings(memory=400)


def marker(dispid: int, template: str = "dvm") -> Marker:
    return Marker(OWNER, template, dispid)


async def opened(options: dict[str, object] | None = None) -> FakeBackend:
    backend = FakeBackend(options)
    await backend.open()
    return backend


def test_a_creation_goes_through_its_steps_and_the_domain_exists_paused_and_marked_early() -> None:
    async def scenario() -> None:
        backend = await opened({"create_delay": 2.0})
        seen: list[tuple[str, bool | None]] = []

        def observe(step: str, name: str | None) -> None:
            domain = backend.domains.get(name or "")
            seen.append((step, None if domain is None else domain.paused))
            if domain is not None:
                assert domain.marker == marker(1)

        backend.steps.observers.append(observe)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await backend.create("disp1", TEMPLATE, marker(1))
        assert loop.time() - start == pytest.approx(2.0)  # the build takes create_delay
        assert seen == [
            ("create", None),  # nothing exists yet
            ("create.build", True),  # exists, paused, marked
            ("create.start", True),
            ("create.return", False),  # running; the answer is on its way
        ]

    run(scenario())


def test_a_kill_in_the_middle_of_a_build_leaves_a_paused_marked_domain() -> None:
    backend = FakeBackend()

    async def killed_mid_build() -> asyncio.Task[int]:
        await backend.open()
        hold = backend.steps.hold("create.build")
        creating = asyncio.create_task(backend.create("disp1", TEMPLATE, marker(1)))
        assert await hold.reached == "disp1"
        return creating  # frozen where it stands, and kept from the garbage collector

    frozen = run(killed_mid_build(), crash=True)
    assert not frozen.done()
    domain = backend.domains["disp1"]
    assert domain.paused and domain.marker == marker(1)


@pytest.mark.parametrize("step", ["create", "create.build", "create.start"])
def test_a_creation_that_fails_at_any_step_leaves_nothing(step: str) -> None:
    async def scenario() -> None:
        backend = await opened()
        fault = backend.steps.fail(step, template="dvm")
        with pytest.raises(BackendError) as caught:
            await backend.create("disp1", TEMPLATE, marker(1))
        assert caught.value.operation == "create" and caught.value.domain == "disp1"
        assert backend.domains == {} and fault.hits == 1
        await backend.create("disp2", TEMPLATE, marker(2))  # once only
        assert backend.steps.fail(step, template="other").hits == 0

    run(scenario())


def test_failures_fire_as_often_as_told_and_for_whom_they_are_meant() -> None:
    async def scenario() -> None:
        backend = await opened()
        for dispid in (1, 2):
            await backend.create(f"disp{dispid}", TEMPLATE, marker(dispid))
        always = backend.steps.fail("pause", name="disp1", times=None)
        for _ in range(3):
            with pytest.raises(BackendError, match="injected"):
                await backend.pause("disp1")
        await backend.pause("disp2")
        assert always.hits == 3
        backend.steps.fail("wait_ready")
        with pytest.raises(NotReady):  # what the real one raises there
            await backend.wait_ready("disp2", 10)
        with pytest.raises(ValueError, match="can fail"):
            backend.steps.fail("create.cleanup")
        assert "create.return" in BACKEND_STEPS
        with pytest.raises(ValueError, match="can fail"):
            backend.steps.fail("create.return")  # the domain runs: the creation succeeded

    run(scenario())


def test_every_step_takes_the_time_it_is_told() -> None:
    async def scenario() -> None:
        backend = await opened({"op_delay": 0.5, "delays": {"destroy": 3.0}})
        await backend.create("disp1", TEMPLATE, marker(1))
        loop = asyncio.get_running_loop()
        for operation, seconds in (("pause", 0.5), ("list_owned", 0.5), ("destroy", 3.0)):
            start = loop.time()
            if operation == "list_owned":
                await backend.list_owned(OWNER)
            else:
                await getattr(backend, operation)("disp1")
            assert loop.time() - start == pytest.approx(seconds), operation

    run(scenario())


def test_a_hold_parks_an_operation_until_released() -> None:
    async def scenario() -> None:
        backend = await opened()
        await backend.create("disp1", TEMPLATE, marker(1))
        hold = backend.steps.hold("pause", name="disp1")
        pausing = asyncio.ensure_future(backend.pause("disp1"))
        assert await hold.reached == "disp1"
        await asyncio.sleep(100)
        assert not pausing.done() and not backend.domains["disp1"].paused
        hold.release()
        await pausing
        assert backend.domains["disp1"].paused

    run(scenario())


def test_a_guest_that_dies_booting_crashes_whether_or_not_anyone_waits() -> None:
    async def scenario() -> None:
        backend = await opened({"ready_delay": 4.0, "die_booting": ["dvm"]})
        events = backend.events()
        await backend.create("disp1", TEMPLATE, marker(1))
        event = await asyncio.wait_for(anext(events), 10)
        assert (event.kind, event.name) == (DomainEventKind.DIED, "disp1")
        assert backend.domains["disp1"].shutdown
        with pytest.raises(NotReady, match="died"):
            await backend.wait_ready("disp1", 60)

    run(scenario())


def test_template_options_choose_where_a_creation_fails_and_how_the_guest_boots() -> None:
    async def scenario() -> None:
        backend = await opened()
        never = TemplateSettings(memory=400, options={"boot": "never"})
        await backend.create("disp1", never, marker(1))
        with pytest.raises(NotReady, match="not ready after 5 s"):
            await backend.wait_ready("disp1", 5)
        broken = TemplateSettings(memory=400, options={"fail_at": "start"})
        with pytest.raises(BackendError, match="unpause failed"):
            await backend.create("disp2", broken, marker(2))
        with pytest.raises(BackendError, match="template options"):
            await backend.create("disp3", TemplateSettings(options={"nope": 1}), marker(3))
        assert set(backend.domains) == {"disp1"}

    run(scenario())


def test_the_memory_double_fails_like_a_memory_manager() -> None:
    async def scenario() -> None:
        backend = await opened({"host_mib": 1000})
        memory = FakeMemory(MemorySettings(), backend)
        backend.steps.fail("free_memory")
        with pytest.raises(MemoryManagerError, match="injected"):
            await memory.available_mib()  # a backend failure, as the manager's own error
        backend.steps.fail("memory.allocation", error=NoMemory("full"))
        with pytest.raises(NoMemory):
            async with memory.allocation("disp1", 400):
                pass
        with pytest.raises(NoMemory):
            async with memory.allocation("disp1", 2000):
                pass
        async with memory.allocation("disp1", 400):
            await backend.create("disp1", TEMPLATE, marker(1))
        backend.steps.fail("memory")
        with pytest.raises(MemoryManagerError, match="shrink disp1"):
            await memory.shrink("disp1")

    run(scenario())


def test_a_handed_out_disposable_gets_its_memory_back() -> None:
    async def scenario() -> None:
        backend = await opened()
        memory = FakeMemory(MemorySettings(preferred_floor_mib=100), backend)
        async with memory.allocation("disp1", 400):
            await backend.create("disp1", TEMPLATE, marker(1))
        result = await memory.shrink("disp1")
        assert result.actual_mib == 130 == backend.domains["disp1"].memory_mib  # 100 used x 1.3
        memory.exclude("disp1")
        memory.include("disp1")
        await asyncio.sleep(1)
        assert backend.domains["disp1"].memory_mib == 400

    run(scenario())


def test_nothing_works_before_open_and_another_process_knows_nothing_yet() -> None:
    async def scenario() -> None:
        backend = FakeBackend()
        with pytest.raises(BackendError, match="not open"):
            await backend.list_owned(OWNER)
        await backend.open()
        await backend.create("disp1", TEMPLATE, marker(1))
        restarted = backend.on_same_host()
        await restarted.open()
        with pytest.raises(BackendError, match="no marker of this daemon"):
            await restarted.pause("disp1")  # not named as its owner yet
        assert [info.name for info in await restarted.list_owned(OWNER)] == ["disp1"]
        await restarted.pause("disp1")

    run(scenario())
