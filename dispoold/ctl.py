"""``dispoolctl``: look at and steer a running dispoold from the command line.

Every command takes ``--json`` (before or after the command's name): the result, or the
error, as JSON on stdout, one object per line, for scripts. Without it, output is for
people and errors go to stderr.

Exit codes (also in ``dispoolctl --help``), so that scripts can tell failures apart:
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from dispoold.client import (
    Client,
    ClientError,
    DaemonStopping,
    DaemonUnavailable,
    Event,
    NotAllowed,
    NotDisposableTemplate,
    OutOfMemory,
    ProtocolViolation,
    RemoteError,
    TimedOut,
    UnknownDisposable,
    UnknownTemplate,
    default_socket,
)
from dispoold.events import EVENT_NAMES
from dispoold.views import PoolView

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_ALLOWED = 4
EXIT_NOT_FOUND = 5
EXIT_NO_MEMORY = 6
EXIT_TIMEOUT = 7
EXIT_SHUTTING_DOWN = 8
EXIT_INTERRUPTED = 130

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_FAILED}    the daemon could not do it (backend_error, bad_request, ...)
  {EXIT_USAGE}    bad command line
  {EXIT_UNAVAILABLE}    the daemon is not running or cannot be reached
  {EXIT_NOT_ALLOWED}    not allowed (socket permissions, or unauthorized: some commands need root)
  {EXIT_NOT_FOUND}    no such template, not a disposable template, or no such disposable
  {EXIT_NO_MEMORY}    not enough memory for a disposable (no_memory)
  {EXIT_TIMEOUT}    no disposable within the request's timeout (timeout)
  {EXIT_SHUTTING_DOWN}    the daemon is shutting down
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""
__doc__ = (__doc__ or "") + "\n" + EXIT_CODES


def exit_code(exc: ClientError) -> int:
    """The exit status for a failed call."""
    match exc:
        case NotAllowed():
            return EXIT_NOT_ALLOWED
        case DaemonUnavailable():
            return EXIT_UNAVAILABLE
        case UnknownTemplate() | NotDisposableTemplate() | UnknownDisposable():
            return EXIT_NOT_FOUND
        case OutOfMemory():
            return EXIT_NO_MEMORY
        case TimedOut():
            return EXIT_TIMEOUT
        case DaemonStopping():
            return EXIT_SHUTTING_DOWN
    return EXIT_FAILED


# -- the commands -------------------------------------------------------------------


class Output:
    def __init__(self, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.as_json = as_json
        self.out = out
        self.err = err

    def result(self, value: Any, text: str | None) -> None:
        if self.as_json:
            self.json(value)
        elif text:
            print(text, file=self.out)

    def json(self, value: Any) -> None:
        print(json.dumps(value, sort_keys=True), file=self.out, flush=True)

    def error(self, exc: ClientError) -> None:
        code = exc.code if isinstance(exc, RemoteError) else _local_code(exc)
        if self.as_json:
            self.json({"error": {"code": code, "message": str(exc)}})
        else:
            print(f"dispoolctl: {exc}", file=self.err)


def _local_code(exc: ClientError) -> str:
    if isinstance(exc, NotAllowed):
        return "not_allowed"
    if isinstance(exc, DaemonUnavailable):
        return "unavailable"
    if isinstance(exc, ProtocolViolation):
        return "protocol_violation"
    return "client_error"


def cmd_ping(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.ping()
    out.result(result.model_dump(), f"dispoold {result.version}, protocol {result.protocol}")
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    raw = client.call("status", {"template": args.template} if args.template else None)
    out.result(raw, None if out.as_json else format_status(PoolView.model_validate(raw)))
    return EXIT_OK


def cmd_request(client: Client, args: argparse.Namespace, out: Output) -> int:
    handout = client.request(
        args.target, source=args.source, paused=args.paused, timeout=args.timeout
    )
    out.result(handout.model_dump(), handout.name)
    return EXIT_OK


def cmd_release(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.release(args.name)
    out.result({}, f"released {args.name}")
    return EXIT_OK


def cmd_set_max(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.set_max(args.value, template=args.template)
    scope = args.template or "the global value"
    done = f"max for {scope}: " + ("override removed" if args.value is None else str(args.value))
    out.result({}, done)
    return EXIT_OK


def cmd_set_threshold(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.set_threshold(args.mib)
    done = "threshold: " + ("override removed" if args.mib is None else f"{args.mib} MiB")
    out.result({}, done)
    return EXIT_OK


def cmd_refresh(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.refresh(args.template)
    out.result({}, f"refreshing the preloads of {args.template}")
    return EXIT_OK


def cmd_suspend(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.suspend()
    out.result({}, "preloads dropped for host suspend")
    return EXIT_OK


def cmd_resume(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.resume()
    out.result({}, "refilling after host resume")
    return EXIT_OK


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    for event in client.subscribe(args.events or None):
        if out.as_json:
            out.json({"event": event.name, "data": event.data})
        else:
            print(format_event(event), file=out.out, flush=True)
    return EXIT_OK


# -- formatting ---------------------------------------------------------------------


def format_status(status: PoolView, now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = ("TEMPLATE", "MAX", "GAP", "DISPOSABLE", "DOMID", "STAGE", "AGE", "MEMORY")
    rows: list[tuple[str, ...]] = []
    for template in status.templates:
        first = (template.name, str(template.max), str(template.threshold_gap))
        if not template.disposables:
            rows.append((*first, "-", "", "", "", ""))
        for index, vm in enumerate(template.disposables):
            lead = first if index == 0 else ("", "", "")
            rows.append(
                (
                    *lead,
                    vm.name,
                    "-" if vm.domid is None else str(vm.domid),
                    vm.stage,
                    format_age(now - vm.since),
                    "-" if vm.memory_mib is None else f"{vm.memory_mib} MiB",
                )
            )
    if not status.templates:
        rows.append(("(no templates)", "", "", "", "", "", "", ""))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    numeric = {1, 2, 4}
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in (header, *rows)
    ]
    lines.extend(format_memory(status.memory))
    if (proc := status.process) is not None:
        lines.append(
            f"daemon: pid {proc.pid}, {proc.rss_mib:g} MiB resident, {proc.cpu_seconds:g} s CPU,"
            f" {proc.open_fds} open descriptors, {proc.threads} threads"
        )
    return "\n".join(lines)


#: How many of the memory manager's latest shrinks the table shows.
SHOWN_SHRINKS = 3


def format_memory(memory: dict[str, Any]) -> list[str]:
    """The ``memory`` part of a status reply, for people: the figures the built-in
    managers report in words, anything else (an out-of-tree manager's) as key=value."""
    rest = dict(memory)
    figures = [
        f"{value} MiB {label}"
        for key, label in (
            ("free_mib", "free"),
            ("available_mib", "available"),
            ("threshold_mib", "kept free (threshold)"),
            ("host_reserve_mib", "reserved for the host"),
        )
        if (value := rest.pop(key, None)) is not None
    ]
    manager = rest.pop("manager", None)
    lead = f"memory ({manager})" if manager else "memory"
    lines = [f"{lead}: {', '.join(figures) or '-'}"]
    if "qmemman_reachable" in rest:
        reachable = rest.pop("qmemman_reachable")
        socket = rest.pop("socket", "?")
        lines.append(f"  qmemman at {socket}: {'reachable' if reachable else 'NOT reachable'}")
    domains = rest.pop("domains", None)
    if isinstance(domains, dict) and domains:
        lines.append("  domains: " + ", ".join(f"{n} {state}" for state, n in domains.items()))
    shrinks = rest.pop("shrinks", None)
    if isinstance(shrinks, list):
        for shrink in shrinks[-SHOWN_SHRINKS:]:
            lines.append("  shrink " + _format_shrink(shrink))
    if (error := rest.pop("last_error", None)) is not None:
        lines.append(f"  last error: {error}")
    if rest:
        lines.append("  " + " ".join(f"{key}={value}" for key, value in sorted(rest.items())))
    return lines


def _format_shrink(shrink: Any) -> str:
    if not isinstance(shrink, dict):
        return str(shrink)
    name, outcome = shrink.get("name", "?"), shrink.get("outcome", "?")
    seconds = shrink.get("seconds")
    took = "" if seconds is None else f" in {seconds:.1f} s"
    if shrink.get("error"):
        return f"{name}: {outcome}{took}: {shrink['error']}"
    return (
        f"{name}: {outcome}{took}, {shrink.get('actual_mib', '?')} MiB "
        f"(target {shrink.get('target_mib', '?')} MiB)"
    )


def format_age(seconds: float) -> str:
    if not seconds >= 0:  # negative, or NaN
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_event(event: Event) -> str:
    stamp = time.strftime("%H:%M:%S")
    details = " ".join(f"{key}={value}" for key, value in sorted(event.data.items()))
    return f"{stamp} {event.name} {details}".rstrip()


# -- command line -------------------------------------------------------------------


def _count_or_unset(text: str) -> int | None:
    if text == "unset":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number or 'unset'")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def _event_name(text: str) -> str:
    if text not in EVENT_NAMES:
        known = ", ".join(sorted(EVENT_NAMES))
        raise argparse.ArgumentTypeError(f"unknown event {text!r}; known: {known}")
    return text


Command = Callable[[Client, argparse.Namespace, Output], int]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the sub-command's copy must not reset a --json given before it.
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="JSON output for scripts"
    )
    parser = argparse.ArgumentParser(
        prog="dispoolctl",
        description="Look at and steer dispoold, the preloaded disposable-VM pool.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help=f"the daemon's socket (default: $DISPOOLD_SOCKET or {default_socket()})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    add("ping", cmd_ping, "check that the daemon answers")
    sub = add("status", cmd_status, "the pools, their disposables and memory figures")
    sub.add_argument("template", nargs="?", help="only this template")
    sub = add("request", cmd_request, "take a disposable; prints its name")
    sub.add_argument(
        "target", nargs="?", default="@dispvm", help="@dispvm, @dispvm:NAME or @dispvm:@tag:TAG"
    )
    sub.add_argument("--source", metavar="QUBE", help="the calling qube (resolves @dispvm)")
    sub.add_argument("--paused", action="store_true", help="hand it out paused")
    sub.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="wait at most this")
    sub = add("release", cmd_release, "destroy a disposable that was handed out")
    sub.add_argument("name")
    sub = add("set-max", cmd_set_max, "how many to keep preloaded (root only)")
    sub.add_argument(
        "value", type=_count_or_unset, help="a number, or 'unset' to use the file's value again"
    )
    sub.add_argument("--template", metavar="NAME", help="this template (default: the global max)")
    sub = add("set-threshold", cmd_set_threshold, "free memory preloading leaves alone (root)")
    sub.add_argument(
        "mib", type=_count_or_unset, help="MiB, or 'unset' to use the file's value again"
    )
    sub = add("refresh", cmd_refresh, "discard and recreate a template's preloads (root only)")
    sub.add_argument("template")
    add("suspend", cmd_suspend, "drop every preload before host suspend (root only)")
    add("resume", cmd_resume, "refill after host resume (root only)")
    sub = add("watch", cmd_watch, "print events as they happen")
    sub.add_argument("events", nargs="*", type=_event_name, metavar="EVENT", help="only these")
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    args = build_parser().parse_args(argv)
    output = Output(getattr(args, "json", False), out or sys.stdout, err or sys.stderr)
    handler: Command = args.handler
    try:
        with Client(args.socket) as client:
            return handler(client, args, output)
    except ClientError as exc:
        output.error(exc)
        return exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed under us (`dispoolctl watch | head`): nothing more to say.
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
