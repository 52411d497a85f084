"""Image release units: a container image as content-addressed blobs in the DML.

An image unit (`units: {web: {image: NAME:TAG}}` read from the local Docker engine, or
`{image: docker-archive:FILE}`) is read as a docker-save archive. In OCI image-layout terms
its config and every layer become DML blobs (`blobs/sha256/…`): the config named by its
sha256 (the image ID), each layer by the sha256 of its uncompressed tar (its diff_id), so a
layer shared by two images, or two releases, is stored and sent once. The package content
lists them under `images`, so the signed manifest covers every digest:

    "images": {"web": {"config": {"digest": "sha256:…", "size": N},
                       "layers": [{"digest": "sha256:…", "size": N}, …]}}

Nothing else about the source (its file name, its tags) enters the content: the same image
gives the same package digest on every rebuild. `verify_blobs` re-hashes the blobs a
package names (a tampered layer is an IntegrityError, exit 6, before any host is touched).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dml.digest import CHUNK, hex_of
from dml.fsutil import move_into_place
from orchestrator.errors import IntegrityError, SpecError

ARCHIVE_PREFIX = "docker-archive:"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class ImageRecord:
    """What a package's content says of one image unit."""

    config: Blob
    layers: tuple[Blob, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "layers": [b.to_dict() for b in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        return cls(
            Blob(str(d["config"]["digest"]), int(d["config"]["size"])),
            tuple(Blob(str(b["digest"]), int(b["size"])) for b in d["layers"]),
        )

    @property
    def image_id(self) -> str:
        return self.config.digest

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)


def images_of(content: dict[str, Any]) -> dict[str, ImageRecord]:
    """The image units of a package's content (none for a files-only package)."""
    return {k: ImageRecord.from_dict(v) for k, v in sorted((content.get("images") or {}).items())}


BlobPath = Callable[[str], Path]


def _sha_copy(src: IO[bytes], dest: IO[bytes], size: int) -> str:
    h, left = hashlib.sha256(), size
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise OSError("archive ended inside a member")
        h.update(chunk)
        dest.write(chunk)
        left -= len(chunk)
    return "sha256:" + h.hexdigest()


def _put(tmp_dir: Path, blob_path: BlobPath, src: IO[bytes], size: int, want: str | None) -> Blob:
    """Copy one member into the DML as a write-once blob; its digest must be `want`."""
    handle, name = tempfile.mkstemp(dir=tmp_dir, prefix=".image-")
    tmp = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            digest = _sha_copy(src, out, size)
            out.flush()
            os.fsync(out.fileno())
        if want is not None and digest != want:
            raise ValueError(f"layer hashes to {digest}, its diff_id is {want}")
        move_into_place(tmp, blob_path(digest))  # no-op when the blob is already stored
        return Blob(digest, size)
    finally:
        tmp.unlink(missing_ok=True)


def store_archive(
    archive: Path, tmp_dir: Path, blob_path: BlobPath, *, where: tuple[str, str]
) -> ImageRecord:
    """Store a docker-save archive's config and layers as blobs; `where` = (file, field)
    of the spec, for the error message."""
    spec, fld = where

    def refuse(problem: str, fix: str) -> SpecError:
        return SpecError(spec, fld, problem, fix)

    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(archive, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise refuse(
            f"{archive} is not a docker-save archive ({exc})", "give `docker save`'s output"
        ) from None
    with tar:
        try:
            manifest = json.load(_member(tar, "manifest.json"))
            if not isinstance(manifest, list) or len(manifest) != 1:
                raise refuse(
                    f"{archive} holds {len(manifest) if isinstance(manifest, list) else 0} "
                    "images; an image unit is exactly one",
                    "save one image per archive",
                )
            entry = manifest[0]
            config_info = tar.getmember(entry["Config"])
            config_bytes = _member(tar, entry["Config"]).read()
            config = json.loads(config_bytes)
            diff_ids = list(config["rootfs"]["diff_ids"])
            layer_names = list(entry["Layers"])
        except (KeyError, ValueError, TypeError) as exc:
            raise refuse(
                f"{archive}: manifest or config unreadable ({exc})", "give `docker save`'s output"
            ) from None
        if len(diff_ids) != len(layer_names):
            raise refuse(
                f"{archive}: {len(layer_names)} layers for {len(diff_ids)} diff_ids",
                "save it again",
            )
        for name in layer_names:  # all there before a blob is stored: none left orphaned
            try:
                tar.getmember(name)
            except KeyError:
                raise refuse(f"{archive} lacks layer {name}", "save the whole image") from None
        with open(_spool(config_bytes, tmp_dir), "rb") as fh:
            try:
                cfg = _put(tmp_dir, blob_path, fh, config_info.size, None)
            finally:
                os.unlink(fh.name)
        layers = []
        for name, diff_id in zip(layer_names, diff_ids, strict=True):
            try:
                info = tar.getmember(name)
                src = tar.extractfile(info)
                if src is None:
                    raise KeyError(name)
                layers.append(_put(tmp_dir, blob_path, src, info.size, diff_id))
            except KeyError:
                raise refuse(f"{archive} lacks layer {name}", "save the whole image") from None
            except ValueError as exc:
                raise refuse(
                    f"{archive}: {exc} (compressed layers are not taken)",
                    "give `docker save`'s output (uncompressed layers)",
                ) from None
    return ImageRecord(cfg, tuple(layers))


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    got = tar.extractfile(name)
    if got is None:
        raise KeyError(name)
    return got


def _spool(data: bytes, tmp_dir: Path) -> str:
    handle, name = tempfile.mkstemp(dir=tmp_dir, prefix=".config-")
    with os.fdopen(handle, "wb") as fh:
        fh.write(data)
    return name


@contextmanager
def saved_from_engine(ref: str, tmp_dir: Path, where: tuple[str, str]) -> Iterator[Path]:
    """`NAME:TAG` from the local Docker engine (DOCKER_HOST) as a docker-save archive."""
    import docker  # heavy; only for image units read from an engine
    import docker.errors

    spec, fld = where
    tmp_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=tmp_dir, prefix=".save-", suffix=".tar")
    path = Path(name)
    try:
        try:
            client = docker.from_env()
            image = client.images.get(ref)
            with os.fdopen(handle, "wb") as out:
                for chunk in image.save(named=False):
                    out.write(chunk)
        except docker.errors.ImageNotFound:
            raise SpecError(
                spec,
                fld,
                f"no image {ref!r} in the local Docker engine",
                "build or load it first, or use docker-archive:FILE",
            ) from None
        except docker.errors.DockerException as exc:
            raise SpecError(
                spec,
                fld,
                f"cannot read {ref!r} from the Docker engine: {exc}",
                "check DOCKER_HOST, or use docker-archive:FILE",
            ) from None
        yield path
    finally:
        path.unlink(missing_ok=True)


def store_image(
    source: str, spec_path: Path, unit: str, tmp_dir: Path, blob_path: BlobPath
) -> tuple[ImageRecord, dict[str, Any]]:
    """One image unit into the DML: (its record, its provenance)."""
    where = (str(spec_path), f"units.{unit}.image")
    if source.startswith(ARCHIVE_PREFIX):
        archive = (spec_path.parent / source[len(ARCHIVE_PREFIX) :]).resolve()
        if not archive.is_file():
            raise SpecError(
                *where,
                f"{archive} is not a file (paths are relative to the spec file)",
                "check the path",
            )
        record = store_archive(archive, tmp_dir, blob_path, where=where)
        return record, {"image": source, "archive": str(archive)}
    with saved_from_engine(source, tmp_dir, where) as archive:
        record = store_archive(archive, tmp_dir, blob_path, where=where)
    return record, {"image": source, "engine": os.environ.get("DOCKER_HOST", "default")}


def verify_blobs(
    release: str,
    content: dict[str, Any],
    blob_path: BlobPath,
    hashed: Callable[[Path, str], bool],
    remember: Callable[[Path, str], None],
) -> None:
    """Every image blob the content names exists and hashes to its digest."""
    for unit, record in images_of(content).items():
        for blob in record.blobs:
            path = blob_path(blob.digest)
            if not path.is_file():
                raise IntegrityError(f"{release}: image {unit}: blob {blob.digest} is missing")
            want = hex_of(blob.digest)
            if hashed(path, want):
                continue
            h, size = hashlib.sha256(), 0
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            if h.hexdigest() != want or size != blob.size:
                raise IntegrityError(
                    f"{release}: image {unit}: blob {blob.digest} is corrupt "
                    f"(its bytes hash to sha256:{h.hexdigest()})"
                )
            remember(path, want)


# --- writing docker-save archives (lab test images, the benchmark's baseline) ------------


def write_archive(
    out: IO[bytes], config: bytes, layers: list[Path], tags: list[str] | None = None
) -> None:
    """A docker-save archive (manifest.json, config, layer tars) that `docker load` reads."""
    config_hex = hashlib.sha256(config).hexdigest()
    names = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        _add_bytes(tar, f"{config_hex}.json", config)
        for layer in layers:
            h = _file_sha(layer)
            name = f"{h}/layer.tar"
            info = tarfile.TarInfo(name)
            info.size, info.mode = layer.stat().st_size, 0o644
            with open(layer, "rb") as fh:
                tar.addfile(info, fh)
            names.append(name)
        manifest = [{"Config": f"{config_hex}.json", "RepoTags": tags or None, "Layers": names}]
        _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def image_config(
    diff_ids: list[str], cmd: list[str], created: str = "1970-01-01T00:00:00Z"
) -> bytes:
    """A minimal image config (deterministic: fixed creation time, sorted keys)."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": "ferry lab"} for _ in diff_ids],
    }
    return json.dumps(config, sort_keys=True).encode()


def add_images(
    built: Any,
    spec_path: Path,
    units: dict[str, Any],
    dml: Any,
    provenance: dict[str, Any],
    say: Callable[[str], None],
) -> Any:
    """The built archive with the spec's image units stored and listed in its content
    (unchanged when there are none, so files-only digests stay what they were)."""
    import dataclasses

    from dml.digest import content_digest

    wanted = {name: u.image for name, u in sorted(units.items()) if u.image is not None}
    if not wanted:
        return built
    images = {}
    for name, source in wanted.items():
        record, prov = store_image(source, spec_path, name, dml.tmp_dir, dml.blob_path)
        size = sum(b.size for b in record.layers)
        say(f"  image {name}: {len(record.layers)} layers, {size} bytes, {record.image_id[:19]}")
        images[name] = record.to_dict()
        # the image ID here too: `ferry status` reads provenance from the CMS package row
        provenance[name] = {**prov, "image_id": record.image_id, "layers": len(record.layers)}
    content = {**built.content, "images": images}
    return dataclasses.replace(built, content=content, digest=content_digest(content))


def image_index(content: dict[str, Any]) -> dict[str, Any]:
    """The index's list of image blobs (what gc keeps, what verify names), if any."""
    digests = sorted({b.digest for r in images_of(content).values() for b in r.blobs})
    return {"images": digests} if digests else {}
