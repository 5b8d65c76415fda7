"""mount.peerdrive's reading of an fstab line: options to flags, the link only from a 0600 file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vfs.errors import UsageError
from vfs.mount_helper import main, mount_argv, parse_args, read_link_file
from vfs.systemd_units import escape_path

LINK = "peerdrive:r1:abc:def:ghi"


def _file(tmp_path: Path, mode: int = 0o600, text: str = f"# photos\n\n{LINK}\n") -> Path:
    f = tmp_path / "drive.link"
    f.write_text(text)
    f.chmod(mode)
    return f


def test_options_become_peerdrive_flags(tmp_path: Path) -> None:
    f = _file(tmp_path)
    spec, mnt, opts, flags = parse_args(
        ["peerdrive", "/srv/p", "-v", "-o", f"link={f},home=/var/lib/pd,bootstrap=h1:4100,"
         "bootstrap=h2:4100,listen=0.0.0.0:4101,cache_size=10G,fetch_timeout=30,nolan,"
         "mirror=https://m.example/p,allow_other,"
         "_netdev,nofail,defaults,x-systemd.requires=network-online.target,rw",
         "-t", "fuse.peerdrive"])
    argv, link = mount_argv(spec, mnt, opts, flags)
    assert link == LINK
    assert argv == ["--home", "/var/lib/pd", "-v", "mount", LINK, "/srv/p",
                    "--bootstrap", "h1:4100", "--bootstrap", "h2:4100", "--listen",
                    "0.0.0.0:4101", "--cache-size", "10G", "--fetch-timeout", "30", "--no-lan",
                    "--mirror", "https://m.example/p", "--allow-other"]
    assert parse_args(["x", "/m", "-sfn"])[3] == {"sloppy": True, "fake": True, "verbose": 0}


def test_bad_lines_are_refused_with_a_reason(tmp_path: Path) -> None:
    f = _file(tmp_path)
    with pytest.raises(UsageError, match="do not put the link in fstab"):
        mount_argv(LINK, "/m", [], parse_args(["a", "/m"])[3])
    with pytest.raises(UsageError, match="give -o link="):
        mount_argv("peerdrive", "/m", ["home=/x"], parse_args(["a", "/m"])[3])
    with pytest.raises(UsageError, match="unknown option 'colour=blue'"):
        mount_argv("peerdrive", "/m", [f"link={f}", "colour=blue"], parse_args(["a", "/m"])[3])
    sloppy = parse_args(["a", "/m", "-s"])[3]
    assert mount_argv("peerdrive", "/m", [f"link={f}", "colour=blue"], sloppy)[1] == LINK
    with pytest.raises(UsageError, match="usage"):
        parse_args(["only-one"])
    with pytest.raises(UsageError, match="-N"):
        parse_args(["a", "/m", "-N", "/proc/1/ns/mnt"])
    assert main(["a", "/m", "-o", "colour=blue"]) == 1
    assert main(["a", "/m", "-f", "-o", f"link={f}"]) == 0  # -f: fake, nothing mounted


def test_link_file_must_be_private(tmp_path: Path) -> None:
    assert read_link_file(_file(tmp_path)) == LINK
    for mode in (0o644, 0o640, 0o604):
        with pytest.raises(UsageError, match="chmod 600"):
            read_link_file(_file(tmp_path, mode))
    with pytest.raises(UsageError, match="holds no link"):
        read_link_file(_file(tmp_path, text="# nothing\n\n"))
    os.symlink(_file(tmp_path), tmp_path / "alias")
    with pytest.raises(UsageError):
        read_link_file(tmp_path / "alias")  # not followed: a link could point anywhere
    with pytest.raises(UsageError, match="No such file"):
        read_link_file(tmp_path / "missing")


def test_unit_names_escape_like_systemd() -> None:
    assert escape_path("/home/ann/My Drive") == "home-ann-My\\x20Drive"
    assert escape_path("/srv/photos-2024/") == "srv-photos\\x2d2024"
    assert escape_path("/") == "-"
    assert escape_path("/a/.hidden") == "a-.hidden"
    assert escape_path("/.x") == "\\x2ex"
    if shutil.which("systemd-escape"):
        paths = ["/home/ann/My Drive", "/srv/photos-2024/", "/a/.hidden", "/.x", "/mnt/ü/x_y:z"]
        want = subprocess.run(["systemd-escape", "--path", *paths], capture_output=True,
                              text=True, check=True).stdout.split()
        assert [escape_path(p) for p in paths] == want
