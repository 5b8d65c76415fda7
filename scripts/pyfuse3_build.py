"""Which pyfuse3 build this checkout wants: its version, patches, label and stamp.

    python3 scripts/pyfuse3_build.py [ROOT]

scripts/setup builds pyfuse3 from its pinned sdist with every
patches/pyfuse3-<version>-*.patch applied in name order, and rebuilds it
whenever what it would build changes. This prints, one per line, what setup
needs to decide that and to do it:

    version   the version requirements.lock pins (e.g. 3.5.0)
    label     the build's version with a local label naming every patch, in
              order (3.5.0+cachereaddir.nogilreply.readparts): a venv whose pyfuse3
              lacks a patch, or has a plain pyfuse3 installed over ours,
              shows a different version
    stamp     SHA-256 over the version, the sdist's checksum file, each
              patch's name and bytes, and the build tools' pins: adding,
              removing, renaming or editing a patch changes it
    sha_file  patches/pyfuse3-<version>.sha256
    patch...  the patches, in the order they are applied

Run by the system python3 before .venv exists, so the standard library only.
Exits 1 with a message on stderr when the pin, the checksum file or every
patch is missing.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path


class BuildSpecError(Exception):
    """The checkout does not say how to build pyfuse3."""


@dataclass(frozen=True)
class Build:
    version: str
    label: str
    stamp: str
    sha_file: Path
    patches: tuple[Path, ...]


def pinned_version(lock: Path) -> str:
    for line in lock.read_text().splitlines():
        m = re.fullmatch(r"pyfuse3==(\S+)", line.strip())
        if m:
            return m.group(1)
    raise BuildSpecError(f"{lock} pins no pyfuse3 version")


def patch_tag(patch: Path, version: str) -> str:
    """The label part naming one patch: pyfuse3-3.5.0-cache-readdir.patch -> cachereaddir."""
    middle = patch.name[len(f"pyfuse3-{version}-"):-len(".patch")]
    tag = re.sub(r"[^a-z0-9]", "", middle.lower())
    if not tag:
        raise BuildSpecError(f"{patch.name}: no name after the version")
    return tag


def build_spec(root: Path) -> Build:
    version = pinned_version(root / "requirements.lock")
    patches_dir = root / "patches"
    sha_file = patches_dir / f"pyfuse3-{version}.sha256"
    if not sha_file.is_file():
        raise BuildSpecError(f"requirements.lock pins pyfuse3 {version} but {sha_file} is missing")
    patches = tuple(sorted(patches_dir.glob(f"pyfuse3-{version}-*.patch")))
    if not patches:
        raise BuildSpecError(f"requirements.lock pins pyfuse3 {version} but patches/ has no "
                             f"pyfuse3-{version}-*.patch")
    tags = [patch_tag(p, version) for p in patches]
    h = hashlib.sha256()
    for part in (version.encode(), sha_file.read_bytes(),
                 *(b"%s\0%s" % (p.name.encode(), p.read_bytes()) for p in patches),
                 (root / "requirements-build.lock").read_bytes()):
        h.update(hashlib.sha256(part).digest())  # each part hashed alone: no two sets collide
    return Build(version=version, label=f"{version}+{'.'.join(tags)}", stamp=h.hexdigest(),
                 sha_file=sha_file, patches=patches)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    try:
        build = build_spec(root)
    except (BuildSpecError, OSError) as e:
        print(f"peerdrive setup: {e}", file=sys.stderr)
        return 1
    print(build.version, build.label, build.stamp, build.sha_file,
          *build.patches, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
