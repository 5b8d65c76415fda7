"""Three-way merge of two writers' trees (vfs/merge.py, vfs/history.merge_trees), no mount.

The property: whatever two writers do to one base version, the merge loses
no change. Every file either side added or changed is in the result (ours
possibly under a conflict name, in a folder possibly renamed the same way),
theirs exactly where it was; what one side removed and the other left alone
is gone; what neither touched is unchanged.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache.store import BlockStore
from vfs.blocks import BlockReader
from vfs.capability import WriteCap
from vfs.crypto import encrypt_chunk
from vfs.formats import KIND_DIR, KIND_FILE, KIND_LINK, MAX_NAME, Entry, build_directory
from vfs.history import changes_between, merge_trees
from vfs.merge import Recurse, conflict_name, merge_dir, same
from vfs.tree import Tree
from vfs.version_blocks import VersionBlocks

CAP = WriteCap.from_secrets(bytes(range(32)), bytes(range(32, 64)))
DEV = "ab12cd34"
DATE = "2026-12-02"
Model = dict  # name (str) -> bytes (a file) | Model (a folder)


def f(name: bytes, content: bytes, mtime: int = 0, mode: int = 0o644) -> Entry:
    ref, _ = encrypt_chunk(CAP.read_key, content)
    return Entry(name, KIND_FILE, mode, mtime, size=len(content), chunks=(ref,))


# ----------------------------------------------------------------------------- one folder


def test_the_rules_of_one_folder() -> None:
    base = [f(b"keep", b"k"), f(b"ours-edits", b"1"), f(b"theirs-edits", b"1"),
            f(b"both-edit.txt", b"1"), f(b"ours-deletes", b"1"), f(b"deleted-edited", b"1"),
            f(b"both-same", b"1")]
    ours = [f(b"keep", b"k"), f(b"ours-edits", b"2"), f(b"theirs-edits", b"1"),
            f(b"both-edit.txt", b"ours"), f(b"deleted-edited", b"2"), f(b"both-same", b"2"),
            f(b"new-ours", b"n")]
    theirs = [f(b"keep", b"k"), f(b"ours-edits", b"1"), f(b"theirs-edits", b"2"),
              f(b"both-edit.txt", b"theirs"), f(b"ours-deletes", b"1"),
              f(b"both-same", b"2", mtime=5), f(b"new-theirs", b"n")]
    dm = merge_dir(base, ours, theirs, DEV, DATE)
    got = {e.name: e for e in dm.entries}
    copy = b"both-edit (conflict ab12cd34 2026-12-02).txt"
    assert sorted(got) == sorted([b"keep", b"ours-edits", b"theirs-edits", b"both-edit.txt", copy,
                                  b"deleted-edited", b"both-same", b"new-ours", b"new-theirs"])
    assert same(got[b"ours-edits"], f(b"ours-edits", b"2"))
    assert same(got[b"theirs-edits"], f(b"theirs-edits", b"2"))
    assert same(got[b"both-edit.txt"], f(b"both-edit.txt", b"theirs"))
    assert got[copy].chunks == f(b"x", b"ours").chunks
    assert dm.conflicts == [(b"both-edit.txt", copy)] and dm.recurse == []


def test_a_folder_changed_on_both_sides_is_merged_further() -> None:
    d1, d2, d3 = (Entry(b"d", KIND_DIR, 0o755, 0, node=encrypt_chunk(CAP.read_key, t)[0])
                  for t in (b"1", b"2", b"3"))
    dm = merge_dir([d1], [d2], [d3], DEV, DATE)
    assert dm.entries == [] and [r.name for r in dm.recurse] == [b"d"]
    # a folder against a file: both kept, ours' folder renamed, keeping what ours changed
    dm = merge_dir([d1], [d2], [f(b"d", b"file")], DEV, DATE)
    assert [e.name for e in dm.entries] == [b"d"] and not dm.entries[0].is_dir
    assert dm.recurse == [Recurse(b"d (conflict ab12cd34 2026-12-02)", d1, d2, None,
                                  conflict_of=b"d")]
    # and the other way round: theirs' folder keeps the name, less what ours removed
    dm = merge_dir([d1], [f(b"d", b"file")], [d3], DEV, DATE)
    assert dm.recurse == [Recurse(b"d", d1, None, d3)]
    assert [e.name for e in dm.entries] == [b"d (conflict ab12cd34 2026-12-02)"]


def test_conflict_names() -> None:
    assert conflict_name(b"notes.txt", DEV, DATE, set()) == \
        b"notes (conflict ab12cd34 2026-12-02).txt"
    assert conflict_name(b".bashrc", DEV, DATE, set()) == b".bashrc (conflict ab12cd34 2026-12-02)"
    first = conflict_name(b"a.txt", DEV, DATE, set())
    assert conflict_name(b"a.txt", DEV, DATE, {first}) == b"a (conflict ab12cd34 2026-12-02 2).txt"
    long = "é".encode() * 120 + b".txt"  # 244 bytes: the stem is cut on a character boundary
    name = conflict_name(long, DEV, DATE, set())
    assert len(name) <= MAX_NAME and name.endswith(b").txt")
    name.decode()  # still valid UTF-8


def test_an_mtime_alone_is_no_conflict() -> None:
    base = [f(b"a", b"1")]
    dm = merge_dir(base, [f(b"a", b"2", mtime=1)], [f(b"a", b"2", mtime=2)], DEV, DATE)
    assert len(dm.entries) == 1 and dm.conflicts == []
    link = Entry(b"l", KIND_LINK, 0o777, 0, size=1, target=b"x")
    assert same(link, link) and not same(link, None) and same(None, None)


# ----------------------------------------------------------------------------- whole trees

NAMES = st.sampled_from(["a", "b", "c.txt", "d"])
CONTENT = st.sampled_from([b"", b"x", b"y", b"zz", b"w" * 100])


def models(depth: int = 3):
    leaf = CONTENT
    if depth == 0:
        return st.dictionaries(NAMES, leaf, max_size=3)
    return st.dictionaries(NAMES, st.one_of(leaf, models(depth - 1)), max_size=4)


def mutate(data: st.DataObject, tree: Model, depth: int = 3) -> Model:
    out: Model = {}
    for name, value in tree.items():
        what = data.draw(st.sampled_from(["keep", "keep", "drop", "change", "descend"]))
        if what == "keep":
            out[name] = value
        elif what == "change":
            out[name] = data.draw(CONTENT if depth == 0 else st.one_of(CONTENT, models(1)))
        elif what == "descend" and isinstance(value, dict):
            out[name] = mutate(data, value, depth - 1)
        elif what == "descend":
            out[name] = value
    for name in data.draw(st.lists(NAMES, max_size=2)):
        if name not in out:
            out[name] = data.draw(CONTENT)
    return out


def flat(tree: Model, prefix: str = "") -> dict[str, bytes | None]:
    """path -> content, folders as None."""
    out: dict[str, bytes | None] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out[prefix + name] = None
            out.update(flat(value, prefix + name + "/"))
        else:
            out[prefix + name] = value
    return out


_CONFLICT = re.compile(r" \(conflict [0-9a-f]{8} \d{4}-\d\d-\d\d( \d+)?\)")


def strip(path: str) -> str:
    return _CONFLICT.sub("", path)


class Trees:
    """Models stored as real directory nodes and file blocks in a real store."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.tree = Tree(BlockReader(store, CAP.read_key))

    def emit(self, payload: bytes):
        ref, ct = encrypt_chunk(CAP.read_key, payload)
        self.store.put(ref.block_id, ct)
        return ref

    def build(self, model: Model, name: bytes = b"root") -> Entry:
        entries = []
        for n, value in model.items():
            if isinstance(value, dict):
                entries.append(self.build(value, n.encode()))
            else:
                chunks = (self.emit(value),) if value else ()
                entries.append(Entry(n.encode(), KIND_FILE, 0o644, 0, size=len(value),
                                     chunks=chunks))
        ref = build_directory(entries, self.emit)
        return Entry(name, KIND_DIR, 0o755, 0, node=ref,
                     nsubdirs=sum(e.is_dir for e in entries), nentries=len(entries))

    async def read(self, entry: Entry) -> Model:
        out: Model = {}
        _, entries = await self.tree.read_directory(entry.node)
        for e in entries:
            if e.is_dir:
                out[e.name.decode()] = await self.read(e)
            else:
                out[e.name.decode()] = b"".join([await self.tree.blocks.read(c)
                                                 for c in e.chunks])
        return out


@pytest.fixture(scope="module")
def trees():
    with tempfile.TemporaryDirectory() as d:
        store = BlockStore(Path(d) / "store")
        try:
            yield Trees(store)
        finally:
            store.close()


def merged_model(trees: Trees, base: Model | None, ours: Model, theirs: Model) -> Model:
    async def run() -> Model:
        m = await merge_trees(trees.tree, None if base is None else trees.build(base),
                              trees.build(ours), trees.build(theirs), trees.emit, DEV, DATE)
        return await trees.read(m.root)
    return trio.run(run)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(models(), st.data())
def test_no_change_is_lost(trees: Trees, base: Model, data: st.DataObject) -> None:
    ours, theirs = mutate(data, base), mutate(data, base)
    merged = flat(merged_model(trees, base, ours, theirs))
    b, o, t = flat(base), flat(ours), flat(theirs)
    plain = {p: c for p, c in merged.items() if strip(p) == p}
    for path, content in t.items():  # theirs' changes stay exactly where they are
        if content is not None and b.get(path, 0) != content:
            assert plain.get(path) == content, (path, base, ours, theirs, merged)
    for path, content in o.items():  # ours' changes stay, maybe under a conflict name
        if content is not None and b.get(path, 0) != content:
            assert any(strip(p) == path and c == content for p, c in merged.items()), \
                (path, base, ours, theirs, merged)
    for path, content in b.items():
        if content is None:
            continue
        in_o, in_t = o.get(path, 0), t.get(path, 0)
        if in_o == content and in_t == content:  # untouched on both sides
            assert plain.get(path) == content, (path, base, ours, theirs, merged)
        elif in_o == 0 and in_t == content or in_t == 0 and in_o == content:
            assert path not in plain, (path, base, ours, theirs, merged)  # removed once
    # nothing appears that neither side had
    for path, content in merged.items():
        if content is not None:
            assert content in (o.get(strip(path)), t.get(strip(path))), (path, merged)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(models(), models())
def test_without_a_base_nothing_is_removed(trees: Trees, ours: Model, theirs: Model) -> None:
    merged = flat(merged_model(trees, None, ours, theirs))
    for side in (flat(ours), flat(theirs)):
        for path, content in side.items():
            if content is not None:
                assert any(strip(p) == path and c == content for p, c in merged.items())


def test_a_tree_merge_reads_only_what_changed_on_both_sides(trees: Trees) -> None:
    base = {"big": {str(i): b"x" for i in range(50)}, "doc.txt": b"1", "other": {"o": b"o"}}
    ours = {**base, "doc.txt": b"ours"}
    theirs = {**base, "doc.txt": b"theirs", "other": {"o": b"p"}}
    got = merged_model(trees, base, ours, theirs)
    assert got["doc.txt"] == b"theirs" and got["other"] == {"o": b"p"}
    assert got["doc (conflict ab12cd34 2026-12-02).txt"] == b"ours"
    assert got["big"] == base["big"]


def test_changes_and_blocks_of_a_version(trees: Trees) -> None:
    old = trees.build({"a": b"1", "d": {"x": b"1", "y": b"2"}, "gone": b"g"})
    new = trees.build({"a": b"2", "d": {"x": b"1", "z": b"3"}, "new": {"n": b"n"}})

    async def run():
        return (await changes_between(trees.tree, old, new, limit=10),
                await changes_between(trees.tree, None, old, limit=1),
                await VersionBlocks(trees.tree).sizes(new))
    changes, first, blocks = trio.run(run)
    assert changes.added == ["d/z", "new/"] and changes.removed == ["d/y", "gone"]
    assert changes.modified == ["a"]
    assert first.counts == {"added": 3, "removed": 0, "modified": 0} and len(first.added) == 1
    assert new.node.block_id in blocks and all(trees.store.size_of(i) == n
                                               for i, n in blocks.items())
