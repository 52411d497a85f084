"""Building packages: deterministic digests and archives, content record, provenance."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from dml.digest import canonical, content_digest
from dml.store import DML
from orchestrator import catalog
from tests.dml.conftest import make_tree, write


def test_same_inputs_give_same_digest_and_archive_from_another_cwd_and_time(
    spec: Path, tmp_path: Path, run_ferry, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run_ferry("release", "build", str(spec), "--output", "json")
    assert first.returncode == 0, first.stderr
    a = first.json()
    time.sleep(1.1)
    for f in spec.parent.rglob("*"):  # new mtimes must not matter
        os.utime(f, None)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    second = run_ferry(
        "release",
        "build",
        str(spec),
        "-o",
        "json",
        env={"FERRY_HOME": str(other / ".ferry")},
    )
    assert second.returncode == 0, second.stderr
    b = second.json()
    assert a["release"] == b["release"] == "shop@1.4.0"
    assert a["digest"] == b["digest"] and a["digest"].startswith("sha256:")
    assert a["archive_digest"] == b["archive_digest"]
    assert a["new"] and b["new"] and a["status"] == "registered"
    assert a["files"] == 4 and a["units"] == ["app", "config"]


def test_one_changed_byte_changes_the_digest(spec: Path, store: DML) -> None:
    a = catalog.build_release(spec, dml=store)
    logo = spec.parent / "app" / "static" / "logo.bin"
    data = bytearray(logo.read_bytes())
    data[100] ^= 1
    logo.write_bytes(bytes(data))
    b = catalog.build_release(spec, version="1.4.1", dml=store)
    assert a["digest"] != b["digest"]
    changed = {f.path: f.sha256 for f in store.open("shop@1.4.1").files}
    before = {f.path: f.sha256 for f in store.open("shop@1.4.0").files}
    assert [p for p in changed if changed[p] != before[p]] == ["app/static/logo.bin"]


def test_content_record_is_the_fixed_package_format(spec: Path, store: DML) -> None:
    res = catalog.build_release(spec, dml=store)
    pkg = store.open(res["release"])
    c = pkg.content
    assert c["format"] == "ferry-package/1" and c["release"] == "shop@1.4.0"
    assert c["units"] == ["app", "config"]
    assert [f["path"] for f in c["files"]] == [
        "app/bin/serve",
        "app/shop/__init__.py",
        "app/static/logo.bin",
        "config/shop.toml.j2",
    ]
    modes = {f["path"]: f["mode"] for f in c["files"]}
    assert modes["app/bin/serve"] == 0o755 and modes["config/shop.toml.j2"] == 0o644
    assert pkg.digest == "sha256:" + hashlib.sha256(canonical(c)).hexdigest()
    assert pkg.digest == content_digest(c) == res["digest"]
    assert pkg.manifest["archive"]["format"] == "tar+zstd"
    assert pkg.manifest["key_id"] == hashlib.sha256(store.public_key_bytes()).hexdigest()[:16]
    prov = pkg.provenance
    assert prov["builder"]["actor"] == "alice" and prov["built_at"]
    assert "provenance" not in c and "built_at" not in str(c)


def test_archive_is_a_plain_normalised_tar(spec: Path, store: DML) -> None:
    catalog.build_release(spec, dml=store)
    pkg = store.open("shop@1.4.0")
    raw = zstandard.ZstdDecompressor().stream_reader(pkg.archive_path.open("rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f.path for f in pkg.files]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert [m.mode for m in members] == [f.mode for f in pkg.files]


def test_iter_files_streams_verified_content(spec: Path, store: DML) -> None:
    catalog.build_release(spec, dml=store)
    pkg = store.open("shop@1.4.0")
    got = dict((e.path, data) for e, data in pkg.iter_file_bytes())
    assert got["config/shop.toml.j2"] == b"port = {{ port }}\n"
    wanted = {f.sha256 for f in pkg.files if f.path == "app/bin/serve"}
    assert [e.path for e, _ in pkg.iter_file_bytes(wanted)] == ["app/bin/serve"]


def test_without_leaves_a_unit_out(spec: Path, run_ferry) -> None:
    res = run_ferry("release", "build", str(spec), "--without", "config", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert res.json()["units"] == ["app"] and res.json()["files"] == 3


def test_git_ref_unit_packages_that_commit_and_records_it(tmp_path: Path, store: DML) -> None:
    assert shutil.which("git"), "git is needed (it comes with the checkout; .ci/bootstrap)"
    repo = tmp_path / "schema"
    write(repo / "migrations" / "0001.sql", "create table t (id int);\n")
    write(repo / "migrations" / "run.sh", "#!/bin/sh\n", 0o755)
    write(repo / "README", "not in the unit\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "v1"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    write(repo / "migrations" / "0002.sql", "later\n")  # not committed: must not be packaged
    spec = make_tree(
        tmp_path / "src",
        "name: shop\nversion: '2'\nunits:\n"
        "  schema: {git: ../schema, ref: v1, path: migrations}\n"
        "  app: {source: app}\n",
    )
    res = catalog.build_release(spec, dml=store)
    pkg = store.open(res["release"])
    files = {f.path: f for f in pkg.files}
    assert {"schema/0001.sql", "schema/run.sh"} <= set(files) and "schema/0002.sql" not in files
    assert files["schema/run.sh"].mode == 0o755
    assert pkg.provenance["units"]["schema"]["git"]["commit"] == commit.strip()
    assert dict(pkg.iter_file_bytes())  # every file verifies on the way out
    # no `path`: the commit's whole tree (it was refused, naming a field never written)
    whole = make_tree(
        tmp_path / "src2", "name: shop\nversion: '3'\nunits:\n  schema: {git: ../schema, ref: v1}\n"
    )
    files = {f.path for f in store.open(catalog.build_release(whole, dml=store)["release"]).files}
    assert files == {"schema/README", "schema/migrations/0001.sql", "schema/migrations/run.sh"}


def test_ci_variables_are_recorded_in_provenance(spec: Path, run_ferry) -> None:
    res = run_ferry(
        "release",
        "build",
        str(spec),
        "-o",
        "json",
        env={
            "CI_PIPELINE_ID": "77",
            "CI_JOB_ID": "901",
            "CI_JOB_TOKEN": "secret",
            "GITHUB_RUN_ID": "5",
            "GITHUB_SHA": "abc",
        },
    )
    assert res.returncode == 0, res.stderr
    pkg = DML.from_settings().open("shop@1.4.0")
    ci = pkg.provenance["ci"]
    assert ci["gitlab"] == {"CI_PIPELINE_ID": "77", "CI_JOB_ID": "901"}
    assert ci["github"] == {"GITHUB_RUN_ID": "5", "GITHUB_SHA": "abc"}


@pytest.mark.parametrize(
    ("path", "size", "mode"),
    [
        ("app/x.py", 10, 0o644),
        ("a" * 100, 0, 0o755),
        ("c/big.bin", 8**11 - 1, 0o644),
        ("é/unicode", 1, 0o644),
        ("long/" * 30 + "name", 5, 0o755),
    ],
)
def test_fast_tar_header_is_what_tarfile_writes(path: str, size: int, mode: int) -> None:
    from dml.package import pax_header, tar_header

    assert tar_header(path, size, mode) == pax_header(path, size, mode)
