"""``sparkops remote ...``: other hosts over SSH (check, trust-host, push, tunnel).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

from sparkops.cli import ops, output
from sparkops.config import Settings, load_secrets
from sparkops.core.errors import ConfigError, InvalidInput
from sparkops.storage.store import Store


def _remote_names(args, settings: Settings) -> list[str]:
    names = args.names or [r.name for r in settings.remotes]
    if not names:
        raise InvalidInput("no remote host is configured; add a [remotes.NAME] table with its address "
                           "(see docs/remote.md)")
    for name in names:
        settings.remote(name)  # ConfigError naming the missing host
    return names


def cmd_remote_check(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops.net import ssh as remote
    from sparkops.remote import gpu as remote_gpu

    rows = []
    for name in _remote_names(args, settings):
        spec = settings.remote(name)
        roles = [role for role, on in (("push", settings["remote.push_host"] == name),
                                       ("tunnel", settings["remote.tunnel_host"] == name),
                                       ("gpu", name in settings["remote.gpu_hosts"])) if on]
        row: dict[str, Any] = {"name": name, "destination": spec.destination, "roles": roles,
                               "via": spec.jump or None}
        started = time.monotonic()
        try:
            with remote.connect(settings, name) as conn:
                key = conn.transport.get_remote_server_key()
                row.update(ok=True, key=f"{key.get_name()} {remote.fingerprint(key)}",
                           login_ms=round((time.monotonic() - started) * 1000))
            if "gpu" in roles:
                row["gpu"] = remote_gpu.read(settings, name).as_dict()
        except remote.RemoteError as exc:
            row.update(ok=False, error=str(exc))
        rows.append(row)

    def text() -> None:
        for r in rows:
            via = f" via {r['via']}" if r["via"] else ""
            roles = f" [{', '.join(r['roles'])}]" if r["roles"] else ""
            if r["ok"]:
                print(f"{r['name']}: ok: {r['destination']}{via}{roles}, {r['key']}, logged in in {r['login_ms']} ms")
                if "gpu" in r:
                    from sparkops.remote.gpu import snapshot_from

                    output.print_gpus(snapshot_from(r["gpu"]), indent="  ")
            else:
                print(f"{r['name']}: FAILED: {r['error']}")
    output.emit(args, rows, text)
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_remote_trust(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops.net import ssh as remote

    spec = settings.remote(args.name)
    key = remote.scan_key(settings, args.name)
    offered = f"{key.get_name()} {remote.fingerprint(key)}"
    print(f"{args.name} ({remote.host_entry(spec)}) offers {offered}")
    if args.fingerprint:
        if args.fingerprint.strip() != remote.fingerprint(key):
            print(f"sparkops: error: {args.name} offers {remote.fingerprint(key)}, not {args.fingerprint}; "
                  "nothing was recorded", file=sys.stderr)
            return 1
    elif not args.yes:
        if not sys.stdin.isatty():
            print("sparkops: error: not a terminal, so nobody can confirm the key: pass --fingerprint "
                  "SHA256:... (compared with the key) or --yes; nothing was recorded", file=sys.stderr)
            return 2
        answer = input(f"Record this key in {spec.known_hosts}? Compare it with `ssh-keygen -lf "
                       "/etc/ssh/ssh_host_*_key.pub` on the host first. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing was recorded")
            return 1
    print(remote.trust(spec, key, replace=args.replace))
    return 0


def cmd_remote_push(args, store: Store) -> int:
    def progress(name: str, sent: int, total: int) -> None:
        if total >= 1_000_000 and not args.json:
            print(f"  {name}: {sent * 100 // max(total, 1)}% of {total / 1e6:.1f} MB", file=sys.stderr)
    if not args.settings["remote.push_host"]:
        raise InvalidInput("no push host: set remote.push_host to one of the [remotes.NAME] hosts")
    return ops.run_job(args, store, "push", progress=progress)


def cmd_remote_tunnel(args, store: Store) -> int:
    """Hold the tunnel in the foreground (or probe it once with --check)."""
    from sparkops.jobs.framework import JobContext, JobLock, lock_dir
    from sparkops.remote import tunnel
    from sparkops.runner.loop import install_stop_handlers

    settings = args.settings
    name = settings["remote.tunnel_host"]
    if not name:
        raise InvalidInput("no tunnel host: set remote.tunnel_host to one of the [remotes.NAME] hosts")
    if args.check:
        return ops.run_job(args, store, "tunnel")
    ctx = JobContext.create(settings, store, secrets=load_secrets())
    refused = tunnel.exposure(settings, ctx.secrets)
    if refused:
        raise ConfigError(refused)
    stop = threading.Event()
    install_stop_handlers(stop)
    keeper = tunnel.Tunnel(settings)
    last = None
    with JobLock(lock_dir(settings) / "tunnel.lock"):  # the runner's tunnel job waits meanwhile
        try:
            while not stop.is_set():
                status = tunnel.step_and_record(ctx, keeper)
                line = f"{status.status}: {status.detail}"
                if line != last:
                    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
                    last = line
                interval = settings["remote.tunnel_interval_seconds"]
                if status.retry_at is not None:  # down: come back when the backoff allows
                    interval = min(interval, max(0.5, status.retry_at - time.time()))
                stop.wait(interval)
        finally:
            keeper.close()
    print("tunnel closed")
    return 0
