"""pyfuse3 as scripts/setup builds it: every patch in, rebuilt when the patches change.

scripts/setup applies every patches/pyfuse3-<version>-*.patch to the pinned
sdist and rebuilds whenever scripts/pyfuse3_build.py's stamp changes; the
installed build's version label names every patch. The last test watches
the patches at work: a probe preloaded into a pyfuse3 file system's process
records, at each fuse_reply_buf, fuse_reply_iov and fuse_session_receive_buf,
whether the calling thread holds the GIL, while the file system answers its
READs with tuples of buffers.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import pyfuse3_build as PB  # noqa: E402


def _checkout(tmp_path: Path) -> Path:
    """A copy of what the build spec reads: the two locks and patches/."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("requirements.lock", "requirements-build.lock"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "patches", root / "patches")
    return root


def test_the_label_names_every_patch_in_the_order_they_are_applied(tmp_path):
    root = _checkout(tmp_path)
    build = PB.build_spec(root)
    assert build.version == "3.5.0"
    assert [p.name for p in build.patches] == ["pyfuse3-3.5.0-cache-readdir.patch",
                                               "pyfuse3-3.5.0-nogil-reply.patch",
                                               "pyfuse3-3.5.0-read-parts.patch"]
    assert build.label == "3.5.0+cachereaddir.nogilreply.readparts"


def test_the_stamp_changes_with_the_set_of_patches_and_with_their_bytes(tmp_path):
    root = _checkout(tmp_path)
    patches = root / "patches"
    stamps = [PB.build_spec(root).stamp]
    assert PB.build_spec(root).stamp == stamps[0]  # the same checkout, the same stamp
    extra = patches / "pyfuse3-3.5.0-zz-extra.patch"
    extra.write_text("another patch\n")
    stamps.append(PB.build_spec(root).stamp)
    assert PB.build_spec(root).label == "3.5.0+cachereaddir.nogilreply.readparts.zzextra"
    extra.write_text("another patch, edited\n")
    stamps.append(PB.build_spec(root).stamp)
    extra.rename(patches / "pyfuse3-3.5.0-zz-renamed.patch")
    stamps.append(PB.build_spec(root).stamp)
    (patches / "pyfuse3-3.5.0-zz-renamed.patch").unlink()
    (patches / "pyfuse3-3.5.0-nogil-reply.patch").unlink()  # back to the older set
    (patches / "pyfuse3-3.5.0-read-parts.patch").unlink()
    stamps.append(PB.build_spec(root).stamp)
    assert PB.build_spec(root).label == "3.5.0+cachereaddir"
    (root / "requirements-build.lock").write_text("Cython==0.0\n")
    stamps.append(PB.build_spec(root).stamp)
    assert len(set(stamps)) == len(stamps)
    # a patch for another pyfuse3 version is not this build's
    (patches / "pyfuse3-9.9.9-other.patch").write_text("x\n")
    assert PB.build_spec(root).stamp == stamps[-1]


def test_a_checkout_without_a_pin_checksum_or_patch_is_a_clear_error(tmp_path):
    root = _checkout(tmp_path)
    for p in (root / "patches").glob("pyfuse3-3.5.0-*.patch"):
        p.unlink()
    with pytest.raises(PB.BuildSpecError, match="no pyfuse3-3.5.0-"):
        PB.build_spec(root)
    (root / "patches" / "pyfuse3-3.5.0.sha256").unlink()
    with pytest.raises(PB.BuildSpecError, match=r"pyfuse3-3\.5\.0\.sha256 is missing"):
        PB.build_spec(root)
    (root / "requirements.lock").write_text("trio==0.35.0\n")
    with pytest.raises(PB.BuildSpecError, match="pins no pyfuse3"):
        PB.build_spec(root)
    # what scripts/setup runs: one line on stderr, exit 1, nothing on stdout
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pyfuse3_build.py"), str(root)],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "pins no pyfuse3" in proc.stderr


def test_setup_reads_the_spec_in_the_order_the_script_prints_it():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pyfuse3_build.py"), str(ROOT)],
                          capture_output=True, text=True, timeout=60, check=True)
    build = PB.build_spec(ROOT)
    assert proc.stdout.splitlines() == [build.version, build.label, build.stamp,
                                        str(build.sha_file), *map(str, build.patches)]


def test_the_installed_pyfuse3_is_this_checkouts_build():
    """A venv that missed a rebuild (a patch added since) fails here: rerun scripts/setup."""
    assert importlib.metadata.version("pyfuse3") == PB.build_spec(ROOT).label
    from vfs import fs

    assert fs.READ_REPLY_PARTS and fs.KERNEL_CACHES_LISTINGS and fs.LISTINGS_BY_INODE


_PROBE_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

struct fuse_session;
struct fuse_buf;
typedef struct fuse_req *fuse_req_t;

/* [0]: called with the GIL held, [1]: without */
static long reply_calls[2], iov_calls[2], receive_calls[2];

/* the real function: pyfuse3's extension loaded libfuse3 into its own (local) scope,
   where RTLD_NEXT does not look */
static void *libfuse(const char *name) {
    void *lib = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
    void *fn = lib != NULL ? dlsym(lib, name) : NULL;
    if (fn == NULL) abort();
    return fn;
}

static int gil_held(void) {
    int (*check)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGILState_Check");
    return check != NULL && check();
}

int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size) {
    int (*real)(fuse_req_t, const char *, size_t) =
        (int (*)(fuse_req_t, const char *, size_t))libfuse("fuse_reply_buf");
    __atomic_add_fetch(&reply_calls[gil_held() ? 0 : 1], 1, __ATOMIC_SEQ_CST);
    return real(req, buf, size);
}

struct iovec;

int fuse_reply_iov(fuse_req_t req, const struct iovec *iov, int count) {
    int (*real)(fuse_req_t, const struct iovec *, int) =
        (int (*)(fuse_req_t, const struct iovec *, int))libfuse("fuse_reply_iov");
    __atomic_add_fetch(&iov_calls[gil_held() ? 0 : 1], 1, __ATOMIC_SEQ_CST);
    return real(req, iov, count);
}

int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf) {
    int (*real)(struct fuse_session *, struct fuse_buf *) =
        (int (*)(struct fuse_session *, struct fuse_buf *))libfuse("fuse_session_receive_buf");
    __atomic_add_fetch(&receive_calls[gil_held() ? 0 : 1], 1, __ATOMIC_SEQ_CST);
    return real(se, buf);
}

int gil_probe_report(const char *path) {
    FILE *f = fopen(path, "w");
    if (f == NULL) return -1;
    fprintf(f, "%ld %ld %ld %ld %ld %ld\n", reply_calls[0], reply_calls[1],
            iov_calls[0], iov_calls[1], receive_calls[0], receive_calls[1]);
    return fclose(f);
}
"""

# A file system of one 4 MiB file `f` (byte i is i % 251) and its xattr user.x; a READ is
# answered with a tuple of three views (uneven, the last one empty at the end of the file).
_FS_PY = r"""
import ctypes, errno, os, stat, sys
import pyfuse3, trio

SIZE = 4 << 20
DATA = bytes(i % 251 for i in range(251)) * (SIZE // 251 + 1)

class Ops(pyfuse3.Operations):
    def _attr(self, inode):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o755, 0
        else:
            a.st_mode, a.st_size = stat.S_IFREG | 0o644, SIZE
        a.attr_timeout = a.entry_timeout = 0
        return a
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)
    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(2)
    async def opendir(self, inode, ctx):
        return inode
    async def readdir(self, fh, start, token):
        if start == 0:
            pyfuse3.readdir_reply(token, b"f", self._attr(2), 1)
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=False)
    async def read(self, fh, off, size):
        end = min(off + size, SIZE)
        cut1, cut2 = min(off + 1000, end), min(off + size // 2 + 7, end)
        view = memoryview(DATA)
        return (view[off:cut1], view[cut1:cut2], view[cut2:end])
    async def getxattr(self, inode, name, ctx):
        if name != b"user.x":
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return b"probe"
    async def listxattr(self, inode, ctx):
        return [b"user.x"]

mnt, report = sys.argv[1], sys.argv[2]
opts = set(pyfuse3.default_options)
opts.add("fsname=gilprobe")
pyfuse3.init(Ops(), mnt, opts)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
if ctypes.CDLL(None).gil_probe_report(report.encode()) != 0:
    sys.exit("gil_probe_report failed")
"""


@pytest.mark.fuse
def test_pyfuse3_replies_from_parts_and_without_the_gil(tmp_path):
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3") and shutil.which("gcc")):
        pytest.fail("needs /dev/fuse, fusermount3 and gcc (scripts/setup installs them)")
    (tmp_path / "probe.c").write_text(_PROBE_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(tmp_path / "probe.so"),
                    str(tmp_path / "probe.c"), "-ldl"], check=True, timeout=120)
    (tmp_path / "fs.py").write_text(textwrap.dedent(_FS_PY))
    mnt, report = tmp_path / "mnt", tmp_path / "report"
    mnt.mkdir()
    env = {**os.environ, "LD_PRELOAD": str(tmp_path / "probe.so")}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "fs.py"), str(mnt), str(report)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the probe file system did not mount"
            time.sleep(0.05)
        assert os.listdir(mnt) == ["f"]
        expected = bytes(i % 251 for i in range(251)) * ((4 << 20) // 251 + 1)
        fd = os.open(mnt / "f", os.O_RDONLY)
        try:
            got = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        finally:
            os.close(fd)
        assert got == expected[:4 << 20]
        assert os.getxattr(mnt / "f", "user.x") == b"probe"
        assert os.listxattr(mnt / "f") == ["user.x"]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    names = ("reply_held", "reply_free", "iov_held", "iov_free", "receive_held", "receive_free")
    counts = dict(zip(names, map(int, report.read_text().split()), strict=True))
    assert (counts["reply_held"], counts["iov_held"], counts["receive_held"]) == (0, 0, 0), counts
    # the probe saw the calls: the READs (4 MiB in requests of at most 1 MiB) as gathered
    # replies, the xattr replies as single buffers
    assert counts["iov_free"] >= 4 and counts["reply_free"] >= 2, counts
    assert counts["receive_free"] >= 8, counts
