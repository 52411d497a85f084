"""Pure decisions of container release units: layers to send, drift, the plan's model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.container_plan import ContainerSpec
from orchestrator.containers import drift, layers_to_send


def test_only_layers_past_the_longest_shared_chain_are_sent() -> None:
    engine = {"sha256:img1": ["a", "b", "c"], "sha256:img2": ["a", "x"]}
    assert layers_to_send(["a", "b", "d"], engine) == ["d"]
    assert layers_to_send(["a", "b", "c"], engine) == []
    assert layers_to_send(["a", "x", "y"], engine) == ["y"]
    # a layer held on another chain is not there for this one (docker keys layers by chain)
    assert layers_to_send(["b", "c"], engine) == ["b", "c"]
    assert layers_to_send(["a"], {}) == ["a"]


def test_drift_names_another_image_a_stopped_and_a_missing_container() -> None:
    want = {"web": "sha256:" + "1" * 64, "api": "sha256:" + "2" * 64}
    seen = {"web": {"image": want["web"], "running": True, "status": "running"}}
    assert drift({"web": want["web"]}, seen) == []
    other = {"web": {"image": "sha256:" + "9" * 64, "running": True, "status": "running"}}
    assert "runs image sha256:9999" in drift({"web": want["web"]}, other)[0]
    stopped = {"web": {"image": want["web"], "running": False, "status": "exited"}}
    assert drift({"web": want["web"]}, stopped) == ["container ferry-web is exited, not running"]
    assert "ferry-api is missing" in drift(want, seen)[0]


def test_container_spec_refuses_bad_fields_and_normalises_env() -> None:
    spec = ContainerSpec.model_validate(
        {"env": {"N": 3, "ON": True}, "health_timeout": "1m", "volumes": ["/srv/d:/data:ro"]}
    )
    assert spec.env == {"N": "3", "ON": "true"} and spec.health_timeout == 60.0
    for bad in (
        {"volumes": ["data"]},
        {"volumes": ["rel/dir:/data"]},
        {"env": {"1X": "v"}},
        {"env": {"K": {"nested": 1}}},
        {"health_timeout": "0s"},
        {"comand": ["x"]},
    ):
        with pytest.raises(ValidationError):
            ContainerSpec.model_validate(bad)


def test_rollout_record_round_trip_keeps_containers_and_hides_secret_env() -> None:
    from orchestrator.rollout import Rollout

    spec = ContainerSpec(env={"API_TOKEN": "hunter2-secret", "MODE": "x"}).record("sha256:ab")
    ro = Rollout(
        release="web@1", digest="sha256:" + "0" * 64, release_id="web-1-000000000000",
        environment="dev", strategy="big-bang", method="push", concurrency=1, waves=(),
        containers={"web": spec},
    )  # fmt: skip
    back = Rollout.from_record(ro.to_record())
    assert back.containers == {"web": spec}
    assert "hunter2-secret" not in str(ro.to_dict()) and "MODE" in str(ro.to_dict())
