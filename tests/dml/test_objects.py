"""The orchestrator's framing of a package's objects: what a host is sent, from one pass
over the verified DML archive, without writing the objects out one by one."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from dml.store import DML
from orchestrator.errors import IntegrityError
from orchestrator.objects import STREAMED_NEEDS, ObjectCache, need_ahead
from tests.dml.conftest import write
from tests.dml.test_store import _build

SPEC = "name: shop\nversion: 2.0.0\nunits:\n  app: {source: app}\n"


def _package(tmp_path: Path, store: DML):  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    write(src / "app" / "a.bin", b"A" * 70_000)
    write(src / "app" / "same-as-a.bin", b"A" * 70_000)  # one object, two paths
    write(src / "app" / "b.txt", "bee\n")
    for i in range(6):
        write(src / "app" / "many" / f"f{i}", f"file {i}\n" * (i + 1))
    store.store(_build(write(src / "release.yaml", SPEC), store), {})
    return store.open("shop@2.0.0")


def _parse(path: Path) -> dict[str, bytes]:
    """The frames a host reads: `<sha256> <size>\\n<bytes>` … `END\\n`, each checked."""
    frames, out, pos = path.read_bytes(), {}, 0
    while True:
        end = frames.index(b"\n", pos)
        head = frames[pos:end].decode()
        if head == "END":
            assert end + 1 == len(frames)
            return out
        sha, size = head.split()
        data = frames[end + 1 : end + 1 + int(size)]
        assert hashlib.sha256(data).hexdigest() == sha and sha not in out
        out[sha] = data
        pos = end + 1 + int(size)


def test_frames_come_straight_from_the_archive_each_object_once(tmp_path, store):
    pkg = _package(tmp_path, store)
    cache = ObjectCache(pkg, tmp_path / "cache")
    every = sorted({f.sha256 for f in pkg.files})
    assert len(every) == len(pkg.files) - 1  # the two equal files are one object
    sent = _parse(cache.frames([f.sha256 for f in pkg.files]))
    assert sorted(sent) == every
    few = [f.sha256 for f in pkg.files if f.path.endswith(("b.txt", "f3"))]
    assert sorted(_parse(cache.frames(few))) == sorted(few)
    # hosts needing the same objects share one file; no object was written on its own
    assert cache.frames(list(reversed(few))) == cache.frames(few)
    assert not (tmp_path / "cache" / "objects").exists()
    cache.close()
    assert not (tmp_path / "cache" / "frames").exists()


def test_past_a_few_distinct_needs_the_objects_are_extracted_once(tmp_path, store):
    pkg = _package(tmp_path, store)
    cache = ObjectCache(pkg, tmp_path / "cache")
    shas = sorted({f.sha256 for f in pkg.files})
    needs = [shas[i : i + 2] for i in range(STREAMED_NEEDS + 2)]
    for need in needs[:STREAMED_NEEDS]:
        for _host in range(3):  # hosts asking the same need again count once
            assert sorted(_parse(cache.frames(need))) == need
    assert not (tmp_path / "cache" / "objects").exists()
    for need in needs[STREAMED_NEEDS:]:
        assert sorted(_parse(cache.frames(need))) == need
    assert sorted(p.name for p in (tmp_path / "cache" / "objects").iterdir()) == shas


def test_an_archive_changed_after_it_was_opened_frames_nothing(tmp_path, store):
    pkg = _package(tmp_path, store)
    cache = ObjectCache(pkg, tmp_path / "cache")
    blob = bytearray(pkg.archive_path.read_bytes())
    blob[-40] ^= 1  # in the last frame's compressed bytes
    pkg.archive_path.chmod(0o644)
    pkg.archive_path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        cache.frames([f.sha256 for f in pkg.files])
    assert list((tmp_path / "cache" / "frames").iterdir()) == []  # no half-written frames


def test_an_object_not_in_the_package_is_never_framed(tmp_path, store):
    cache = ObjectCache(_package(tmp_path, store), tmp_path / "cache")
    with pytest.raises(ValueError, match="not in shop@2.0.0"):
        cache.frames(["0" * 64])


@pytest.mark.parametrize(
    ("priors", "guess"),
    [
        ([None, None], ["a", "b", "c"]),  # cold: everything
        ([{"a", "b"}, {"a", "b"}, None], ["c"]),  # the most common need wins
        ([{"a", "b", "c"}], []),  # nothing to send
        ([{"x"}, {"a"}, {"a"}], ["b", "c"]),  # objects the package lacks change nothing
        ([], []),
    ],
)
def test_what_a_wave_will_need_is_guessed_from_what_each_host_runs(priors, guess):
    hosts = Counter(None if p is None else frozenset(p) for p in priors)  # as the executor counts
    assert need_ahead(["a", "b", "c"], hosts) == guess


def test_a_need_framed_ahead_is_the_one_the_hosts_get_and_is_made_once(tmp_path, store):
    pkg = _package(tmp_path, store)
    cache = ObjectCache(pkg, tmp_path / "cache")
    passes = []
    real = cache._frame_from_archive
    cache._frame_from_archive = lambda wanted, out: passes.append(1) or real(wanted, out)  # type: ignore[method-assign]
    few = [f.sha256 for f in pkg.files if f.path.endswith(("b.txt", "f3"))]
    cache.frame_ahead(few)
    cache.frame_ahead([f.sha256 for f in pkg.files])  # one guess per run
    path = cache.frames(list(reversed(few)))  # a host asking while it is made waits for it
    assert sorted(_parse(path)) == sorted(few) and passes == [1]
    cache.close()  # waits for the guess, then removes what it made
    assert not (tmp_path / "cache" / "frames").exists()


def test_a_stored_package_is_unpacked_once_and_gc_drops_what_no_release_lists(tmp_path, store):
    pkg = _package(tmp_path, store)
    objects = store.objects_dir
    assert sorted(p.name for p in objects.iterdir()) == sorted({f.sha256 for f in pkg.files})
    for f in pkg.files:
        assert hashlib.sha256((objects / f.sha256).read_bytes()).hexdigest() == f.sha256
    stray = objects / ("0" * 64)  # unpacked for a release since removed
    stray.write_bytes(b"old")
    report = store.gc(delete=True)
    assert report.removed == [f"object {stray.name}"] and not stray.exists()
    assert len(list(objects.iterdir())) == len({f.sha256 for f in pkg.files})


def test_frames_come_from_the_unpacked_objects_and_a_damaged_one_is_never_sent(tmp_path, store):
    pkg = _package(tmp_path, store)
    few = [f.sha256 for f in pkg.files if f.path.endswith(("b.txt", "f3"))]
    for damaged in (False, True):
        cache = ObjectCache(pkg, tmp_path / f"cache-{damaged}", store=store.objects_dir)
        passes: list[int] = []
        real = cache._frame_from_archive
        cache._frame_from_archive = lambda w, o, r=real, p=passes: p.append(1) or r(w, o)  # type: ignore[method-assign]
        if damaged:  # same size, other bytes: its hash, not its size, gives it away
            (store.objects_dir / few[0]).write_bytes(b"x" * cache.sizes[few[0]])
        sent = _parse(cache.frames(few))
        assert sorted(sent) == sorted(few)
        assert all(hashlib.sha256(d).hexdigest() == s for s, d in sent.items())
        assert passes == ([1] if damaged else [])  # the archive only when an object failed
        cache.close()
