"""The store: write-once, idempotent, atomic under concurrency, verified on every read."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from dml.package import build_archive
from dml.sources import collect
from dml.spec import load_spec
from dml.store import DML, WriteOnceRefused
from orchestrator import catalog
from orchestrator.errors import IntegrityError, NotFound
from tests.dml.conftest import dml_files, make_tree


def _build(spec: Path, store: DML):  # type: ignore[no-untyped-def]
    s = load_spec(spec)
    with collect(spec, dict(s.units)) as src:
        return build_archive(s.name, s.version, sorted(s.units), src.files, store.tmp_dir)


def test_same_content_again_is_a_no_op_keeping_the_first_manifest(spec: Path, store: DML) -> None:
    first = store.store(_build(spec, store), {"built_at": "first"})
    before = dml_files(store.root)
    again = store.store(_build(spec, store), {"built_at": "second"})
    assert first.new and not again.new
    assert again.manifest_digest == first.manifest_digest
    assert store.open("shop@1.4.0").provenance == {"built_at": "first"}
    assert dml_files(store.root) == before  # no temp files, no extra blobs


def test_different_content_under_an_existing_version_is_refused(spec: Path, store: DML) -> None:
    catalog.build_release(spec, dml=store)
    (spec.parent / "app" / "shop" / "__init__.py").write_text("VERSION = 'changed'\n")
    before = dml_files(store.root)
    with pytest.raises(WriteOnceRefused, match="write-once: give the build a new version"):
        catalog.build_release(spec, dml=store)
    assert dml_files(store.root) == before
    assert store.open("shop@1.4.0").digest != ""


def test_write_once_refusal_through_the_cli_exits_2(spec: Path, run_ferry) -> None:
    assert run_ferry("release", "build", str(spec)).returncode == 0
    (spec.parent / "config" / "shop.toml.j2").write_text("port = 1\n")
    res = run_ferry("release", "build", str(spec))
    assert res.returncode == 2 and "already in the DML as sha256:" in res.stderr


def _writer(spec: str, root: str, tag: str, go, results) -> None:  # type: ignore[no-untyped-def]
    store = DML(Path(root))
    built = _build(Path(spec), store)
    go.wait()
    try:
        results.put((tag, store.store(built, {"writer": tag}).new))
    except WriteOnceRefused:
        results.put((tag, "refused"))


def test_concurrent_writers_store_one_package_once(tmp_path: Path) -> None:
    same_a = make_tree(tmp_path / "a")
    same_b = make_tree(tmp_path / "b")
    differs = make_tree(tmp_path / "c")
    (differs.parent / "config" / "shop.toml.j2").write_text("port = 2\n")
    root = tmp_path / "dml"
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(str(s), str(root), tag, go, results))
        for tag, s in (("a", same_a), ("b", same_b), ("c", differs))
    ]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = dict(results.get(timeout=5) for _ in procs)
    store = DML(root)
    winner = store.open("shop@1.4.0").provenance["writer"]
    if winner == "c":
        assert got == {"a": "refused", "b": "refused", "c": True}
    else:
        assert sorted(got.values(), key=str) == sorted([True, False, "refused"], key=str)
        assert got["c"] == "refused"
    assert store.verify().ok
    assert len(list(store.iter_blobs())) == 3  # one archive, manifest, signature
    assert not [f for f in dml_files(root) if "tmp" in f]


def _flip(path: Path, at: int = -20) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("role", ["archive", "manifest", "signature"])
def test_a_flipped_byte_in_a_blob_fails_open_and_verify_naming_it(
    role: str, spec: Path, store: DML, run_ferry
) -> None:
    catalog.build_release(spec, dml=store)
    digest = store.index("shop@1.4.0")[role]
    _flip(store.blob_path(digest))
    with pytest.raises(IntegrityError, match=f"{role} blob {digest}"):
        store.open("shop@1.4.0")
    res = run_ferry("dml", "verify", "-o", "json")
    assert res.returncode == 6
    problems = res.json()["details"]["problems"]
    assert {"item": f"blob {digest}", "problem": problems[0]["problem"]} in problems
    assert f"{role} of shop@1.4.0" in res.stderr


def test_a_missing_blob_is_reported(spec: Path, store: DML, run_ferry) -> None:
    catalog.build_release(spec, dml=store)
    store.blob_path(store.index("shop@1.4.0")["archive"]).unlink()
    res = run_ferry("dml", "verify")
    assert res.returncode == 6 and "archive blob sha256:" in res.stderr and "missing" in res.stderr


def test_a_file_corrupted_inside_a_recompressed_archive_is_named(spec: Path, store: DML) -> None:
    """Even with a consistent archive checksum, each file's sha256 is checked as it streams."""
    import zstandard

    catalog.build_release(spec, dml=store)
    pkg = store.open("shop@1.4.0")
    raw = zstandard.ZstdDecompressor().stream_reader(pkg.archive_path.open("rb")).read()
    tar = bytearray(raw)
    at = raw.index(b"port = {{ port }}")
    tar[at] = ord("P")
    forged = zstandard.ZstdCompressor().compress(bytes(tar))
    object.__setattr__(pkg, "archive_path", pkg.archive_path.with_name("forged"))
    pkg.archive_path.write_bytes(forged)
    with pytest.raises(IntegrityError, match="file config/shop.toml.j2 does not match"):
        for _ in pkg.iter_file_bytes():
            pass


def test_verify_passes_on_an_intact_store_and_deep_reads_every_file(
    spec: Path, store: DML, run_ferry
) -> None:
    catalog.build_release(spec, dml=store)
    res = run_ferry("dml", "verify", "--deep", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert res.json()["checked"] == {"blobs": 3, "releases": 1}


def test_open_unknown_release_is_not_found(store: DML) -> None:
    with pytest.raises(NotFound):
        store.open("shop@9.9.9")


def test_gc_removes_only_unreferenced_blobs(spec: Path, store: DML, run_ferry) -> None:
    catalog.build_release(spec, dml=store)
    referenced = set(d for d, _ in store.iter_blobs())
    orphan = store.blob_path(store._put_blob(b"left by a crashed build"))
    dry = run_ferry("dml", "gc", "-o", "json")
    assert dry.returncode == 0 and orphan.exists()
    assert dry.json()["unreferenced"] == ["sha256:" + orphan.parent.name + orphan.name]
    res = run_ferry("dml", "gc", "--yes", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert not orphan.exists()
    assert set(d for d, _ in store.iter_blobs()) == referenced
    assert run_ferry("dml", "verify").returncode == 0


def test_gc_keeps_blobs_the_cms_still_names(spec: Path, store: DML, run_ferry) -> None:
    catalog.build_release(spec, dml=store)
    archive = store.index("shop@1.4.0")["archive"]
    store.index_path("shop@1.4.0").unlink()  # the index is gone, the CMS still knows
    res = run_ferry("dml", "gc", "--yes", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert store.blob_path(archive).exists()


@pytest.fixture
def new_process(monkeypatch):
    """What a later command sees: no hash remembered in memory, hash_file's calls counted."""
    import dml.store

    read: list[Path] = []

    def counted(path, *a, **k):  # type: ignore[no-untyped-def]
        read.append(Path(path))
        return real(path, *a, **k)

    real = dml.store.hash_file
    monkeypatch.setattr(dml.store, "hash_file", counted)

    def fresh() -> list[Path]:
        dml.store._HASHED.clear()
        read.clear()
        return read

    return fresh


def test_a_later_command_does_not_hash_an_unchanged_archive_again(
    spec: Path, store: DML, new_process
) -> None:
    catalog.build_release(spec, dml=store)
    digest = store.index("shop@1.4.0")["archive"]
    archive = store.blob_path(digest)
    read = new_process()
    DML(store.root).open("shop@1.4.0")
    assert read == []  # hashed on its way to disk; its identity is what it was then
    (store.hashed_dir / digest.removeprefix("sha256:")).unlink()  # as before stamps
    read = new_process()
    DML(store.root).open("shop@1.4.0")
    assert read == [archive]  # hashed in full once
    read = new_process()
    DML(store.root).open("shop@1.4.0")
    assert read == []


def test_an_archive_written_after_it_was_hashed_is_hashed_again_and_refused(
    spec: Path, store: DML, new_process
) -> None:
    catalog.build_release(spec, dml=store)
    digest = store.index("shop@1.4.0")["archive"]
    store.open("shop@1.4.0")
    _flip(store.blob_path(digest))  # the write moves its ctime: the stamp no longer matches
    read = new_process()
    with pytest.raises(IntegrityError, match=f"archive blob {digest} is corrupt"):
        DML(store.root).open("shop@1.4.0")
    assert read == [store.blob_path(digest)]


def test_verify_rereads_every_blob_and_drops_a_forged_stamp(
    spec: Path, store: DML, new_process
) -> None:
    """The limit of the stamps, in docs/dml.md: a writer who alters a blob and forges its
    stamp too gets past open (what a host receives is still checked object by object);
    `ferry dml verify` reads every blob, finds it and drops the stamp."""
    catalog.build_release(spec, dml=store)
    digest = store.index("shop@1.4.0")["archive"]
    path = store.blob_path(digest)
    store.open("shop@1.4.0")
    _flip(path)
    st = path.stat()
    stamp = store.hashed_dir / digest.removeprefix("sha256:")
    stamp.write_text(f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}")
    new_process()
    DML(store.root).open("shop@1.4.0")  # forged: not read
    report = DML(store.root).verify()
    assert [p["item"] for p in report.problems] == [f"blob {digest}"]
    assert not stamp.exists()
    new_process()
    with pytest.raises(IntegrityError, match="is corrupt"):
        DML(store.root).open("shop@1.4.0")
