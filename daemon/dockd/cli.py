"""The command line of SPEC §3: parse arguments, load the configuration, run, exit with the
right code (0 ok, 1 a check failed, 2 usage, 78 bad configuration)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dockd import __version__
from dockd.config import Config, config_path, load_config
from dockd.errors import EX_CONFIG, EX_FAIL, EX_OK, EX_SOFTWARE, ConfigError, DockdError
from dockd.units import format_size


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="configuration file (default: $DOCKD_CONFIG, else /etc/dockd/dockd.toml)",
    )
    p = argparse.ArgumentParser(
        prog="dockd",
        description="Verified offload of body-worn camera footage.",
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"dockd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon until SIGTERM/SIGINT")
    sub.add_parser("check-config", parents=[common], help="validate and print the configuration")
    st = sub.add_parser("status", parents=[common], help="cameras, sessions, queue, staging")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    v = sub.add_parser("verify", parents=[common], help="re-read evidence in the store")
    v.add_argument("sessions", nargs="*", metavar="SESSION")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    pr = sub.add_parser("prioritize", parents=[common], help="upload a session before all others")
    pr.add_argument("session", metavar="SESSION")
    cu = sub.add_parser("custody", parents=[common], help="the custody log")
    cu_sub = cu.add_subparsers(dest="custody_command", required=True, metavar="COMMAND")
    ex = cu_sub.add_parser("export", parents=[common], help="a session's records as JSON lines")
    ex.add_argument("session", metavar="SESSION")
    ky = sub.add_parser("key", parents=[common], help="the dock's signing key")
    ky_sub = ky.add_subparsers(dest="key_command", required=True, metavar="COMMAND")
    ky_sub.add_parser("show", parents=[common], help="the public key line and key id")
    dm = sub.add_parser("demo", parents=[common], help="a self-contained demonstration")
    dm.add_argument("--keep", action="store_true", help="keep the demo directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from dockd.demo import run_demo

            return run_demo(keep=args.keep)
        config = load_config(config_path(args.config))
        handler = {
            "run": cmd_run,
            "check-config": cmd_check_config,
            "status": cmd_status,
            "verify": cmd_verify,
            "prioritize": cmd_prioritize,
            "custody": cmd_custody,
            "key": cmd_key,
        }[args.command]
        return handler(config, args)
    except ConfigError as exc:
        print(f"dockd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except DockdError as exc:
        print(f"dockd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dockd status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from dockd.daemon import Daemon
    from dockd.observers.log import setup

    setup(config.log.level)
    daemon = Daemon(config, config_file=config_path(args.config))
    daemon.preflight()  # ConfigError here exits 78 before anything starts

    async def _main() -> int:
        daemon.install_signal_handlers()
        return await daemon.run()

    try:
        return asyncio.run(_main())
    except DockdError as exc:
        from dockd.observers.log import get

        get(dock_id=config.dock.id).error("daemon_failed", error=str(exc))
        return exc.exit_code if exc.exit_code != EX_OK else EX_SOFTWARE


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    print(json.dumps(config.effective(), indent=2))
    return EX_OK


def _open_journal(config: Config) -> Any:
    from dockd.journal import Journal

    return Journal.open_readonly(config.journal_path, config.dock.id)


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from dockd.journal.status import DockStatus as JournalStatus
    from dockd.journal.status import QueueSummary
    from dockd.runtime import free_bytes

    if config.journal_path.exists():
        journal = _open_journal(config)
        try:
            st = journal.dock_status()
        finally:
            journal.close()
    else:  # the daemon has never run here: that is a status, not an error
        st = JournalStatus([], [], QueueSummary(0, 0, 0, 0), {})
    st.daemon["running"] = _alive(st.daemon.get("pid"))
    try:
        staging_free: int | None = free_bytes(config.staging_dir)
    except OSError:
        staging_free = None
    data: dict[str, Any] = {
        "dock_id": config.dock.id,
        "daemon": st.daemon,
        "cameras_docked": st.cameras,
        "queue": {
            "sessions": st.queue.sessions,
            "files": st.queue.files,
            "bytes": st.queue.bytes,
            "failed": st.queue.failed,
        },
        "staging_free_bytes": staging_free,
        "min_free_staging": config.offload.min_free_staging,
        "problems": st.daemon.get("problems", []),
        "sessions": st.sessions,
    }
    if staging_free is not None and staging_free < config.offload.min_free_staging:
        note = "staging below offload.min_free_staging: new offloads wait"
        if note not in data["problems"]:
            data["problems"] = [*data["problems"], note]
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        _print_status(data)
    return EX_OK


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _print_status(d: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    daemon = d["daemon"]
    running = f"running, pid {daemon['pid']}" if daemon.get("running") else "not running"
    console.print(
        f"[bold]dock[/] {d['dock_id']}   daemon {running}, last update "
        f"{daemon.get('updated_at', 'never')}"
    )
    free = d["staging_free_bytes"]
    console.print(
        f"staging free {format_size(free) if free is not None else 'unknown'} "
        f"(minimum {format_size(d['min_free_staging'])})   store reachable "
        f"{daemon.get('store_reachable', 'unknown')}"
    )
    q = d["queue"]
    console.print(
        f"queue: {q['sessions']} session(s), {q['files']} file(s), {format_size(q['bytes'])}; "
        f"{q['failed']} failed"
    )
    for p in d["problems"]:
        console.print(f"[red]problem:[/] {p}")
    cams = Table(title="docked cameras")
    for col in ("camera", "source", "location", "docked at"):
        cams.add_column(col)
    for c in d["cameras_docked"]:
        cams.add_row(c["id"], c["source"], c["location"], c["docked_at"])
    console.print(cams)
    t = Table(title="sessions (queued first, in upload order)")
    for col in ("session", "camera", "state", "files", "size", "to upload", "stored", "bad", ""):
        t.add_column(col)
    for s in d["sessions"]:
        t.add_row(
            s["id"],
            s["camera"],
            s["state"],
            str(s["files"]),
            format_size(s["bytes"]),
            str(s["to_upload"] or 0),
            str(s["stored"] or 0),
            str(s["bad"] or 0),
            "PRIORITY" if s["prioritized"] else "",
        )
    console.print(t)


def cmd_verify(config: Config, args: argparse.Namespace) -> int:
    """Re-read the store's evidence. Needs only the store and the trusted keys: with no journal
    here (a custodian's machine), the store is checked on its own."""
    from dockd.errors import StoreError
    from dockd.evidence.signing import load, trusted_keys
    from dockd.journal.db import Db
    from dockd.store import build_store
    from dockd.verify import check_journal_chain, verify

    store = build_store(config)
    trusted = trusted_keys(config.signing.trusted_keys_dir, load(config.key_file, config.dock.id))
    journal: Db | None = None
    if config.journal_path.exists():
        journal = Db.open_readonly(config.journal_path, config.dock.id)
    try:
        chain_problems = check_journal_chain(journal) if journal else []
        try:
            reports = list(verify(store, args.sessions, journal, trusted))
        except StoreError as exc:  # the store itself is away: nothing could be checked
            print(f"dockd: {exc}", file=sys.stderr)
            return EX_FAIL
    finally:
        if journal is not None:
            journal.close()
    ok = not chain_problems and all(r.ok for r in reports)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "journal_chain": chain_problems or "ok" if journal else "no journal",
                    "sessions": [r.as_dict() for r in reports],
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return EX_OK if ok else EX_FAIL
    columns = ("session", "camera", "files", "bytes", "signature", "chain", "ascmhl", "result")
    rows = [
        (
            r.session_id,
            r.camera,
            str(r.files),
            format_size(r.bytes),
            r.signature,
            r.chain,
            r.ascmhl,
            "ok" if r.ok else "FAILED",
        )
        for r in reports
    ]
    problems = [f"journal: {p}" for p in chain_problems]
    problems += [f"{r.session_id}: {p}" for r in reports for p in r.problems]
    summary = f"{len(reports)} session(s) checked: " + (
        "all good" if ok else f"{len(problems)} PROBLEM(S)"
    )
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = Console(highlight=False)
        table = Table(title=f"dockd verify: {escape(store.name)}")
        for col in columns:  # a narrow terminal folds session ids, never cuts them
            right = col in ("files", "bytes")
            table.add_column(col, justify="right" if right else "left", overflow="fold")
        for row in rows:
            style = "green" if row[-1] == "ok" else "bold red"
            table.add_row(*map(escape, row[:-1]), f"[{style}]{row[-1]}[/]")
        console.print(table)
        for p in problems:
            console.print(f"[red]PROBLEM[/] {escape(p)}")
        console.print(f"[{'green' if ok else 'bold red'}]{escape(summary)}[/]")
    else:
        widths = [max(len(x) for x in col) for col in zip(columns, *rows, strict=True)]
        for row in (columns, *rows):
            print("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
        for p in problems:
            print(f"PROBLEM {p}")
        print(summary)
    return EX_OK if ok else EX_FAIL


def cmd_prioritize(config: Config, args: argparse.Namespace) -> int:
    from dockd.errors import JournalError
    from dockd.journal import Journal

    journal = Journal.open(config.journal_path, config.dock.id)
    try:
        s = journal.prioritize(args.session)
    except JournalError as exc:
        print(f"dockd: {exc}", file=sys.stderr)
        return EX_FAIL
    finally:
        journal.close()
    print(f"{s.id}: first in the upload queue")
    return EX_OK


def cmd_key(config: Config, args: argparse.Namespace) -> int:
    """Prints the line a custodian puts in a file under signing.trusted_keys_dir. Creates the
    key if the daemon has not yet (the same thing its first start does)."""
    from dockd.evidence.signing import load_or_create

    key = load_or_create(config.key_file, config.dock.id)
    print(key.public_line())
    return EX_OK


def cmd_custody(config: Config, args: argparse.Namespace) -> int:
    from dockd.custody import check_chain, check_slice
    from dockd.errors import CustodyError

    journal = _open_journal(config)
    try:
        records = list(journal.custody_records(args.session))
        if not records:
            print(f"dockd: session {args.session}: no custody records", file=sys.stderr)
            return EX_FAIL
        for r in records:
            sys.stdout.write(r.to_json() + "\n")
        try:
            check_slice(records, args.session)
            check_chain(journal.custody_records())
        except CustodyError as exc:
            print(f"dockd: custody chain broken: {exc}", file=sys.stderr)
            return EX_FAIL
    finally:
        journal.close()
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
