"""The qrexec service ``qubes.DispVMRequest``: a qube asks dom0's dispoold for a disposable.

qrexec runs the service in dom0 with the calling qube in ``QREXEC_REMOTE_DOMAIN`` and
the service argument (what follows ``+`` in ``qubes.DispVMRequest+ARG``) in
``QREXEC_SERVICE_ARGUMENT``. qrexec only lets ``A-Z a-z 0-9 _ . - +`` through in an
argument, so the target is encoded:

==================  ===================  ==========================================
argument            target               meaning
==================  ===================  ==========================================
(none, or empty)    ``@dispvm``          the calling qube's default disposable template
``NAME``            ``@dispvm:NAME``     the disposable template NAME
``tag+TAG``         ``@dispvm:@tag:TAG`` any disposable template carrying the tag TAG
==================  ===================  ==========================================

A template name starts with a letter and never contains ``+``, so ``tag+`` cannot be
mistaken for one. A tag with characters outside the set above cannot be asked for
through qrexec.

On success the disposable's name is the only thing written to stdout (one line); on
failure a message goes to stderr and the exit status is :mod:`dispoold.ctl`'s.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import TextIO

from dispoold.client import Client, ClientError, RemoteError
from dispoold.ctl import EXIT_OK, EXIT_USAGE, exit_code

SERVICE = "qubes.DispVMRequest"
TAG_PREFIX = "tag+"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: What qrexec allows a qube's name to be (it put it there, but check anyway).
_QUBE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")


class ArgumentError(ValueError):
    """The service argument is not one of the encodings above."""


def decode_argument(untrusted_argument: str) -> str:
    """The target a service argument stands for. Raises :class:`ArgumentError`."""
    if untrusted_argument == "":
        return "@dispvm"
    if untrusted_argument.startswith(TAG_PREFIX):
        untrusted_tag = untrusted_argument.removeprefix(TAG_PREFIX)
        if not _TAG.fullmatch(untrusted_tag):
            raise ArgumentError(
                f"{untrusted_argument!r}: a tag is 1-64 of A-Z a-z 0-9 _ . - (tag+TAG)"
            )
        return f"@dispvm:@tag:{untrusted_tag}"
    if not _NAME.fullmatch(untrusted_argument):
        raise ArgumentError(
            f"{untrusted_argument!r}: expected nothing (@dispvm), a template NAME, or tag+TAG"
        )
    return f"@dispvm:{untrusted_argument}"


def encode_target(target: str) -> str:
    """The service argument for ``target`` (the inverse of :func:`decode_argument`).
    Raises :class:`ArgumentError` for a target qrexec cannot carry."""
    if target == "@dispvm":
        return ""
    if target.startswith("@dispvm:@tag:"):
        argument = TAG_PREFIX + target.removeprefix("@dispvm:@tag:")
    elif target.startswith("@dispvm:"):
        argument = target.removeprefix("@dispvm:")
    else:
        raise ArgumentError(f"{target!r} is not a disposable target")
    if decode_argument(argument) != target:
        raise ArgumentError(f"{target!r} cannot be carried in a qrexec argument")
    return argument


def main(
    environ: Mapping[str, str] | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    err = err or sys.stderr
    untrusted_source = environ.get("QREXEC_REMOTE_DOMAIN", "")
    if not _QUBE.fullmatch(untrusted_source):
        print(f"{SERVICE}: run me through qrexec (no valid QREXEC_REMOTE_DOMAIN)", file=err)
        return EXIT_USAGE
    source = untrusted_source
    try:
        target = decode_argument(environ.get("QREXEC_SERVICE_ARGUMENT", ""))
    except ArgumentError as exc:
        print(f"{SERVICE}: bad argument {exc}", file=err)
        return EXIT_USAGE
    try:
        with Client(environ.get("DISPOOLD_SOCKET") or None) as dispoold:
            handout = dispoold.request(target, source=source)
    except RemoteError as exc:
        print(f"{SERVICE}: {target} for {source}: {exc} ({exc.code})", file=err)
        return exit_code(exc)
    except ClientError as exc:
        print(f"{SERVICE}: {exc}", file=err)
        return exit_code(exc)
    print(handout.name, file=out, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
