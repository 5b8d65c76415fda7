"""`peerdrive install-units`: systemd user units for `serve` and for mounts.

    peerdrive-serve.service            peerdrive serve, restarted on failure
    peerdrive-mount-<path>.service     peerdrive mount - MOUNTPOINT --foreground, the link
                                       on standard input from a 0600 file
                                       (StandardInput=file:...), never in the unit;
                                       stopped with peerdrive unmount

Each unit names this node's home (Environment=PEERDRIVE_HOME) and the
command that wrote it, so the units run this same peerdrive. Pure text: the
caller writes the files and says which `systemctl --user` lines enable them.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

SERVE_UNIT = "peerdrive-serve.service"


@dataclass(frozen=True)
class Unit:
    name: str
    text: str


def peerdrive_command() -> list[str]:
    """How a unit runs this peerdrive: the installed command, or this Python with -m vfs.cli."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "peerdrive" and argv0.is_file():
        return [str(argv0.resolve())]
    return [sys.executable, "-m", "vfs.cli"]


def escape_path(path: str) -> str:
    """systemd's path escaping (as `systemd-escape --path`): / becomes -, the rest \\xNN."""
    trimmed = path.strip("/") or "-"
    if trimmed == "-":
        return "-"
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def _exec(argv: list[str]) -> str:
    # systemd's own quoting: double quotes, with \ and " escaped; % doubled (specifiers)
    def q(a: str) -> str:
        if a and all(c.isalnum() or c in "/._-:+=@," for c in a):
            return a.replace("%", "%%")
        return '"' + a.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'

    return " ".join(q(a) for a in argv)


def _environment(home: Path) -> list[str]:
    env = [f"Environment={_exec(['PEERDRIVE_HOME=' + str(home)])}"]
    cmd = peerdrive_command()
    if cmd[1:2] == ["-m"]:  # not installed: run the package from where it is
        root = Path(__file__).resolve().parent.parent
        env.append(f"Environment={_exec(['PYTHONPATH=' + str(root)])}")
    return env


def serve_unit(home: Path, extra: list[str] | None = None) -> Unit:
    cmd = peerdrive_command()
    text = "\n".join([
        "[Unit]",
        "Description=peerdrive: serve the drives of this node",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        *_environment(home),
        f"ExecStart={_exec([*cmd, 'serve', *(extra or [])])}",
        "Restart=on-failure",
        "RestartSec=5",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])
    return Unit(SERVE_UNIT, text)


def mount_unit(home: Path, mountpoint: Path, link_file: Path,
               extra: list[str] | None = None) -> Unit:
    cmd = peerdrive_command()
    mp = str(mountpoint)
    text = "\n".join([
        "[Unit]",
        f"Description=peerdrive: mount a drive at {mp}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        *_environment(home),
        f"StandardInput=file:{link_file}",
        f"ExecStart={_exec([*cmd, 'mount', '-', mp, '--foreground', *(extra or [])])}",
        f"ExecStop={_exec([*cmd, 'unmount', mp])}",
        "Restart=on-failure",
        "RestartSec=10",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])
    return Unit(f"peerdrive-mount-{escape_path(mp)}.service", text)


def default_unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def exec_lines(unit_text: str, key: str) -> list[list[str]]:
    """The argv of each `key=` line of a unit (ExecStart, ExecStop), as systemd splits it."""
    out = []
    for line in unit_text.splitlines():
        if line.startswith(key + "="):
            out.append([a.replace("%%", "%") for a in shlex.split(line[len(key) + 1:])])
    return out
