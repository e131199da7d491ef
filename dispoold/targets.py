"""Request targets, as qrexec policy writes them, resolved to disposable templates."""

from __future__ import annotations

from collections.abc import Mapping

from dispoold.config import SourceSettings, TemplateSettings
from dispoold.errors import InvalidTarget, NoSuchTemplate, NotADispvmTemplate

DISPVM = "@dispvm"
_NAMED = "@dispvm:"
_TAGGED = "@dispvm:@tag:"


def resolve(
    target: str,
    source: str | None,
    *,
    templates: Mapping[str, TemplateSettings],
    sources: Mapping[str, SourceSettings],
    default_dispvm: str | None,
) -> list[str]:
    """The disposable templates ``target`` may be served from, in order of preference.

    - ``@dispvm``: the calling qube's ``default_dispvm``, else the system-wide one;
    - ``@dispvm:NAME``: NAME, which must be a disposable template;
    - ``@dispvm:@tag:TAG``: every disposable template carrying TAG, by name.

    Raises :class:`InvalidTarget`, :class:`NoSuchTemplate` or :class:`NotADispvmTemplate`.
    """
    if target == DISPVM:
        name = _default_for(source, sources, default_dispvm)
        return [_dispvm_template(name, templates)]
    if target.startswith(_TAGGED):
        tag = target.removeprefix(_TAGGED)
        if not tag:
            raise InvalidTarget(f"target {target!r}: empty tag")
        tagged = sorted(n for n, t in templates.items() if t.dispvm_template and tag in t.tags)
        if not tagged:
            raise NoSuchTemplate(f"no disposable template carries the tag {tag!r}")
        return tagged
    if target.startswith(_NAMED):
        name = target.removeprefix(_NAMED)
        if not name:
            raise InvalidTarget(f"target {target!r}: empty template name")
        return [_dispvm_template(name, templates)]
    raise InvalidTarget(f"target {target!r}: expected @dispvm, @dispvm:NAME or @dispvm:@tag:TAG")


def _default_for(
    source: str | None, sources: Mapping[str, SourceSettings], default_dispvm: str | None
) -> str:
    settings = sources.get(source) if source is not None else None
    if settings is not None and settings.default_dispvm is not None:
        if settings.default_dispvm == "":
            raise NoSuchTemplate(f"{source} has no default disposable template")
        return settings.default_dispvm
    if default_dispvm is None:
        raise NoSuchTemplate("no default disposable template is configured (pool.default_dispvm)")
    return default_dispvm


def _dispvm_template(name: str, templates: Mapping[str, TemplateSettings]) -> str:
    template = templates.get(name)
    if template is None:
        raise NoSuchTemplate(f"no template named {name!r}")
    if not template.dispvm_template:
        raise NotADispvmTemplate(f"{name} is not a disposable template")
    return name
