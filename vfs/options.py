"""What the command line asks a node to do, as plain dataclasses.

`vfs/cli.py` parses argv with argparse and builds these; everything below it
(`vfs/node.py`, `vfs/mount.py`, the dashboard) takes them and never sees an
`argparse.Namespace`. So the code that runs a node can be called from a test,
a script or another process with exactly the fields it needs, and a new
option is one field here, one flag in `cli.py` and the code that uses it.

Values left `None` fall back to the node's config file (`Home.config()`) and
then to the defaults below, in `NodeOptions.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .home import Config

SERVE_LISTEN = "0.0.0.0:4100"
MOUNT_LISTEN = "0.0.0.0:0"
# `mount --max-inodes` below this is refused: the kernel holds every folder on the way to
# what it uses, so a smaller inode table (vfs/fs.py) would only thrash
MIN_INODES = 64


@dataclass
class NodeOptions:
    """How a node joins the network: the options `serve` and `mount` share."""

    bootstrap: list[str] = field(default_factory=list)  # HOST:PORT; empty: the config's
    listen: str | None = None  # HOST:PORT; None: the config's, else the command's default
    cache_size: str | None = None  # e.g. "10G"; None: the config's, else the stored limit
    lan: bool = True  # False: --no-lan (the config can turn it off too)
    fetch_timeout: float | None = None  # seconds; None: the config's (default 20)
    mirrors: list[str] = field(default_factory=list)  # static HTTP mirror base URLs (--mirror)
    push: list[str] = field(default_factory=list)  # [NODEID@]HOST:PORT; empty: the config's

    def resolve(self, config: Config, default_listen: str) -> ResolvedNodeOptions:
        """These options over the config file over the defaults."""
        return ResolvedNodeOptions(
            bootstrap=list(self.bootstrap) or list(config.bootstrap),
            listen=self.listen or config.listen or default_listen,
            cache_size=self.cache_size or config.cache_size,
            lan=self.lan and config.lan,
            fetch_timeout=self.fetch_timeout or config.fetch_timeout,
            mirrors=list(dict.fromkeys([*self.mirrors, *config.mirrors])),
            push=list(self.push) or list(config.push),
        )


@dataclass(frozen=True)
class ResolvedNodeOptions:
    """NodeOptions with the config file and defaults applied: what the node runs with."""

    bootstrap: list[str]
    listen: str
    cache_size: str | None
    lan: bool
    fetch_timeout: float
    mirrors: list[str] = field(default_factory=list)  # --mirror and the config's, for every drive
    push: list[str] = field(default_factory=list)


@dataclass
class MountOptions(NodeOptions):
    """`peerdrive mount`: a node serving one drive through FUSE."""

    ready_fd: int | None = None  # the background parent's pipe: "ready" or "error ..."
    verbose: int = 0  # -v count, handed on to the background mount process
    allow_other: bool = False  # --allow-other: every local user may enter the mount
    nonempty: bool = False  # --nonempty: mount over a folder that holds files
    log_file: str | None = None  # where this mount process logs (registered for `status`)
    # a write link's mount: seconds without a change before a new version is published
    publish_delay: float = 2.0
    at_seq: int | None = None  # LINK@SEQ: mount that old version, read-only, never switched
    max_inodes: int | None = None  # --max-inodes: the inode table's bound (vfs/fs.py)


@dataclass
class ServeOptions(NodeOptions):
    """`peerdrive serve`: a node serving every drive whose head it holds."""

    keep_versions: int = 10  # of drives this node writes: versions kept whole (vfs/writers.py)


@dataclass
class MirrorOptions(NodeOptions):
    """`peerdrive mirror`: write a drive's ciphertext into a directory as static files.

    The node options are used only when the blocks or the head are not all on
    this node: then it joins the network like a mount, for as long as it takes.
    """

