"""Archives are never extracted outside their target: crafted archives are refused."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from dml.extract import UnsafeArchive, check_member, safe_extract
from dml.store import DML
from orchestrator import catalog


def _tar(*members: tuple[str, str, bytes | str], zstd: bool = False) -> bytes:
    """(name, kind, data-or-linkname) → tar bytes; kind is file, dir, sym, hard or fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "hard": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "dev": tarfile.CHRTYPE,
            }[kind]
            info.linkname = payload if isinstance(payload, str) else ""
            tar.addfile(info)
    raw = buf.getvalue()
    return zstandard.ZstdCompressor().compress(raw) if zstd else raw


CRAFTED = {
    "dot-dot": [("../evil", "file", "x")],
    "nested dot-dot": [("a/../../evil", "file", "x")],
    "absolute": [("/tmp/evil", "file", "x")],
    "symlink out": [("link", "sym", "../../outside")],
    "absolute symlink": [("link", "sym", "/etc")],
    "write through symlink": [("d", "sym", "."), ("d/f", "file", "x")],
    "symlink chain out": [("a", "sym", "c/.."), ("c", "sym", ".")],
    "hardlink out": [("h", "hard", "../../etc/passwd")],
    "hardlink to nothing extracted": [("h", "hard", "etc/passwd")],
    "fifo": [("pipe", "fifo", b"")],
    "device": [("dev", "dev", b"")],
    "duplicate name": [("f", "file", "x"), ("f", "file", "y")],
    "backslash": [("..\\evil", "file", "x")],
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
@pytest.mark.parametrize("zstd", [False, True], ids=["tar", "tar+zstd"])
def test_crafted_archive_is_refused_and_leaves_nothing(
    case: str, zstd: bool, tmp_path: Path
) -> None:
    dest = tmp_path / "outer" / "release"
    archive = tmp_path / "crafted"
    archive.write_bytes(_tar(*CRAFTED[case], zstd=zstd))
    with pytest.raises(UnsafeArchive):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "outer").iterdir()) == ["release"]


def test_links_inside_the_target_are_fine(tmp_path: Path) -> None:
    data = _tar(
        ("app/a.txt", "file", "hello"),
        ("app/link", "sym", "a.txt"),
        ("cfg/up", "sym", "../app/a.txt"),
        ("app/hard", "hard", "app/a.txt"),
        zstd=True,
    )
    names = safe_extract(io.BytesIO(data), tmp_path / "r")
    assert names == ["app/a.txt", "app/link", "cfg/up", "app/hard"]
    assert (tmp_path / "r" / "cfg" / "up").read_text() == "hello"


def test_a_dml_package_extracts_with_its_modes(ferry_home: Path, tmp_path: Path) -> None:
    from tests.dml.conftest import make_tree

    spec = make_tree(tmp_path / "src")
    store = DML.from_settings()
    catalog.build_release(spec, dml=store)
    pkg = store.open("shop@1.4.0")
    safe_extract(pkg.archive_path, tmp_path / "out")
    serve = tmp_path / "out" / "app" / "bin" / "serve"
    assert serve.stat().st_mode & 0o777 == 0o755
    assert serve.read_text() == "#!/bin/sh\necho serving\n"


@pytest.mark.parametrize(
    ("name", "kind", "link"),
    [
        ("../x", "file", ""),
        ("/x", "file", ""),
        ("a/./../../x", "dir", ""),
        ("l", "symlink", "/etc"),
        ("d/l", "symlink", "../../x"),
        ("h", "hardlink", "../x"),
        ("", "file", ""),
        ("dev", "other", ""),
    ],
)
def test_check_member_refuses(name: str, kind, link: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsafeArchive):
        check_member(name, kind, link)


def test_check_member_normalises_harmless_names() -> None:
    assert str(check_member("./a//b/./c", "file")) == "a/b/c"
    assert str(check_member("d/l", "symlink", "../x")) == "d/l"
