"""Configuration: every mistake names the file and the field, and nothing starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from dispoold.config import Config, ConfigError, load, parse

GOOD = """
[pool]
default_dispvm = "work-dvm"
max = 2

[templates.work-dvm]
kernel = "/var/lib/x/vmlinuz"
memory = 400
maxmem = 800
tags = ["work"]
preload_max = 1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dispoold.toml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_defaults_for_everything_unsaid(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    assert config.pool.max == 2 and config.pool.refill_delay == 3.0
    assert config.templates["work-dvm"].max_memory == 800
    assert config.daemon.socket == Path("/run/dispoold/dispoold.sock")
    assert config.backend.name == "xen"


def test_the_shipped_sample_is_valid() -> None:
    sample = Path(__file__).parent.parent / "etc" / "dispoold.toml"
    if not sample.exists():
        pytest.fail("etc/dispoold.toml is missing")
    load(sample)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[pool]\nmaxx = 1\n", "pool.maxx"),
        ("[pool]\nmax = -1\n", "pool.max"),
        ("[pool]\nmax = 'two'\n", "pool.max"),
        ("[pool]\ndefault_dispvm = 'nope'\n", "no template named 'nope'"),
        ("[templates.x]\nmemory = 400\nmaxmem = 100\n", "maxmem (100) is below memory (400)"),
        ("[templates.'bad name']\n", "templates.bad name"),
        ("[templates.x]\ntags = ['two words']\n", "must be one word"),
        ("[sources.q]\ndefault_dispvm = 'nope'\n", "sources.q.default_dispvm"),
        ("[daemon]\ninstance = 'a b'\n", "daemon.instance"),
        # A writable disk all disposables would share is refused, naming the field.
        ("[templates.x]\ndisks = ['vdev=xvda, target=/r.img']\n", "templates.x: disks: describe"),
        (
            "[templates.x]\n[[templates.x.volumes]]\nrole = 'root'\nvdev = 'xvda'\n",
            "templates.x.volumes.0: a root volume needs a source",
        ),
        (
            "[templates.x]\n[[templates.x.volumes]]\nrole = 'volatile'\nvdev = 'xvdc'\n",
            "needs size_mib",
        ),
        (
            "[templates.x]\n[[templates.x.volumes]]\nrole = 'root'\nvdev = 'xvda'\nsource = 'r'\n",
            "volumes.0: no pool, and the template has no storage",
        ),
        (
            "[templates.x]\nstorage = 'thin'\n[[templates.x.volumes]]\nrole = 'root'\n"
            "vdev = 'xvda'\nsource = 'r'\n",
            "templates.x.volumes.0: no storage pool named 'thin'",
        ),
        (
            "[templates.x]\n[[templates.x.volumes]]\nrole = 'read-only'\nvdev = 'xvda'\n"
            "source = '/a'\n[[templates.x.volumes]]\nrole = 'read-only'\nvdev = 'xvda'\n"
            "source = '/b'\n",
            "each needs a vdev of its own",
        ),
        (
            "[templates.x]\n[[templates.x.interfaces]]\nsubnet = '10.137.0.0/24'\n",
            "subnet 10.137.0.0/24 is too small",
        ),
        (
            "[templates.x]\n[[templates.x.interfaces]]\nsubnet = '10.137.0.0/16'\n"
            "gateway = '10.1.0.1'\n",
            "gateway 10.1.0.1 is not in 10.137.0.0/16",
        ),
    ],
)
def test_mistakes_name_the_file_and_the_field(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(path) in str(caught.value) and where in str(caught.value)


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[pool\n"))


def test_a_template_fingerprint_follows_its_definition_and_its_files(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"1")
    config = parse(
        {
            "templates": {
                "t": {
                    "kernel": str(kernel),
                    "volumes": [
                        {"role": "read-only", "vdev": "xvda", "source": str(tmp_path / "root.img")}
                    ],
                }
            }
        }
    )
    template = config.templates["t"]
    assert template.files() == [kernel, tmp_path / "root.img"]
    before = template.fingerprint()
    assert template.fingerprint() == before
    (tmp_path / "root.img").write_bytes(b"disk")  # a missing file appears
    after_disk = template.fingerprint()
    assert after_disk != before
    kernel.write_bytes(b"22")
    assert template.fingerprint() != after_disk
    changed = Config.model_validate({"templates": {"t": {"kernel": str(kernel), "memory": 500}}})
    assert changed.templates["t"].fingerprint() != template.fingerprint()


def test_the_shipped_sample_documents_every_setting() -> None:
    """etc/dispoold.toml promises to show every key: a new setting must be added there."""
    from dispoold import config
    from dispoold.xen.options import XenBackendOptions, XenTemplateOptions

    sample = (Path(__file__).parent.parent / "etc" / "dispoold.toml").read_text()
    shown = set(re.findall(r"^#?\s*([a-z_]+)\s*=", sample, re.MULTILINE))
    shown |= set(re.findall(r"\{ ([a-z_]+) =", sample))
    shown |= set(re.findall(r"^\[\[?templates\.[^.\]]+\.([a-z_]+)\]", sample, re.MULTILINE))
    from dispoold.storage.file import FileDriver
    from dispoold.storage.lvm_thin import LvmThin

    tables: list[type[BaseModel]] = [
        LvmThin.Options,
        FileDriver.Options,
        config.DaemonSettings,
        config.BackendSettings,
        config.MemorySettings,
        config.PoolSettings,
        config.TemplateSettings,
        config.VolumeSettings,
        config.InterfaceSettings,
        config.SavefileSettings,
        config.TemplateSavefile,
        config.SourceSettings,
        XenBackendOptions,
        XenTemplateOptions,
    ]
    missing = {
        f"{table.__name__}.{key}"
        for table in tables
        for key in table.model_fields
        if key not in shown and key != "options"
    }
    assert not missing, f"not in etc/dispoold.toml: {sorted(missing)}"
