"""The `peerdrive` command line: parse, call, print, exit codes.

This is the only module that prints and the only place errors become exit
codes:

    0  success               4  data unavailable (no peer, no head)
    1  other failure         5  no space left on the device
    2  usage / bad link      6  mount or unmount failed
    3  corrupt or forged data  130  interrupted
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cache.errors import StoreError, StoreFull
from dht.errors import DhtError

from . import flags, xattrs
from .capability import ReadCap, StoreCap, WriteCap, parse_link, require_read, split_version
from .errors import (
    BlockUnavailable,
    MountError,
    NoSpaceError,
    PeerdriveError,
    UsageError,
    unwrap_group,
)
from .head import MAX_HEAD_MIRRORS
from .home import Home, checked_mirror_url
from .logs import setup_logging
from .options import MIN_INODES, MirrorOptions, MountOptions, NodeOptions, ServeOptions
from .units import format_size

EXIT_INTERRUPTED = 130
# Seconds between two looks at a folder whose figures are being counted (`status --wait`).
STATUS_WAIT_POLL = 0.5


# ----------------------------------------------------------------------------- output


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stdout is a terminal."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self._last = 0.0
        self._start = time.monotonic()

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = done / total if total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = done / max(now - self._start, 1e-6)
        sys.stderr.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% "
                         f"{format_size(done)}/{format_size(total)} {format_size(rate)}/s ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _emit(args: argparse.Namespace, data: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, sort_keys=True))
    else:
        print(text)


def _home(args: argparse.Namespace) -> Home:
    return Home(Path(args.home) if args.home else None)


def _node_fields(args: argparse.Namespace) -> dict:
    """The NodeOptions fields from the flags `serve` and `mount` share."""
    return {"bootstrap": list(args.bootstrap or ()), "listen": args.listen,
            "cache_size": args.cache_size, "lan": not args.no_lan,
            "fetch_timeout": args.fetch_timeout,
            "mirrors": [checked_mirror_url(u, "--mirror: ") for u in getattr(args, "mirror",
                                                                              None) or ()],
            "push": list(getattr(args, "push", None) or ())}


def mount_options(args: argparse.Namespace) -> MountOptions:
    if args.max_inodes is not None and args.max_inodes < MIN_INODES:
        raise UsageError(f"--max-inodes: at least {MIN_INODES} (the kernel holds every "
                         "folder on the way to what it uses)")
    return MountOptions(**_node_fields(args), ready_fd=args.ready_fd, verbose=args.verbose,
                        allow_other=args.allow_other, nonempty=args.nonempty,
                        log_file=args.log_file, publish_delay=_publish_delay(args),
                        max_inodes=args.max_inodes)


def _publish_delay(args: argparse.Namespace) -> float:
    delay = args.publish_delay
    if not 0 <= delay <= 86400:
        raise UsageError("--publish-delay takes 0 to 86400 seconds")
    return float(delay)


def mount_flags(opts: MountOptions) -> list[str]:
    """node_flags plus the mount's own (for the background mount)."""
    return [*node_flags(opts), *(["--allow-other"] if opts.allow_other else []),
            *(["--nonempty"] if opts.nonempty else []),
            "--publish-delay", repr(opts.publish_delay),
            *(["--max-inodes", str(opts.max_inodes)] if opts.max_inodes is not None else [])]


def serve_options(args: argparse.Namespace) -> ServeOptions:
    _check_keep(args.keep_versions)
    return ServeOptions(**_node_fields(args), keep_versions=args.keep_versions)


def mirror_options(args: argparse.Namespace) -> MirrorOptions:
    return MirrorOptions(**_node_fields(args))


def node_flags(opts: NodeOptions) -> list[str]:
    """The command-line flags that give a node these options (for the background mount)."""
    argv: list[str] = []
    for b in opts.bootstrap:
        argv += ["--bootstrap", b]
    if opts.cache_size:
        argv += ["--cache-size", opts.cache_size]
    if opts.listen:
        argv += ["--listen", opts.listen]
    if not opts.lan:
        argv.append("--no-lan")
    if opts.fetch_timeout:
        argv += ["--fetch-timeout", str(opts.fetch_timeout)]
    for url in opts.mirrors:
        argv += ["--mirror", url]
    for target in opts.push:
        argv += ["--push", target]
    return argv


# ----------------------------------------------------------------------------- commands


def cmd_publish(args: argparse.Namespace) -> int:
    home = _home(args)
    source = Path(args.folder).expanduser()
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder")
    mirrors = _publish_mirrors(args)  # checked before anything is locked or read
    if args.wait_copies is not None:
        from .host_list import serving_snapshots

        if args.wait_copies < 1:
            raise UsageError("--wait-copies takes a number of hosts, 1 or more")
        if not serving_snapshots(home.running_nodes(), "copies"):
            raise UsageError("--wait-copies needs `peerdrive serve` running with this home: "
                             "hosts fetch the new version from it")
    if args.watch and args.wait_copies is not None:
        raise UsageError("--watch publishes for as long as it runs: --wait-copies is for one "
                         "publish")
    _check_keep(args.keep_versions)
    if args.into:
        into = parse_link(_link_arg(args.into))
        if not isinstance(into, WriteCap):
            raise UsageError("--into takes the drive's write link (peerdrive share --write)")
        cap = home.adopt_drive(source, into)
    else:
        cap = home.drive_of_source(source)
    lock = home.publish_lock(cap, on_wait=lambda: print(
        f"waiting for another publish of {source} to finish", file=sys.stderr))
    with lock:
        if not args.watch or not _has_version(home, cap):
            code = _publish_locked(args, home, cap, source, mirrors)
            if not args.watch:
                return code
        # a folder published before: the watch's first round re-reads only what changed
        return _watch(args, home, cap, source)


def _has_version(home: Home, cap: WriteCap) -> bool:
    from cache.store import BlockStore

    from .storage import DriveStorage

    store = BlockStore(home.store_path)
    try:
        return DriveStorage(store).head_wire(cap.pubkey) is not None
    finally:
        store.close()


def _watch(args: argparse.Namespace, home: Home, cap: WriteCap, source: Path) -> int:
    """`publish DIR --watch`: serve, and publish each burst of changes (one line each)."""
    from .node import run_watch

    def ready(net, port: int, caps: list) -> None:
        data = {"event": "watching", "folder": str(source), "node_id":
                net.identity.node_id.hex(), "port": port, "drive": cap.drive_id}
        _emit(args, data, f"watching {source}; serving as node {data['node_id'][:16]} on port "
                          f"{port} (Ctrl-C to stop)")
        sys.stdout.flush()

    def published(report) -> None:
        changes = [*(f"+{p}" for p in report.added), *(f"~{p}" for p in report.modified),
                   *(f"-{p}" for p in report.removed)]
        data = {"event": "published", "seq": report.head.seq, "added": report.added,
                "modified": report.modified, "removed": report.removed,
                "bytes_read": report.bytes_read}
        shown = " ".join(changes[:8]) + (f" (+{len(changes) - 8} more)" if len(changes) > 8
                                         else "")
        _emit(args, data, f"published version {report.head.seq}: {len(report.added)} added, "
                          f"{len(report.modified)} modified, {len(report.removed)} removed "
                          f"({format_size(report.bytes_read)} read) {shown}".rstrip())
        sys.stdout.flush()

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    run_watch(home, cap, source, serve_options(args), _publish_delay(args), ready, published,
              warn)
    return 0


def _check_keep(keep: int) -> None:
    from .storage import MAX_KEEP_VERSIONS

    if not 1 <= keep <= MAX_KEEP_VERSIONS:
        raise UsageError(f"--keep-versions takes 1 to {MAX_KEEP_VERSIONS}")


def _device(home: Home) -> str:
    """This node's short name in conflict copies' names."""
    from dht.identity import NodeIdentity

    from .merge import device_name

    return device_name(NodeIdentity.load_or_create(home.node_key_path).node_id)


def _publish_mirrors(args: argparse.Namespace) -> list[str] | None:
    """The mirror URLs for the new head: --mirror-url, none, or None for the last version's."""
    if args.no_mirror_url:
        return []
    if not args.mirror_url:
        return None
    mirrors = list(dict.fromkeys(checked_mirror_url(u, "--mirror-url: ")
                                 for u in args.mirror_url))
    if len(mirrors) > MAX_HEAD_MIRRORS:
        raise UsageError(f"at most {MAX_HEAD_MIRRORS} --mirror-url")
    return mirrors


def _publish_locked(args: argparse.Namespace, home: Home, cap: WriteCap, source: Path,
                    mirrors: list[str] | None) -> int:
    import trio

    from cache.store import BlockStore

    from .publish import Publisher
    from .storage import DriveStorage

    store = BlockStore(home.store_path)
    bar = ProgressBar("publishing", sys.stdout.isatty() and not args.json)
    try:
        pub = Publisher(DriveStorage(store), cap, source, on_progress=bar.update,
                        on_warning=lambda m: print(f"warning: {m}", file=sys.stderr),
                        mirrors=mirrors, device=_device(home),
                        keep_versions=args.keep_versions)
        started = time.monotonic()
        result = trio.run(pub.run)
        elapsed = time.monotonic() - started
    finally:
        bar.finish()
        store.close()
    data = {
        "read_link": cap.read_cap().link(),
        "drive": cap.drive_id,
        "seq": result.head.seq,
        "files": result.files,
        "bytes": result.bytes,
        "new_blocks": result.new_blocks,
        "new_bytes": result.new_bytes,
        "mirrors": list(result.head.mirrors),
        "seconds": round(elapsed, 3),
        "merged_with": result.merged_with,
        "conflicts": result.conflicts,
    }
    text = (f"published {result.files} files ({format_size(result.bytes)}) as version "
            f"{result.head.seq}; {result.new_blocks} new blocks ({format_size(result.new_bytes)}) "
            f"in {elapsed:.1f} s\n{cap.read_cap().link()}")
    if result.merged_with is not None:
        text += (f"\nanother writer published version {result.merged_with} meanwhile: both "
                 f"sets of changes are in version {result.head.seq}"
                 + "".join(f"\n  conflict copy: {c}" for c in result.conflicts))
    if args.wait_copies is not None:
        data["copies"] = _wait_copies(args, home, cap, result.head.seq)
        text += f"\n{data['copies']} other holder(s) keep version {result.head.seq} whole"
    _emit(args, data, text)
    return 0


def _wait_copies(args: argparse.Namespace, home: Home, cap: StoreCap, seq: int) -> int:
    """Wait until `args.wait_copies` other nodes hold version `seq` whole (serve counts them)."""
    from .host_list import copies_in, serving_snapshots

    want = args.wait_copies
    bar = ProgressBar(f"waiting for {want} copies", sys.stdout.isatty() and not args.json)
    deadline = None if args.wait_timeout is None else time.monotonic() + args.wait_timeout
    try:
        while True:
            snaps = serving_snapshots(home.running_nodes(), "copies")
            if not snaps:
                raise UsageError("`peerdrive serve` stopped: nothing counts the copies any more")
            have = copies_in(snaps, cap.pubkey, seq) or 0
            bar.update(min(have, want), want)
            if have >= want:
                return have
            if deadline is not None and time.monotonic() > deadline:
                raise BlockUnavailable(
                    f"version {seq} is whole on {have} of the {want} host(s) asked for after "
                    f"{args.wait_timeout:g} s; hosts keep fetching it while serve runs")
            time.sleep(0.25)
    finally:
        bar.finish()


def cmd_new(args: argparse.Namespace) -> int:
    import trio

    from cache.store import BlockStore

    from .publish import commit_empty
    from .storage import DriveStorage

    home = _home(args)
    cap = home.create_drive(None)
    store = BlockStore(home.store_path)
    try:
        committed = trio.run(commit_empty, DriveStorage(store), cap, _device(home))
    finally:
        store.close()
    data = {"drive": cap.drive_id, "seq": committed.head.seq,
            "read_link": cap.read_cap().link(), "write_link": cap.link()}
    _emit(args, data, f"new drive {cap.drive_id[:16]} (version {committed.head.seq}, empty)\n"
                      f"read   {data['read_link']}\nwrite  {data['write_link']}  (keep it secret)")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    if args.limit < 1 or args.paths < 0:
        raise UsageError("--limit takes 1 or more, --paths 0 or more")
    target = args.target
    if target == "-" or target.startswith("peerdrive:"):
        from .options import NodeOptions
        from .versions import run_log

        cap = require_read(parse_link(_link_arg(target)))
        opts = NodeOptions(**_node_fields(args))
        items = [i.as_json() for i in run_log(_home(args), cap, opts, args.limit, args.paths)]
    else:
        import errno
        import os

        from .versions import decode_xattr

        path = Path(target).expanduser()
        try:
            raw = os.getxattr(path, xattrs.full_name(xattrs.VERSIONS))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
                raise UsageError(f"{target} is neither a link nor the folder a drive is "
                                 "mounted at") from None
            raise
        items = decode_xattr(raw)[:args.limit]
        for item in items:
            changes = item.get("changes")
            if isinstance(changes, dict):
                for kind in ("added", "removed", "modified"):
                    changes[kind] = changes.get(kind, [])[:args.paths]
    _emit(args, {"versions": items}, render_log(items))
    return 0


def render_log(items: list[dict]) -> str:
    lines = []
    for v in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["time"]))
        changes = v.get("changes")
        summary = "" if changes is None else (
            f"  +{changes['counts']['added']} -{changes['counts']['removed']} "
            f"~{changes['counts']['modified']}")
        if v.get("files") is None:
            lines.append(f"version {v['seq']}  {when}  (its blocks are on no device reachable "
                         "now: released by its publisher)")
            continue
        lines.append(f"version {v['seq']}  {when}  {v['files']} files  "
                     f"{format_size(v['bytes'])}{summary}")
        if changes is None:
            lines.append("  (what changed is unknown: the version before it is not in the "
                         "history)")
            continue
        for kind, mark in (("added", "+"), ("removed", "-"), ("modified", "~")):
            lines.extend(f"  {mark} {p}" for p in changes[kind])
            more = changes["counts"][kind] - len(changes[kind])
            if more > 0 and changes[kind]:
                lines.append(f"  {mark} ... {more} more")
    return "\n".join(lines) or "no versions"


def cmd_share(args: argparse.Namespace) -> int:
    home = _home(args)
    cap: StoreCap
    target = args.target
    if target.startswith("peerdrive:"):
        cap = parse_link(target)
    else:
        found = home.drive_for_source(Path(target).expanduser())
        if found is None:
            raise UsageError(f"{target} is neither a link nor a folder this node publishes")
        cap = found
    if args.store:
        out = cap.store_cap().link() if isinstance(cap, ReadCap) else cap.link()
    elif args.write:
        if not isinstance(cap, WriteCap):
            raise UsageError("only the publishing node holds the write capability")
        out = cap.link()
    else:
        out = require_read(cap).read_cap().link() if isinstance(cap, WriteCap) else \
            require_read(cap).link()
    _emit(args, {"link": out, "drive": cap.drive_id}, out)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from dht.identity import NodeIdentity

    home = _home(args)
    ident = NodeIdentity.load_or_create(home.node_key_path)
    drives = []
    for cap in home.published_drives():
        d = {"drive": cap.drive_id, "read_link": cap.read_cap().link(),
             "source": home.drive_source(cap.pubkey)}
        if args.show_write:
            d["write_link"] = cap.link()
        drives.append(d)
    data = {"node_id": ident.node_id.hex(), "home": str(home.path), "drives": drives}
    lines = [f"node id  {ident.node_id.hex()}", f"home     {home.path}"]
    for d in drives:
        lines.append(f"drive    {d['drive'][:16]}  {d['source']}")
        lines.append(f"  read   {d['read_link']}")
        if "write_link" in d:
            lines.append(f"  write  {d['write_link']}")
    _emit(args, data, "\n".join(lines))
    return 0


def _mount_link(args: argparse.Namespace) -> str:
    """The link to mount: the argument, or with `-` what comes on --link-fd (the
    background mount) or stdin (a user keeping it off every command line)."""
    return _link_arg(args.link, getattr(args, "link_fd", None))


def _link_arg(link: str, fd: int | None = None) -> str:
    """A link argument; `-` reads it from `fd` (default stdin), so a read key stays out
    of the process list, which every local user can read."""
    if link != "-":
        return link
    from .mount import read_secret
    from .mount_helper import link_in_text

    text = read_secret(fd if fd is not None else 0)
    return link_in_text(text) or text  # a link file may carry # comments (install-units)


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import check_mountpoint, python_argv, spawn_daemon

    home = _home(args)
    link, at_seq = split_version(_mount_link(args))
    if args.at is not None:
        at_seq = args.at
    cap = require_read(parse_link(link))
    mountpoint = Path(args.mountpoint).expanduser().resolve()
    opts = mount_options(args)
    opts.at_seq = at_seq
    check_mountpoint(mountpoint, opts.nonempty)
    if not args.foreground:
        # the link goes by pipe: a command line is readable by every local user (ps)
        log_path = home.mount_log_path(cap.drive_id)
        argv = [*python_argv(), "--home", str(home.path), *["-v"] * opts.verbose,
                "--log-file", str(log_path),
                "mount", "-", str(mountpoint), "--foreground", *mount_flags(opts),
                *(["--at", str(at_seq)] if at_seq is not None else [])]
        pid = spawn_daemon(argv, log_path, secret=cap.link(), main=main,
                           on_command_line=args.link)
        _emit(args, {"mountpoint": str(mountpoint), "pid": pid, "drive": cap.drive_id},
              f"mounted {cap.drive_id[:16]} at {mountpoint} (pid {pid})")
        return 0
    from .node import run_mount_foreground

    run_mount_foreground(home, cap, mountpoint, opts)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .node import run_serve

    home = _home(args)

    def ready(net, port: int, caps: list) -> None:
        data = {"node_id": net.identity.node_id.hex(), "port": port,
                "addresses": [f"{h}:{p}" for h, p in net.addresses()],
                "drives": [c.drive_id for c in caps]}
        _emit(args, data, f"serving {len(caps)} drive(s) as node {data['node_id'][:16]} on "
                          f"{', '.join(data['addresses'])} (Ctrl-C to stop)")
        sys.stdout.flush()

    run_serve(home, serve_options(args), ready)
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    from .mirror import run_mirror

    home = _home(args)
    # a read or store link (no read key needed); `-` from stdin keeps it out of ps
    cap = StoreCap(parse_link(_link_arg(args.link)).pubkey)
    directory = Path(args.directory).expanduser().resolve()
    bar = ProgressBar("mirroring", sys.stdout.isatty() and not args.json)
    started = time.monotonic()
    try:
        result = run_mirror(home, cap, directory, mirror_options(args),
                            on_progress=bar.update, on_wait=lambda: print(
                                f"waiting for another peerdrive mirror into {directory} to "
                                "finish", file=sys.stderr))
    finally:
        bar.finish()
    elapsed = time.monotonic() - started
    data = {"directory": str(directory), "drive": cap.drive_id, "seq": result.seq,
            "blocks": result.blocks, "bytes": result.bytes, "written": result.written,
            "written_bytes": result.written_bytes, "skipped": result.skipped,
            "head_written": result.head_written, "seconds": round(elapsed, 3)}
    _emit(args, data, (
        f"mirrored version {result.seq} of {cap.drive_id[:16]} into {directory}: "
        f"{result.written} blocks written ({format_size(result.written_bytes)}), "
        f"{result.skipped} already there"
        + ("" if result.head_written else "; the head was already current")))
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    from cache.store import BlockStore

    from .host_list import HostEntry, HostList, hosted_versions, stop_hosting
    from .units import parse_size

    home = _home(args)
    hosts = HostList(home.hosts_dir)
    if args.list:
        if args.link or args.remove:
            raise UsageError("--list takes no link")
        return _host_list(args, home, hosts)
    if not args.link:
        raise UsageError("give the drive's store link (peerdrive share LINK --store prints it)")
    cap = StoreCap(parse_link(args.link).pubkey)  # only the store capability is ever kept
    if args.remove:
        removed = hosts.remove(cap)
        store = BlockStore(home.store_path)
        try:
            freed = stop_hosting(store, cap)
        finally:
            store.close()
        _emit(args, {"drive": cap.drive_id, "removed": removed, "freed_bytes": freed},
              f"{'no longer hosting' if removed else 'was not hosting'} {cap.drive_id[:16]}; "
              f"freed {format_size(freed)}")
        return 0
    quota = parse_size(args.quota) if args.quota is not None else None
    entry = HostEntry(cap, quota, args.keep_versions)
    registered = time.time()
    new = hosts.add(entry)
    note = "" if args.link.strip().lower().startswith("peerdrive:s1:") else \
        " (from that link only the store capability is kept: this node cannot read the drive)"
    if args.no_wait or not _serving(home):
        store = BlockStore(home.store_path)
        try:
            versions = hosted_versions(store, cap.pubkey)
        finally:
            store.close()
        later = "" if _serving(home) else "; `peerdrive serve` fetches and serves it"
        _emit(args, {"drive": cap.drive_id, "new": new, "quota": quota,
                     "keep_versions": entry.keep_versions,
                     "hosted_seq": versions[-1] if versions else None, "state": "registered"},
              f"hosting {cap.drive_id[:16]}{note}{later}")
        return 0
    state = _wait_hosted(args, home, entry, registered)
    _emit(args, {"drive": cap.drive_id, "new": new, "quota": quota,
                 "keep_versions": entry.keep_versions, **state},
          f"hosting {cap.drive_id[:16]}{note}: {state['message']}")
    return 0


def _serving(home: Home) -> bool:
    from .host_list import serving_snapshots

    return bool(serving_snapshots(home.running_nodes(), "hosting"))


def _wait_hosted(args: argparse.Namespace, home: Home, entry, registered: float) -> dict:
    """Follow the running serve's hosting of `entry` until its newest version is complete."""
    from .host_list import NotHostable, QuotaExceeded, host_state_in, serving_snapshots

    bar = ProgressBar("hosting", sys.stdout.isatty() and not args.json)
    last, last_change = None, time.monotonic()
    try:
        while True:
            snaps = serving_snapshots(home.running_nodes(), "hosting")
            if not snaps:
                raise UsageError("`peerdrive serve` stopped before the drive was hosted; "
                                 "it fetches it when it runs again")
            state, when = host_state_in(snaps, entry.cap)
            current = (state is not None and when > registered
                       and state["quota"] == entry.quota
                       and state["keep_versions"] == entry.keep_versions)
            if current:
                if state["state"] == "complete":
                    bar.update(state["bytes_total"], state["bytes_total"])
                    return state
                if state["state"] == "refused":
                    error = QuotaExceeded if "quota" in state["message"] else NotHostable
                    raise error(state["message"])
                bar.update(state["bytes_have"], max(state["bytes_total"], 1))
                progress = (state["state"], state["seq"], state["bytes_have"])
                if progress != last:
                    last, last_change = progress, time.monotonic()
            if time.monotonic() - last_change > args.stall_timeout:
                why = state["message"] if current and state else "serve has not taken it up"
                raise BlockUnavailable(f"hosting made no progress for {args.stall_timeout:g} s "
                                       f"({why}); serve keeps trying in the background")
            time.sleep(0.25)
    finally:
        bar.finish()


def _host_list(args: argparse.Namespace, home: Home, hosts) -> int:
    from cache.store import BlockStore

    from .host_list import host_state_in, hosted_versions, serving_snapshots

    snaps = serving_snapshots(home.running_nodes(), "hosting")
    out = []
    store = BlockStore(home.store_path)
    try:
        for entry in hosts.entries():
            versions = hosted_versions(store, entry.cap.pubkey)
            state, _ = host_state_in(snaps, entry.cap)
            out.append({"drive": entry.cap.drive_id, "link": entry.cap.link(),
                        "quota": entry.quota, "keep_versions": entry.keep_versions,
                        "hosted_versions": versions,
                        "state": state["state"] if state else "not served (serve is not running)",
                        "message": state["message"] if state else None,
                        "refused_blocks": state["refused_blocks"] if state else 0})
    finally:
        store.close()
    lines = [f"{d['drive'][:16]}  versions {d['hosted_versions'] or '-'}  quota "
             f"{format_size(d['quota'])}  keep {d['keep_versions']}  {d['state']}"
             + (f": {d['message']}" if d["message"] else "") for d in out]
    _emit(args, {"hosts": out}, "\n".join(lines) or "this node hosts no drive")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    from .mount import unmount
    from .process import is_recorded_alive

    home = _home(args)
    mountpoint = Path(args.mountpoint).expanduser().resolve()
    record = home.mount_record(mountpoint)
    try:
        unmount(mountpoint, record, lazy=args.lazy, on_wait=lambda seconds: print(
            f"waiting for the mount to publish its last changes (at most {seconds:.0f} s)",
            file=sys.stderr, flush=True))
    except MountError:
        if record is not None and not is_recorded_alive(record.get("pid", 0),
                                                        record.get("start")):
            home.unregister_mount(mountpoint)  # a stale record goes even if nothing was mounted
        raise
    home.unregister_mount(mountpoint)
    _emit(args, {"mountpoint": str(mountpoint)}, f"unmounted {mountpoint}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from .status import path_status, pin_progress

    paths = [Path(p).expanduser() for p in args.paths]
    for p in paths:
        flags.pin(p)
    if not args.no_wait:
        bar = ProgressBar("pinning", sys.stdout.isatty() and not args.json)
        last_change = time.monotonic()
        last_done = -1
        while True:
            # the pins' own counters: cheap to poll, whatever the size of the folder
            progress = [pin_progress(p) for p in paths]
            done = sum(p.blocks for p in progress if p is not None)
            bar.update(sum(p.bytes for p in progress if p is not None),
                       sum(p.total_bytes for p in progress if p is not None))
            if all(p is not None and p.complete for p in progress):
                break
            if done != last_done:
                last_done, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > args.stall_timeout:
                bar.finish()
                why = next((p.error for p in progress if p is not None and p.error), "")
                raise BlockUnavailable(
                    f"pinning stalled at {done} blocks: no peer serves the missing ones; the "
                    "pin stays and completes when one does" + (f" ({why})" if why else ""))
            time.sleep(0.25)
        bar.finish()
    # not `copies`: that asks every peer about every block below the path
    results = [path_status(p, only=xattrs.LOCAL) for p in paths]
    _emit(args, {"pinned": results},
          "\n".join(f"pinned {r['path']}: {r['state']}, {format_size(r.get('cached_bytes', 0))}"
                    f" of {format_size(r.get('size_bytes', 0))} on this device" for r in results))
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    for p in args.paths:
        flags.unpin(Path(p).expanduser())
    _emit(args, {"unpinned": args.paths}, "\n".join(f"unpinned {p}" for p in args.paths))
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    from .status import path_status

    out = []
    for p in args.paths:
        path = Path(p).expanduser()
        flags.evict(path)
        out.append(path_status(path, only=xattrs.LOCAL))
    _emit(args, {"evicted": out}, "\n".join(
        f"evicted {r['path']}: {format_size(r.get('cached_bytes', 0))} still on this device"
        + (" (pinned)" if r.get("pinned") else "") for r in out))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import node_status, path_status_with_cache

    home = _home(args)
    if args.path:
        data = path_status_with_cache(home, Path(args.path))
        while getattr(args, "wait", False) and data.get("complete") is False:
            time.sleep(STATUS_WAIT_POLL)  # the count runs in the mount: ask again
            data = path_status_with_cache(home, Path(args.path))
        _emit(args, data, render_path_status(data))
    else:
        data = node_status(home)
        _emit(args, data, render_node_status(data))
    return 0


def render_path_status(data: dict) -> str:
    if data.get("complete") is False:
        files = data.get("files")
        done = (f"{data.get('counted_files', 0):,} of {files:,} files"
                if files is not None else f"{data.get('counted_files', 0):,} files")
        size = (format_size(data["size_bytes"]) if "size_bytes" in data else "not known yet")
        text = (f"{data['path']}\n  state   counting ({done} so far)\n"
                f"  size    {size}")
    else:
        text = (f"{data['path']}\n  state   {data['state']}\n"
                f"  on device {format_size(data.get('cached_bytes', 0))} of "
                f"{format_size(data.get('size_bytes', 0))}")
        if data.get("files") is not None:
            text += f"\n  files   {data['files']:,}"
    if "pinned" in data:
        text += f"\n  pinned  {'yes' if data['pinned'] else 'no'}"
    if "copies" in data:
        text += f"\n  copies  {data['copies']}"
    return text


def render_node_status(data: dict) -> str:
    cache = data["cache"]
    lines = [f"home    {data['home']}",
             f"cache   {format_size(cache['used_bytes'])} used of "
             f"{format_size(cache['limit_bytes'])}"]
    for d in data["drives"]:
        version = f"version {d['seq']}" if d["seq"] is not None else "no version yet"
        lines.append(f"drive   {d['drive'][:16]}  {version}"
                     f"{'  published here' if d['published_here'] else ''}"
                     f"{'  hosted' if d.get('hosted') else ''}"
                     + ("" if d.get("complete") is None else
                        "  complete" if d["complete"] else
                        f"  {d['missing_blocks']} blocks missing")
                     + f"  copies {d.get('copies', 0)}"
                     + ("" if d.get("copies_checked") else " (this device only)"))
    for m in data["mounts"]:
        lines.append(f"mount   {m['mountpoint']}  drive {m['drive'][:16]}  pid {m['pid']}"
                     + (f"  log {m['log']}" if m.get("log") else ""))
    for n in data["nodes"]:
        srv = n["server"]
        lines.append(f"node    pid {n['pid']} port {n['port']}  {n['dht_contacts']} DHT contacts, "
                     f"served {srv['blocks_served']} blocks ({format_size(srv['bytes_served'])})")
        for drive, d in n["drives"].items():
            for p in d["peers"]:
                lines.append(f"  peer  {p['node_id'][:12]} {p['addr']}  drive {drive[:12]}  "
                             f"got {p['blocks']} blocks ({format_size(p['bytes'])})"
                             f"{'  connected' if p['connected'] else ''}")
    return "\n".join(lines)


def cmd_install_units(args: argparse.Namespace) -> int:
    from .mount_helper import read_link_file
    from .systemd_units import default_unit_dir, mount_unit, serve_unit

    home = _home(args)
    units = [serve_unit(home.path)]
    for mountpoint, link_file in args.mount or ():
        link_path = Path(link_file).expanduser().resolve()
        require_read(parse_link(read_link_file(link_path)))  # a usable link, mode 600
        units.append(mount_unit(home.path, Path(mountpoint).expanduser().resolve(), link_path))
    unit_dir = Path(args.dir).expanduser() if args.dir else default_unit_dir()
    unit_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for unit in units:
        path = unit_dir / unit.name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(unit.text)
        tmp.replace(path)
        written.append(str(path))
    names = " ".join(u.name for u in units)
    _emit(args, {"units": written, "dir": str(unit_dir)},
          "\n".join([*(f"wrote {p}" for p in written),
                      "enable them with: systemctl --user daemon-reload && "
                      f"systemctl --user enable --now {names}"]))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboard.server import DashboardOptions, run_dashboard

    opts = DashboardOptions(listen=args.listen, open_browser=not args.no_open)
    host = args.listen.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
        print(f"warning: the dashboard listens on {host}, beyond this machine, over plain "
              "HTTP: whoever sees its URL (with the token) can use it", file=sys.stderr)

    def ready(url: str) -> None:
        _emit(args, {"url": url}, f"dashboard at {url} (Ctrl-C to stop)")
        sys.stdout.flush()

    run_dashboard(_home(args), opts, ready)
    return 0


# ----------------------------------------------------------------------------- parser


def _visiting_node_flags(s: argparse.ArgumentParser, what: str) -> None:
    """The flags of a command that joins the network only for what this node lacks."""
    s.add_argument("--bootstrap", action="append", metavar="HOST:PORT",
                   help=f"a DHT node to join through when {what} are not on this node")
    s.add_argument("--listen", metavar="HOST:PORT", help=argparse.SUPPRESS)
    s.add_argument("--no-lan", action="store_true", help="no LAN discovery")
    s.add_argument("--fetch-timeout", type=float, metavar="SECONDS",
                   help="give up on a block no peer serves in this time")
    s.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peerdrive", description=(
        "A peer-to-peer cloud drive: publish a folder, mount it anywhere, "
        "stream on demand, pin what you need offline."))
    p.add_argument("--home", help="state directory (default: $PEERDRIVE_HOME or the user data dir)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("--log-file", help=argparse.SUPPRESS)  # a background mount's rotated log
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("publish", help="publish a folder as a new version of its drive")
    s.add_argument("folder")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--mirror-url", action="append", metavar="URL",
                   help="a static HTTP mirror of the drive (see `peerdrive mirror`), recorded "
                   "in the signed head so readers use it with no flag (repeatable, at most "
                   f"{MAX_HEAD_MIRRORS}; default: the last version's)")
    g.add_argument("--no-mirror-url", action="store_true",
                   help="record no mirror in this version")
    s.add_argument("--wait-copies", type=int, metavar="N",
                   help="return once N other holders (hosts, peers, mirrors) keep the whole new "
                        "version (needs serve running)")
    s.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                   help="with --wait-copies: give up (exit 4) after this long")
    s.add_argument("--watch", action="store_true",
                   help="keep running: publish the folder again as it changes (inotify), and "
                   "serve the drive meanwhile, like `serve`")
    s.add_argument("--publish-delay", type=float, default=2.0, metavar="SECONDS",
                   help="with --watch: publish once nothing has changed for this long "
                   "(default 2)")
    s.add_argument("--listen", metavar="HOST:PORT", help="with --watch: address to serve on "
                   "(default 0.0.0.0:4100)")
    s.add_argument("--bootstrap", action="append", metavar="HOST:PORT",
                   help="with --watch: a DHT node to join through (repeatable)")
    s.add_argument("--no-lan", action="store_true", help="with --watch: no LAN discovery")
    s.add_argument("--into", metavar="WRITE_LINK",
                   help="publish the folder into this existing drive (another device of its "
                   "owner; `-` reads the link from stdin); changes made elsewhere are merged, "
                   "never lost")
    s.add_argument("--keep-versions", type=int, default=10, metavar="N",
                   help="keep the blocks of this node's last N versions (default 10); older "
                   "ones are released (readers fetch them from peers that still hold them)")
    s.add_argument("--json", action="store_true", help="print one JSON object (with --watch: "
                   "one per line, per version)")
    s.set_defaults(func=cmd_publish, cache_size=None, fetch_timeout=None)

    s = sub.add_parser("new", help="create an empty drive and print its links")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_new)

    s = sub.add_parser("log", help="a drive's versions: when, how big, what changed")
    s.add_argument("target", metavar="LINK|MNT", help="a read or write link (`-`: from stdin), "
                   "or the folder a drive is mounted at")
    s.add_argument("--limit", type=int, default=20, metavar="N",
                   help="the newest N versions (default 20)")
    s.add_argument("--paths", type=int, default=20, metavar="N",
                   help="changed paths listed per kind and version (default 20)")
    _visiting_node_flags(s, "the versions")
    s.set_defaults(func=cmd_log, cache_size=None)

    s = sub.add_parser("mirror", help="write a drive's ciphertext into a directory that any "
                       "static web server can serve as a mirror")
    s.add_argument("link", help="a read or store link, or - to read it from stdin")
    s.add_argument("directory")
    _visiting_node_flags(s, "blocks")
    s.set_defaults(func=cmd_mirror, cache_size=None)

    s = sub.add_parser("mount", help="mount a drive from its read link (read-only) or its "
                       "write link (read-write: changes are published as new versions)")
    s.add_argument("link", help="the read or write link, or - to read it from stdin (keeps it "
                   "out of the shell history and the process list); LINK@SEQ mounts version "
                   "SEQ read-only, as it was (see `peerdrive log`)")
    s.add_argument("--at", type=int, help=argparse.SUPPRESS)  # the background mount's @SEQ
    s.add_argument("--publish-delay", type=float, default=2.0, metavar="SECONDS",
                   help="with a write link: publish a new version once nothing has changed "
                   "for this long (default 2; fsync publishes at once)")
    s.add_argument("mountpoint")
    s.add_argument("--allow-other", action="store_true",
                   help="let every local user enter the mount (within the files' modes); "
                   "by default only you can")
    s.add_argument("--nonempty", action="store_true",
                   help="mount over a folder that holds files (they are hidden meanwhile)")
    s.add_argument("--max-inodes", type=int, metavar="N",
                   help="inodes the mount keeps before it asks the kernel to forget "
                   "folders, the most recently listed first (memory against lookups "
                   "again; default 65536)")
    s.add_argument("--link-fd", type=int, help=argparse.SUPPRESS)
    s.add_argument("--foreground", "-f", action="store_true",
                   help="serve in this process until unmounted")
    s.add_argument("--bootstrap", action="append", metavar="HOST:PORT",
                   help="a DHT node to join through (repeatable)")
    s.add_argument("--listen", metavar="HOST:PORT", help="address to serve blocks on")
    s.add_argument("--cache-size", metavar="SIZE", help="cache limit, e.g. 500M or 10G")
    s.add_argument("--no-lan", action="store_true", help="no LAN discovery")
    s.add_argument("--fetch-timeout", type=float, metavar="SECONDS",
                   help="fail a read with EIO when no peer serves a block in this time")
    s.add_argument("--mirror", action="append", metavar="URL",
                   help="a static HTTP mirror of the drive to read from too (repeatable; "
                   "`mirrors = [...]` in config.toml; mirrors named in the head are used "
                   "without it)")
    s.add_argument("--push", action="append", metavar="[NODEID@]HOST:PORT",
                   help="keep a connection to this node and let it fetch over it (repeatable)")
    s.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("serve", help="join the network and serve every drive this node holds")
    s.add_argument("--listen", metavar="HOST:PORT", help="TCP (blocks) and UDP (DHT) address, "
                   "default 0.0.0.0:4100")
    s.add_argument("--bootstrap", action="append", metavar="HOST:PORT",
                   help="a DHT node to join through (repeatable)")
    s.add_argument("--cache-size", metavar="SIZE", help="cache limit, e.g. 500M or 10G")
    s.add_argument("--no-lan", action="store_true", help="no LAN discovery")
    s.add_argument("--fetch-timeout", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    s.add_argument("--push", action="append", metavar="[NODEID@]HOST:PORT",
                   help="keep a connection to this node (a host) and let it fetch every drive "
                   "served here over it, from behind NAT (repeatable)")
    s.add_argument("--keep-versions", type=int, default=10, metavar="N",
                   help="of drives this node publishes: keep the blocks of the last N versions "
                   "(default 10), including versions other writers of the drive published")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("host", help="keep and serve a drive from its store link (cannot read it)")
    s.add_argument("link", nargs="?", metavar="STORE_LINK")
    s.add_argument("--quota", metavar="SIZE",
                   help="refuse a version bigger than this, e.g. 50G (default: no limit)")
    s.add_argument("--keep-versions", type=int, default=1, metavar="N",
                   help="complete versions kept (default 1: older ones are released)")
    s.add_argument("--remove", action="store_true", help="stop hosting the drive, free its blocks")
    s.add_argument("--list", action="store_true", help="the drives this node hosts")
    s.add_argument("--no-wait", action="store_true",
                   help="return at once; serve fetches the drive in the background")
    s.add_argument("--stall-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up waiting when nothing arrives for this long (default 60)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_host)

    s = sub.add_parser("unmount", help="unmount a drive (also clears a crashed mount)")
    s.add_argument("mountpoint")
    s.add_argument("--lazy", action="store_true", help="detach now even if busy")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_unmount)

    s = sub.add_parser("share", help="print a drive's link (read by default)")
    s.add_argument("target", help="a link, or a folder this node publishes")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--store", action="store_true",
                   help="the store capability: can hold and serve, cannot read")
    g.add_argument("--write", action="store_true", help="the write capability (keep it secret)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_share)

    s = sub.add_parser("keys", help="this node's identity and the drives it publishes")
    s.add_argument("--show-write", action="store_true", help="also print write capabilities")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser("pin", help="keep files or folders whole on this device")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--no-wait", action="store_true", help="return at once; fetch in background")
    s.add_argument("--stall-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up waiting when nothing arrives for this long (default 60)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pin)

    s = sub.add_parser("unpin", help="let pinned data be evicted again")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_unpin)

    s = sub.add_parser("evict", help="free the unpinned blocks under a path now")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evict)

    s = sub.add_parser("install-units", help="write systemd user units for serve and mounts")
    s.add_argument("--mount", nargs=2, action="append", metavar=("MOUNTPOINT", "LINK_FILE"),
                   help="also a unit mounting the drive whose read link is in LINK_FILE (mode "
                   "600) at MOUNTPOINT (repeatable)")
    s.add_argument("--dir", help="where to write them (default ~/.config/systemd/user)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_install_units)

    s = sub.add_parser("dashboard", help="a live web page of this node: drives, files, peers, "
                       "cache")
    s.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:0",
                   help="where to serve it (default 127.0.0.1 on a free port); the URL it "
                   "prints carries the access token")
    s.add_argument("--no-open", action="store_true",
                   help="do not open the page in a browser (xdg-open, when there is a display)")
    s.add_argument("--json", action="store_true", help='print {"url": ...} on one line')
    s.set_defaults(func=cmd_dashboard)

    s = sub.add_parser("status", help="the node, or a path inside a mount")
    s.add_argument("path", nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--wait", action="store_true",
                   help="while a folder's figures are being counted (the first status of a "
                        "version of a large drive), wait for them instead of answering at "
                        "once with complete: false")
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, Path(args.log_file) if args.log_file else None)
    try:
        _check_time_scale()
        try:
            return int(args.func(args) or 0)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PeerdriveError as exc:
        _report_failure(args, str(exc))
        return exc.exit_code
    except StoreFull as exc:
        _report_failure(args, f"no space: {exc}")
        return NoSpaceError.exit_code
    except StoreError as exc:
        _report_failure(args, f"store: {exc}")
        return 1
    except DhtError as exc:
        # What the drive layer does not turn into its own error reaches here: the
        # node failing to start (a UDP port taken, no multicast) is a message, not
        # a traceback.
        _report_failure(args, str(exc))
        return 1
    except OSError as exc:
        _report_failure(args, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return 1


def _check_time_scale() -> None:
    """Refuse a PEERDRIVE_TIME_SCALE that is not a number (tests' knob, dht/timescale.py);
    say in the log when one other than 1 shortens the long timers."""
    from dht import timescale

    if timescale.problem() is not None:
        raise UsageError(timescale.problem())
    if timescale.SCALE != 1.0:
        logging.getLogger(__name__).warning(
            "%s=%g: hours-long timers run %g times faster (for tests)", timescale.ENV,
            timescale.SCALE, timescale.SCALE)


def _report_failure(args: argparse.Namespace, message: str) -> None:
    from .mount import report_ready

    print(f"peerdrive: error: {message}", file=sys.stderr)
    report_ready(getattr(args, "ready_fd", None), f"error {message}")


if __name__ == "__main__":
    sys.exit(main())
