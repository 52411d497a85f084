"""Image release units deployed to real Docker engines on lab hosts (4 hosts, each its own
dockerd): phased rollout by image digest, only missing layers sent, health check as part
of the milestone, backout to the prior container with the volume's data restored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from dml.image import images_of
from dml.store import DML
from orchestrator import catalog
from orchestrator.cms.models import Deployment, HostStep
from orchestrator.lab import docker as lab_docker
from orchestrator.lab.docker import test_image as make_image
from tests.deploy.helpers import cms, deploy, host_release, rfc, rid

pytestmark = pytest.mark.fleet

HEALTH = "test ! -e /data/broken && wget -qO- http://127.0.0.1:8081/ok"
HOOKS = {
    "snapshot": "mkdir -p {{ shared }}/data && cp -a {{ shared }}/data/. {{ snapshot_dir }}/",
    "install": "mkdir -p {{ shared }}/data && echo {{ version }} > {{ shared }}/data/schema",
    "restore": "rm -rf {{ shared }}/data && mkdir -p {{ shared }}/data && "
    "cp -a {{ snapshot_dir }}/. {{ shared }}/data/",
}


def build_web(work: Path, version: str, healthy: bool = True) -> dict[str, Any]:
    """web@version: an image unit (busybox httpd) and a file unit (conf)."""
    src = work / f"web-{version}"
    make_image(src / "web.tar", version, healthy=healthy)
    (src / "conf").mkdir(parents=True, exist_ok=True)
    (src / "conf" / "web.toml").write_text(f"version = {version!r}\n")
    spec = {
        "name": "web",
        "version": version,
        "units": {"web": {"image": "docker-archive:web.tar"}, "conf": {"source": "conf"}},
    }
    (src / "release.yaml").write_text(yaml.safe_dump(spec))
    return catalog.build_release(src / "release.yaml")


def web_plan(work: Path, fleet, name: str = "plan.yaml", **fields: Any) -> Path:
    doc: dict[str, Any] = {
        "environment": "dev",
        "inventory": str(fleet.inventory_path),
        "targets": "all",
        "strategy": "phased",
        "waves": [1, 2, "100%"],
        "hooks": HOOKS,
        "containers": {
            "web": {
                "volumes": ["/srv/app/shared/data:/data"],
                "health": HEALTH,
                "health_timeout": "20s",
                "env": {"MODE": "test", "API_TOKEN": "s3cr3t-value"},
            }
        },
        "milestone": {"max_failed": 0, "deadline": "180s"},
        "timeouts": {"step": "60s", "connect": "5s"},
    }
    doc.update(fields)
    path = work / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def image_id(release: str) -> str:
    return images_of(DML.from_settings().open(release).content)["web"].image_id


def running(fleet, host: str) -> tuple[str, bool] | None:
    out = lab_docker.docker(
        fleet, host, "inspect", "--format", "{{.Image}} {{.State.Running}}", "ferry-web",
        check=False,
    )  # fmt: skip
    if not out.strip():
        return None
    image, state = out.split()
    return image, state == "true"


def stage_details(deployment: int) -> dict[str, dict[str, Any]]:
    rows = cms(
        lambda s: [
            (r.host, r.detail)
            for r in s.scalars(
                select(HostStep).where(
                    HostStep.deployment_id == deployment, HostStep.step == "stage"
                )
            )
        ]
    )
    return {host: detail or {} for host, detail in rows}


def test_phased_image_deployment_runs_the_image_by_digest_and_sends_only_missing_layers(
    clean_docker, run_ferry
):
    fleet, work = clean_docker, Path.cwd()
    v1 = build_web(work, "1")
    first = deploy(run_ferry, web_plan(work, fleet), "web@1", rfc(run_ferry, "web@1"))
    assert first.returncode == 0, first.stdout + first.stderr
    report = first.json()
    assert [len(w) for w in report["waves"]] == [1, 1, 2]
    want = image_id("web@1")
    for host in fleet.hosts:
        assert running(fleet, host) == (want, True)
        assert host_release(fleet, host) == rid("web@1")
    sizes = [b.size for b in images_of(DML.from_settings().open("web@1").content)["web"].layers]
    staged = stage_details(report["id"])
    assert {h: d["image_bytes_sent"] for h, d in staged.items()} == {
        h: sum(sizes) for h in fleet.hosts
    }
    assert "s3cr3t-value" not in first.stdout
    status = run_ferry("status", "-o", "json")
    assert status.returncode == 0, status.stderr
    assert want in status.stdout

    # the same release again: nothing crosses, the container keeps running
    again = deploy(run_ferry, web_plan(work, fleet), "web@1", rfc(run_ferry, "web@1"))
    assert again.returncode == 0, again.stdout + again.stderr
    staged = stage_details(again.json()["id"])
    assert {d["image_bytes_sent"] for d in staged.values()} == {0}
    assert all(running(fleet, h) == (want, True) for h in fleet.hosts)

    # a new image on the same base: only its changed (app) layer crosses
    build_web(work, "2")
    second = deploy(run_ferry, web_plan(work, fleet), "web@2", rfc(run_ferry, "web@2"))
    assert second.returncode == 0, second.stdout + second.stderr
    layers = images_of(DML.from_settings().open("web@2").content)["web"].layers
    staged = stage_details(second.json()["id"])
    for host, detail in staged.items():
        assert detail["images"]["web"]["layers_sent"] == 1, (host, detail)
        assert detail["image_bytes_sent"] == layers[1].size < sizes[0]
    assert all(running(fleet, h) == (image_id("web@2"), True) for h in fleet.hosts)
    assert v1["digest"] != second.json()["digest"]
    assert second.json()["image_bytes_sent"] == 4 * layers[1].size
    downtime = second.json()["container_downtime_s"]
    # the old container ends on SIGTERM: the switch never waits out docker stop's 10 s grace
    assert set(downtime) == set(fleet.hosts) and all(0 < s < 8 for s in downtime.values())


def _has_image(fleet, host: str, image: str) -> bool:
    return image in lab_docker.docker(fleet, host, "images", "-q", "--no-trunc").split()


def test_failing_health_check_in_wave_two_backs_out_to_the_prior_container_with_its_data(
    clean_docker, run_ferry
):
    fleet, work = clean_docker, Path.cwd()
    build_web(work, "1")
    build_web(work, "2")
    everywhere = web_plan(work, fleet, "all.yaml", strategy="big-bang", waves=None)
    first = deploy(run_ferry, everywhere, "web@1", rfc(run_ferry, "web@1"))
    assert first.returncode == 0, first.stdout + first.stderr
    v1, v2 = image_id("web@1"), image_id("web@2")
    # h2 (wave 2 of [1, 2, 100%]) will fail web@2's health check
    (fleet.root_dir("h2") / "shared" / "data" / "broken").write_text("x\n")
    res = deploy(run_ferry, web_plan(work, fleet), "web@2", rfc(run_ferry, "web@2"))
    assert res.returncode == 4, res.stdout + res.stderr
    report = res.json()
    assert report["hosts"]["h2"]["failure"]["step"] == "milestone"
    assert "container web health" in report["hosts"]["h2"]["failure"]["reason"]
    for host in ("h1", "h2"):  # backed out as one: files, container and data
        assert running(fleet, host) == (v1, True), host
        assert host_release(fleet, host) == rid("web@1")
        assert (fleet.root_dir(host) / "shared" / "data" / "schema").read_text() == "1\n"
        seen = lab_docker.docker(fleet, host, "exec", "ferry-web", "cat", "/data/schema")
        assert seen == "1\n"
        assert _has_image(fleet, host, v2)  # it was loaded, then the prior came back
    for host in ("h3", "h4"):  # wave 3 never received the new image
        assert not _has_image(fleet, host, v2)
        assert running(fleet, host) == (v1, True)
        assert host_release(fleet, host) == rid("web@1")
    assert set(stage_details(report["id"])) == {"h1", "h2"}


def test_a_tampered_layer_blob_is_refused_before_any_host_changes(clean_docker, run_ferry):
    fleet, work = clean_docker, Path.cwd()
    build_web(work, "1")
    dml = DML.from_settings()
    layer = images_of(dml.open("web@1").content)["web"].layers[1]
    path = dml.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[700] ^= 0x20
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    res = deploy(run_ferry, web_plan(work, fleet), "web@1", rfc(run_ferry, "web@1"))
    assert res.returncode == 6, res.stdout + res.stderr
    assert f"blob {layer.digest} is corrupt" in res.stderr
    assert cms(lambda s: s.scalar(select(func.count()).select_from(Deployment))) == 0
    for host in fleet.hosts:
        assert lab_docker.docker(fleet, host, "images", "-q").strip() == ""
        assert [p.name for p in fleet.root_dir(host).iterdir()] == [".ferry"]  # docker-host


def test_containers_entry_naming_no_image_unit_is_exit_2_naming_file_and_field(
    clean_docker, run_ferry
):
    fleet, work = clean_docker, Path.cwd()
    build_web(work, "1")
    bad = web_plan(work, fleet, "bad.yaml", containers={"api": {"health": "true"}})
    res = deploy(run_ferry, bad, "web@1", rfc(run_ferry, "web@1"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "bad.yaml: containers.api" in res.stderr and "image units: web" in res.stderr
    worse = web_plan(work, fleet, "worse.yaml", containers={"web": {"volumes": ["data"]}})
    res = deploy(run_ferry, worse, "web@1", None, "--dry-run")
    assert res.returncode == 2 and "containers.web.volumes" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # pull agents load no images: refused before anything is recorded, never half deployed
    pulled = web_plan(work, fleet, "pulled.yaml", method="pull",
                      pull={"server": "https://198.18.0.1:8443"})  # fmt: skip
    res = deploy(run_ferry, pulled, "web@1", rfc(run_ferry, "web@1"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "pulled.yaml: method" in res.stderr and "image units (web)" in res.stderr
    assert "method: push" in res.stderr and "Traceback" not in res.stderr
    assert cms(lambda s: s.scalar(select(func.count()).select_from(Deployment))) == 0
    assert cms(lambda s: s.scalar(select(func.count()).select_from(Deployment))) == 0
    for host in fleet.hosts:
        assert lab_docker.docker(fleet, host, "images", "-q").strip() == ""


def test_an_image_read_from_a_docker_engine_is_the_same_unit_as_its_archive(
    bare_docker, ferry_home, monkeypatch
):
    fleet, work = bare_docker, Path.cwd()
    archive = make_image(work / "web.tar", "7")
    lab_docker.docker(fleet, "h1", "load", "-i", str(archive))
    loaded = lab_docker.docker(fleet, "h1", "images", "-q", "--no-trunc").split()[0]
    lab_docker.docker(fleet, "h1", "tag", loaded, "shop-web:7")
    (work / "from-archive.yaml").write_text(
        'name: a\nversion: "7"\nunits:\n  web: {image: "docker-archive:web.tar"}\n'
    )
    (work / "from-engine.yaml").write_text(
        'name: e\nversion: "7"\nunits:\n  web: {image: "shop-web:7"}\n'
    )
    monkeypatch.setenv("DOCKER_HOST", lab_docker.socket(fleet, "h1"))
    a = catalog.build_release(work / "from-archive.yaml")
    e = catalog.build_release(work / "from-engine.yaml")
    dml = DML.from_settings()
    record = images_of(dml.open(e["release"]).content)["web"]
    assert record == images_of(dml.open(a["release"]).content)["web"]
    assert record.image_id == loaded


def test_drift_reports_a_stopped_container_a_missing_one_and_another_image(clean_docker, run_ferry):
    fleet, work = clean_docker, Path.cwd()
    build_web(work, "1")
    everywhere = web_plan(work, fleet, "all.yaml", strategy="big-bang", waves=None)
    res = deploy(run_ferry, everywhere, "web@1", rfc(run_ferry, "web@1"))
    assert res.returncode == 0, res.stdout + res.stderr
    other = make_image(work / "other.tar", "other")
    lab_docker.docker(fleet, "h3", "load", "-i", str(other))
    other_id = next(
        i
        for i in lab_docker.docker(fleet, "h3", "images", "-q", "--no-trunc").split()
        if i != image_id("web@1")
    )
    lab_docker.docker(fleet, "h1", "stop", "ferry-web")
    lab_docker.docker(fleet, "h2", "rm", "-f", "ferry-web")
    lab_docker.docker(fleet, "h3", "rm", "-f", "ferry-web")
    lab_docker.docker(
        fleet, "h3", "run", "-d", "--name", "ferry-web", "--network", "host", other_id
    )
    drift = run_ferry("remediate", "drift", "--inventory", str(fleet.inventory_path), "-o", "json")
    assert drift.returncode == 5, drift.stdout + drift.stderr
    hosts = drift.json()["hosts"]
    assert {h: v["state"] for h, v in hosts.items()} == {
        "h1": "drifted", "h2": "drifted", "h3": "drifted", "h4": "ok",
    }  # fmt: skip
    assert "ferry-web is exited" in hosts["h1"]["detail"]
    assert "ferry-web is missing" in hosts["h2"]["detail"]
    assert f"runs image {other_id[:19]}" in hosts["h3"]["detail"]


def test_container_revert_is_idempotent_and_leaves_a_container_its_release_did_not_change(
    bare_docker, tmp_path
):
    """The agent's container requests in-process, against h1's real engine."""
    from types import SimpleNamespace

    from orchestrator.agent import ferry_agent as agent

    fleet, work = bare_docker, tmp_path
    ids = []
    for v in ("1", "2"):
        lab_docker.docker(fleet, "h1", "load", "-i", str(make_image(work / f"{v}.tar", v)))
        ids.append(next(i for i in lab_docker.docker(
            fleet, "h1", "images", "-q", "--no-trunc").split() if i not in ids))  # fmt: skip
    host = agent.Host(str(fleet.root_dir("h1")))

    def args(**kw: Any) -> SimpleNamespace:
        return SimpleNamespace(**dict(agent.DEFAULTS, unit="web", **kw))

    def switch(rid: str, image: str) -> dict[str, Any]:
        return agent.op_container_switch(host, args(id=rid, container={"image": image}))

    assert switch("web-1", ids[0])["prior_image"] is None
    assert switch("web-2", ids[1])["prior_image"] == ids[0]
    for _ in range(2):  # a recover may run the backout again: the same end state
        agent.op_container_revert(host, args(id="web-2"))
        assert running(fleet, "h1") == (ids[0], True)
    # a redeploy of what already runs changes nothing, so its backout changes nothing
    assert switch("web-1", ids[0])["already"] is True
    assert agent.op_container_revert(host, args(id="web-1"))["unchanged"] is True
    assert running(fleet, "h1") == (ids[0], True)
    assert agent.op_container_health(
        host, args(command="wget -qO- http://127.0.0.1:8081/ok", timeout=20)
    )["ok"]
