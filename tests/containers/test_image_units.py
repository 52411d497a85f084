"""Image release units in the DML: config and layers as blobs, signed, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dml.image import images_of
from dml.store import DML
from orchestrator import catalog
from orchestrator.errors import IntegrityError
from orchestrator.lab.docker import test_image as make_image
from tests.dml.conftest import write

SPEC = """\
name: web
version: "{version}"
units:
  web: {{image: "docker-archive:web.tar"}}
  conf: {{source: conf}}
"""


def _tree(root: Path, version: str = "1", app: str = "1") -> Path:
    make_image(root / "web.tar", app)
    write(root / "conf" / "web.toml", f"app = {app}\n")
    return write(root / "release.yaml", SPEC.format(version=version))


def test_image_unit_stores_config_and_layers_as_blobs_covered_by_the_signed_manifest(
    tmp_path: Path, ferry_home: Path
) -> None:
    spec = _tree(tmp_path / "src")
    out = catalog.build_release(spec)
    dml = DML.from_settings()
    pkg = dml.open(out["release"])
    images = images_of(pkg.content)
    assert list(images) == ["web"] and out["units"] == ["conf", "web"]
    record = images["web"]
    assert len(record.layers) == 2
    # each layer is stored under the sha256 of its uncompressed tar: its diff_id
    config = json.loads(dml.blob_path(record.config.digest).read_bytes())
    assert config["rootfs"]["diff_ids"] == [b.digest for b in record.layers]
    for blob in record.blobs:
        assert dml.blob_path(blob.digest).stat().st_size == blob.size
    signed = json.loads(pkg.manifest_bytes)["content"]["images"]["web"]
    assert signed == record.to_dict()
    assert set(dml.index(out["release"])["images"]) == {b.digest for b in record.blobs}
    assert dml.gc().unreferenced == []  # every image blob is referenced by the index
    assert [f.path for f in pkg.files] == ["conf/web.toml"]


def test_rebuild_of_the_same_image_gives_the_same_package_digest(
    tmp_path: Path, ferry_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = catalog.build_release(_tree(tmp_path / "a"))
    other = tmp_path / "other-home"
    monkeypatch.setenv("FERRY_HOME", str(other))
    from orchestrator.settings import reset_settings

    reset_settings()
    b = catalog.build_release(_tree(tmp_path / "b"))
    assert a["digest"] == b["digest"]
    c = catalog.build_release(_tree(tmp_path / "c", version="2", app="2"))
    assert c["digest"] != a["digest"]


def test_a_tampered_layer_blob_is_refused_on_open(tmp_path: Path, ferry_home: Path) -> None:
    out = catalog.build_release(_tree(tmp_path / "src"))
    dml = DML.from_settings()
    layer = images_of(dml.open(out["release"]).content)["web"].layers[1]
    path = dml.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="image web: blob .* is corrupt"):
        dml.open(out["release"])
    assert not dml.verify().ok


def test_spec_errors_for_image_units_name_the_field(tmp_path: Path, run_ferry) -> None:
    src = tmp_path / "src"
    write(
        src / "release.yaml",
        'name: w\nversion: "1"\nunits:\n  web: {image: "docker-archive:no.tar"}\n',
    )
    res = run_ferry("release", "build", str(src / "release.yaml"))
    assert res.returncode == 2
    assert "units.web.image" in res.stderr and "no.tar is not a file" in res.stderr
    assert "Traceback" not in res.stderr
    write(src / "release.yaml", 'name: w\nversion: "1"\nunits:\n  web: {image: x, git: y}\n')
    res = run_ferry("release", "build", str(src / "release.yaml"))
    assert res.returncode == 2 and "exactly one of" in res.stderr


def test_an_image_unit_refused_leaves_no_key_archive_or_blob_behind(
    tmp_path: Path, run_ferry, ferry_home: Path
) -> None:
    import io
    import tarfile

    src = tmp_path / "src"
    make_image(tmp_path / "outside.tar", "1")  # a good archive, but not in the spec's tree
    write(
        src / "release.yaml",
        'name: w\nversion: "1"\nunits:\n  web: {image: "docker-archive:../outside.tar"}\n',
    )
    res = run_ferry("release", "build", str(src / "release.yaml"))
    assert res.returncode == 2 and "outside the spec's directory" in res.stderr, res.stderr
    # a docker-save archive whose manifest names a layer it does not hold
    with tarfile.open(src / "web.tar", "w") as tar:
        for name, data in {
            "manifest.json": json.dumps([{"Config": "c.json", "Layers": ["l1/layer.tar"]}]),
            "c.json": json.dumps({"rootfs": {"diff_ids": ["sha256:" + "0" * 64]}}),
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data.encode()))
    write(
        src / "release.yaml",
        'name: w\nversion: "1"\nunits:\n  web: {image: "docker-archive:web.tar"}\n',
    )
    res = run_ferry("release", "build", str(src / "release.yaml"))
    assert res.returncode == 2 and "lacks layer l1/layer.tar" in res.stderr, res.stderr
    dml = ferry_home / ".ferry" / "dml"
    left = [p.relative_to(dml) for p in dml.rglob("*") if p.is_file()] if dml.exists() else []
    assert left == [], f"left behind: {left}"
