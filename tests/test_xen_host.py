"""The Xen backend on a host without Xen: loading, options, and the pure parts.

What needs a hypervisor is in ``tests/xen/`` (run in the lab). Here: the backend must
refuse to load with a reason a person can act on, validate its options before anything
else, and build correct libxl inputs. Tests that need the compiled bindings skip when
they are not built (``python -m dispoold.xen.build``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dispoold import identity
from dispoold.backend import BackendUnavailable, Disk, Marker, Provision, load_backend
from dispoold.config import TemplateSettings
from dispoold.xen import bindings, build
from dispoold.xen.backend import domain_spec
from dispoold.xen.keys import marker_keys, parse_kib, parse_marker
from dispoold.xen.options import XenBackendOptions, XenTemplateOptions

MODULE = "dispoold.xen._xenlight"


@pytest.fixture
def no_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the compiled module had never been built."""
    monkeypatch.setitem(sys.modules, MODULE, None)


@pytest.fixture
def no_headers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build, "include_dirs", lambda: [tmp_path])


@pytest.fixture
def headers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for header in build.HEADERS:
        (tmp_path / header).write_text("/* stand-in */\n")
    monkeypatch.setattr(build, "include_dirs", lambda: [tmp_path])


def kernel_template(tmp_path: Path, **changes: object) -> TemplateSettings:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0")
    settings: dict[str, object] = {"kernel": kernel, "memory": 128, "maxmem": 256}
    settings.update(changes)
    return TemplateSettings.model_validate(settings)


# -- loading ----------------------------------------------------------------------------


@pytest.mark.usefixtures("no_bindings", "no_headers")
def test_without_bindings_or_headers_loading_says_to_install_headers_and_build() -> None:
    with pytest.raises(BackendUnavailable) as caught:
        load_backend("xen", {})
    message = str(caught.value)
    assert "Xen bindings not built: libxl.h was not found" in message
    assert "libxen-dev" in message
    assert "python -m dispoold.xen.build" in message
    assert caught.value.operation == "load"


@pytest.mark.usefixtures("no_bindings", "headers")
def test_without_bindings_but_with_headers_loading_says_to_build() -> None:
    with pytest.raises(BackendUnavailable, match=r"not built: run python -m dispoold\.xen\.build"):
        load_backend("xen", {})


def test_bindings_whose_libraries_are_missing_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> None:
        raise ImportError("libxenlight.so.4.17: cannot open shared object file")

    monkeypatch.setattr("dispoold.xen.bindings.importlib.import_module", broken)
    with pytest.raises(BackendUnavailable, match=r"cannot be loaded: libxenlight\.so\.4\.17"):
        bindings.load()


@pytest.mark.usefixtures("no_bindings")
def test_importing_dispoold_works_without_bindings() -> None:
    import dispoold.xen.backend
    import dispoold.xen.libxl
    import dispoold.xen.xenstore

    assert dispoold.xen.backend.XenBackend is not None


def test_build_without_headers_explains(no_headers: None) -> None:
    with pytest.raises(SystemExit, match=r"libxl\.h.*not found.*libxen-dev.*xen-devel"):
        build.build(Path("/nonexistent"))


# -- options ----------------------------------------------------------------------------


@pytest.mark.usefixtures("no_bindings")
def test_unknown_option_is_refused_before_bindings_are_looked_for() -> None:
    with pytest.raises(BackendUnavailable, match=r"bad options: ready_kye: unknown key"):
        load_backend("xen", {"ready_kye": "data/ready"})


def test_option_defaults() -> None:
    options = XenBackendOptions()
    assert options.readiness == "xenstore"
    assert options.ready_key == "data/ready"
    assert options.meminfo_key == "data/meminfo"
    assert options.control_context == "separate"


@pytest.mark.parametrize(
    "options",
    [
        {"readiness": "ssh"},
        {"ready_key": "../1/data/ready"},
        {"ready_key": "data//ready"},
        {"ready_key": ""},
        {"meminfo_key": "data/mem info"},
        {"unpause_check_interval": 0},
        {"qrexec_command": []},
        {"control_context": "per-thread"},
        {"build_threads": 0},
    ],
)
def test_bad_option_values_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        XenBackendOptions.model_validate(options)


def test_absolute_and_qubes_keys_are_accepted() -> None:
    options = XenBackendOptions.model_validate(
        {"meminfo_key": "memory/meminfo", "ready_key": "/local/domain/0/x", "readiness": "qrexec"}
    )
    assert options.meminfo_key == "memory/meminfo"


def test_template_options_refuse_unknown_keys() -> None:
    assert XenTemplateOptions.model_validate({"type": "pvh"}).type == "pvh"
    with pytest.raises(ValueError):
        XenTemplateOptions.model_validate({"typ": "pv"})
    with pytest.raises(ValueError):
        XenTemplateOptions.model_validate({"type": "hvm"})


# -- marker and guest-written values ----------------------------------------------------


def test_marker_round_trip() -> None:
    marker = Marker(owner="dispoold", template="fedora-dvm", dispid=4711)
    entries = marker_keys(marker)
    assert entries == {
        "dispoold/owner": "dispoold",
        "dispoold/template": "fedora-dvm",
        "dispoold/dispid": "4711",
    }
    values = {key.split("/")[1]: value for key, value in entries.items()}
    assert parse_marker(values) == marker


@pytest.mark.parametrize(
    "values",
    [
        {"owner": "", "template": "t", "dispid": "1"},
        {"owner": "o", "template": "", "dispid": "1"},
        {"owner": "o", "template": "t", "dispid": "-1"},
        {"owner": "o", "template": "t", "dispid": "x"},
        {"owner": "o", "template": "t"},
    ],
)
def test_incomplete_markers_are_not_markers(values: dict[str, str]) -> None:
    assert parse_marker(values) is None


@pytest.mark.parametrize(
    ("untrusted", "expected"),
    [
        ("26000", 26000),
        (" 26000\n", 26000),
        ("999999999", 262144),
        ("-5", None),
        ("12kB", None),
        ("", None),
        (None, None),
        ("9" * 40, None),
    ],
)
def test_guest_reported_kib_is_checked_and_clamped(
    untrusted: str | None, expected: int | None
) -> None:
    assert parse_kib(untrusted, 262144) == expected


# -- what libxl is asked to build -------------------------------------------------------


def test_domain_spec_from_template(tmp_path: Path) -> None:
    ramdisk = tmp_path / "initrd.img"
    ramdisk.write_bytes(b"\0")
    template = kernel_template(
        tmp_path,
        ramdisk=ramdisk,
        cmdline="console=hvc0",
        vcpus=2,
        volumes=[{"role": "read-only", "vdev": "xvdd", "source": "/images/shared.img"}],
        interfaces=[{"subnet": "10.137.0.0/16", "gateway": "10.137.0.1", "dns": ["10.137.0.1"]}],
    )
    marker = Marker("dispoold", "lab-dvm", 7)
    spec = domain_spec("disp7", template, marker, XenTemplateOptions())
    assert spec.name == "disp7"
    assert spec.kernel == str(tmp_path / "vmlinuz")
    assert spec.ramdisk == str(ramdisk)
    assert (spec.memory_kib, spec.maxmem_kib, spec.vcpus) == (128 * 1024, 256 * 1024, 2)
    # A shared image is given read-only, whatever else the template has.
    assert spec.disks == ("format=raw, vdev=xvdd, access=ro, target=/images/shared.img",)
    assert spec.xsdata == marker_keys(marker)
    assert spec.nics == ()  # no identity: a domain without interfaces of its own
    assert not spec.pvh


def test_domain_spec_with_disks_and_identity(tmp_path: Path) -> None:
    template = kernel_template(
        tmp_path,
        interfaces=[{"subnet": "10.137.0.0/16", "gateway": "10.137.0.1", "dns": ["10.137.0.1"]}],
    )
    marker = Marker("dispoold", "lab-dvm", 7)
    who = identity.identity("disp7", template, "dispoold", 7)
    provision = Provision(
        disks=(
            Disk("xvda", Path("/dev/dispoold/dispoold--disp7--xvda"), writable=True),
            Disk("xvdb", Path("/dev/loop3"), writable=False),
        ),
        identity=who,
    )
    spec = domain_spec("disp7", template, marker, XenTemplateOptions(), provision)
    assert spec.disks == (
        "format=raw, vdev=xvda, access=rw, target=/dev/dispoold/dispoold--disp7--xvda",
        "format=raw, vdev=xvdb, access=ro, target=/dev/loop3",
    )
    [nic] = spec.nics
    assert (nic.devid, nic.mac, nic.bridge, nic.backend) == (
        0,
        who.interfaces[0].mac,
        "xenbr0",
        None,
    )
    keys = spec.xsdata
    assert keys["dispoold/identity/name"] == "disp7"
    assert keys["dispoold/identity/generation"] == "1"
    assert keys["dispoold/identity/seed"] == who.seed
    assert keys["dispoold/identity/net/0/mac"] == nic.mac
    assert keys["dispoold/identity/net/0/ip"] == "10.137.0.9/16"  # network + 2 + dispid 7
    assert keys["dispoold/identity/net/0/gateway"] == "10.137.0.1"
    assert keys["dispoold/identity/net/0/dns"] == "10.137.0.1"
    assert {k: v for k, v in keys.items() if k.startswith("dispoold/") and "/" not in k[9:]} == (
        marker_keys(marker)
    )


def test_maxmem_defaults_to_memory(tmp_path: Path) -> None:
    template = kernel_template(tmp_path, maxmem=None)
    spec = domain_spec("disp1", template, Marker("o", "t", 1), XenTemplateOptions(type="pvh"))
    assert spec.maxmem_kib == spec.memory_kib == 128 * 1024
    assert spec.pvh


def test_missing_kernel_is_a_clear_error(tmp_path: Path) -> None:
    template = kernel_template(tmp_path, kernel=tmp_path / "nope")
    with pytest.raises(ValueError, match=r"kernel .*nope does not exist"):
        domain_spec("disp1", template, Marker("o", "t", 1), XenTemplateOptions())


def test_missing_ramdisk_is_a_clear_error(tmp_path: Path) -> None:
    template = kernel_template(tmp_path, ramdisk=tmp_path / "gone.img")
    with pytest.raises(ValueError, match=r"ramdisk .*gone\.img does not exist"):
        domain_spec("disp1", template, Marker("o", "t", 1), XenTemplateOptions())


def test_a_template_without_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="no kernel"):
        domain_spec("disp1", TemplateSettings(), Marker("o", "t", 1), XenTemplateOptions())


# -- with the compiled bindings (skipped when not built) --------------------------------


@pytest.fixture
def compiled() -> tuple[object, object]:
    module = pytest.importorskip(MODULE, reason="Xen bindings not built")
    return module.ffi, module.lib


def test_disk_specs_go_through_xls_own_parser(compiled: tuple[object, object]) -> None:
    from dispoold.xen.libxl import Libxl

    xl = Libxl(*compiled)
    xl.check_disk("format=raw, vdev=xvda, access=rw, target=/var/lib/x.img")
    xl.check_disk("/var/lib/x.img,raw,xvdb,ro")
    with pytest.raises(ValueError, match="unknown parameter"):
        xl.check_disk("bogus=1, vdev=xvda")


def test_libxl_error_codes_have_names(compiled: tuple[object, object]) -> None:
    from dispoold.xen.libxl import Libxl, LibxlError, error_name

    Libxl(*compiled)
    assert error_name(-3) == "ERROR_FAIL"
    assert error_name(-21) == "ERROR_DOMAIN_NOTFOUND"
    assert (
        str(LibxlError("libxl_domain_pause", -3, "x"))
        == "libxl_domain_pause failed: ERROR_FAIL (x)"
    )


@pytest.mark.asyncio
@pytest.mark.skipif(Path("/proc/xen/capabilities").exists(), reason="this host runs Xen")
async def test_open_outside_dom0_is_unavailable_and_explains(
    compiled: tuple[object, object],
) -> None:
    backend = load_backend("xen", {"libxl_log_level": "none"})
    with pytest.raises(BackendUnavailable, match=r"cannot use Xen: .*dom0"):
        await backend.open()
    await backend.close()
