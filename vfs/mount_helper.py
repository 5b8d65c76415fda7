"""`mount.peerdrive`: the helper mount(8) runs for an /etc/fstab line, so a drive mounts at boot.

    # /etc/fstab
    peerdrive  /srv/photos  fuse.peerdrive  link=/etc/peerdrive/photos.link,_netdev,nofail  0 0

mount(8) runs `mount.fuse.peerdrive SPEC DIR [-sfnv] [-o OPTIONS]` for type
`fuse.peerdrive` (`mount.peerdrive` for type `peerdrive`; both are this
program). The read link never goes in fstab, which every user can read:
`link=FILE` names a file holding it, which must be a regular file owned by
the user mounting and readable by nobody else (chmod 600), or the mount is
refused. SPEC is free text (`peerdrive` makes `mount -a` see the mount as
already there, since the kernel lists it under that name).

Options map to `peerdrive mount` flags:

    link=FILE            the file holding the read link (required)
    home=DIR             PEERDRIVE_HOME (default: $PEERDRIVE_HOME or the user data dir)
    bootstrap=HOST:PORT  a DHT node to join through (repeatable)
    listen=HOST:PORT     where to serve blocks
    cache_size=SIZE      cache limit, e.g. 10G
    fetch_timeout=SECS   fail a read with EIO after this long without a source
    mirror=URL           a static HTTP mirror of the drive (repeatable)
    nolan                no LAN discovery
    allow_other          let every local user enter the mount (default: only its owner)
    nonempty             mount over a folder that holds files
    verbose              log more (as -v)

mount(8)'s own options (defaults, auto, noauto, nofail, _netdev, user, ro,
rw, x-systemd.*, comment=...) are accepted and left to mount(8) and systemd.
Anything else is an error, unless -s (sloppy) is given.

Exit codes follow mount(8): 0 mounted, 1 bad usage or options, 32 mount
failure (the message says why).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from .errors import UsageError

EXIT_USAGE = 1
EXIT_FAILURE = 32

# mount(8) and systemd options that mean nothing to peerdrive itself
GENERIC = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser",
                     "users", "owner", "group", "ro", "rw", "exec", "noexec", "suid", "nosuid",
                     "dev", "nodev", "sync", "async", "atime", "noatime", "relatime",
                     "nodiratime", "diratime", "silent", "loud"})
VALUED = {"home": "--home", "bootstrap": "--bootstrap", "listen": "--listen",
          "cache_size": "--cache-size", "fetch_timeout": "--fetch-timeout",
          "mirror": "--mirror"}


def read_link_file(path: Path) -> str:
    """The read link in `path`, refused unless only its owner (the caller) can read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"link file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"link file {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise UsageError(f"link file {path} belongs to uid {st.st_uid}, not to the user "
                             f"mounting (uid {os.getuid()})")
        if st.st_mode & 0o077:
            raise UsageError(f"link file {path} can be read by others (mode "
                             f"{stat.S_IMODE(st.st_mode):o}): chmod 600 {path}")
        link = link_in_text(f.read(64 * 1024))
    if link is None:
        raise UsageError(f"link file {path} holds no link")
    return link


def link_in_text(text: str) -> str | None:
    """The first line that is neither blank nor a # comment: a link file's link."""
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    return None


def parse_args(argv: list[str]) -> tuple[str, str, list[str], dict]:
    """(spec, mountpoint, options, flags) from mount(8)'s calling convention."""
    positional: list[str] = []
    options: list[str] = []
    flags = {"sloppy": False, "fake": False, "verbose": 0}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o" and i + 1 < len(argv):
            options += [o for o in argv[i + 1].split(",") if o]
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options += [o for o in a[2:].split(",") if o]
        elif a in ("-t", "-N") and i + 1 < len(argv):
            if a == "-N":
                raise UsageError("mount.peerdrive: -N (another namespace) is not supported")
            i += 2
            continue
        elif a.startswith("-") and len(a) > 1:
            for ch in a[1:]:
                if ch == "s":
                    flags["sloppy"] = True
                elif ch == "f":
                    flags["fake"] = True
                elif ch == "v":
                    flags["verbose"] += 1
                elif ch == "n":
                    pass  # no /etc/mtab to write: the kernel's table is the only one
                else:
                    raise UsageError(f"mount.peerdrive: unknown flag -{ch}")
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise UsageError("usage: mount.peerdrive SPEC MOUNTPOINT [-sfnv] [-o OPTIONS]")
    return positional[0], positional[1], options, flags


def mount_argv(spec: str, mountpoint: str, options: list[str], flags: dict
               ) -> tuple[list[str], str]:
    """The `peerdrive` argv (without the link) and the link, from fstab's fields."""
    link_file = None
    before: list[str] = []  # global options
    after: list[str] = []  # mount options
    verbose = flags["verbose"]
    for opt in options:
        name, eq, value = opt.partition("=")
        key = name.replace("-", "_")
        if key == "link" and eq:
            link_file = Path(value)
        elif key in VALUED and eq:
            (before if key == "home" else after).extend([VALUED[key], value])
        elif key in ("nolan", "no_lan") and not eq:
            after.append("--no-lan")
        elif key in ("allow_other", "nonempty") and not eq:
            after.append("--" + key.replace("_", "-"))
        elif key in ("verbose", "v") and not eq:
            verbose += 1
        elif name in GENERIC or name.startswith(("x-", "comment=")) or flags["sloppy"]:
            continue
        else:
            raise UsageError(f"mount.peerdrive: unknown option {opt!r} (see mount.peerdrive "
                             "--help)")
    if link_file is None:
        if spec.startswith("peerdrive:"):
            raise UsageError("mount.peerdrive: do not put the link in fstab (anyone can read "
                             "it); put it in a file only you can read (chmod 600) and give "
                             "-o link=/path/to/file")
        raise UsageError("mount.peerdrive: give -o link=/path/to/file (a file holding the "
                         "read link, mode 600)")
    link = read_link_file(link_file)
    argv = [*before, *["-v"] * verbose, "mount", link, mountpoint, *after]
    return argv, link


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        spec, mountpoint, options, flags = parse_args(argv)
        peerdrive_argv, _ = mount_argv(spec, mountpoint, options, flags)
    except UsageError as exc:
        print(f"mount.peerdrive: {exc}".replace("mount.peerdrive: mount.peerdrive: ",
                                                 "mount.peerdrive: "), file=sys.stderr)
        return EXIT_USAGE
    if flags["fake"]:
        return 0
    from .cli import main as peerdrive_main

    rc = peerdrive_main(peerdrive_argv)  # in this process: the link is in no argv of ours
    if rc == 0:
        return 0
    return EXIT_USAGE if rc == UsageError.exit_code else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
