"""The host agent, run as the host runs it (python3, stdlib only), on a local directory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from orchestrator import agent
from orchestrator.agent import ferry_agent

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def package(files: dict[str, bytes]) -> tuple[bytes, bytes, dict]:
    entries = [
        {"path": p, "size": len(d), "mode": 0o644, "sha256": hashlib.sha256(d).hexdigest()}
        for p, d in sorted(files.items())
    ]
    content = {
        "format": "ferry-package/1",
        "name": "app",
        "version": "1",
        "release": "app@1",
        "units": ["u"],
        "files": entries,
    }
    digest = "sha256:" + hashlib.sha256(ferry_agent.canonical(content)).hexdigest()
    raw = json.dumps({"digest": digest, "content": content}).encode()
    return raw, KEY.sign(raw), content


def run(root: Path, op: str, *args: str, stdin: bytes = b"") -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-I", str(agent.SOURCE_PATH), op, "--root", str(root), *args],
        input=stdin,
        capture_output=True,
    )
    line = [ln for ln in proc.stdout.decode().splitlines() if ln.startswith("RESULT ")][-1]
    return proc.returncode, json.loads(line[7:])


def receive_stream(raw: bytes, sig: bytes, objects: dict[str, bytes]) -> bytes:
    frames = b"".join(f"{s} {len(d)}\n".encode() + d for s, d in objects.items())
    return (
        json.dumps({"manifest_len": len(raw), "sig_len": len(sig)}).encode()
        + b"\n"
        + raw
        + sig
        + frames
        + b"END\n"
    )


def test_pure_python_ed25519_agrees_with_cryptography():
    msg = b"ferry" * 100
    sig = KEY.sign(msg)
    assert ferry_agent.ed25519_verify(PUB, msg, sig)
    assert not ferry_agent.ed25519_verify(PUB, msg + b"!", sig)
    bad = bytearray(sig)
    bad[5] ^= 1
    assert not ferry_agent.ed25519_verify(PUB, msg, bytes(bad))
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert not ferry_agent.ed25519_verify(other, msg, sig)


def test_the_agents_curve_constants_are_their_definitions():
    """The agent writes Ed25519's constants as literals (RFC 8032, 5.1): each one derived."""
    p, a = ferry_agent._P, ferry_agent
    assert a._D == -121665 * pow(121666, p - 2, p) % p  # d = -121665/121666
    assert a._I * a._I % p == p - 1  # sqrt(-1)
    assert a._GY == 4 * pow(5, p - 2, p) % p  # the base point's y = 4/5
    assert a._GX % 2 == 0 and a._recover_x(a._GY, 0) == a._GX  # its x, the even root
    assert a._G == (a._GX, a._GY, 1, a._GX * a._GY % p)  # extended coordinates
    assert a._mul(a._L, a._G)[0] == 0  # the base point has order L


def test_receive_verify_switch_and_readback_on_a_real_directory(tmp_path):
    files = {"u/a.txt": b"alpha", "u/sub/b.bin": b"\x00" * 1000}
    raw, sig, content = package(files)
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    objects = {hashlib.sha256(d).hexdigest(): d for d in files.values()}
    rc, res = run(tmp_path, "receive", "--id", "app-1", stdin=receive_stream(raw, sig, objects))
    assert rc == 0 and res["received"] == 2, res
    assert run(tmp_path, "verify", "--id", "app-1")[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[1]["current"] == "app-1"
    assert (tmp_path / "current").resolve() == tmp_path / "releases" / "app-1"
    rc, back = run(tmp_path, "readback", "--id", "app-1", "--full")
    assert rc == 0 and back["ok"]
    (tmp_path / "releases/app-1/u/a.txt").write_bytes(b"alphA")  # same size, other bytes
    assert not run(tmp_path, "readback", "--id", "app-1", "--full")[1]["ok"]


def test_a_manifest_not_signed_by_the_pinned_key_is_refused_before_any_data(tmp_path):
    raw, _sig, _ = package({"u/a": b"x"})
    forged = Ed25519PrivateKey.generate().sign(raw)
    run(tmp_path, "pin", "--key", PUB.hex())
    rc, res = run(tmp_path, "receive", "--id", "r", stdin=receive_stream(raw, forged, {}))
    assert rc == ferry_agent.EXIT_INTEGRITY and "signature" in res["message"]


def test_a_corrupted_object_is_refused_and_not_kept(tmp_path):
    raw, sig, _ = package({"u/a": b"good"})
    run(tmp_path, "pin", "--key", PUB.hex())
    sha = hashlib.sha256(b"good").hexdigest()
    rc, res = run(tmp_path, "receive", "--id", "r", stdin=receive_stream(raw, sig, {sha: b"evil"}))
    assert rc == ferry_agent.EXIT_INTEGRITY
    assert not (tmp_path / ".ferry/incoming" / sha).exists()


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "u/../../x", "u//a", "./a"])
def test_manifest_paths_outside_the_release_are_refused(tmp_path, path):
    raw, sig, _ = package({path: b"x"})
    run(tmp_path, "pin", "--key", PUB.hex())
    rc, res = run(tmp_path, "receive", "--id", "r", stdin=receive_stream(raw, sig, {}))
    assert rc == ferry_agent.EXIT_INTEGRITY and "unsafe path" in res["message"]


def test_another_pinned_key_is_never_replaced_silently(tmp_path):
    run(tmp_path, "pin", "--key", PUB.hex())
    rc, res = run(tmp_path, "pin", "--key", "11" * 32)
    assert rc == ferry_agent.EXIT_INTEGRITY and "pins DML key" in res["message"]
    assert "ferry dml key import" in res["message"]  # the fix, named
    assert (tmp_path / ".ferry" / "dml.pub").read_text().strip() == PUB.hex()


def _rotation(old: Ed25519PrivateKey, new: Ed25519PrivateKey) -> dict[str, str]:
    from dml.keyring import endorse

    new_pub = new.public_key().public_bytes_raw()
    return {
        "old": old.public_key().public_bytes_raw().hex(),
        "new": new_pub.hex(),
        "signature": endorse(old, new_pub).hex(),
    }


def _pin(root: Path, key: Ed25519PrivateKey, rotations: list[dict[str, str]]) -> dict:
    from types import SimpleNamespace

    args = SimpleNamespace(key=key.public_key().public_bytes_raw().hex(), rotations=rotations)
    return ferry_agent.op_pin(ferry_agent.Host(str(root)), args)


def test_a_rotation_signed_by_the_pinned_key_moves_the_pin_and_only_stored_manifests_keep_the_old(
    tmp_path,
):
    run(tmp_path, "pin", "--key", PUB.hex())
    stored_raw, stored_sig, _ = package({"u/a": b"a"})
    mid, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    chain = [_rotation(mid, new), _rotation(KEY, mid)]  # any order: the signatures decide
    assert _pin(tmp_path, new, chain) == {"pinned": "rotated", "from": ferry_agent.key_id(PUB)}
    host = ferry_agent.Host(str(tmp_path))
    assert host.pinned_key() == new.public_key().public_bytes_raw()
    assert host.retired_keys() == [PUB, mid.public_key().public_bytes_raw()]
    # a manifest already on the host, signed by the old key, still verifies as stored …
    assert host.check_manifest(stored_raw, stored_sig, stored=True)["digest"]
    # … but nothing new signed by a retired key is accepted
    with pytest.raises(ferry_agent.AgentError, match="does not verify"):
        host.check_manifest(stored_raw, stored_sig)
    assert _pin(tmp_path, new, chain) == {"pinned": "already"}


def test_a_rotation_not_signed_by_the_pinned_key_is_refused(tmp_path):
    run(tmp_path, "pin", "--key", PUB.hex())
    intruder, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    forged = _rotation(intruder, new)
    forged["old"] = PUB.hex()  # claims to come from the pinned key, signed by another
    with pytest.raises(ferry_agent.AgentError, match="no rotation signed by it leads there"):
        _pin(tmp_path, new, [forged])
    assert ferry_agent.Host(str(tmp_path)).pinned_key() == PUB


def test_prune_keeps_the_newest_releases_and_every_protected_one(tmp_path):
    run(tmp_path, "pin", "--key", PUB.hex())
    for i in range(5):
        raw, sig, _ = package({f"u/{i}": str(i).encode()})
        objects = {hashlib.sha256(str(i).encode()).hexdigest(): str(i).encode()}
        run(tmp_path, "receive", "--id", f"r{i}", stdin=receive_stream(raw, sig, objects))
        assert run(tmp_path, "verify", "--id", f"r{i}")[0] == 0
        run(tmp_path, "switch", "--id", f"r{i}")
    rc, res = run(tmp_path, "prune", "--keep", "2", "--protect", "r0")
    assert rc == 0
    assert sorted(res["removed"]) == ["r1", "r2"]
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["r0", "r3", "r4"]


def test_a_release_altered_on_the_host_is_set_aside_and_never_trusted_again(tmp_path):
    files = {"u/a.txt": b"alpha"}
    raw, sig, _ = package(files)
    run(tmp_path, "pin", "--key", PUB.hex())
    objects = {hashlib.sha256(b"alpha").hexdigest(): b"alpha"}
    run(tmp_path, "receive", "--id", "r", stdin=receive_stream(raw, sig, objects))
    run(tmp_path, "verify", "--id", "r")
    assert run(tmp_path, "check", "--id", "r", "--full")[1]["ok"]
    (tmp_path / "releases/r/u/a.txt").write_bytes(b"alphA")
    rc, res = run(tmp_path, "check", "--id", "r", "--full")
    assert rc == 0 and not res["ok"] and res["set_aside"]
    assert run(tmp_path, "state")[1]["digests"] == {}  # the host no longer claims it
    # staged afresh: the altered copy is not a source; the object must be sent again
    rc, res = run(tmp_path, "receive", "--id", "r", stdin=receive_stream(raw, sig, objects))
    assert rc == 0 and res["needed"] == 1
    assert run(tmp_path, "verify", "--id", "r")[0] == 0
    assert (tmp_path / "releases/r/u/a.txt").read_bytes() == b"alpha"


def _release(
    files: dict[str, bytes], version: str, modes: dict[str, int] | None = None
) -> tuple[bytes, bytes]:
    entries = [
        {"path": p, "size": len(d), "mode": (modes or {}).get(p, 0o644),
         "sha256": hashlib.sha256(d).hexdigest()}
        for p, d in sorted(files.items())
    ]  # fmt: skip
    content = {"format": "ferry-package/1", "name": "app", "version": version,
               "release": f"app@{version}", "units": ["u"], "files": entries}  # fmt: skip
    digest = "sha256:" + hashlib.sha256(ferry_agent.canonical(content)).hexdigest()
    raw = json.dumps({"digest": digest, "content": content}).encode()
    return raw, KEY.sign(raw)


def _publish(
    root: Path, rid: str, files: dict[str, bytes], version: str, send: list[str]
) -> tuple[int, dict]:
    """Receive (sending only the files named in `send`: the rest is on the host) and verify."""
    raw, sig = _release(files, version)
    objects = {hashlib.sha256(files[p]).hexdigest(): files[p] for p in send}
    rc, res = run(root, "receive", "--id", rid, stdin=receive_stream(raw, sig, objects))
    assert rc == 0, res
    return run(root, "verify", "--id", rid)


def test_a_new_release_reuses_intact_files_unread_and_rereads_any_that_changed(tmp_path):
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    a, b, c = b"A" * 4096, b"B" * 100, b"C" * 100
    assert _publish(tmp_path, "app-1", {"u/a": a, "u/b": b}, "1", ["u/a", "u/b"])[0] == 0
    # app-2 shares u/a with app-1: placed from the verified copy without hashing it again
    rc, res = _publish(tmp_path, "app-2", {"u/a": a, "u/c": c}, "2", ["u/c"])
    assert rc == 0 and res["rehashed"] == 0 and res["placed"] == 2, res
    assert run(tmp_path, "readback", "--id", "app-2", "--full")[1]["ok"] is False  # not current
    assert run(tmp_path, "switch", "--id", "app-2")[0] == 0
    rc, back = run(tmp_path, "readback", "--id", "app-2", "--full")
    assert rc == 0 and back["ok"] and back["mismatches"] == []
    # the same bytes' size, other bytes, edited in place: its identity changed, so a full
    # read-back hashes it again and finds it (sizes alone would not)
    (tmp_path / "releases" / "app-2" / "u" / "a").write_bytes(b"X" * 4096)
    back = run(tmp_path, "readback", "--id", "app-2")[1]
    assert back["ok"], "a quick read-back compares sizes only"
    back = run(tmp_path, "readback", "--id", "app-2", "--full")[1]
    assert back["mismatches"] == ["u/a: content differs"]
    # and a later release that would reuse it rereads it, and asks for the object instead
    # of the altered copy (asked for and not sent: it never arrived, and nothing is placed)
    raw, sig = _release({"u/a": a}, "3")
    rc, res = run(tmp_path, "receive", "--id", "app-3", stdin=receive_stream(raw, sig, {}))
    assert rc == 10 and "never arrived" in res["message"]
    assert not (tmp_path / "releases" / "app-3").exists()
    sent = {hashlib.sha256(a).hexdigest(): a}
    rc, res = run(tmp_path, "receive", "--id", "app-3", stdin=receive_stream(raw, sig, sent))
    assert rc == 0 and res["needed"] == 1
    assert run(tmp_path, "verify", "--id", "app-3")[0] == 0
    assert (tmp_path / "releases" / "app-3" / "u" / "a").read_bytes() == a


def test_a_kept_copy_read_at_receive_is_read_again_at_verify_only_if_it_changed_since(
    tmp_path,
):
    """A copy whose identity moved (touched: same bytes) is read once in a session, when
    receive looks for what the host lacks; verify stats it again and reuses it unread. A copy
    written between the two is read again by verify and refused."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    a, b = b"A" * 4096, b"B" * 100
    assert _publish(tmp_path, "app-1", {"u/a": a, "u/b": b}, "1", ["u/a", "u/b"])[0] == 0
    kept = tmp_path / "releases" / "app-1" / "u" / "a"

    def stage(rid: str, version: str, between=lambda: None) -> tuple[dict, dict]:
        new = version.encode() * 100  # the one object the host lacks
        raw, sig = _release({"u/a": a, "u/new": new}, version)
        proc = _session_with_spy(tmp_path, "pass")
        try:
            stream = receive_stream(raw, sig, {hashlib.sha256(new).hexdigest(): new})
            received = _answer(proc, {"op": "receive", "args": {"id": rid}}, stream)
            between()
            return received, _answer(proc, {"op": "verify", "args": {"id": rid}})
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)

    os.utime(kept, ns=(1, 1))  # the same bytes, another identity: not trusted unread
    received, placed = stage("app-2", "2")
    assert received["_code"] == 0 and received["needed"] == 1, received
    assert placed["_code"] == 0 and placed["rehashed"] == 0, placed  # read once, at receive
    os.utime(kept, ns=(2, 2))
    received, placed = stage("app-3", "3", between=lambda: kept.write_bytes(b"X" * 4096))
    assert received["_code"] == 0 and received["needed"] == 1, received
    assert placed["_code"] == 10 and "no longer matches its checksum" in placed["message"], placed
    assert not (tmp_path / "releases" / "app-3").exists()


def test_a_copy_gone_from_a_kept_release_is_asked_for_again(tmp_path):
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    a, b = b"A" * 100, b"B" * 100
    assert _publish(tmp_path, "app-1", {"u/a": a, "u/b": b}, "1", ["u/a", "u/b"])[0] == 0
    (tmp_path / "releases" / "app-1" / "u" / "a").unlink()  # by hand, on the host
    raw, sig = _release({"u/a": a, "u/c": b}, "2")
    rc, res = run(tmp_path, "receive", "--id", "app-2", stdin=receive_stream(raw, sig, {}))
    assert rc == 10 and "1 objects never arrived" in res["message"], res  # asked, not an OS error


def test_the_live_release_set_aside_keeps_serving_until_a_clean_copy_is_switched_to(tmp_path):
    """A deploy of the release a host runs, altered there, sets it aside: `current` follows
    it (the service keeps what it ran, not a dangling link) until the clean copy is
    activated, and a read-back says so instead of failing on the missing metadata."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    files = {"u/a": b"alpha", "u/b": b"beta"}
    assert _publish(tmp_path, "app-1", files, "1", ["u/a", "u/b"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    (tmp_path / "releases" / "app-1" / "u" / "a").write_bytes(b"alphA")
    rc, res = run(tmp_path, "check", "--id", "app-1", "--full")
    assert rc == 0 and not res["ok"] and res["current_set_aside"], res
    current = tmp_path / "current"
    assert current.resolve() == Path(res["set_aside"]).resolve()
    assert (current / "u" / "b").read_bytes() == b"beta"  # still serving
    rc, back = run(tmp_path, "readback", "--id", "app-1")
    assert rc == 0 and not back["ok"] and ".broken-app-1-" in back["mismatches"][0], back
    rc, back = run(tmp_path, "readback")  # whatever it runs: not a verified release
    assert rc == 0 and not back["ok"] and "not a release verified" in back["mismatches"][0]
    # staged afresh (a copy set aside is no source: all of it is sent), switched to: live
    assert _publish(tmp_path, "app-1", files, "1", ["u/a", "u/b"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    assert (current / "u" / "a").read_bytes() == b"alpha"
    assert run(tmp_path, "readback", "--id", "app-1", "--full")[1]["ok"]


@pytest.mark.parametrize("tag", ["cpython-0", sys.implementation.cache_tag])
def test_serve_answers_many_requests_in_one_process_started_from_the_source_it_is_sent(
    tmp_path, tag
):
    from orchestrator.transport.session import BOOT

    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", BOOT, "serve", "--root", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    source, code = agent.source(), agent.compiled()
    requests = [
        {"op": "pin", "args": {"key": PUB.hex()}},
        {"op": "run", "args": {"command": "echo $FERRY_X; exit 3", "env": {"FERRY_X": "hi"},
                               "timeout": 5}},
        {"op": "run", "args": {"command": "sleep 5", "timeout": 0.5}},
        {"op": "switch", "args": {"id": "nope"}},
        {"op": "state"},
    ]  # fmt: skip
    # this interpreter's tag runs the compiled code; a tag no interpreter has, the source
    feed = f"{len(source)} {len(code)} {tag}\n".encode() + source + code
    feed += b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    out, _ = proc.communicate(feed, timeout=30)
    assert proc.returncode == 0  # stdin closed: the session ends cleanly
    results = [json.loads(ln[7:]) for ln in out.decode().splitlines() if ln.startswith("RESULT ")]
    assert [r["_code"] for r in results] == [0, 0, 0, 11, 0]
    assert results[0]["pinned"] == "new"
    assert results[1]["rc"] == 3 and results[1]["output"].strip() == "hi"
    assert results[2]["rc"] == 124 and "timed out" in results[2]["output"]
    assert results[3]["error"] == "input" and "not verified" in results[3]["message"]
    assert results[4]["pinned"] is True and results[4]["current"] is None


@pytest.mark.parametrize(
    "value",
    [{}, [], "x", 0, -7, 10**30, 1.5, -0.0, 1e300, True, False, None,
     {"b": [1, {"a": "é\u2028\"\\\n"}], "a": None}, [1, 2.25, "ü", {"z": 1, "y": [True]}]],
)  # fmt: skip
def test_the_agents_json_codec_is_the_json_modules(value):
    for kw in ({}, {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False}):
        text = ferry_agent.dumps(value, **kw)
        assert text == json.dumps(value, **kw)
        assert ferry_agent.loads(text) == value and ferry_agent.loads(text.encode()) == value
    assert ferry_agent.dumps(value, indent=1) == json.dumps(value, indent=1)


@pytest.mark.parametrize("bad", ["", " ", "{", "[1] x", "nul", '{"a":}', "[1,]"])
def test_the_agents_json_codec_refuses_what_json_refuses(bad):
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        ferry_agent.loads(bad)


def test_a_session_starts_without_the_heavy_stdlib_modules(tmp_path):
    """A no-op host pays for the agent's imports on every deployment: json (re, enum),
    hashlib, subprocess and signal stay out of a session that inspects and runs a check."""
    from orchestrator.transport.session import BOOT, boot_input

    feed = boot_input()
    for r in [
        {"op": "pin", "args": {"key": PUB.hex()}},
        {"op": "inspect", "args": {"id": "app-1-x", "key": PUB.hex(), "full": True}},
        {"op": "run", "args": {"command": "test -d .", "timeout": 5}},
        {"op": "state"},
    ]:
        feed += json.dumps(r).encode() + b"\n"
    # the session as a host runs it, which writes down what it imported when it ends
    report = "lambda: sys.stderr.write(repr(sorted(sys.modules)))"
    spy = f"import atexit,sys;atexit.register({report});{BOOT}"
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", spy, "serve", "--root", str(tmp_path)],
        input=feed, capture_output=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(ln[7:]) for ln in proc.stdout.decode().splitlines()]
    assert [r["_code"] for r in results] == [0, 0, 0, 0] and results[2]["rc"] == 0
    loaded = set(eval(proc.stderr.decode()))  # noqa: S307 - our own child's repr of a list
    assert "_json" in loaded
    assert not loaded & {"json", "re", "enum", "hashlib", "subprocess", "signal"}


def test_a_command_runs_in_its_directory_with_its_output_and_exit_code(tmp_path):
    from types import SimpleNamespace as Args

    (tmp_path / "sub dir").mkdir()
    host = ferry_agent.Host(str(tmp_path))
    cmd = 'pwd; echo "$FERRY_X"; echo err >&2; read line; echo "[$line]"; exit 7'
    out = ferry_agent.op_run(
        host, Args(cwd=str(tmp_path / "sub dir"), env={"FERRY_X": "x y"}, command=cmd, timeout=5)
    )
    assert out["rc"] == 7
    assert out["output"] == f"{tmp_path / 'sub dir'}\nx y\nerr\n[]\n"  # stdin is /dev/null
    gone = ferry_agent.op_run(host, Args(cwd=str(tmp_path / "gone"), env=None, command="pwd",
                                         timeout=5))  # fmt: skip
    assert gone["rc"] == 0 and gone["output"] == f"{tmp_path}\n"  # falls back to the root
    killed = ferry_agent.op_run(host, Args(cwd=None, env=None, command="kill -TERM $$", timeout=5))
    assert killed["rc"] == -15


def test_a_command_past_its_timeout_is_killed_with_its_whole_process_group(tmp_path):
    from types import SimpleNamespace as Args

    pidfile = tmp_path / "child.pid"
    cmd = f"sleep 30 & echo $! > {pidfile}; echo started; wait"
    out = ferry_agent.op_run(ferry_agent.Host(str(tmp_path)), Args(cwd=None, env=None, command=cmd,
                                                             timeout=0.5))  # fmt: skip
    assert out["rc"] == 124 and out["output"].startswith("started\n")
    assert "timed out after 0.5s" in out["output"] and out["seconds"] < 5
    child = int(pidfile.read_text())
    import os
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the background sleep was in the group: killed too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the command's child {child} outlived the timeout")


def test_pruning_a_release_leaves_the_files_it_shared_trusted_unread_unless_they_changed(
    tmp_path,
):
    """Removing a release unlinks inodes its successors share, which changes their ctime:
    prune re-records the files that were still as verified, so the next release reuses
    them unread; a file altered before the prune stays suspect and is read again."""
    import os
    import time

    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    a, b, c, d = b"A" * 4096, b"B" * 100, b"C" * 100, b"D" * 100
    for i, (rid, extra) in enumerate([("app-1", b), ("app-2", c)]):
        files = {"u/a": a, "u/x": extra}
        assert (
            _publish(tmp_path, rid, files, str(i + 1), ["u/a", "u/x"] if i == 0 else ["u/x"])[0]
            == 0
        )
        assert run(tmp_path, "switch", "--id", rid)[0] == 0
    time.sleep(0.01)  # a ctime that can differ from the one recorded
    assert run(tmp_path, "prune", "--keep", "1")[1]["removed"] == ["app-1"]
    rc, res = _publish(tmp_path, "app-3", {"u/a": a, "u/x": d}, "3", ["u/x"])
    assert rc == 0 and res["rehashed"] == 0, res  # u/a, shared with pruned app-1: unread
    assert run(tmp_path, "switch", "--id", "app-3")[0] == 0
    # u/a altered in place (same size, mtime put back) before a prune: read again, refused
    path = tmp_path / "releases" / "app-3" / "u" / "a"
    st = path.stat()
    path.write_bytes(b"X" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run(tmp_path, "prune", "--keep", "1")[1]["removed"] == ["app-2"]
    raw, sig = _release({"u/a": a}, "4")
    rc, res = run(tmp_path, "receive", "--id", "app-4", stdin=receive_stream(raw, sig, {}))
    assert rc == 10 and "never arrived" in res["message"]  # asked for again, not reused


def _session_with_spy(root: Path, spy: str) -> subprocess.Popen[bytes]:
    """A serve session as a host runs it, with `spy` (Python) run before the agent."""
    from orchestrator.transport.session import BOOT, boot_input

    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", f"{spy};{BOOT}", "serve", "--root", str(root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(boot_input())
    return proc


def _answer(proc: subprocess.Popen[bytes], request: dict, then: bytes = b"") -> dict:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(request).encode() + b"\n" + then)
    proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "the agent died"
        if line.startswith(b"RESULT "):
            return json.loads(line[7:])


# counts the calls a session makes, written to stderr when it ends: fsync, and sha512 (one
# per ed25519 check of a signature: CPython's built-in sha512, _sha2 from 3.12 on)
COUNTING = (  # its own names: BOOT's code runs in the same globals and uses n, m, t, s, c
    "import atexit,os,sys;calls={'fsync':0,'sha512':0}\n"
    "try:\n import _sha2 as sha\nexcept ImportError:\n import _sha512 as sha\n"
    "def counted(what,real):\n"
    " def call(*a):\n  calls[what]+=1;return real(*a)\n"
    " return call\n"
    "os.fsync=counted('fsync',os.fsync);sha.sha512=counted('sha512',sha.sha512)\n"
    "atexit.register(lambda:sys.stderr.write(repr(calls)))"
)


def test_a_pruned_releases_inode_judged_once_for_every_kept_release_still_finds_a_swapped_file(
    tmp_path,
):
    """Prune stats each shared inode once, through one path, for every kept release that
    recorded it. A file swapped for another inode (a rename over it) in one of them is not
    that inode: after the prune its release still reads back as altered, and the next
    release is placed from the good copy."""
    import os

    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    a = b"A" * 4096
    for i, rid in enumerate(["app-1", "app-2", "app-3"]):
        files = {"u/a": a, "u/x": b"x%d" % i}
        assert _publish(tmp_path, rid, files, str(i + 1), ["u/x"] if i else ["u/a", "u/x"])[0] == 0
        assert run(tmp_path, "switch", "--id", rid)[0] == 0
    inode = (tmp_path / "releases" / "app-1" / "u" / "a").stat().st_ino
    assert (tmp_path / "releases" / "app-3" / "u" / "a").stat().st_ino == inode  # one inode
    swapped = tmp_path / "releases" / "app-3" / "u" / "a"
    (tmp_path / "evil").write_bytes(b"E" * 4096)
    os.replace(tmp_path / "evil", swapped)  # same size, another inode
    assert run(tmp_path, "prune", "--keep", "2")[1]["removed"] == ["app-1"]
    rc, back = run(tmp_path, "readback", "--id", "app-3", "--full")
    assert not back["ok"] and back["mismatches"] == ["u/a: content differs"], back
    # the next release is placed from a copy that still holds u/a's bytes
    assert _publish(tmp_path, "app-4", {"u/a": a, "u/x": b"x4"}, "4", ["u/x"])[0] == 0
    assert (tmp_path / "releases" / "app-4" / "u" / "a").read_bytes() == a


def test_removing_a_tree_never_follows_a_symlink_out_of_it(tmp_path):
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "keep").write_bytes(b"k")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"f")
    (tree / "a" / "link").symlink_to(outside / "d")
    (tree / "file-link").symlink_to(outside / "d" / "keep")
    ferry_agent.remove_tree(str(tree))
    assert not tree.exists()
    assert (outside / "d" / "keep").read_bytes() == b"k"
    ferry_agent.remove_tree(str(tree))  # gone already: nothing to do, no error
    (tmp_path / "dir-link").symlink_to(outside)
    ferry_agent.remove_tree(str(tmp_path / "dir-link"))  # a link itself is not a tree to empty
    assert (outside / "d" / "keep").exists()


@pytest.mark.parametrize("syncfs", [True, False])
def test_a_release_is_made_durable_once_and_its_signature_checked_once_per_session(
    tmp_path, syncfs
):
    """receive then verify in one session: the manifest's ed25519 runs once (verify reads back
    the bytes receive checked), the objects cross a 1 MiB pipe, and the placed release is made
    durable by one syncfs(2), not an fsync per file, where the host has it (Linux); without
    it (no _ctypes), every received file and directory is fsynced."""
    import fcntl

    files = {f"u/d{i % 4}/f{i}": f"content {i}\n".encode() * 50 for i in range(40)}
    raw, sig, _ = package(files)
    spy = COUNTING + ("" if syncfs else ";sys.modules['_ctypes']=None")
    proc = _session_with_spy(tmp_path, spy)
    assert _answer(proc, {"op": "pin", "args": {"key": PUB.hex()}})["_code"] == 0
    objects = {hashlib.sha256(d).hexdigest(): d for d in files.values()}
    stream = receive_stream(raw, sig, objects)
    res = _answer(proc, {"op": "receive", "args": {"id": "app-1"}}, stream)
    assert res["_code"] == 0 and res["received"] == 40, res
    assert fcntl.fcntl(proc.stdin.fileno(), 1032) == 1 << 20  # F_GETPIPE_SZ
    res = _answer(proc, {"op": "verify", "args": {"id": "app-1"}})
    assert res["_code"] == 0 and res["placed"] == 40, res
    assert _answer(proc, {"op": "switch", "args": {"id": "app-1"}})["current"] == "app-1"
    _, err = proc.communicate(timeout=30)
    counts = eval(err.decode().strip().splitlines()[-1])  # noqa: S307 - our own child's repr
    assert counts["sha512"] == 1, counts
    if syncfs:  # the metadata files' own atomic writes (manifest, signature, ids) and the
        assert counts["fsync"] < 12, counts  # three directories switch syncs: none per file
    else:
        assert counts["fsync"] >= 40 + 5, counts  # each file, each directory
    back = run(tmp_path, "readback", "--id", "app-1", "--full")[1]
    assert back["ok"] and back["mismatches"] == []


def test_a_session_that_places_and_switches_a_release_imports_no_json(tmp_path):
    """Importing json costs a small host ~17 ms (its decoder compiles regular expressions):
    the state a switch writes is indented by the agent's own encoder, not json's."""
    files = {f"u/f{i}": b"x%d" % i for i in range(5)}
    raw, sig, _ = package(files)
    spy = (
        "import atexit,sys;"
        "atexit.register(lambda:sys.stderr.write('json' in sys.modules and 'JSON' or 'none'))"
    )
    proc = _session_with_spy(tmp_path, spy)
    assert _answer(proc, {"op": "pin", "args": {"key": PUB.hex()}})["_code"] == 0
    stream = receive_stream(raw, sig, {hashlib.sha256(d).hexdigest(): d for d in files.values()})
    assert _answer(proc, {"op": "receive", "args": {"id": "app-1"}}, stream)["_code"] == 0
    for op in ("verify", "switch", "readback"):
        assert _answer(proc, {"op": op, "args": {"id": "app-1"}})["_code"] == 0, op
    _, err = proc.communicate(timeout=30)
    assert err.decode().strip().endswith("none"), err
    state = (tmp_path / ".ferry" / "state.json").read_text()
    assert state == json.dumps(json.loads(state), indent=1)  # as json would write it


def test_a_no_op_session_never_loads_openssl(tmp_path):
    """A host that already runs the release intact answers `inspect` (its stored manifest
    checked by the digest Ferry names) without loading OpenSSL (~5.5 ms of its CPU): the
    digest of 0.1 MB goes through CPython's built-in sha256. Its objects did, when they
    were received: bulk bytes still go through OpenSSL."""
    files = {f"u/f{i}": b"x%d" % i for i in range(5)}
    raw, sig, content = package(files)
    digest = json.loads(raw)["digest"]
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    objects = {hashlib.sha256(d).hexdigest(): d for d in files.values()}
    stream = receive_stream(raw, sig, objects)
    assert run(tmp_path, "receive", "--id", "app-1", stdin=stream)[0] == 0
    assert run(tmp_path, "verify", "--id", "app-1")[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    spy = "import atexit,sys;atexit.register(lambda:sys.stderr.write(" + (
        "'_hashlib' in sys.modules and 'SSL' or 'none'))"
    )
    for full in (False, True):
        proc = _session_with_spy(tmp_path, spy)
        args = {"id": "app-1", "key": PUB.hex(), "full": full, "digest": digest}
        res = _answer(proc, {"op": "inspect", "args": args})
        assert res["_code"] == 0 and res["have"] is True, res
        _, err = proc.communicate(timeout=30)
        assert err.decode().strip().endswith("none"), err
    # the built-in code gives OpenSSL's digests
    data = os.urandom(70_000)
    assert ferry_agent.small_hash(data).hexdigest() == hashlib.sha256(data).hexdigest()
    assert ferry_agent.small_hash(data, "sha512").digest() == hashlib.sha512(data).digest()
    assert ferry_agent.content_digest({"content": content}) == digest


@pytest.mark.parametrize(
    "obj",
    [
        {"current": "app-2", "previous": None, "history": [{"current": "app-1", "at": "t"}]},
        {}, [], {"a": {}, "b": [], "c": [[], {}], "é\"\n": 1.5, 1: True, None: 0, 2.5: "x"},
        [1, [2, [3, {"x": [None, False]}]]], "plain", 7,
    ],
)  # fmt: skip
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_agents_indented_json_is_jsons(obj, ensure_ascii):
    for indent in (1, 2):
        got = ferry_agent.dumps(obj, indent=indent, ensure_ascii=ensure_ascii)
        assert got == json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a//b", "a/./b", "a\\b", "", "a\0b"])
def test_an_unsafe_path_is_refused_every_time_not_only_the_first(path):
    for _ in range(2):  # the agent remembers safe paths only
        with pytest.raises(ferry_agent.AgentError, match="unsafe path"):
            ferry_agent.safe_relpath(path)
    for not_a_path in (["x"], None, 5):
        with pytest.raises(ferry_agent.AgentError, match="unsafe path"):
            ferry_agent.safe_relpath(not_a_path)


@pytest.mark.parametrize("known", ["recorded", "none", "wrong"])
def test_a_prior_release_ferry_records_is_checked_by_its_digest_not_its_signature(tmp_path, known):
    """receive and verify of app-2 on a host holding app-1: the stored app-1 manifest, whose
    objects app-2 reuses, is checked by the digest Ferry records for it (no ed25519); without
    one, or with a digest it does not match, by its signature, as before."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    a, b = b"A" * 4096, b"B" * 100
    assert _publish(tmp_path, "app-1", {"u/a": a}, "1", ["u/a"])[0] == 0
    digest = json.loads(_release({"u/a": a}, "1")[0])["digest"]
    recorded = {"recorded": {"app-1": digest}, "none": None, "wrong": {"app-1": "sha256:0"}}
    args = {"id": "app-2", **({"known": recorded[known]} if recorded[known] else {})}
    raw, sig = _release({"u/a": a, "u/b": b}, "2")
    proc = _session_with_spy(tmp_path, COUNTING)
    stream = receive_stream(raw, sig, {hashlib.sha256(b).hexdigest(): b})
    res = _answer(proc, {"op": "receive", "args": args}, stream)
    assert res["_code"] == 0 and res["needed"] == 1, res  # u/a is reused from app-1
    res = _answer(proc, {"op": "verify", "args": args})
    assert res["_code"] == 0 and res["placed"] == 2 and res["rehashed"] == 0, res
    _, err = proc.communicate(timeout=30)
    counts = eval(err.decode().strip().splitlines()[-1])  # noqa: S307 - our own child's repr
    # app-2's own signature once per session; app-1's too unless its digest was recorded
    assert counts["sha512"] == (1 if known == "recorded" else 2), counts


@pytest.mark.parametrize("other", ["unrelated", "shares-b", "shares-b-but-altered"])
def test_a_release_the_new_one_needs_nothing_from_is_not_checked_or_read(tmp_path, other):
    """app-2 on a host holding its prior app-1 (recorded) and an older app-0. app-0 is
    checked (by its signature) and used only when it holds an object app-2 lacks, so a host
    keeping several releases pays nothing for the ones an incremental release never uses;
    a stored manifest that claims an object but fails its signature is not used: the
    object is asked for."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    a, b, c = b"A" * 4096, b"B" * 100, b"C" * 100
    old = {"u/z": b"Z" * 50, "u/b": b} if other != "unrelated" else {"u/z": b"Z" * 50}
    assert _publish(tmp_path, "app-0", old, "0", sorted(old))[0] == 0
    assert _publish(tmp_path, "app-1", {"u/a": a}, "1", ["u/a"])[0] == 0
    if other == "shares-b-but-altered":  # the stored manifest no longer matches its signature
        path = tmp_path / ".ferry" / "meta" / "app-0.json"
        path.write_bytes(path.read_bytes().replace(b'"0"', b'"9"'))
    digest = json.loads(_release({"u/a": a}, "1")[0])["digest"]
    args = {"id": "app-2", "known": {"app-1": digest}}
    raw, sig = _release({"u/a": a, "u/b": b, "u/c": c}, "2")
    proc = _session_with_spy(tmp_path, COUNTING)
    proc.stdin.write(json.dumps({"op": "receive", "args": args}).encode() + b"\n")
    proc.stdin.write(json.dumps({"manifest_len": len(raw), "sig_len": len(sig)}).encode() + b"\n")
    proc.stdin.write(raw + sig)
    proc.stdin.flush()
    need = json.loads(proc.stdout.readline()[5:])
    objects = {hashlib.sha256(d).hexdigest(): d for d in (b, c)}
    want = {hashlib.sha256(c).hexdigest()} if other == "shares-b" else set(objects)
    assert set(need) == want
    for sha in need:
        proc.stdin.write(f"{sha} {len(objects[sha])}\n".encode() + objects[sha])
    proc.stdin.write(b"END\n")
    proc.stdin.flush()
    while not (line := proc.stdout.readline()).startswith(b"RESULT "):
        assert line, "the agent died"
    res = json.loads(line[7:])
    assert res["_code"] == 0 and res["received"] == len(want), res
    res = _answer(proc, {"op": "verify", "args": args})
    assert res["_code"] == 0 and res["placed"] == 3 and res["rehashed"] == 0, res
    assert _answer(proc, {"op": "switch", "args": {"id": "app-2"}})["current"] == "app-2"
    _, err = proc.communicate(timeout=30)
    counts = eval(err.decode().strip().splitlines()[-1])  # noqa: S307 - our own child's repr
    # app-2's own signature; app-0's only when it was worth checking (it holds u/b)
    assert counts["sha512"] == (1 if other == "unrelated" else 2), counts
    back = run(tmp_path, "readback", "--id", "app-2", "--full")[1]
    assert back["ok"] and back["mismatches"] == [], back


def test_a_mode_changed_on_the_host_is_a_change_to_the_release(tmp_path):
    """A published file's mode is its manifest's: a chmod (+x, a setuid bit, world-writable)
    is found by every read-back, quick or full, as an edit of its bytes is; `check` sets
    the release aside so that the next deploy publishes a clean copy."""
    import os

    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    x, y = b"X" * 64, b"Y" * 64
    assert _publish(tmp_path, "app-1", {"u/a": x, "u/y": y}, "1", ["u/a", "u/y"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    for full in ([], ["--full"]):
        assert run(tmp_path, "readback", "--id", "app-1", *full)[1]["ok"] is True
    os.chmod(tmp_path / "releases" / "app-1" / "u" / "a", 0o4755)
    for args in ([], ["--full"], ["--full", "--rehash"]):
        back = run(tmp_path, "readback", "--id", "app-1", *args)[1]
        assert not back["ok"] and back["mismatches"] == ["u/a: mode 4755, published 0644"], back
    res = run(tmp_path, "check", "--id", "app-1")[1]
    assert res["ok"] is False and res["current_set_aside"] is True, res


def test_every_file_gets_its_manifests_mode_and_no_published_release_changes(tmp_path):
    """A file app-2 links from app-1 keeps app-1's inode only when its mode is the one app-2
    gives it; content wanted with another mode is copied, never chmodded in place: the
    releases sharing that inode would change with it (a backout to app-1 would run its
    files with app-2's modes). The same content at two paths of different modes is two files."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    x, y = b"X" * 64, b"Y" * 64
    assert _publish(tmp_path, "app-1", {"u/a": x, "u/y": y}, "1", ["u/a", "u/y"])[0] == 0
    one = tmp_path / "releases" / "app-1" / "u"

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o7777

    files = {"u/a": x, "u/b": x, "u/y": y}
    raw, sig = _release(files, "2", {"u/a": 0o755, "u/b": 0o644})
    rc, res = run(tmp_path, "receive", "--id", "app-2", stdin=receive_stream(raw, sig, {}))
    assert rc == 0 and res["needed"] == 0, res
    rc, res = run(tmp_path, "verify", "--id", "app-2")
    assert rc == 0 and res["rehashed"] == 0, res
    two = tmp_path / "releases" / "app-2" / "u"
    assert (mode(two / "a"), mode(two / "b"), mode(two / "y")) == (0o755, 0o644, 0o644)
    assert (two / "b").stat().st_ino == (one / "a").stat().st_ino  # same mode: one inode
    assert (two / "a").stat().st_ino != (one / "a").stat().st_ino  # another mode: a copy
    assert mode(one / "a") == 0o644  # app-1 as it was published
    # app-3 gives u/a 0644 again: whichever copy it comes from, app-1 and app-2 keep theirs
    raw3, sig3 = _release({"u/a": x}, "3", {"u/a": 0o644})
    rc, res = run(tmp_path, "receive", "--id", "app-3", stdin=receive_stream(raw3, sig3, {}))
    assert rc == 0 and run(tmp_path, "verify", "--id", "app-3")[0] == 0
    assert mode(tmp_path / "releases" / "app-3" / "u" / "a") == 0o644
    assert (mode(one / "a"), mode(two / "a"), mode(two / "b")) == (0o644, 0o755, 0o644)
    # received content at two paths of different modes: each path gets its own
    z = b"Z" * 64
    raw4, sig4 = _release({"u/s": z, "u/t": z}, "4", {"u/s": 0o755, "u/t": 0o644})
    sent = {hashlib.sha256(z).hexdigest(): z}
    rc, res = run(tmp_path, "receive", "--id", "app-4", stdin=receive_stream(raw4, sig4, sent))
    assert rc == 0 and run(tmp_path, "verify", "--id", "app-4")[0] == 0
    four = tmp_path / "releases" / "app-4" / "u"
    assert (mode(four / "s"), mode(four / "t")) == (0o755, 0o644)
    for rid in ("app-1", "app-2", "app-3", "app-4"):  # every release still as verified
        assert run(tmp_path, "check", "--id", rid, "--full")[1]["ok"] is True, rid


def test_the_logins_environment_does_not_reach_the_agent(tmp_path):
    """A PYTHONPATH exported on the host (a shell rc file sourced for the ssh command) would
    put its modules before the standard library the verified agent imports: the command
    the session runs ignores it."""
    from orchestrator.transport.session import agent_command, boot_input

    shadow, ran = tmp_path / "shadow", tmp_path / "ran"
    shadow.mkdir()
    for name in ("types", "hashlib", "fcntl", "select", "struct", "shutil"):  # none frozen
        (shadow / f"{name}.py").write_text(f"open({str(ran)!r}, 'a').write({name!r} + ' ')\n")
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    bin_dir.mkdir()  # the command's `python3` is this interpreter, wherever it is installed
    (bin_dir / "python3").symlink_to(sys.executable)
    request = json.dumps({"op": "pin", "args": {"key": PUB.hex()}}).encode() + b"\n"
    proc = subprocess.run(
        ["sh", "-c", agent_command(str(root))],
        input=boot_input() + request,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(shadow)},
        capture_output=True,
        timeout=30,
    )
    results = [
        json.loads(ln[7:]) for ln in proc.stdout.decode().splitlines() if ln[:7] == "RESULT "
    ]
    assert proc.returncode == 0, proc.stderr.decode()[-500:]
    assert [r["pinned"] for r in results] == ["new"]
    assert not ran.exists(), f"shadowing modules ran: {ran.read_text()}"


def test_the_agent_is_python_3_6_syntax_so_older_hosts_can_compile_it():
    """A host compiles the agent's source with its own python3 when its Python is not
    Ferry's (BOOT): a construct newer than that host's Python fails every step there. A
    parenthesized `with` (3.9) did, on every Ubuntu 20.04 or Debian 10 host."""
    import ast

    ast.parse(agent.source().decode(), feature_version=(3, 6))


def _two_releases_sharing_a_file(root: Path) -> Path:
    """app-1 and app-2 published and switched to, one inode for u/a in both: app-2's."""
    assert run(root, "pin", "--key", PUB.hex())[0] == 0
    for i, rid in enumerate(["app-1", "app-2"]):
        files = {"u/a": b"A" * 4096, "u/x": b"x%d" % i}
        assert _publish(root, rid, files, str(i + 1), ["u/x"] if i else ["u/a", "u/x"])[0] == 0
        assert run(root, "switch", "--id", rid)[0] == 0
    return root / "releases" / "app-2" / "u" / "a"


def test_a_kept_file_written_while_prune_removes_a_release_still_reads_back_as_changed(
    tmp_path, monkeypatch
):
    """Unlinking app-1's name of a shared inode moves its ctime, so prune records app-2's
    file again after the removal, but only where nothing but the ctime moved: a write in
    that window (same size) stays a change that read-back finds, not a verified copy that
    the next release would be linked from unread."""
    kept = _two_releases_sharing_a_file(tmp_path)
    remove = ferry_agent.remove_tree

    def remove_then_write(path: str) -> None:
        remove(path)
        kept.write_bytes(b"X" * 4096)

    monkeypatch.setattr(ferry_agent, "remove_tree", remove_then_write)
    host = ferry_agent.Host(str(tmp_path))
    args = ferry_agent.Args(**dict(ferry_agent.DEFAULTS, keep=1))
    res, code = ferry_agent.dispatch(host, "prune", args)
    assert code == 0 and res["removed"] == ["app-1"], res
    assert not ferry_agent.recorded_as(os.stat(kept), host.identities("app-2")["u/a"])
    back = run(tmp_path, "readback", "--id", "app-2", "--full")[1]  # re-hashes what moved
    assert not back["ok"] and back["mismatches"] == ["u/a: content differs"], back


def test_prune_records_shared_files_again_when_the_removed_release_has_no_identities(tmp_path):
    """A removed release whose identities were never recorded (a crash between its publish
    and that record) may share any inode with the kept ones: each kept file is looked at,
    so an intact one is not re-read by the next deploy for the ctime the removal moved."""
    kept = _two_releases_sharing_a_file(tmp_path)
    os.unlink(tmp_path / ".ferry" / "meta" / "app-1.ids")
    assert run(tmp_path, "prune", "--keep", "1")[1]["removed"] == ["app-1"]
    recorded = ferry_agent.Host(str(tmp_path)).identities("app-2")["u/a"]
    assert ferry_agent.recorded_as(os.stat(kept), recorded)


def test_removing_a_tree_deeper_than_pythons_recursion_limit(tmp_path):
    """Directory by directory with a stack, not recursion: a release holding a tree 1,500
    deep (past the default limit of 1,000 frames) is removed, not left to fail every prune."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # one descriptor per level while it descends
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    try:
        tree = tmp_path / "tree"
        fd = os.open(tmp_path, os.O_RDONLY)
        for name in ["tree"] + ["d"] * 1500:  # mkdir relative to the last: no long paths
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        os.close(fd)
        ferry_agent.remove_tree(str(tree))
        assert not tree.exists()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_removing_a_tree_leaves_a_filesystem_mounted_inside_it(tmp_path):
    """A filesystem mounted inside an old release (a bind of data by hand, a tmpfs) is not
    the release's to empty, as with `rm --one-file-system`: it and its parents are left."""
    tree = tmp_path / "tree"  # root, as the fleet suites: `mount` refuses anyone else
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "f").write_bytes(b"f")
    mount = tree / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ferry-test", str(mount)], check=True)
    try:
        (mount / "keep").write_bytes(b"k")
        ferry_agent.remove_tree(str(tree))
        assert (mount / "keep").read_bytes() == b"k"
        assert not (tree / "a").exists() and tree.exists()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_release_published_but_never_recorded_is_published_again_over_its_leftover(
    tmp_path,
):
    """A crash between placing releases/<id> and recording it leaves the directory without
    its record: the next deploy of that release publishes a clean copy in its place (it
    once failed on every later try: Directory not empty)."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    files = {"u/a": b"A", "u/b": b"B"}
    assert _publish(tmp_path, "app-1", files, "1", ["u/a", "u/b"])[0] == 0
    os.unlink(tmp_path / ".ferry" / "meta" / "app-1.json")  # the crash's window
    (tmp_path / "releases" / "app-1" / "u" / "b").write_bytes(b"tampered")
    assert not run(tmp_path, "inspect", "--id", "app-1", "--key", PUB.hex())[1]["have"]
    rc, res = _publish(tmp_path, "app-1", files, "1", ["u/a", "u/b"])
    assert rc == 0 and res["already"] is False, res
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    back = run(tmp_path, "readback", "--id", "app-1", "--full")[1]
    assert back["ok"], back
    assert (tmp_path / "releases" / "app-1" / "u" / "b").read_bytes() == b"B"


def test_a_leftover_the_live_service_runs_from_is_set_aside_not_removed(tmp_path):
    """`current` points at a release whose record is gone (removed by hand): the service
    keeps running from it, set aside, until the clean copy is switched to."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    assert _publish(tmp_path, "app-1", {"u/a": b"A"}, "1", ["u/a"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    os.unlink(tmp_path / ".ferry" / "meta" / "app-1.json")
    assert _publish(tmp_path, "app-1", {"u/a": b"A"}, "1", ["u/a"])[0] == 0
    live = os.readlink(tmp_path / "current")
    assert live.startswith("releases/.broken-app-1-"), live
    assert (tmp_path / live / "u" / "a").read_bytes() == b"A"
    assert (tmp_path / "releases" / "app-1" / "u" / "a").read_bytes() == b"A"


def test_a_leftover_holding_a_mount_is_refused_with_its_remedy_and_the_mount_kept(tmp_path):
    """A prune that met a filesystem mounted inside a release leaves that directory without
    its record; publishing the same release again says what is in the way, and empties
    nothing mounted there."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    assert _publish(tmp_path, "app-1", {"u/a": b"A"}, "1", ["u/a"])[0] == 0
    assert _publish(tmp_path, "app-2", {"u/a": b"B"}, "2", ["u/a"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-2")[0] == 0
    mount = tmp_path / "releases" / "app-1" / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ferry-test", str(mount)], check=True)
    try:
        (mount / "keep").write_bytes(b"k")
        assert run(tmp_path, "prune", "--keep", "1")[1]["removed"] == ["app-1"]
        assert not (tmp_path / ".ferry" / "meta" / "app-1.json").exists()
        rc, res = _publish(tmp_path, "app-1", {"u/a": b"A"}, "1", ["u/a"])
        assert (
            rc == 12 and "releases/app-1 is left from a release removed before" in (res["message"])
        ), res
        assert "unmount" in res["message"] and (mount / "keep").read_bytes() == b"k"
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    rc, res = _publish(tmp_path, "app-1", {"u/a": b"A"}, "1", [])  # received before
    assert rc == 0 and res["already"] is False, res


# what a host's older python3 lacks, taken away from this one before the agent starts
OLDER_PYTHONS = {
    "3.6": "import os;del os.posix_spawn;del os.waitstatus_to_exitcode",
    "3.8": "import os;del os.waitstatus_to_exitcode",
}


@pytest.mark.parametrize("version", sorted(OLDER_PYTHONS))
def test_a_session_on_an_older_hosts_python_publishes_runs_hooks_and_prunes(tmp_path, version):
    """The host's own python3 runs the agent: 3.6 and 3.7 have no posix_spawn, 3.8 no
    waitstatus_to_exitcode, and a hook or check used both (every milestone check failed
    the session on such a host). Their absence is made here, on this interpreter; that the
    source parses as 3.6 is the test above's."""
    proc = _session_with_spy(tmp_path, OLDER_PYTHONS[version])
    assert _answer(proc, {"op": "pin", "args": {"key": PUB.hex()}})["_code"] == 0
    for i, rid in enumerate(["app-1", "app-2"]):
        files = {"u/a": b"A" * 4096, "u/x": b"x%d" % i}
        raw, sig = _release(files, str(i + 1))
        send = [files["u/x"]] + ([] if i else [files["u/a"]])  # app-2 has u/a already
        objects = {hashlib.sha256(d).hexdigest(): d for d in send}
        receive = {"op": "receive", "args": {"id": rid}}
        assert _answer(proc, receive, receive_stream(raw, sig, objects))["_code"] == 0
        for op in ("verify", "switch"):
            assert _answer(proc, {"op": op, "args": {"id": rid}})["_code"] == 0, (rid, op)
    hook = {"command": "echo out; echo err >&2; exit 3", "timeout": 10}
    done = _answer(proc, {"op": "run", "args": hook})
    assert (done["rc"], done["output"]) == (3, "out\nerr\n"), done
    killed = _answer(proc, {"op": "run", "args": {"command": "sleep 30", "timeout": 0.3}})
    assert killed["rc"] == 124, killed  # the timeout's exit code, as timeout(1) gives
    back = _answer(proc, {"op": "readback", "args": {"id": "app-2", "full": True}})
    assert back["ok"], back
    assert _answer(proc, {"op": "prune", "args": {"keep": 1}})["removed"] == ["app-1"]
    proc.stdin.close()  # type: ignore[union-attr]
    assert proc.wait(timeout=30) == 0


# --- crashes between two of an operation's writes (an adversarial review's findings) -----


class Killed(BaseException):
    """The agent killed at this point: nothing of the operation runs after it."""


def _op(root: Path, op: str, **args: object) -> tuple[dict, int]:
    """One operation in this process (a fresh Host: a new session), so a step can be
    replaced by one that kills it."""
    return ferry_agent.dispatch(
        ferry_agent.Host(str(root)), op, ferry_agent.Args(**dict(ferry_agent.DEFAULTS, **args))
    )


def _receive(root: Path, rid: str, files: dict[str, bytes], version: str, send: list[str]):
    raw, sig = _release(files, version)
    objects = {hashlib.sha256(files[p]).hexdigest(): files[p] for p in send}
    return run(root, "receive", "--id", rid, stdin=receive_stream(raw, sig, objects))


def test_a_verify_cut_before_its_record_leaves_no_received_object_trusted_unread(
    tmp_path, monkeypatch
):
    """Killed while letting go of the objects it placed, verify leaves app-1 unrecorded and
    an object in incoming/ that is still a link to app-1/u/a. A write through that leftover
    must not reach app-2: its receive asks for the object again (it was once taken as
    freshly received: published unread, and chmodded in place)."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    x = b"X" * 64
    assert _receive(tmp_path, "app-1", {"u/a": x, "u/b": b"B"}, "1", ["u/a", "u/b"])[0] == 0
    unlink = os.unlink

    def killed(path, *a, **kw):  # type: ignore[no-untyped-def]
        if "/incoming/" in str(path) and len(os.path.basename(str(path))) == 64:
            raise Killed
        return unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", killed)
    with pytest.raises(Killed):
        _op(tmp_path, "verify", id="app-1")
    monkeypatch.setattr(os, "unlink", unlink)
    assert not (tmp_path / ".ferry" / "meta" / "app-1.json").exists()
    with open(tmp_path / "releases" / "app-1" / "u" / "a", "r+b") as f:
        f.write(b"EVIL")  # the leftover is not Ferry's: anyone may have written it
    rc, res = _receive(tmp_path, "app-2", {"u/x": x, "u/c": b"C"}, "2", ["u/x", "u/c"])
    assert rc == 0 and res["needed"] == 2, res
    assert _op(tmp_path, "verify", id="app-2")[1] == 0
    assert run(tmp_path, "switch", "--id", "app-2")[0] == 0
    assert run(tmp_path, "readback", "--id", "app-2", "--full")[1]["ok"]
    assert (tmp_path / "releases" / "app-2" / "u" / "x").read_bytes() == x


@pytest.mark.parametrize("settle_cut", [False, True])
@pytest.mark.parametrize("tampered", [False, True])
def test_a_verify_killed_while_placing_leaves_its_objects_received_unless_written_since(
    tmp_path, monkeypatch, tampered, settle_cut
):
    """Killed while placing files (kill -9, the OOM killer), verify leaves releases/.tmp-<id>
    holding a second name of each object it placed. The next session reads those objects
    again and removes that directory: each whose bytes are still its name stays received
    and is not sent again; one written through the leftover name is. `settle_cut`: that
    session is killed too, just after the directory went; the one after it trusts no
    object written through it (each had been read good before it lost its second name)."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    files = {"u/a": b"A" * 3000, "u/b": b"B" * 2000, "u/c": b"C" * 1000}
    assert _receive(tmp_path, "app-1", files, "1", list(files))[0] == 0
    link, placed = os.link, []

    def killed(src, dest, *a, **kw):  # type: ignore[no-untyped-def]
        if len(placed) == 2:
            raise Killed
        placed.append(dest)
        return link(src, dest, *a, **kw)

    monkeypatch.setattr(os, "link", killed)
    with pytest.raises(Killed):
        _op(tmp_path, "verify", id="app-1")
    monkeypatch.setattr(os, "link", link)
    incoming = tmp_path / ".ferry" / "incoming"
    shas = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    assert sorted(os.stat(incoming / shas[p]).st_nlink for p in files) == [1, 2, 2]
    first = Path(placed[0])
    assert first.parent.parent.name == ".tmp-app-1"
    if tampered:
        with open(first, "r+b") as f:
            f.write(b"EVIL")  # through the leftover name: the object is not its bytes now
    if settle_cut:
        remove = ferry_agent.remove_tree

        def cut(path):  # type: ignore[no-untyped-def]
            remove(path)
            raise Killed

        monkeypatch.setattr(ferry_agent, "remove_tree", cut)
        host = ferry_agent.Host(str(tmp_path))
        host.hold("the cut session's receive", wait=0)
        with pytest.raises(Killed):
            host.settle_incoming()
        host.let_go()
        monkeypatch.setattr(ferry_agent, "remove_tree", remove)
        assert not (tmp_path / "releases" / ".tmp-app-1").exists()
    resend = [str(first.relative_to(first.parent.parent))] if tampered else []
    rc, res = _receive(tmp_path, "app-1", files, "1", resend)  # what would be asked for
    assert rc == 0 and res["needed"] == len(resend), res
    assert not (tmp_path / "releases" / ".tmp-app-1").exists()
    kept = [incoming / shas[str(Path(d).relative_to(first.parent.parent))] for d in placed]
    for path in kept[1:] if tampered else kept:  # the ones taken back: 0600, as received
        assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(path).st_nlink == 1
    res, code = _op(tmp_path, "verify", id="app-1")
    assert code == 0 and res["rehashed"] == 0, res
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    assert run(tmp_path, "readback", "--id", "app-1", "--full")[1]["ok"]
    for p, data in files.items():
        assert (tmp_path / "releases" / "app-1" / p).read_bytes() == data


def test_objects_received_before_the_host_rebooted_are_sent_again(tmp_path):
    """Received objects are made durable once, at publish: a power loss before that may
    leave one empty or torn. After a reboot (another boot_id) receive asks for all again."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    files = {"u/a": b"A" * 5000, "u/b": b"B"}
    assert _receive(tmp_path, "app-1", files, "1", ["u/a", "u/b"])[0] == 0
    incoming = tmp_path / ".ferry" / "incoming"
    assert (incoming / ".boot").read_text() == Path(
        "/proc/sys/kernel/random/boot_id"
    ).read_text().strip()
    (incoming / ".boot").write_text("an-earlier-boot")
    (incoming / hashlib.sha256(files["u/a"]).hexdigest()).write_bytes(b"\0" * 5000)  # torn
    rc, res = _receive(tmp_path, "app-1", files, "1", ["u/a", "u/b"])
    assert rc == 0 and res["needed"] == 2, res
    assert _op(tmp_path, "verify", id="app-1")[1] == 0
    assert (tmp_path / "releases" / "app-1" / "u" / "a").read_bytes() == files["u/a"]


def test_a_switch_cut_before_its_state_record_records_it_when_run_again(tmp_path, monkeypatch):
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    for i, rid in enumerate(["app-1", "app-2"]):
        assert _publish(tmp_path, rid, {"u/a": b"%d" % i}, str(i + 1), ["u/a"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0

    def killed(self, st):  # type: ignore[no-untyped-def]
        raise Killed

    monkeypatch.setattr(ferry_agent.Host, "save_state", killed)
    with pytest.raises(Killed):
        _op(tmp_path, "switch", id="app-2")
    monkeypatch.undo()
    assert os.readlink(tmp_path / "current") == "releases/app-2"
    assert run(tmp_path, "switch", "--id", "app-2")[0] == 0
    st = json.loads((tmp_path / ".ferry" / "state.json").read_text())
    assert (st["current"], st["previous"]) == ("app-2", "app-1")
    assert [h["current"] for h in st["history"]] == ["app-1", "app-2"]


@pytest.mark.parametrize("step", ["_link_tree", "_point_current", "remove_tree", None])
def test_setting_aside_the_live_release_never_leaves_current_naming_a_missing_directory(
    tmp_path, monkeypatch, step
):
    """A live release found altered is set aside while the service runs from it: killed at
    any step, `current` still names a directory holding the live files, and the next
    deploy of the release publishes a clean copy and switches to it."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    files = {"u/a": b"A" * 10, "u/d/b": b"B"}
    assert _publish(tmp_path, "app-1", files, "1", ["u/a", "u/d/b"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    (tmp_path / "releases" / "app-1" / "u" / "a").write_bytes(b"altered!!!")
    if step is not None:

        def killed(*a):  # type: ignore[no-untyped-def]
            raise Killed

        monkeypatch.setattr(ferry_agent, step, killed)
        with pytest.raises(Killed):
            _op(tmp_path, "check", id="app-1", full=True)
        monkeypatch.undo()
    else:
        inode = os.stat(tmp_path / "releases" / "app-1").st_ino
        res = _op(tmp_path, "check", id="app-1", full=True)[0]
        assert res["current_set_aside"] and not (tmp_path / "releases" / "app-1").exists()
        # the directory itself moved: a process working in it (its cwd) keeps it
        assert os.stat(res["set_aside"]).st_ino == inode
        assert os.path.realpath(tmp_path / "current") == res["set_aside"]
    live = tmp_path / "current"
    assert (live / "u" / "a").read_bytes() == b"altered!!!"  # what the service ran
    assert (live / "u" / "d" / "b").read_bytes() == b"B"
    rc, res = _receive(tmp_path, "app-1", files, "1", ["u/a", "u/d/b"])  # none is trusted
    assert rc == 0, res
    assert _op(tmp_path, "verify", id="app-1")[1] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    assert (live / "u" / "a").read_bytes() == files["u/a"]
    assert run(tmp_path, "readback", "--id", "app-1", "--full")[1]["ok"]


def test_prune_sweeps_what_crashes_leave_once_it_is_an_hour_old(tmp_path):
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    assert _publish(tmp_path, "app-1", {"u/a": b"A"}, "1", ["u/a"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    releases, incoming = tmp_path / "releases", tmp_path / ".ferry" / "incoming"
    old = ["releases/app-0", "releases/.tmp-app-2", "releases/.broken-app-1-2.tmp",
           ".ferry/incoming/" + "a" * 64 + ".part"]  # fmt: skip
    young = ["releases/app-3", ".ferry/incoming/" + "b" * 64 + ".part"]
    kept = ["releases/.broken-app-1-1", ".ferry/incoming/" + "c" * 64]  # staged, unverified
    for rel in old + young + kept:
        path = tmp_path / rel
        if rel.startswith("releases/"):
            (path / "u").mkdir(parents=True)
            (path / "u" / "f").write_bytes(b"f")
        else:
            path.write_bytes(b"part")
        if rel not in young:
            os.utime(path, (1_000_000, 1_000_000))
    res = _op(tmp_path, "prune", keep=1)[0]
    assert sorted(res["swept"]) == sorted(old), res
    assert not any((tmp_path / rel).exists() for rel in old)
    assert all((tmp_path / rel).exists() for rel in young + kept + ["releases/app-1/u/a"])
    assert incoming.is_dir() and releases.is_dir()


def test_a_container_switch_cut_after_its_container_started_is_still_reverted(
    tmp_path, monkeypatch
):
    """Killed between `docker run` and its record, the retried switch finds its container
    running; the backout of that release must still put the prior container back (it once
    recorded the switch as no change and left the new one running). A fake engine: the
    real one is tests/containers'."""
    engine: dict[str, dict] = {}
    cut = [""]  # the docker command the agent is killed in

    def docker(host, argv, timeout=120, stdin=None, check=True):  # type: ignore[no-untyped-def]
        if argv[0] == "run":
            name = argv[argv.index("--name") + 1]
            release = next(a for a in argv if a.startswith("ferry.release="))[14:]
            engine[name] = {"image": next(a for a in argv if a.startswith("img:")),
                            "running": True, "release": release}  # fmt: skip
            if cut[0] == "run":
                raise Killed
        elif argv[0] in ("stop", "start"):
            engine[argv[-1]]["running"] = argv[0] == "start"
            if cut[0] == argv[0]:
                raise Killed
        elif argv[0] == "rename":
            engine[argv[2]] = engine.pop(argv[1])
        elif argv[0] == "rm":
            engine.pop(argv[-1], None)
        return 0, ""

    monkeypatch.setattr(ferry_agent, "_docker", docker)
    monkeypatch.setattr(ferry_agent, "_container", lambda host, name: engine.get(name))

    def switch(rid: str, image: str) -> dict:
        res, code = _op(tmp_path, "container_switch", id=rid, unit="u", container={"image": image})
        assert code == 0, res
        return res

    left = tmp_path / ".ferry" / "incoming" / ".env-v"  # another unit's switch, cut short
    left.parent.mkdir(parents=True)
    left.write_text("TOKEN=secret\n")
    res, code = _op(tmp_path, "container_switch", id="r1", unit="u",
                    container={"image": "img:1", "env": {"A": "1"}})  # fmt: skip
    assert code == 0 and not left.exists(), res  # its secrets do not stay on the host
    cut[0] = "run"
    with pytest.raises(Killed):
        switch("r2", "img:2")
    cut[0] = ""
    assert switch("r2", "img:2")["already"]
    assert _op(tmp_path, "container_revert", id="r2", unit="u")[0]["image"] == "img:1"
    assert engine["ferry-u"] == {"image": "img:1", "running": True, "release": "r1"}
    # cut once the old one stopped, before its own ran: the backout starts the old one
    # again (the switch had already removed the older -prior, as every switch does)
    switch("r2", "img:2")
    cut[0] = "stop"
    with pytest.raises(Killed):
        switch("r4", "img:4")
    cut[0] = ""
    assert engine["ferry-u"] == {"image": "img:2", "running": False, "release": "r2"}
    assert _op(tmp_path, "container_revert", id="r4", unit="u")[0]["restarted"]
    assert engine == {"ferry-u": {"image": "img:2", "running": True, "release": "r2"}}
    # a release whose switch found its container running from a finished switch changed
    # nothing: its backout leaves the containers alone
    switch("r3", "img:3")
    assert switch("r3", "img:3")["already"]
    assert _op(tmp_path, "container_revert", id="r3", unit="u")[0]["unchanged"]


def test_setting_aside_a_live_release_with_a_volume_mounted_inside_copies_none_of_it(tmp_path):
    """The bridge that `current` names while the live release is renamed holds the mount
    point, never the volume's bytes; afterwards the volume is where `current` leads."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    assert _publish(tmp_path, "app-1", {"u/a": b"A" * 10}, "1", ["u/a"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    mount = tmp_path / "releases" / "app-1" / "u" / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ferry-test", str(mount)], check=True)
    try:
        (mount / "keep").write_bytes(b"k")
        (tmp_path / "releases" / "app-1" / "u" / "a").write_bytes(b"altered!!!")
        linked = []
        real = ferry_agent._link_tree

        def spy(src: str, dest: str) -> None:
            real(src, dest)
            linked.append(sorted(os.listdir(os.path.join(dest, "u", "data"))))

        ferry_agent._link_tree = spy  # type: ignore[assignment]
        try:
            res = _op(tmp_path, "check", id="app-1", full=True)[0]
        finally:
            ferry_agent._link_tree = real  # type: ignore[assignment]
        assert res["current_set_aside"] and linked == [[]], (res, linked)
        assert (tmp_path / "current" / "u" / "data" / "keep").read_bytes() == b"k"
        assert os.path.ismount(tmp_path / "current" / "u" / "data")
    finally:  # wherever the volume is now, and whatever the agent did
        _unmount_under(tmp_path)


def _unmount_under(top: Path) -> None:
    """Every mount below `top` (this test's own tmpfs), deepest first."""
    with open("/proc/mounts") as f:
        points = [ln.split()[1] for ln in f]
    for point in sorted((p for p in points if p.startswith(f"{top}/")), reverse=True):
        subprocess.run(["umount", point], check=True)
    assert not any(p.startswith(f"{top}/") for p in Path("/proc/mounts").read_text().split())


def test_a_verify_that_fails_keeps_what_was_received_for_the_next_try(tmp_path, monkeypatch):
    """A verify that fails before publishing (here: no space for a copy) lets go of the
    release it was placing: the objects it received stay received, and the next session
    asks for none of them again (each would otherwise be sent again, the old copies still
    taking their space)."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    files = {"u/a": b"A" * 100, "u/b": b"B" * 100}
    assert _receive(tmp_path, "app-1", files, "1", ["u/a", "u/b"])[0] == 0
    sync = ferry_agent._sync_tree

    def full(top, unsynced):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ferry_agent, "_sync_tree", full)
    res, code = _op(tmp_path, "verify", id="app-1")
    assert code == 12 and res["error"] == "disk-full", res
    monkeypatch.setattr(ferry_agent, "_sync_tree", sync)
    assert not (tmp_path / "releases" / ".tmp-app-1").exists()
    rc, res = _receive(tmp_path, "app-1", files, "1", [])  # a new session: nothing is sent
    assert rc == 0 and res["needed"] == 0, res
    assert _op(tmp_path, "verify", id="app-1")[1] == 0


def test_a_release_of_an_app_named_env_keeps_its_staged_manifest_across_sessions(tmp_path):
    """Release ids start with the app's name: one called env-exporter is not a container's
    env file, which the next session removes."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    files = {"u/a": b"A"}
    assert _receive(tmp_path, "env-exporter-1", files, "1", ["u/a"])[0] == 0
    assert run(tmp_path, "state")[0] == 0
    assert _receive(tmp_path, "app-2", {"u/x": b"X"}, "2", ["u/x"])[0] == 0  # settles
    assert _op(tmp_path, "verify", id="env-exporter-1")[1] == 0


# --- one agent at a time: a push session, the pull daemon, another Ferry's session ------------


def test_a_step_waits_for_another_agent_then_refuses_as_busy_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ferry_agent, "LOCK_WAIT", 0.3)
    other = ferry_agent.Host(str(tmp_path))
    other.hold("the pull agent's deploy of app-2 (deployment 7)")
    res, code = _op(tmp_path, "pin", key=PUB.hex())
    assert (res["error"], code) == ("busy", ferry_agent.EXIT_OS), res
    assert f"pid {os.getpid()}, the pull agent's deploy of app-2 (deployment 7)" in res["message"]
    assert "a Ferry session's pin waited 0.3 s" in res["message"], res["message"]
    assert not (tmp_path / ".ferry/dml.pub").exists()  # refused before any write
    assert _op(tmp_path, "state")[1] == 0  # reading the host takes no lock
    other.let_go()
    assert _op(tmp_path, "pin", key=PUB.hex())[1] == 0


def test_a_step_that_waits_goes_ahead_once_the_other_agent_is_done(tmp_path):
    import threading
    import time

    other = ferry_agent.Host(str(tmp_path))
    other.hold("a Ferry session's verify")
    threading.Timer(0.4, other.let_go).start()
    started = time.monotonic()
    res, code = _op(tmp_path, "pin", key=PUB.hex())
    assert code == 0 and time.monotonic() - started >= 0.35, res
    assert (tmp_path / ".ferry/dml.pub").read_text().strip() == PUB.hex()


def test_the_lock_goes_with_its_holder_however_it_dies_and_never_with_a_hook(tmp_path):
    import signal

    holder = subprocess.Popen(
        [sys.executable, "-I", "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); import ferry_agent as a; "
         "a.Host(sys.argv[2]).hold('x'); print('held', flush=True); sys.stdin.read()",
         str(agent.SOURCE_PATH.parent), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"held\n"  # type: ignore[union-attr]
        with pytest.raises(ferry_agent.AgentError, match="busy|another Ferry agent"):
            ferry_agent.Host(str(tmp_path)).hold("y", wait=0)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    host = ferry_agent.Host(str(tmp_path))
    host.hold("y", wait=2)  # the kernel let go of the killed holder's lock
    host.let_go()
    # a hook's child that outlives its step (a daemon it starts) does not keep the lock
    res, code = _op(tmp_path, "run", command="(sleep 5 >/dev/null 2>&1 &)", timeout=5)
    assert code == 0 and res["rc"] == 0, res
    host.hold("z", wait=0)
    host.let_go()


def test_an_agent_forgets_what_it_knew_of_the_host_once_another_agent_changed_it(tmp_path):
    mine, other = ferry_agent.Host(str(tmp_path)), ferry_agent.Host(str(tmp_path))
    mine.hold("a")
    mine._placed, mine._settled = {"k": "placement"}, True
    mine.let_go()
    mine.hold("b")  # nobody in between: what it knows still holds
    assert mine._placed == {"k": "placement"} and mine._settled
    mine.let_go()
    other.hold("c")
    other.let_go()
    mine.hold("d")
    assert mine._placed == {} and not mine._settled  # incoming/ is looked at again too
    mine.let_go()


def test_the_pull_daemon_holds_back_while_a_push_session_changes_the_host(tmp_path):
    pull = tmp_path / ".ferry/pull"
    pull.mkdir(parents=True)
    config = {"server": "http://127.0.0.1:9", "host": "h1", "insecure_http": True}
    (pull / "config.json").write_text(json.dumps(config))
    (pull / "token").write_text("t")
    daemon = ferry_agent.PullAgent(str(tmp_path))
    daemon.call = lambda *a, **k: (_ for _ in ()).throw(OSError("the server is down"))
    work = {"generation": 3, "deployment": 7, "purpose": "deploy", "release_id": None,
            "apply": "boot", "spec": {"actions": [{"step": "switch", "switch": None}]}}  # fmt: skip
    session = ferry_agent.Host(str(tmp_path))
    session.hold("a Ferry session's switch")
    daemon.booted = False
    daemon.apply(work)
    assert daemon.st["outbox"] == []  # nothing reported: the host is not failing
    assert daemon.st["pending"]["held_back"] and daemon.time_has_come(daemon.st["pending"])
    daemon.retry(daemon.st["pending"])  # still held: nothing changes
    assert daemon.st["pending"]["held_back"] and daemon.st["outbox"] == []
    session.let_go()
    daemon.retry(daemon.st["pending"])
    assert [(r["step"], r["ok"]) for r in daemon.st["outbox"]] == [("switch", True), ("done", True)]
    assert daemon.st["pending"] is None
    # held back in its window: once the window has closed, it waits for the next one
    closed = {"days": [], "start": "00:00", "end": "00:01", "tz": "UTC"}
    late = dict(work, apply="window", held_back=True, spec=dict(work["spec"], window=closed))
    assert not daemon.time_has_come(late)


def test_a_session_holds_the_lock_from_its_first_change_to_its_end_and_says_when_it_waits(
    tmp_path,
):
    """A deployment is never refused half-way on a host: only before its first change. Its
    wait is announced (WAIT), so the orchestrator's deadline moves by as much."""
    import threading

    proc = _session_with_spy(tmp_path, "pass")
    other = ferry_agent.Host(str(tmp_path))
    try:
        state = _answer(proc, {"op": "state"})  # reading takes no lock
        assert state["_code"] == 0
        other.hold("the pull agent's deploy of app-9 (deployment 3)", wait=0)
        threading.Timer(0.5, other.let_go).start()
        proc.stdin.write(json.dumps({"op": "pin", "args": {"key": PUB.hex()}}).encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert proc.stdout.readline() == b"WAIT 30\n"  # type: ignore[union-attr]
        assert json.loads(proc.stdout.readline()[7:])["_code"] == 0  # type: ignore[union-attr]
        with pytest.raises(ferry_agent.AgentError) as held:  # held to the session's end
            other.hold("the pull agent's deploy of app-9 (deployment 3)", wait=0)
        assert "a Ferry session's pin, since " in held.value.message, held.value.message
        done = _answer(proc, {"op": "run", "args": {"command": "true", "timeout": 5}})
        assert done["_code"] == 0  # its own later changes never wait for it
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)
    assert (tmp_path / ".ferry/agent.lock").read_text() == "2"  # its end let go: no holder
    other.hold("after the session", wait=0)
    other.let_go()


def test_inspect_and_check_take_the_lock_only_for_the_writes_they_come_to_make(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(ferry_agent, "LOCK_WAIT", 0.3)
    other = ferry_agent.Host(str(tmp_path))
    other.hold("the pull agent's deploy of app-2 (deployment 7)")
    res, code = _op(tmp_path, "inspect", id="app-1", key=PUB.hex())
    assert res["error"] == "busy" and not (tmp_path / ".ferry/dml.pub").exists(), res
    other.let_go()
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    files = {"u/a": b"alpha"}
    assert _publish(tmp_path, "app-1", files, "1", ["u/a"])[0] == 0
    (tmp_path / "releases/app-1/u/a").write_bytes(b"alphA")  # altered on the host
    other.hold("the pull agent's deploy of app-2 (deployment 7)")
    res, code = _op(tmp_path, "inspect", id="app-1", key=PUB.hex(), full=True)
    assert res["error"] == "busy", res  # it found the alteration, but may not set it aside
    assert (tmp_path / "releases/app-1").is_dir() and "app-1" in ferry_agent.Host(
        str(tmp_path)
    ).verified_ids()
    res, code = _op(tmp_path, "run", command="true", timeout=5, lock=False)
    assert code == 0 and res["rc"] == 0  # a check's command never waits
    other.let_go()
    res, code = _op(tmp_path, "inspect", id="app-1", key=PUB.hex(), full=True)
    assert code == 0 and res["check"]["set_aside"], res
    res, code = _op(tmp_path, "inspect", id="app-1", key=PUB.hex())
    assert code == 0 and res["pinned"] == "already"
    other.hold("the pull agent's deploy of app-2 (deployment 7)")
    res, code = _op(tmp_path, "inspect", id="app-1", key=PUB.hex())  # the no-op's path
    assert code == 0 and res["pinned"] == "already", res
    other.let_go()


def test_the_lock_is_never_left_held_and_a_replaced_lock_file_is_not_trusted(tmp_path, monkeypatch):
    import errno

    host = ferry_agent.Host(str(tmp_path))
    real = os.pwrite

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ferry_agent.os, "pwrite", full)
    res, code = _op(tmp_path, "pin", key=PUB.hex())
    assert res["error"] == "disk-full", res
    monkeypatch.setattr(ferry_agent.os, "pwrite", real)
    host.hold("free", wait=0)  # the failed step let go
    host.let_go()
    # someone removes the lock file while an agent has it open: a lock on it guards nothing
    (tmp_path / ".ferry/agent.lock").unlink()
    other = ferry_agent.Host(str(tmp_path))
    other.hold("the new file's holder", wait=0)
    with pytest.raises(ferry_agent.AgentError, match="the new file's holder"):
        host.hold("the old file's", wait=0.2)
    other.let_go()
    host.hold("the old file's", wait=0)
    host.let_go()


def test_a_no_op_session_takes_no_lock(tmp_path):
    """A host that already runs the release costs one login and one small request: its
    session never waits for, or takes, the agent lock (its count stays where it was)."""
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    assert _publish(tmp_path, "app-1", {"u/a": b"alpha"}, "1", ["u/a"])[0] == 0
    assert run(tmp_path, "switch", "--id", "app-1")[0] == 0
    count = (tmp_path / ".ferry/agent.lock").read_text()
    other = ferry_agent.Host(str(tmp_path))
    other.hold("the pull agent's deploy of app-2 (deployment 7)")  # it would wait 30 s
    proc = _session_with_spy(tmp_path, "pass")
    try:
        inspect = {"id": "app-1", "key": PUB.hex(), "full": True}
        res = _answer(proc, {"op": "inspect", "args": inspect})
        assert res["_code"] == 0 and res["have"] and res["current"] == "app-1", res
        check = {"command": "test -d current", "timeout": 5, "lock": False}
        assert _answer(proc, {"op": "run", "args": check})["rc"] == 0
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(timeout=30) == 0
        other.let_go()
    assert (tmp_path / ".ferry/agent.lock").read_text() == str(int(count) + 1)  # other's only


def test_a_session_idle_with_the_lock_lets_go_and_takes_it_again_at_its_next_change(
    tmp_path, monkeypatch
):
    """Its orchestrator may be gone without the host's sshd noticing (hours), or pausing: an
    idle session must not keep every other agent off the host."""
    import time

    monkeypatch.setattr(ferry_agent, "LOCK_IDLE", 0.2)
    host = ferry_agent.Host(str(tmp_path))
    host.hold("a Ferry session's switch")
    r, w = os.pipe()
    with open(r, "rb") as inp:
        os.write(w, b'{"op": "state"}\n{"op": "state"}\n')
        assert inp.readline()
        started = time.monotonic()
        ferry_agent._let_go_when_idle(host, inp)  # the next request is read already
        assert host.held and time.monotonic() - started < 0.15
        assert inp.readline()
        ferry_agent._let_go_when_idle(host, inp)  # nothing comes
        assert not host.held and time.monotonic() - started >= 0.2
        other = ferry_agent.Host(str(tmp_path))
        other.hold("the pull agent's deploy of app-2 (deployment 7)", wait=0)
        other.let_go()
        os.close(w)


def test_a_timed_out_hook_whose_child_left_its_group_still_answers(tmp_path):
    """A daemon a hook starts with setsid is not killed with the hook's group, and holds its
    output: the answer (and the agent lock) must not wait for it."""
    import signal
    import time

    pidfile = tmp_path / "daemon.pid"
    command = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & echo started; sleep 30"
    started = time.monotonic()
    res, code = _op(tmp_path, "run", command=command, timeout=1)
    try:
        assert code == 0 and res["rc"] == 124 and "started" in res["output"], res
        assert time.monotonic() - started < 1 + ferry_agent.KILLED_OUTPUT_WAIT + 2
    finally:
        deadline = time.monotonic() + 5
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)  # by the PID it wrote


@pytest.mark.parametrize(
    "command, rc, seconds",
    [
        # its output sent elsewhere: still timed out (it once ran on, holding the session)
        ("echo elsewhere; exec >/dev/null 2>&1; sleep 30", 124, (1, 4)),
        # ended well, leaving a daemon that holds the output: its own exit code, at once
        ("setsid sh -c 'echo $$ > {d}/daemon; exec sleep 30' & echo started; exit 0", 0, (0, 3)),
        ("echo quick", 0, (0, 0.5)),
    ],
)
def test_a_command_is_judged_by_its_own_process_not_by_who_holds_its_output(
    tmp_path, command, rc, seconds
):
    import signal
    import time

    started = time.monotonic()
    res, code = _op(tmp_path, "run", command=command.format(d=tmp_path), timeout=1)
    took = time.monotonic() - started
    try:
        assert code == 0 and res["rc"] == rc, res
        assert seconds[0] <= took < seconds[1], took
    finally:
        daemon = tmp_path / "daemon"
        deadline = time.monotonic() + 5
        while "daemon" in command and not daemon.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if daemon.exists():
            os.kill(int(daemon.read_text()), signal.SIGKILL)  # by the PID it wrote


def _receive_paced(
    root: Path,
    stall: float,
    data: bytes,
    sends: list[tuple[float, int]],
    *,
    spy: str = "pass",
    then: Callable[[], None] | None = None,
) -> tuple[dict, float]:
    """A serve session receives one object, `data`, the request naming `stall`: after the
    object's frame line, each (pause, upto) sends `data` up to that offset; all of it sent,
    END follows. The sender then waits without hanging up. The agent's answer, and how long
    after the last byte it came; `then` (a pause, say) runs after a good answer, and the
    answer to a verify that follows it is `_then`. `spy`: Python run before the agent."""
    import select
    import time

    raw, sig, _ = package({"u/big": data})
    proc = _session_with_spy(root, spy)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert _answer(proc, {"op": "pin", "args": {"key": PUB.hex()}})["_code"] == 0
        head = json.dumps({"manifest_len": len(raw), "sig_len": len(sig)}).encode()
        request = {"op": "receive", "args": {"id": "app-1", "stall": stall}}
        proc.stdin.write(json.dumps(request).encode() + b"\n" + head + b"\n" + raw + sig)
        proc.stdin.flush()
        assert proc.stdout.readline().startswith(b"NEED "), proc.stderr
        proc.stdin.write(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode())
        sent = 0
        for pause, upto in sends:
            time.sleep(pause)
            proc.stdin.write(data[sent:upto] + (b"END\n" if upto == len(data) else b""))
            proc.stdin.flush()
            sent = upto
        last = time.monotonic()
        answered = select.select([proc.stdout], [], [], stall + 10)[0]  # (the fd: none buffered)
        assert answered, f"no answer {stall + 10:g} s after the last byte"
        line = proc.stdout.readline()
        took = time.monotonic() - last
        assert line.startswith(b"RESULT "), (line, proc.stderr.read() if proc.stderr else "")
        res = json.loads(line[7:])
        if res["_code"]:  # a failed receive ends its session: its own exit, not our kill
            res["_exit"] = proc.wait(timeout=10)
        elif then is not None:
            then()
            res["_then"] = _answer(proc, {"op": "verify", "args": {"id": "app-1"}})
        return res, took
    finally:
        proc.kill()
        proc.wait()


def test_a_sender_silent_in_the_middle_of_a_transfer_is_taken_for_gone_and_the_host_let_go(
    tmp_path,
):
    """Its orchestrator gone (a crashed machine, a partitioned network) while its sshd has not
    noticed: the agent fails the receive once nothing arrived for the request's `stall`, so
    its process ends and the agent lock is free, instead of blocking in a read for hours."""
    import fcntl

    data = os.urandom(2 << 20)
    res, took = _receive_paced(tmp_path, 1.5, data, [(0, 3 << 19)])  # 1.5 of its 2 MiB
    assert res["_code"] == 11 and res["error"] == "stalled" and res["_exit"] == 11, res
    said = "the sender went silent in the middle of the release's transfer (a read of up to 1 MiB"
    assert said in res["message"] and "waited 1.5 s" in res["message"], res
    assert 1.0 <= took < 6, took
    with open(tmp_path / ".ferry" / "agent.lock", "rb") as lock:  # no one holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert (tmp_path / ".ferry" / "agent.lock").read_bytes().isdigit()  # its count: no holder


def test_a_slow_sender_that_keeps_sending_is_not_taken_for_gone(tmp_path):
    """The silence counts from the last chunk read, not from the step's start: four MiB 0.8 s
    apart (2.4 s from the first to the last) pass a 2 s stall, and the object arrives. The
    timer is off once the transfer is over: the session answers a request after a pause
    longer than the stall (an alarm left armed would end it: SIGALRM's default action)."""
    import time

    data = os.urandom(4 << 20)
    sends = [(0.0 if k == 1 else 0.8, k << 20) for k in range(1, 5)]
    res, _ = _receive_paced(tmp_path, 2.0, data, sends, then=lambda: time.sleep(2.5))
    assert res["_code"] == 0 and res["received"] == 1 and res["bytes"] == 4 << 20, res
    assert res["_then"]["_code"] == 0 and res["_then"]["placed"] == 1, res["_then"]


def test_a_host_whose_own_disk_is_slow_does_not_blame_its_sender(tmp_path):
    """Only the reads that wait for the sender are timed: the first write of the object's
    bytes takes 2 s here, the host's own work, with a 1.5 s stall and every byte sent."""
    data = os.urandom(4 << 20)
    spy = (
        "import os,time;_w=os.write;_slow=[2.0]\n"
        "def slow(fd,b):\n if len(b)>=1<<19 and _slow:time.sleep(_slow.pop())\n"
        " return _w(fd,b)\n"
        "os.write=slow"
    )
    res, _ = _receive_paced(tmp_path, 1.5, data, [(0.0, len(data))], spy=spy)
    assert res["_code"] == 0 and res["received"] == 1, res


# logs each fsync (by the path of its descriptor) and each rename over a name, in order,
# written to stderr when the session ends (BOOT's own names are n, m, t, s, c)
ORDERING = (
    "import atexit,os,sys;seen=[]\n"
    "def synced(real):\n"
    " def call(fd):\n  seen.append(('fsync',os.readlink('/proc/self/fd/%d'%fd)));return real(fd)\n"
    " return call\n"
    "def moved(real):\n"
    " def call(a,b,**k):\n  seen.append(('replace',os.path.abspath(b)));return real(a,b,**k)\n"
    " return call\n"
    "os.fsync=synced(os.fsync);os.replace=moved(os.replace)\n"
    "atexit.register(lambda:sys.stderr.write('\\n'+repr(seen)))"
)


def test_current_never_names_a_release_whose_publish_a_power_loss_could_undo(tmp_path):
    """A release is published by a rename in releases/ and recorded by one in .ferry/meta/;
    `current` moves by a rename in the root. Each directory's entries are made durable by an
    fsync of that directory: releases/ and meta/ are synced after the release's rename and
    record and before `current` names it, and the root after."""
    root = Path(os.path.realpath(tmp_path))
    files = {f"u/f{i}": f"content {i}\n".encode() for i in range(3)}
    raw, sig, _ = package(files)
    proc = _session_with_spy(root, ORDERING)
    assert _answer(proc, {"op": "pin", "args": {"key": PUB.hex()}})["_code"] == 0
    stream = receive_stream(raw, sig, {hashlib.sha256(d).hexdigest(): d for d in files.values()})
    assert _answer(proc, {"op": "receive", "args": {"id": "app-1"}}, stream)["_code"] == 0
    assert _answer(proc, {"op": "verify", "args": {"id": "app-1"}})["_code"] == 0
    assert _answer(proc, {"op": "switch", "args": {"id": "app-1"}})["current"] == "app-1"
    _, err = proc.communicate(timeout=30)
    seen = eval(err.decode().strip().splitlines()[-1])  # noqa: S307 - our own child's repr
    meta = root / ".ferry" / "meta"

    def at(event: tuple[str, str]) -> int:
        assert event in seen, (event, seen)
        return len(seen) - 1 - seen[::-1].index(event)  # its last time

    moved = at(("replace", str(root / "current")))
    assert at(("replace", str(root / "releases" / "app-1"))) < at(("fsync", str(root / "releases")))
    assert at(("replace", str(meta / "app-1.json"))) < at(("fsync", str(meta))) < moved
    assert at(("fsync", str(root / "releases"))) < moved < at(("fsync", str(root)))


def test_a_hook_left_running_by_a_killed_agent_is_ended_before_the_next_change(tmp_path):
    """Hooks run in sessions of their own, so an agent killed mid-hook (kill -9, the OOM
    killer) leaves the hook running: a backout would then report the host restored while
    the failed release's migration still writes to it. The next agent to take the lock
    ends it, its process group with it, and says so."""
    import time

    late = tmp_path / "late"
    hooks = tmp_path / ".ferry" / "hooks"
    first = _session_with_spy(tmp_path, "pass")
    assert first.stdin is not None
    command = f"sleep 4; echo written > {late}"
    first.stdin.write(json.dumps({"op": "run", "args": {"command": command, "timeout": 60}})
                      .encode() + b"\n")  # fmt: skip
    first.stdin.flush()
    deadline = time.monotonic() + 10
    while not (hooks.is_dir() and any(hooks.iterdir())):
        assert time.monotonic() < deadline, "the hook never started"
        time.sleep(0.02)
    hook = int(next(hooks.iterdir()).name)
    first.kill()  # the agent, not its hook: that runs on in its own session
    first.wait()
    assert ferry_agent._started_at(hook) is not None
    second = _session_with_spy(tmp_path, "pass")
    try:
        res = _answer(second, {"op": "prune", "args": {"keep": 3}})  # a change: takes the lock
        assert res["_code"] == 0 and res["ended_orphans"] == [hook], res
        time.sleep(4.5)
        assert not late.exists(), "the killed agent's hook wrote after the next agent began"
        assert list(hooks.iterdir()) == []
    finally:
        second.kill()
        second.wait()


def test_a_live_agents_lock_free_check_and_a_finished_hooks_daemon_are_left_alone(tmp_path):
    """Only a dead agent's unfinished command is ended: a check that a live session runs
    without the lock, and a process a hook that has exited left behind (a daemon it meant
    to start, still in the hook's process group), are not."""
    import threading
    import time

    host = ferry_agent.Host(str(tmp_path))
    host.ensure_dirs()
    checked: list[int] = []

    def check() -> None:  # a milestone check: `run` without the lock, in this live process
        args = ferry_agent.Args(**dict(ferry_agent.DEFAULTS, command="sleep 1", timeout=30))
        checked.append(ferry_agent.op_run(ferry_agent.Host(str(tmp_path)), args)["rc"])

    checking = threading.Thread(target=check)
    checking.start()
    daemon = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        hooks = tmp_path / ".ferry" / "hooks"
        deadline = time.monotonic() + 10
        while not (hooks.is_dir() and any(hooks.iterdir())):
            assert time.monotonic() < deadline, "the check never started"
            time.sleep(0.02)
        born = ferry_agent._started_at(daemon.pid)
        assert born is not None
        # the record a dead agent's hook left, that hook since exited: its PID's process now
        # is another (the daemon), started at another time
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        (hooks / str(daemon.pid)).write_text(f"{boot} {born + 1} 999999 1")
        other = ferry_agent.Host(str(tmp_path))
        other.hold("the test's change", wait=0)
        other.let_go()
        assert other.ended_hooks == []
        assert daemon.poll() is None and not (hooks / str(daemon.pid)).exists()
        checking.join(timeout=10)
        assert checked == [0]  # the live agent's check ran to its end
    finally:
        daemon.kill()
        daemon.wait()


def test_records_of_commands_are_best_effort_and_never_fail_a_command_or_the_lock(tmp_path):
    """Where .ferry/hooks cannot be used (here it is a file; a directory another user owns,
    a full or read-only disk alike), commands run and time out as ever, unrecorded, and
    taking the lock is not refused; a record from another boot names no process now."""
    import time

    (tmp_path / ".ferry").mkdir()
    (tmp_path / ".ferry" / "hooks").write_text("not a directory")
    host = ferry_agent.Host(str(tmp_path))
    args = ferry_agent.Args(**dict(ferry_agent.DEFAULTS, command="sleep 5", timeout=0.5))
    started = time.monotonic()
    res = ferry_agent.op_run(host, args)
    assert res["rc"] == 124 and res["timed_out"] and time.monotonic() - started < 4, res
    host.hold("the test's change", wait=0)  # end_orphans finds no directory: no refusal
    host.let_go()
    (tmp_path / ".ferry" / "hooks").unlink()
    (tmp_path / ".ferry" / "hooks").mkdir()
    daemon = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        born = ferry_agent._started_at(daemon.pid)
        (tmp_path / ".ferry" / "hooks" / str(daemon.pid)).write_text(f"another-boot {born} 1 1")
        host.hold("the test's change", wait=0)
        host.let_go()
        assert daemon.poll() is None and host.ended_hooks == []
        assert list((tmp_path / ".ferry" / "hooks").iterdir()) == []  # dropped, not acted on
    finally:
        daemon.kill()
        daemon.wait()
    exits = ferry_agent.op_run(host, ferry_agent.Args(**dict(
        ferry_agent.DEFAULTS, command="exit 124", timeout=5)))  # fmt: skip
    assert exits["rc"] == 124 and not exits["timed_out"]  # its own code, not a timeout
