#!/usr/bin/env python3
"""Ferry's host agent. Standard library only: it runs with the host's own python3, 3.6 or
later (tests/unit/test_agent.py parses it as 3.6 and runs sessions without the calls
3.6 and 3.8 lack).

    python3 ferry_agent.py OP --root DEPLOY_ROOT [args]      (prints one JSON object)
    python3 ferry_agent.py serve --root DEPLOY_ROOT [--from ADDRESS]   (one session, many requests)
    python3 ferry_agent.py pull --root DEPLOY_ROOT           (the pull daemon, see below)
    python3 ferry_agent.py apply-now --root DEPLOY_ROOT      (a person on the host: apply
                                                              the pending release at once)

OPs: state, pin, inspect, receive, verify, config, switch, readback, check, prune, run,
probe, pull_files (the pull daemon's files, at `ferry agent install`); for container
release units (the host's Docker engine): images, image_load,
container_switch, container_health, container_state, container_revert. In `serve` mode
the agent reads one request per line on stdin, `{"op": OP, "args": {...}, "payload": N}`
followed by N payload bytes, and answers each with one `RESULT {json}` line (its `_code`
is the exit code the one-shot form would have had); `receive` also writes its `NEED [...]`
line and then reads the objects from the same stream (`image_load` reads its blobs). Ferry
starts it by sending this very source over the SSH session (`python3 -I -S -c BOOT`), so
the code that runs is the code Ferry holds, never a file on the host that someone could
have edited.
Exit codes: 0 ok, 10 integrity (signature/checksum/pinned key), 11 bad input, 12 OS error
(e.g. ENOSPC). Host layout:
    ROOT/releases/<id>/        unpacked package, never modified after verify
    ROOT/current -> releases/<id>
    ROOT/shared/               data that survives releases
    ROOT/.ferry/state.json     current, previous, history
    ROOT/.ferry/dml.pub        the pinned DML public key (raw 32 bytes, hex)
    ROOT/.ferry/dml.retired    keys rotated out (hex, one a line): they verify only the
                               manifests already on this host, never a new one
    ROOT/.ferry/meta/<id>.json, <id>.sig   the signed manifest of each verified release
    ROOT/.ferry/incoming/      objects received and verified, not yet placed
    ROOT/.ferry/agent.lock     held by the one agent process changing the host (see Host.hold)
    ROOT/.ferry/hooks/<pid>    a hook or check running, for the next agent to end if its
                               own agent died (see Host.end_orphans)
"""

import errno
import os
import stat  # (os has loaded it: free)
import sys
import time

# An agent session starts on every host of every deployment, so its imports are most of
# its start-up: json (with re and enum), hashlib, subprocess and signal cost ~30 ms of CPU
# per host, more than the login. The session's hot path uses their C cores directly (_json,
# _hashlib, os.posix_spawn); the pure-Python modules load only where they are needed, and
# OpenSSL only where bulk bytes are hashed (small_hash).
try:
    import _json
except ImportError:  # not CPython: the json module's own pure-Python codec
    _json = None


class _ScanContext:  # what _json's scanner reads: json.loads's defaults
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int

    @staticmethod
    def parse_constant(name):
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


class Args:
    """A request's arguments as attributes (types.SimpleNamespace without importing types,
    ~0.3 ms of every session's start)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


_SCAN = _json.make_scanner(_ScanContext) if _json else None
_WS = " \t\n\r"


def loads(text):
    """json.loads (str or UTF-8 bytes) without importing json."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode()
    if _SCAN is None:
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip(_WS))
    try:
        obj, end = _SCAN(text, start)
    except StopIteration as exc:
        raise ValueError("not JSON: expecting a value at char %s" % (exc.value,)) from None
    if text[end:].strip(_WS):
        raise ValueError("not JSON: extra data at char %d" % end)
    return obj


def _unencodable(obj):
    raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)


def dumps(obj, sort_keys=False, separators=None, ensure_ascii=True, indent=None):
    """json.dumps without importing json (~17 ms on a small host: its decoder compiles
    regular expressions at import, and every switch writes the state with an indent)."""
    if _json is not None and indent is not None and not sort_keys and separators is None:
        return _indented(obj, indent, 0, dumps if ensure_ascii else _dumps_utf8)
    if _json is None or indent is not None:
        import json

        return json.dumps(
            obj,
            sort_keys=sort_keys,
            separators=separators,
            ensure_ascii=ensure_ascii,
            indent=indent,
        )
    item_sep, key_sep = separators or (", ", ": ")
    quote = _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring
    # markers, default, encoder, indent, key_sep, item_sep, sort_keys, skipkeys, allow_nan
    encode = _json.make_encoder(
        {}, _unencodable, quote, None, key_sep, item_sep, sort_keys, False, True
    )
    return "".join(encode(obj, 0))


def _dumps_utf8(obj):
    return dumps(obj, ensure_ascii=False)


def _indented(obj, indent, level, flat):
    """What json.dumps(obj, indent=indent) writes (one item per line; `flat` encodes the
    rest: strings, numbers, booleans, null, empty containers)."""
    if isinstance(obj, dict) and obj:
        pad = "\n" + " " * (indent * (level + 1))
        items = [pad + flat(_key(k)) + ": " + _indented(v, indent, level + 1, flat)
                 for k, v in obj.items()]  # fmt: skip
        return "{" + ",".join(items) + "\n" + " " * (indent * level) + "}"
    if isinstance(obj, (list, tuple)) and obj:
        pad = "\n" + " " * (indent * (level + 1))
        items = [pad + _indented(v, indent, level + 1, flat) for v in obj]
        return "[" + ",".join(items) + "\n" + " " * (indent * level) + "]"
    return flat(obj)


def _key(k):
    """A dict key as json writes it: str as it is, True/False/None/numbers as text."""
    if isinstance(k, str):
        return k
    if k is True or k is False or k is None:
        return {True: "true", False: "false", None: "null"}[k]
    if isinstance(k, (int, float)):
        return dumps(k)
    raise TypeError("keys must be str, int, float, bool or None, not %s" % type(k).__name__)


_SMALL = {}  # name → a constructor: CPython's built-in one, or OpenSSL's where there is none


def small_hash(data, name="sha256"):
    """sha256/sha512 of bytes already in memory (a manifest's digest, a key's id, ed25519's
    challenge) through CPython's built-in code: loading OpenSSL (_hashlib) costs ~5.5 ms of
    a host's CPU, and a no-op deploy hashes only ~0.1 MB (one manifest's digest). OpenSSL is
    ~7x faster on a CPU with SHA extensions, so files and streams still go through it."""
    make = _SMALL.get(name)
    if make is None:
        make = _SMALL[name] = _builtin_hash(name)
    return make(data)


def _builtin_hash(name):
    for module in ("_sha2", "_" + name):  # 3.12 on: _sha2; before: _sha256, _sha512
        try:
            return getattr(__import__(module), name)
        except (ImportError, AttributeError):
            continue
    return lambda data: new_hash(data, name)


def new_hash(data=b"", name="sha256"):
    """OpenSSL's sha256/sha512 (as hashlib gives them) without hashlib's module."""
    try:
        import _hashlib

        return getattr(_hashlib, "openssl_" + name)(data)
    except (ImportError, AttributeError, ValueError):
        import hashlib

        return hashlib.new(name, data)


CHUNK = 1 << 20
EXIT_INTEGRITY, EXIT_INPUT, EXIT_OS = 10, 11, 12


class AgentError(Exception):
    def __init__(self, kind, message, code):
        Exception.__init__(self, message)
        self.kind, self.message, self.code = kind, message, code


LOCK_WAIT = 30.0  # s a step waits for another agent's; the orchestrator's deadline moves as much
# s a read from the sender may wait (Silence) when the request names no `stall` (its deadline)
STALL = 600.0
LOAD_MARGIN = 5.0  # s before the orchestrator's deadline that a hung `docker load` is stopped
ADDRESS_CHARS = frozenset("0123456789abcdefABCDEF:.")  # what an IPv4 or IPv6 address holds


class Silence(object):
    """A sender silent in the middle of a transfer for longer than it would itself wait for
    the step is gone: a crashed machine, a dead worker, a partitioned network, which this
    host's sshd may not notice for hours. The step then fails, so the process ends and lets
    go of the agent lock, instead of blocking in a read that holds it. Only the reads that
    wait for the sender are timed (read(): one setitimer before and one after each read of
    up to 1 MiB), not this host's own work between them (hashing, a slow disk). Where
    signals cannot be had (not the main thread) it does nothing."""

    def __init__(self, seconds, what):
        self.seconds, self.what = float(seconds), what
        self._signal = self._old = None
        self._waiting = False

    def __enter__(self):
        try:
            import _signal as sig  # not `signal`: it imports enum, ~1 ms of a session
        except ImportError:
            import signal as sig
        try:
            self._old = sig.signal(sig.SIGALRM, self._gone)
            self._signal = sig
        except (ValueError, AttributeError):  # not the main thread, or no SIGALRM
            pass
        return self

    def read(self, call, *args):
        """call(*args), a read from the sender, failed as stalled if it waits too long."""
        if self._signal is None:
            return call(*args)
        self._waiting = True
        self._signal.setitimer(self._signal.ITIMER_REAL, self.seconds)
        try:
            return call(*args)
        finally:
            self._waiting = False  # (an alarm due just as the read ended is ignored)
            self._signal.setitimer(self._signal.ITIMER_REAL, 0)

    def __exit__(self, *exc):
        if self._signal is not None:
            self._signal.setitimer(self._signal.ITIMER_REAL, 0)
            if self._old is not None:  # (None: a handler not set from Python)
                self._signal.signal(self._signal.SIGALRM, self._old)
        return False

    def _gone(self, signum, frame):
        if self._waiting:
            raise AgentError(
                "stalled",
                "the sender went silent in the middle of %s (a read of up to 1 MiB waited "
                "%g s): it is taken for gone, and this host is let go" % (self.what, self.seconds),
                EXIT_INPUT,
            )


LOCK_IDLE = LOCK_WAIT  # s without a request after which a session lets go (see serve)


def copy_hashed(inp, path, size, view, what, silence=None):
    """Write the next `size` bytes of `inp` to a new 0600 file at `path`, hashing them as
    they pass through one reused buffer `view` (no second read); the sha256 hex digest.
    `silence` (a Silence) times every read that waits for the sender."""
    h, left = new_hash(), size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while left:  # no allocation or copy per chunk
            chunk = view[: min(CHUNK, left)]
            n = inp.readinto(chunk) if silence is None else silence.read(inp.readinto, chunk)
            if not n:
                raise bad_input("stream ended inside %s" % what)
            h.update(view[:n])
            written = 0
            while written < n:
                written += os.write(fd, view[written:n])
            left -= n
    finally:
        os.close(fd)
    return h.hexdigest()


def integrity(msg):
    return AgentError("integrity", msg, EXIT_INTEGRITY)


def bad_input(msg):
    return AgentError("input", msg, EXIT_INPUT)


# --- ed25519 verification (RFC 8032, section 5.1.7), pure Python -------------------------
# The curve's constants as literals: deriving them (seven modular exponentiations) cost ~1 ms
# of every session's start, and a no-op never checks a signature. Each is derived from its
# definition in tests/unit/test_agent.py.
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555  # -121665/121666
_I = 19681161376707505956807079304988542015446066515923890162744021073123829784752  # sqrt(-1)


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 % _P == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _I % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _add(a, b):
    aa = (a[1] - a[0]) * (b[1] - b[0]) % _P
    bb = (a[1] + a[0]) * (b[1] + b[0]) % _P
    cc = 2 * a[3] * b[3] * _D % _P
    dd = 2 * a[2] * b[2] % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s, pt):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, pt)
        pt = _add(pt, pt)
        s >>= 1
    return q


def _decompress(b):
    if len(b) != 32:
        return None
    y = int.from_bytes(b, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_GY = 46316835694926478169428394003475163141307993866256225615783033603165251855960  # 4/5
_G = (_GX, _GY, 1, 46827403850823179245072216630277197565144205554125654976674165829533817101731)


def ed25519_verify(public, message, signature):
    if len(public) != 32 or len(signature) != 64:
        return False
    a, r = _decompress(public), _decompress(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    h = int.from_bytes(small_hash(signature[:32] + public + message, "sha512").digest(), "little")
    h %= _L
    left, right = _mul(s, _G), _add(r, _mul(h, a))
    return (left[0] * right[2] - right[0] * left[2]) % _P == 0 and (
        left[1] * right[2] - right[1] * left[2]
    ) % _P == 0


# --- helpers ------------------------------------------------------------------------------
def content_digest(manifest):
    return "sha256:" + small_hash(canonical(manifest["content"])).hexdigest()


def canonical(obj):
    return dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def safe_relpath(path):
    """A manifest path may only name a file below the release directory."""
    # a session checks each of a release's paths up to five times
    if isinstance(path, str) and path in _SAFE_PATHS:
        return path
    if not isinstance(path, str) or not path or "\0" in path or "\\" in path:
        raise integrity("unsafe path in manifest: %r" % (path,))
    if path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
        raise integrity("unsafe path in manifest: %r" % (path,))
    _SAFE_PATHS.add(path)
    return path


_SAFE_PATHS = set()  # paths (str) already found safe in this process


def safe_id(rid):
    if not rid or "/" in rid or rid.startswith(".") or "\0" in rid:
        raise bad_input("bad release id %r" % (rid,))
    return rid


def write_atomic(path, data, mode=0o644):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def identity(path):
    """What a file is on this host, short of its bytes: inode, size, mtime and ctime (ns).

    Editing a file changes its mtime and ctime; restoring the mtime by hand changes the
    ctime again, and ctime cannot be set without changing the clock. So a file whose
    identity is the one recorded when Ferry verified it has not been written since."""
    return identity_of(os.stat(path))


def identity_of(st):
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def recorded_as(st, recorded):
    """Whether a file's stat is the identity recorded for it (None: nothing recorded)."""
    return recorded is not None and identity_of(st) == list(recorded)


def _stat(path):
    try:
        return os.stat(path)
    except OSError:
        return None


def published_mode(entry):
    """The mode a manifest entry's file is published with."""
    return 0o755 if entry["mode"] & 0o111 else 0o644


def _hashed_identity(path, sha):
    """The identity `path` had when it was read and found to hold `sha` (None: it does not,
    or is gone). Taken before the read: a write during it moves the identity, so a later
    stat that finds this identity finds the bytes that were read."""
    try:
        st = os.stat(path)
        return identity_of(st) if sha256_file(path) == sha else None
    except OSError:
        return None


def _frozen(expect):
    return tuple(sorted((expect or {}).items()))


def sha256_file(path):
    h = new_hash()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


class Host:
    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.meta = os.path.join(self.root, ".ferry", "meta")
        self.incoming = os.path.join(self.root, ".ferry", "incoming")
        self.releases = os.path.join(self.root, "releases")
        self.state_path = os.path.join(self.root, ".ferry", "state.json")
        self.key_path = os.path.join(self.root, ".ferry", "dml.pub")
        self.retired_path = os.path.join(self.root, ".ferry", "dml.retired")
        self._checked = {}  # rid → (metadata file identity, manifest): see load_manifest
        self._signed = {}  # (manifest bytes, signature, keys) → manifest: see check_manifest
        self._placed = {}  # (manifest digest, expect) → the copies stage found: see placement
        self._settled = False  # incoming/ looked at: see settle_incoming
        self.lock_path = os.path.join(self.root, ".ferry", "agent.lock")
        self.hooks = os.path.join(self.root, ".ferry", "hooks")  # commands running: end_orphans
        self.ended_hooks = []  # PIDs of a dead agent's commands this one ended (end_orphans)
        self._lock_fd = None
        self._lock_writable = True
        self._lock_count = None  # the lock's count as this process left it: see hold
        self.held = False
        self.who = "an agent"  # whose steps these are: see dispatch
        # the address this login came from, for the lock's note (serve's --from under sudo)
        self.peer = (os.environ.get("SSH_CLIENT") or "").split(" ")[0]
        self.announce = None  # serve: tells the orchestrator that a step waits (see hold)

    def ensure_dirs(self):
        for d in (self.meta, self.incoming, self.releases, os.path.join(self.root, "shared")):
            os.makedirs(d, exist_ok=True)

    def settle_incoming(self):
        """Once per process, before incoming/ is used: objects there are trusted unread by
        verify (each was hashed as it arrived), so only while that still holds.
        - Not made durable one by one (verify makes the release durable once), an object
          may be empty or torn after the host itself crashed (power, kernel): they are
          trusted only within the boot that received them. incoming/.boot names it
          (Linux's boot_id); what an earlier boot left is removed, to be sent again. A
          process that dies loses nothing the kernel holds.
        - An object with another name besides its own was placed by a verify cut short
          before it let go of it: that release directory, unrecorded, is not Ferry's to
          trust, and the shared inode could be written through it. A verify killed while
          placing leaves that name in releases/.tmp-<id>, which this process (holding the
          agent lock: no verify runs) removes once each such object was read again: one
          whose bytes are still its name is kept, so it is not sent again (1,000 objects,
          100 MB, are read in ~0.17 s here; resent, they cross the network). An object
          still named elsewhere (a published directory whose record a crash cut off,
          cleared by its next verify) is let go of here, to be sent again (_take_back).
        - A container's env file (its secrets) outlives its switch only if that was cut
          short: it goes too."""
        if self._settled:
            return
        boot = None
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:  # not Linux: no boot to tell apart
            pass
        mark = os.path.join(self.incoming, ".boot")
        try:
            with open(mark) as f:
                same = boot is None or f.read() == boot
        except FileNotFoundError:
            same = boot is None
        os.makedirs(self.incoming, exist_ok=True)
        placed = []  # objects a cut-short verify also named elsewhere
        for name in os.listdir(self.incoming):
            path = os.path.join(self.incoming, name)
            if name == ".boot" or (same and len(name) != 64 and not name.startswith(".env-")):
                continue
            st = os.lstat(path)
            if same and len(name) == 64 and stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    placed.append(name)
                continue
            _remove(path, st)  # a directory too (image-<unit>/)
        if placed:
            self._take_back(placed)
        if not same:
            write_atomic(mark, boot.encode())
        self._settled = True

    def _take_back(self, names):
        """settle_incoming's objects that a cut-short verify also named elsewhere. Each is
        read while both its names exist, and one whose bytes are no longer its name goes
        first; only then does releases/.tmp-<id> go, and an object named nowhere else now is
        kept. Killed at any point, nothing written through a leftover name is ever kept: an
        object is down to one name only after it was read good. Without the lock (a request
        sent with `lock: false`) a live verify may own a .tmp-<id>: they are let go of."""
        good = []
        for name in names:
            path = os.path.join(self.incoming, name)
            if self.held and sha256_file(path) == name:
                os.chmod(path, 0o600)  # as received (verify sets its published mode)
                good.append(path)
            else:
                os.unlink(path)
        if not good:
            return
        for name in os.listdir(self.releases) if os.path.isdir(self.releases) else []:
            if name.startswith(".tmp-"):
                remove_tree(os.path.join(self.releases, name))
        for path in good:
            if os.lstat(path).st_nlink > 1:  # named elsewhere too: a published directory
                os.unlink(path)  # a crash left unrecorded

    def hold(self, what, wait=None):
        """Take ROOT/.ferry/agent.lock: one agent process changes this host at a time. A push
        session (one per deployment, its CMS host lock serializes Ferry's own runs) and the
        pull daemon (which applies on its own) are two processes; Ferry installs with two
        CMSes are two more. Each step's writes are ordered to survive a crash, not a second
        writer: one session's settle of incoming/ would take the objects another's verify is
        placing. flock: the kernel lets go when the holder dies, however it dies.
        - Held already: nothing to do. A session holds it from its first change to its end
          (dispatch), or until it has had no request for LOCK_IDLE s (serve), so a
          deployment is refused on a host before it changed anything there, not half-way
          (unless it paused that long); the pull daemon holds it for one apply.
        - Held by another: waits up to `wait` s (LOCK_WAIT), telling the orchestrator first
          (`announce`: its deadline moves by as much), then refuses as "busy", naming it.
        - The file counts every hold: a count this process did not leave means another agent
          changed the host in between, so what this one remembered of it is forgotten."""
        if self.held:
            return
        import fcntl

        wait = LOCK_WAIT if wait is None else wait
        deadline, told = time.monotonic() + wait, False
        while True:
            fd = self._lock_file()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    err = AgentError(
                        "busy",
                        "another Ferry agent is changing this host (%s); %s waited %g s for "
                        "it: try again when it is done" % (holder, what, wait),
                        EXIT_OS,
                    )
                    err.holder = holder
                    raise err
                if not told and wait > 0 and self.announce is not None:
                    self.announce(wait)
                    told = True
                time.sleep(0.05)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # removed or replaced while this waited: a lock on that file guards nothing
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._lock_fd = None
        try:
            self._note(what)
            self.end_orphans()
        except BaseException:  # (no space for the note): never left held by nobody's step
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise
        self.held = True

    def end_orphans(self):
        """A hook or check still running whose agent died (kill -9, the OOM killer) is
        ended, its whole process group, when the next agent takes the lock, before it
        changes anything: a backout must not report a host restored while the failed
        release's migration still writes to it (hooks run in sessions of their own, so
        nothing else ends them). Each command run leaves a record while it runs
        (hooks/<pid>: the boot, its start time, its agent's PID and start time). One whose
        agent still lives (a check sent without the lock) is its agent's own; one that
        exited is left alone with what it started (a daemon it meant to leave). A record
        is taken only from this user or root (another user's could name any process), and
        one that cannot be read or removed is passed over, never a reason to refuse."""
        try:
            names = os.listdir(self.hooks)
        except OSError:  # none (FileNotFoundError), or not this user's to read
            return
        mine, boot = os.getuid(), _boot_id()
        for name in names:
            path = os.path.join(self.hooks, name)
            try:
                if os.lstat(path).st_uid not in (0, mine):
                    continue
                with open(path) as f:
                    at, born, agent, agent_born = f.read().split()
                pid, born, agent, agent_born = int(name), int(born), int(agent), int(agent_born)
            except (OSError, ValueError):
                at = pid = None
            if pid is not None and at == boot and _started_at(agent) != agent_born:
                if _started_at(pid) == born:  # not exited, and no other process's PID
                    try:
                        os.killpg(pid, 9)  # SIGKILL, the group: what it started dies with it
                        _gone(pid, 2.0)  # (a write in flight ends first)
                        self.ended_hooks.append(pid)
                    except OSError:  # (EPERM: another user's group) left, said nowhere
                        pass
            elif pid is not None and at == boot:
                continue  # its agent runs it still
            try:
                os.unlink(path)
            except OSError:
                pass

    def command_started(self, pid):
        """Record a command this agent runs (see end_orphans); the record's path, or None
        where it cannot be made (no /proc to tell a start time, a directory not this
        user's, a full disk): the command runs all the same, unprotected."""
        born, me, boot = _started_at(pid), _started_at(os.getpid()), _boot_id()
        if born is None or me is None or boot is None:
            return None
        path = os.path.join(self.hooks, str(pid))
        for _ in range(2):
            try:
                with open(path, "w") as f:
                    f.write("%s %d %d %d" % (boot, born, os.getpid(), me))
                return path
            except FileNotFoundError:
                try:
                    os.makedirs(self.hooks, exist_ok=True)
                except OSError:
                    return None
            except OSError:
                return None
        return None

    def _lock_file(self):
        if self._lock_fd is None:
            os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
            try:  # not inherited by hooks (PEP 446); readable by all: it holds no secret
                self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                self._lock_writable = True
            except PermissionError:  # another user's (a root daemon's): flock works read-only
                self._lock_fd = os.open(self.lock_path, os.O_RDONLY)
                self._lock_writable = False
        return self._lock_fd

    def _note(self, what):
        """Count the hold and say who holds it ("count pid since what [from addr]")."""
        fd = self._lock_fd
        try:
            count = int(os.pread(fd, 512, 0).split(b" ", 1)[0].strip() or b"0")
        except ValueError:
            count = 0
        if not self._lock_writable or (self._lock_count not in (None, count)):
            self._checked, self._placed, self._settled = {}, {}, False  # (unknown: forgotten)
        if not self._lock_writable:
            return
        self._lock_count = count + 1
        peer = "".join(c for c in self.peer if c in ADDRESS_CHARS)[:45]  # words only: an IP
        note = "%d %d %d %s%s" % (self._lock_count, os.getpid(), int(time.time()), what,
                                  " from " + peer if peer else "")  # fmt: skip
        data = note.encode("utf-8", "replace")[:500]
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))

    def holder(self):
        """Who holds agent.lock, in words, from what it wrote there."""
        try:
            raw = os.pread(self._lock_file(), 512, 0)
            _count, pid, since, what = raw.decode("utf-8", "replace").split(" ", 3)
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(since)))
            return "pid %s, %s, since %s" % (pid, what, when)
        except (OSError, ValueError):
            return "its holder has not said who it is yet"

    def hold_for(self, op):
        """hold, for this process's own kind of step (see dispatch)."""
        self.hold("%s's %s" % (self.who, op))

    def let_go(self):
        if not self.held:
            return
        import fcntl

        self.held = False
        try:
            if self._lock_writable:  # the count stays, the words go: nobody holds it now
                data = str(self._lock_count).encode()
                os.pwrite(self._lock_fd, data, 0)
                os.ftruncate(self._lock_fd, len(data))
        except OSError:
            pass  # words only; a stale note names a holder that is gone
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def state(self):
        try:
            with open(self.state_path) as f:
                return loads(f.read())
        except FileNotFoundError:
            return {"current": None, "previous": None, "history": []}

    def save_state(self, st):
        write_atomic(self.state_path, dumps(st, indent=1).encode())

    def current(self):
        link = os.path.join(self.root, "current")
        try:
            target = os.readlink(link)
        except OSError:
            return None
        return os.path.basename(target.rstrip("/"))

    def verified_ids(self):
        try:
            names = os.listdir(self.meta)
        except FileNotFoundError:
            return []
        ids = sorted(n[:-5] for n in names if n.endswith(".json"))
        return [i for i in ids if os.path.isdir(os.path.join(self.releases, i))]

    def forget(self, rid):
        """rid is no longer recorded as verified: its manifest, signature and identities go
        (the manifest first: it is the record)."""
        for suffix in (".json", ".sig", ".ids"):
            try:
                os.unlink(os.path.join(self.meta, rid + suffix))
            except FileNotFoundError:
                pass

    def _meta_key(self, rid):
        st = os.stat(os.path.join(self.meta, rid + ".json"))
        return (rid, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def checked(self, rid, manifest):
        """`manifest` (checked by its signature) was just stored as rid's metadata: this
        session's later loads of it (the read-back, ~3 ms of parsing and digest) take it
        as long as the file keeps the identity it has now."""
        self._checked[rid] = (self._meta_key(rid), manifest)

    def load_manifest(self, rid, expect=None):
        """A published release's manifest, checked: by its signature, or — when Ferry says
        which digest it expects (it holds the verified package) — by that digest, which
        binds every byte of the content as the signature does, without the pure-Python
        ed25519 (~10 ms). A session checks each unchanged metadata file once."""
        path = os.path.join(self.meta, rid + ".json")
        key = self._meta_key(rid)
        cached = self._checked.get(rid)
        if cached is not None and cached[0] == key:
            return cached[1]
        with open(path, "rb") as f:
            raw = f.read()
        manifest = None
        if expect:
            manifest = loads(raw.decode())
            if manifest.get("digest") != expect or content_digest(manifest) != expect:
                manifest = None
            else:
                for entry in manifest["content"]["files"]:
                    safe_relpath(entry["path"])
        if manifest is None:
            with open(os.path.join(self.meta, rid + ".sig"), "rb") as f:
                sig = f.read()
            manifest = self.check_manifest(raw, sig, stored=True)
        self._checked[rid] = (key, manifest)
        return manifest

    def pinned_key(self):
        try:
            with open(self.key_path) as f:
                return bytes.fromhex(f.read().strip())
        except FileNotFoundError:
            raise integrity("no DML key pinned on this host (Ferry pins it on first contact)")

    def retired_keys(self):
        try:
            with open(self.retired_path) as f:
                return [bytes.fromhex(line.strip()) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def check_manifest(self, raw, sig, stored=False):
        """A manifest signed by the pinned key; one already stored here (`stored`) may
        also be signed by a key this host pinned before a rotation."""
        keys = [self.pinned_key()] + (self.retired_keys() if stored else [])
        # receive checks the manifest, verify reads the same bytes back: the pure-Python
        # ed25519 (~10 ms) and the digest run once per session for the same bytes and keys
        memo = (bytes(raw), bytes(sig), tuple(keys))
        if memo in self._signed:
            return self._signed[memo]
        if not any(ed25519_verify(k, raw, sig) for k in keys):
            raise integrity("manifest signature does not verify with the pinned DML key")
        manifest = loads(raw.decode())
        content = manifest["content"]
        digest = content_digest(manifest)
        if digest != manifest.get("digest"):
            raise integrity("manifest digest %s does not match" % manifest.get("digest"))
        for entry in content["files"]:
            safe_relpath(entry["path"])
        self._signed[memo] = manifest
        return manifest

    def identities(self, rid):
        """path → [inode, size, mtime_ns, ctime_ns] of each file as published (or {})."""
        try:
            with open(os.path.join(self.meta, rid + ".ids")) as f:
                return loads(f.read())
        except (OSError, ValueError):
            return {}

    def record_identities(self, rid, manifest):
        base = os.path.join(self.releases, rid)
        files = manifest["content"]["files"]
        ids = {e["path"]: identity(os.path.join(base, e["path"])) for e in files}
        write_atomic(os.path.join(self.meta, rid + ".ids"), dumps(ids).encode())
        return ids

    def refresh_identities(self, rid, paths, known=None):
        """Re-record files of `rid` that were intact and are now shared with a new release
        (`known`: path → identity already read, for a file that is the same inode)."""
        ids = self.identities(rid)
        base = os.path.join(self.releases, rid)
        known = known or {}
        for rel in paths:
            if rel in known and rel in ids:
                ids[rel] = known[rel]
            elif rel in ids:
                try:
                    ids[rel] = identity(os.path.join(base, rel))
                except OSError:
                    ids.pop(rel, None)
        write_atomic(os.path.join(self.meta, rid + ".ids"), dumps(ids).encode())

    def _received(self, sha):
        """known_objects' entry for an object received for the release being staged: 0600
        (copy_hashed), never a published mode, so verify always sets the mode."""
        return (os.path.join(self.incoming, sha), True, True, None, None, 0o600, None)

    def known_objects(self, expect=None, wanted=None, intact=True):
        """sha256 -> (path, fresh, intact, release, relpath, mode, identity) of a file here with
        that content (`identity`: the one it was found to have, for an intact copy):
        objects received for the release being staged (incoming/) first, then published
        releases, those Ferry names in `expect` (release id → the digest it records for it,
        the host's prior baseline: checked by that digest, not the pure-Python ed25519) first.
        `wanted`: the sha256s looked for; once each has a copy the rest is not read, and a
        release whose manifest lists none of those still missing is passed over before its
        signature is checked or a file of it is looked at (a host keeping 3 releases paid
        ~45 ms of CPU per call for the ones an incremental release never uses). `intact`:
        compare each copy's identity with the one recorded at its publication and prefer an
        unchanged one (verify re-reads any other); receive only asks what is on the host."""
        found = {}
        for name in os.listdir(self.incoming) if os.path.isdir(self.incoming) else []:
            if len(name) == 64 and (wanted is None or name in wanted):
                found[name] = self._received(name)
        expect = expect or {}

        def settled(sha):
            seen = found.get(sha)
            return seen is not None and (seen[2] or not intact)

        for rid in sorted(self.verified_ids(), key=lambda r: r not in expect):
            if wanted is not None:
                missing = [sha for sha in wanted if not settled(sha)]
                if not missing:
                    break
                if rid not in expect and not self._lists_any(rid, missing):
                    continue
            try:
                manifest = self.load_manifest(rid, expect=expect.get(rid))
            except (AgentError, OSError, ValueError, KeyError):
                continue
            base = os.path.join(self.releases, rid)
            ids = self.identities(rid) if intact else {}
            for e in manifest["content"]["files"]:
                sha = e["sha256"]
                if (wanted is not None and sha not in wanted) or settled(sha):
                    continue
                path = os.path.join(base, e["path"])
                recorded = ids.get(e["path"])
                st = _stat(path) if intact and recorded is not None else None
                ok = st is not None and recorded_as(st, recorded)
                if ok or sha not in found:  # a copy still as verified is reused unread
                    mode = st.st_mode & 0o7777 if ok else None  # its own: chmod moves the ctime
                    found[sha] = (path, False, ok, rid, e["path"], mode, recorded if ok else None)
        return found

    def missing_objects(self, manifest, expect=None):
        """sha256 -> size of each object of `manifest` this host holds no good copy of. A
        copy changed since it was verified (its identity moved: edited, or only touched) is
        read now, and sent again when its bytes are no longer the object's: verify would
        otherwise find it bad after the stream ended, and the stage could never succeed.
        The copies found are kept for this session's verify of the same manifest
        (`placement`), with the identity each had when it was found good."""
        files = manifest["content"]["files"]
        known = self.known_objects(expect, wanted={e["sha256"] for e in files})
        need = {}
        for e in files:
            sha = e["sha256"]
            copy = known.get(sha)  # (path, fresh, intact, release, relpath, mode, identity)
            if copy is None or copy[1] or copy[2]:
                if copy is None:
                    need[sha] = e["size"]
                continue
            seen = _hashed_identity(copy[0], sha)  # changed since verified: its bytes decide
            if seen is None:
                need[sha] = e["size"]
            else:  # read just now: verify re-reads it only if it changes again
                known[sha] = copy[:2] + (True,) + copy[3:5] + (None, seen)
        self._placed = {(manifest["digest"], _frozen(expect)): known}  # the latest stage only
        return need

    def placement(self, manifest, expect=None):
        """What known_objects would answer for `manifest`'s objects, from this session's
        receive of it when there was one: each copy it found good is stat'ed again, and one
        whose identity moved since is read again by verify (as a copy changed since it was
        published is). One stat per copy instead of loading every release's manifest and
        identities again: 4.7 ms against 36 ms of a host's CPU for a release of 1,000 files
        with 3 releases kept (15 ms against ~5 ms when Ferry names the prior).
        Objects received since are the fresh copies in incoming/."""
        wanted = {e["sha256"] for e in manifest["content"]["files"]}
        known = self._placed.pop((manifest["digest"], _frozen(expect)), None)
        if known is None:
            return self.known_objects(expect, wanted=wanted)
        for name in os.listdir(self.incoming):
            if name in wanted:
                known[name] = self._received(name)
        for sha, copy in known.items():
            if copy[1] or not copy[2]:
                continue
            st = _stat(copy[0])
            if st is None:  # gone since (set aside, removed by hand): look for another
                return self.known_objects(expect, wanted=wanted)
            if not recorded_as(st, copy[6]):
                known[sha] = copy[:2] + (False,) + copy[3:5] + (None, None)
            elif copy[5] is None:  # read at receive: its mode is what it is now
                known[sha] = copy[:5] + (st.st_mode & 0o7777, copy[6])
        return known

    def _lists_any(self, rid, shas):
        """Whether release `rid`'s stored manifest lists any of `shas`, read without checking
        it: only a release that does is then checked and used, so a lie here costs no more
        than sending that object again."""
        cached = self._checked.get(rid)
        try:
            if cached is not None:
                files = cached[1]["content"]["files"]
            else:
                with open(os.path.join(self.meta, rid + ".json"), "rb") as f:
                    files = loads(f.read().decode())["content"]["files"]
            listed = {e["sha256"] for e in files}
        except (OSError, ValueError, KeyError, TypeError):
            return True  # load_manifest decides, and skips it if it is unreadable
        return any(sha in listed for sha in shas)


# --- operations ---------------------------------------------------------------------------
def op_state(host, args):
    st = host.state()
    return {
        "current": host.current(),
        "state": st,
        "releases": host.verified_ids(),
        "pinned": os.path.exists(host.key_path),
        "digests": _digests(host),
    }


def _digests(host):
    out = {}
    for rid in host.verified_ids():
        try:
            with open(os.path.join(host.meta, rid + ".json"), "rb") as f:
                out[rid] = loads(f.read().decode()).get("digest")
        except (OSError, ValueError):
            continue
    return out


ROTATION = b"ferry-dml-key-rotation\x00"  # what an old key signs: this prefix + the new key


def key_id(public):
    return small_hash(public).hexdigest()[:16]


def rotated_to(pinned, key, rotations):
    """The chain of keys from `pinned` to `key`, each rotation signed by the key before it,
    or None. Rotations come from Ferry; only their signatures make them trusted."""
    chain, cur = [], pinned
    for _ in range(len(rotations)):
        step = None
        for r in rotations:
            old, new = bytes.fromhex(r["old"]), bytes.fromhex(r["new"])
            if old == cur and ed25519_verify(old, ROTATION + new, bytes.fromhex(r["signature"])):
                step = new
                break
        if step is None:
            return None
        chain.append(cur)
        cur = step
        if cur == key:
            return chain
    return None


def op_pin(host, args):
    host.ensure_dirs()
    key = args.key.strip().lower()
    if len(bytes.fromhex(key)) != 32:
        raise bad_input("a DML public key is 32 bytes (64 hex digits)")
    if not (os.path.exists(host.key_path) and host.pinned_key().hex() == key):
        host.hold_for("pin")  # (from inspect, which takes no lock for its usual "already")
    if os.path.exists(host.key_path):
        pinned = host.pinned_key()
        if pinned.hex() == key:
            return {"pinned": "already"}
        chain = rotated_to(pinned, bytes.fromhex(key), args.rotations or [])
        if chain is None:
            raise integrity(
                "this host pins DML key %s, not %s, and no rotation signed by it leads there: "
                "import the DML key this host was deployed with (`ferry dml key import FILE`), "
                "or, if this host really changes DML, remove %s on it deliberately"
                % (key_id(pinned), key_id(bytes.fromhex(key)), host.key_path)
            )
        retired = [k.hex() for k in host.retired_keys()] + [k.hex() for k in chain]
        write_atomic(host.retired_path, ("\n".join(retired) + "\n").encode(), 0o644)
        write_atomic(host.key_path, (key + "\n").encode(), 0o644)
        return {"pinned": "rotated", "from": key_id(pinned)}
    write_atomic(host.key_path, (key + "\n").encode(), 0o644)
    return {"pinned": "new"}


def op_inspect(host, args):
    """First contact of a deployment, in one call: pin the DML key, say whether this host
    already holds the release intact (a copy altered on the host is set aside), and what it
    runs now."""
    pinned = op_pin(host, args)["pinned"]
    check = op_check(host, args)
    return {"pinned": pinned, "have": check["ok"], "check": check, "current": host.current()}


def _read_exact(stream, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(min(CHUNK, n - len(buf)))
        if not chunk:
            raise bad_input("stream ended early")
        buf += chunk
    return bytes(buf)


def op_receive(host, args):
    """Read manifest + signature, say which objects are missing, then read those objects."""
    host.ensure_dirs()
    host.settle_incoming()
    rid = safe_id(args.id)
    with Silence(args.stall or STALL, "the release's transfer") as silence:
        return _receive(host, rid, args, silence)


def _receive(host, rid, args, silence):
    inp, out = sys.stdin.buffer, sys.stdout
    header = loads(silence.read(inp.readline).decode())
    raw = silence.read(_read_exact, inp, int(header["manifest_len"]))
    sig = silence.read(_read_exact, inp, int(header["sig_len"]))
    manifest = host.check_manifest(raw, sig)
    write_atomic(os.path.join(host.incoming, rid + ".manifest"), raw)
    write_atomic(os.path.join(host.incoming, rid + ".sig"), sig)
    wanted = host.missing_objects(manifest, args.known)
    if wanted:
        _widen_pipe(inp)
    out.write("NEED " + dumps(sorted(wanted)) + "\n")
    out.flush()
    received = nbytes = 0
    view = memoryview(bytearray(CHUNK))
    while True:
        line = silence.read(inp.readline).decode().strip()
        if line == "END":
            break
        if not line:
            raise bad_input("stream ended before END")
        sha, size = line.split()
        size = int(size)
        if sha not in wanted or wanted[sha] != size:
            raise integrity("object %s was not asked for" % sha)
        part = os.path.join(host.incoming, sha + ".part")
        if copy_hashed(inp, part, size, view, "object %s" % sha, silence) != sha:
            os.unlink(part)
            raise integrity("object %s arrived corrupted" % sha)
        os.replace(part, os.path.join(host.incoming, sha))
        received, nbytes = received + 1, nbytes + size
    missing = [s for s in wanted if not os.path.exists(os.path.join(host.incoming, s))]
    if missing:
        raise integrity("%d objects never arrived" % len(missing))
    return {"needed": len(wanted), "received": received, "bytes": nbytes}


F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's capacity
PIPE_BYTES = 1 << 20  # the default limit for a non-root user too (/proc/sys/fs/pipe-max-size)


def _widen_pipe(stream):
    """Let sshd hand over up to 1 MiB at once when stdin is a pipe (64 KiB by default): the
    objects then cross in a sixteenth of the wake-ups, and sshd never has to hold what this
    agent has not read yet in its own growing buffers (measured: its page faults and copies
    were a fifth of a cold push's CPU on the hosts). Anything but Linux, or a socket, keeps
    what it has."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, OSError, ValueError, AttributeError):
        pass


def op_verify(host, args):
    """Check signature and digest again, place every file, hash it, publish releases/<id>."""
    rid = safe_id(args.id)
    final = os.path.join(host.releases, rid)
    if os.path.isdir(final) and os.path.exists(os.path.join(host.meta, rid + ".json")):
        return {"release": rid, "placed": 0, "already": True}
    if os.path.lexists(final):
        _clear_unrecorded(host, rid, final)
    host.settle_incoming()
    with open(os.path.join(host.incoming, rid + ".manifest"), "rb") as f:
        raw = f.read()
    with open(os.path.join(host.incoming, rid + ".sig"), "rb") as f:
        sig = f.read()
    manifest = host.check_manifest(raw, sig)
    files = manifest["content"]["files"]
    known = host.placement(manifest, args.known)
    reused, rehashed = {}, 0  # release → its files this one now shares; files read again
    unsynced = []  # files whose data is not yet durable: received this stage, or copied
    received = set()  # objects placed from incoming/, removed from there once published
    tmp = os.path.join(host.releases, ".tmp-" + rid)
    if os.path.lexists(tmp):  # left by an earlier try
        remove_tree(tmp)
    os.makedirs(tmp)
    made = {tmp}  # directories made: one mkdir each, not one per file
    linked_from = {}  # (release, path) a file was linked from → its path in this release
    given = {}  # received object → the mode its first path gave it
    try:
        for e in files:
            rel = safe_relpath(e["path"])
            dest = os.path.join(tmp, rel)
            parent = os.path.dirname(dest)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            src, fresh, intact, src_rid, src_rel, src_mode, _seen = known.get(
                e["sha256"], (None, False, False, None, None, None, None)
            )
            if src is None:
                raise integrity("%s: no verified copy of its content on this host" % rel)
            if not fresh and not intact:
                if sha256_file(src) != e["sha256"]:
                    raise integrity("%s: local copy %s no longer matches its checksum" % (rel, src))
                rehashed += 1
            mode = published_mode(e)
            if fresh and src not in given:  # in no release yet: its first path sets its mode
                os.chmod(src, mode)
                given[src] = mode
            if fresh:
                src_mode = given[src]
            elif src_mode is None:  # read again above: its mode is what it is now
                src_mode = os.stat(src).st_mode & 0o7777
            # A published inode is never chmodded: every release linking it would change with
            # it (a backout to one would then run files with another's modes). Content wanted
            # with another mode than the copy has is copied instead (rare: a mode changed).
            linked = src_mode == mode
            if linked:
                try:
                    os.link(src, dest)
                except OSError:  # no hard links here (another filesystem, a link limit)
                    linked = False
            if not linked:
                import shutil

                shutil.copyfile(src, dest)
                os.chmod(dest, mode)
            if fresh:
                received.add(e["sha256"])
            if fresh or not linked:
                unsynced.append(dest)
            if src_rid is not None:
                reused.setdefault(src_rid, set()).add(src_rel)
                if linked:
                    linked_from[(src_rid, src_rel)] = e["path"]
        _sync_tree(tmp, unsynced)  # durability once per release, not once per file
    except Exception:  # a failed verify lets go of what it placed: received objects keep
        remove_tree(tmp)  # one name each, so the next session finds them as received
        raise
    os.replace(tmp, final)
    # The record is written last: meta/<id>.json says the release is published, so before
    # it its signature is stored and incoming/ let go of what it placed. A received object
    # left in incoming/ after the record would still be a link to the published file, and
    # the next release would take it as freshly received: unread, and chmodded in place.
    # A crash before the record leaves an unrecorded directory (_clear_unrecorded).
    write_atomic(os.path.join(host.meta, rid + ".sig"), sig)
    for sha in received:  # only what came from incoming: a lookup per file is not free
        try:
            os.unlink(os.path.join(host.incoming, sha))
        except FileNotFoundError:
            pass
    for suffix in (".manifest", ".sig"):
        try:
            os.unlink(os.path.join(host.incoming, rid + suffix))
        except FileNotFoundError:
            pass
    write_atomic(os.path.join(host.meta, rid + ".json"), raw)
    host.checked(rid, manifest)
    # identities last: linking and unlinking above changed the inodes' ctime. The releases
    # the reused files came from share those inodes, so their records follow (a linked
    # file's identity is its inode's: the one just recorded for its path in this release).
    ids = host.record_identities(rid, manifest)
    for src_rid, paths in reused.items():
        same = {p: ids[linked_from[(src_rid, p)]] for p in paths if (src_rid, p) in linked_from}
        host.refresh_identities(src_rid, paths, same)
    return {
        "release": rid,
        "placed": len(manifest["content"]["files"]),
        "already": False,
        "rehashed": rehashed,
    }


def _clear_unrecorded(host, rid, final):
    """releases/<id> is there without its record: a crash between publishing it and
    recording it, or a prune that could not remove all of it (a filesystem mounted inside
    it). Unverified, it is never used: it makes way for the copy about to be published.
    One that `current` points to (its record removed by hand) keeps serving, set aside."""
    if host.current() == rid:
        _set_aside(host, rid)
        return
    _remove(final, os.lstat(final))
    if os.path.lexists(final):
        raise AgentError("os", "releases/%s is left from a release removed before, with what "
                         "could not be removed (a filesystem mounted inside it?): unmount "
                         "it or remove it by hand, then deploy again" % rid, EXIT_OS)  # fmt: skip


def _sync_tree(top, files):
    """Make a freshly placed release durable before it is published, once: one syncfs(2) of
    its filesystem where the host has it (Linux), which writes the data and every directory
    entry and flushes the disk's cache in one call. Elsewhere, the data of `files` (received
    this stage, not yet synced), then every directory (its entries, the links); a file
    linked from a published release was synced when that release was."""
    if _syncfs(top):
        return
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for dirpath, _dirs, _files in os.walk(top):
        fsync_dir(dirpath)


def _syncfs(path):
    """syncfs(2) on the filesystem holding `path`: True once it is durable, False where the
    call does not exist (not Linux, no ctypes); a failed writeback raises OSError (Linux
    reports it to syncfs since 5.8). Measured on a 20-host cold push of 1001 files: the
    verify step of the median host took 1.75 s with an fsync per file (each a device flush),
    0.6-1.1 s with one syncfs. Called through ctypes' C core: the ctypes package costs
    ~5.5 ms of a host's CPU to import, _ctypes ~0.5 ms."""
    try:
        import _ctypes

        class _IntCall(_ctypes.CFuncPtr):  # int f(int), errno kept: ctypes.CFUNCTYPE's shape
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

        call = _IntCall(_ctypes.dlsym(_ctypes.dlopen(None), "syncfs"))
    except (ImportError, OSError, AttributeError, TypeError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if call(fd) != 0:
            err = _ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)
    return True


def op_config(host, args):
    """Write rendered config files under releases/<id>/.rendered/ (JSON {dest: text} on stdin)."""
    rid = safe_id(args.id)
    base = os.path.join(host.releases, rid, ".rendered")
    raw = args.payload if getattr(args, "payload", None) is not None else sys.stdin.buffer.read()
    files = loads(raw.decode())
    for dest, text in sorted(files.items()):
        path = os.path.join(base, safe_relpath(dest))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, text.encode(), 0o640)
    return {"written": sorted(files)}


def _point_current(host, name):
    """`current` → releases/<name>, atomically (a symlink at a temp name, renamed over).
    First the entries of releases/ and meta/ are made durable: a power loss after `current`
    moved must not find the directory it names unpublished (still .tmp-<id>, or not yet
    set aside) or its record gone. One journal commit where nothing is pending; ext4 and
    XFS commit them with `current` anyway, a filesystem that logs per inode (btrfs) may not."""
    fsync_dir(host.releases)
    fsync_dir(host.meta)
    link = os.path.join(host.root, "current")
    tmp = link + ".tmp-%d" % os.getpid()
    os.symlink(os.path.join("releases", name), tmp)
    os.replace(tmp, link)


def fsync_dir(path):
    """A directory's entries made durable: what was renamed into it, created or removed.
    A filesystem that cannot sync a directory says EINVAL (or EBADF) and has nothing to
    make durable that way (as PostgreSQL treats it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def op_switch(host, args):
    """Point `current` at releases/<id> atomically (symlink to a temp name, rename)."""
    link = os.path.join(host.root, "current")
    before = host.current()
    st = host.state()
    if args.none:
        if os.path.lexists(link):
            os.unlink(link)
        target = None
    else:
        target = safe_id(args.id)
        if not os.path.exists(os.path.join(host.meta, target + ".json")) or not os.path.isdir(
            os.path.join(host.releases, target)
        ):
            raise bad_input("release %s is not verified on this host" % target)
        _point_current(host, target)
    recorded = st.get("current")
    if before != target or recorded != target:  # or the link moved and a crash cut the record
        st["previous"], st["current"] = before if before != target else recorded, target
        st.setdefault("history", []).append(
            {"current": target, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        )
        st["history"] = st["history"][-50:]
    st["current"] = target
    host.save_state(st)
    fsync_dir(host.root)
    return {"current": target, "before": before}


def _mismatches(host, rid, full, rehash=False, expect=None):
    """Files of releases/<rid> that differ from its signed manifest: sizes and modes always
    (a published file's mode is its manifest's and never changes: a chmod, +x or a setuid
    bit, is a change to the release); with `full`, the sha256 of every file whose identity
    changed since it was verified; with `rehash` (the drift audit), the sha256 of every
    file whatever its identity."""
    manifest = host.load_manifest(rid, expect)
    base = os.path.join(host.releases, rid)
    ids = {} if rehash else host.identities(rid)
    out = []
    for e in manifest["content"]["files"]:
        path = os.path.join(base, safe_relpath(e["path"]))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append("%s: missing" % e["path"])
            continue
        mode = st.st_mode & 0o7777
        if mode != published_mode(e):
            out.append("%s: mode %04o, published %04o" % (e["path"], mode, published_mode(e)))
        if st.st_size != e["size"]:
            out.append("%s: content differs" % e["path"])
        elif full and not recorded_as(st, ids.get(e["path"])):
            if sha256_file(path) != e["sha256"]:
                out.append("%s: content differs" % e["path"])
    return manifest, out


def _agent_files(host):
    """Agent files an older Ferry left in .ferry/ (agent-<hash>.py): Ferry never runs them
    (it sends the agent on every session), but one whose content no longer has the hash in
    its name was modified on the host, which the drift audit reports as tampering."""
    out = []
    where = os.path.join(host.root, ".ferry")
    try:
        names = sorted(os.listdir(where))
    except OSError:
        return out
    for name in names:
        if not (name.startswith("agent-") and name.endswith(".py")):
            continue
        want = name[len("agent-") : -len(".py")]
        try:
            with open(os.path.join(where, name), "rb") as f:
                got = small_hash(f.read()).hexdigest()[: len(want)]
        except OSError:
            got = None
        out.append({"file": ".ferry/" + name, "modified": got != want, "sha256": got})
    return out


def op_readback(host, args):
    """What `current` points at, and whether every file matches the signed manifest."""
    cur = host.current()
    result = {"current": cur, "ok": False, "mismatches": [], "agents": _agent_files(host)}
    if cur is None:
        result["ok"] = args.id is None
        return result
    if args.id and cur != args.id:
        result["mismatches"].append("current is %s, expected %s" % (cur, args.id))
        return result
    if cur not in host.verified_ids():  # e.g. a copy changed on the host, set aside (op_check)
        result["mismatches"].append("current is %s, not a release verified on this host" % cur)
        return result
    expect = args.digest if args.id == cur else None
    manifest, result["mismatches"] = _mismatches(host, cur, args.full, args.rehash, expect)
    result["ok"] = not result["mismatches"]
    result["digest"] = manifest["digest"]
    result["files"] = len(manifest["content"]["files"])
    return result


def op_check(host, args):
    """Is a published release intact? If not, set it aside so that it is staged afresh.

    A release whose files were changed on the host is never trusted again: it is renamed to
    releases/.broken-<id>-<time> (kept for forensics, pruned by hand) and its metadata
    removed, so the next stage re-sends what is needed and verify publishes a clean copy.
    """
    rid = safe_id(args.id)
    if rid not in host.verified_ids():
        return {"release": rid, "present": False, "ok": False, "mismatches": []}
    _manifest, bad = _mismatches(host, rid, args.full, expect=args.digest)
    if bad:
        host.hold_for("set-aside of %s" % rid)  # (inspect takes no lock: a change is rare)
        if rid not in host.verified_ids():  # another agent set it aside or pruned it
            return {"release": rid, "present": False, "ok": False, "mismatches": []}
        _manifest, bad = _mismatches(host, rid, args.full, expect=args.digest)
    if bad:
        aside, live = _set_aside(host, rid)
        return {
            "release": rid,
            "present": True,
            "ok": False,
            "mismatches": bad[:20],
            "set_aside": aside,
            "current_set_aside": live,
        }
    return {"release": rid, "present": True, "ok": True, "mismatches": []}


def _set_aside(host, rid):
    """releases/<rid> → releases/.broken-<rid>-<time>, kept for forensics (pruned by hand),
    its record removed first: (the new path, whether `current` pointed at it). The service
    keeps running what it ran until a clean copy is activated: the directory itself is
    renamed, never copied or removed, so a process whose working directory is in it keeps
    it. For a live release `current` never names a missing directory on the way, even if
    the agent dies between two steps: it points at a bridge (a copy made of hard links, no
    byte copied) while the original is renamed, then at the renamed original, and the
    bridge goes. Where no bridge can be made, the rename and the repoint follow each other
    directly (two system calls apart)."""
    final = os.path.join(host.releases, rid)
    aside = base = os.path.join(host.releases, ".broken-%s-%d" % (rid, int(time.time())))
    n = 1
    while os.path.lexists(aside) or os.path.lexists(aside + ".tmp"):  # one cut short before
        aside, n = "%s~%d" % (base, n), n + 1
    host.forget(rid)
    if host.current() != rid:
        os.rename(final, aside)
        return aside, False
    bridge = aside + ".tmp"
    try:
        _link_tree(final, bridge)
    except OSError:  # (unreadable, no space): what was made goes, the direct way instead
        remove_tree(bridge)
        bridge = None
    else:
        _point_current(host, os.path.basename(bridge))
    os.rename(final, aside)
    _point_current(host, os.path.basename(aside))
    if bridge is not None:
        remove_tree(bridge)
    return aside, True


def _link_tree(src, dest):
    """dest as a copy of the tree src made of hard links (symlinks copied as symlinks, a
    file that cannot be linked copied); never follows a symlink. A directory on another
    filesystem (a volume mounted inside) is copied as an empty directory, never its
    contents. OSError where the tree changes under it or cannot be read."""
    import shutil

    def fail(exc):  # a part not copied must not be served as the whole
        raise exc

    if os.path.islink(src) or not os.path.isdir(src):
        raise OSError(errno.ENOTDIR, "not a directory", src)
    dev = os.lstat(src).st_dev
    modes = []  # each directory's own mode, set once it is filled (it may forbid writing)
    for top, dirs, files in os.walk(src, onerror=fail):
        here = os.path.normpath(os.path.join(dest, os.path.relpath(top, src)))
        os.mkdir(here, 0o700)
        modes.append((here, os.lstat(top).st_mode & 0o7777))
        for name in list(dirs):
            path = os.path.join(top, name)
            st = os.lstat(path)
            if st.st_mode & 0o170000 == 0o120000:  # a link to a directory: walked as a link
                dirs.remove(name)
                files.append(name)
            elif st.st_dev != dev:  # a mount point: the bridge names it, holds none of it
                dirs.remove(name)
                os.mkdir(os.path.join(here, name), 0o700)
                modes.append((os.path.join(here, name), st.st_mode & 0o7777))
        for name in files:
            path, to = os.path.join(top, name), os.path.join(here, name)
            if os.path.islink(path):
                os.symlink(os.readlink(path), to)
                continue
            try:
                os.link(path, to, follow_symlinks=False)
            except OSError:  # a link limit: this file's bytes, never through a symlink
                shutil.copy2(path, to, follow_symlinks=False)
    for here, mode in reversed(modes):
        os.chmod(here, mode)


def op_prune(host, args):
    """Keep the newest `keep` releases by install history, and every protected one."""
    protect = set(args.protect or []) | {host.current()}
    order = [h.get("current") for h in host.state().get("history", []) if h.get("current")]
    ranked = list(dict.fromkeys(reversed(order)))
    keep = set(ranked[: args.keep]) | protect
    ids = host.verified_ids()
    gone = [rid for rid in ids if rid not in keep]
    swept = _sweep_leftovers(host, ids)
    if not gone:  # nothing removed: no inode's ctime moves
        return {"removed": [], "kept": sorted(k for k in keep if k), "current": host.current(),
                "swept": swept}  # fmt: skip
    # A kept release shares inodes with the ones removed (a file unchanged between
    # releases is one inode), and removing a link changes that inode's ctime: the kept
    # file would count as changed and be read again by every later deploy. So the files
    # still exactly as verified just before the removal are re-recorded just after it; a
    # file already changed stays changed. Only inodes a removed release recorded can move.
    # A removed release without recorded identities (a crash between its publish and its
    # record) could have shared any inode: every kept file is looked at then.
    removed = [host.identities(rid) for rid in gone]
    moved = None if not all(removed) else {rec[0] for r in removed for rec in r.values()}
    before, kept = Inodes(), {}
    for rid in [r for r in ids if r in keep]:
        base, recorded = os.path.join(host.releases, rid), host.identities(rid)
        shared = {rel: rec for rel, rec in recorded.items() if moved is None or rec[0] in moved}
        intact = [rel for rel, rec in shared.items()
                  if before.as_recorded(os.path.join(base, rel), rec)]  # fmt: skip
        kept[rid] = (recorded, intact)
    for rid in gone:  # unrecorded first: a crash in between never leaves a partial
        host.forget(rid)  # release recorded as verified
        remove_tree(os.path.join(host.releases, rid))
    after = before.again()
    for rid, (recorded, intact) in kept.items():
        if intact:
            for rel in intact:
                now = after.get(recorded[rel][0])
                if now is None:  # gone or replaced since: recorded as it was, read again later
                    continue
                recorded[rel] = now
            write_atomic(os.path.join(host.meta, rid + ".ids"), dumps(recorded).encode())
    return {"removed": gone, "kept": sorted(k for k in keep if k), "current": host.current(),
            "swept": swept}  # fmt: skip


LEFTOVER_AGE = 3600  # s: no session is that slow between two steps on what it still writes


def _sweep_leftovers(host, recorded):
    """What a crash leaves and nothing else would remove, once it is LEFTOVER_AGE old: a
    release directory without its record (not `current`), verify's .tmp-<id>, a copy set
    aside but cut short, receive's .part files. `.broken-*` are kept for forensics. The
    names removed."""
    now, live, swept = time.time(), host.current(), []
    for name in os.listdir(host.releases) if os.path.isdir(host.releases) else []:
        if name in recorded or name == live:
            continue
        if name.startswith(".broken-") and not name.endswith(".tmp"):  # a copy cut short
            continue
        if name.startswith(".") and not name.startswith((".tmp-", ".broken-")):
            continue
        path = os.path.join(host.releases, name)
        st = os.lstat(path)
        if now - st.st_mtime < LEFTOVER_AGE:
            continue
        _remove(path, st)  # a mount inside stays, and with it the directory
        if not os.path.lexists(path):
            swept.append("releases/" + name)
    for name in os.listdir(host.incoming) if os.path.isdir(host.incoming) else []:
        path = os.path.join(host.incoming, name)
        if name.endswith(".part") and now - os.lstat(path).st_mtime >= LEFTOVER_AGE:
            os.unlink(path)
            swept.append(".ferry/incoming/" + name)
    return swept


class Inodes:
    """The stat of each inode, taken once through one of its paths: kept releases share
    most inodes (a file unchanged between them is one inode), so prune stats ~1,000 of
    them for 3 kept releases of 1,000 files instead of 3,000 paths (twice: before and after
    a removal; ~5 us each here). A path judged by another path's stat of the inode it
    recorded is sound: a write to that inode moves its identity through every path, and a
    path since replaced by another inode is recorded with the old inode's identity, which
    it no longer has, so it counts as changed wherever it is read next."""

    def __init__(self):
        self.stats = {}  # inode → (stat, the path it was taken through)

    def as_recorded(self, path, recorded):
        seen = self.stats.get(recorded[0])
        if seen is None:
            st = _stat(path)
            if st is None or st.st_ino != recorded[0]:
                return False
            seen = self.stats[st.st_ino] = (st, path)
        return recorded_as(seen[0], recorded)

    def again(self):
        """Each inode's identity now, through the same path, where only its ctime moved
        (what unlinking another of its names does); none for an inode gone, replaced, or
        written or chmod'ed while the removal ran, which stays as recorded: changed. (A
        write that also puts the size and mtime back cannot be told from the unlink by a
        stat: `ferry remediate drift` re-hashes.)"""
        out = {}
        for ino, (was, path) in self.stats.items():
            st = _stat(path)
            if st is not None and st.st_ino == ino and _only_ctime_moved(was, st):
                out[ino] = identity_of(st)
        return out


def _only_ctime_moved(was, now):
    same = ("st_size", "st_mtime_ns", "st_mode")
    return all(getattr(was, a) == getattr(now, a) for a in same)


def _remove(path, st):
    """The file, link or (with remove_tree) directory at `path`, lstat'ed as `st`."""
    if st.st_mode & 0o170000 == 0o040000:
        remove_tree(path)
    else:
        os.unlink(path)


def remove_tree(path):
    """shutil.rmtree(path, ignore_errors=True) without importing shutil (~15 ms of a host's
    CPU, each time a release goes). Like it, it never follows a symlink: each directory is
    opened with O_NOFOLLOW through its parent's descriptor, so one swapped for a link
    while it runs cannot lead outside the tree. Unlike it, a directory on another
    filesystem (something mounted inside a release) is left as it is, with what it holds
    (like `rm --one-file-system`). What cannot be removed is left."""
    if os.scandir not in os.supports_fd or os.open not in os.supports_dir_fd:
        import shutil  # no descriptor-relative calls here: shutil's own fallback

        shutil.rmtree(path, ignore_errors=True)
        return
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0)
    try:
        top = os.open(path, flags)
    except OSError:
        return
    try:
        _empty_tree(top, flags, os.fstat(top).st_dev)
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _empty_tree(top, flags, dev):
    """Depth first with a stack of open directories, not recursion: a tree as deep as its
    paths allow outlasts Python's recursion limit. A directory that cannot be opened (or
    listed, or past the process's descriptors) is left with its parents."""
    stack = [(top, _entries(top), None)]  # (descriptor, entries left, name in its parent)
    try:
        while stack:
            fd, entries, name = stack[-1]
            if not entries:
                stack.pop()
                if name is not None:  # a subdirectory, now as empty as it can be
                    os.close(fd)
                    try:
                        os.rmdir(name, dir_fd=stack[-1][0])
                    except OSError:
                        pass
                continue
            child, is_dir = entries.pop()
            try:
                if not is_dir:
                    os.unlink(child, dir_fd=fd)
                    continue
                sub = os.open(child, flags, dir_fd=fd)
            except OSError:
                continue
            try:
                ours = os.fstat(sub).st_dev == dev
            except OSError:
                ours = False
            if ours:
                stack.append((sub, _entries(sub), child))
            else:
                os.close(sub)
    finally:
        for fd, _entries_left, name in stack:
            if name is not None:
                os.close(fd)


def _entries(fd):
    try:
        with os.scandir(fd) as it:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    except OSError:
        return []


def op_run(host, args):
    """Run a (rendered) hook or check command under /bin/sh, in its directory, with a
    timeout; its own process group is killed when the timeout passes. Its exit code is data."""
    cwd = args.cwd if args.cwd and os.path.isdir(args.cwd) else host.root
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (args.env or {}).items()})
    started = time.monotonic()
    rc, out = spawn(["/bin/sh", "-c", args.command], cwd if os.path.isdir(cwd) else "/", env,
                    args.timeout, host)  # fmt: skip
    timed_out = rc is None
    if timed_out:
        rc = 124
        out += b"\n(timed out after %ss)" % str(args.timeout).encode()
    text = out.decode(errors="replace")
    return {"rc": rc, "output": text[-4000:], "seconds": round(time.monotonic() - started, 3),
            "timed_out": timed_out}  # fmt: skip


KILLED_OUTPUT_WAIT = 2.0  # s a command's output is read for after it ended or was killed


_BOOT = []


def _boot_id():
    """This boot's id (Linux), read once: a process start time counts from the boot."""
    if not _BOOT:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT.append(f.read().strip() or None)
        except OSError:
            _BOOT.append(None)
    return _BOOT[0]


def _gone(pgid, seconds):
    """Wait up to `seconds` for process group `pgid` to be gone (killpg(0) finds none)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return
        time.sleep(0.01)


def _started_at(pid):
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat's 22nd field):
    with its PID, it names one process for good. None: no such process (or no /proc)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def spawn(argv, cwd, env, timeout, host=None):
    """(exit code, stdout+stderr) of `argv` run in `cwd` in a session of its own, stdin
    /dev/null (never the session's own stream), once it has exited (its output read for
    KILLED_OUTPUT_WAIT s more: a daemon it left may hold the pipe for ever); (None, output
    so far) when `timeout` passes, its whole process group killed, whatever it did with
    its output. posix_spawn and poll, not subprocess: importing
    subprocess (and signal, enum) costs ~16 ms of CPU, paid by every host of a deployment
    whose milestone runs a check. posix_spawn has no portable chdir, so the agent moves
    there itself (it uses absolute paths only)."""
    import select

    try:
        here = os.getcwd()
    except OSError:  # the directory it was in is gone
        here = None
    if here != cwd:
        os.chdir(cwd)
    r, w = os.pipe()  # both close-on-exec; only the dup2'd copies reach the child
    try:
        pid = _start(argv, env, w)
    finally:
        os.close(w)
    record = None
    chunks, deadline, killed, status, eof = [], time.monotonic() + timeout, False, None, False
    grace = None  # once the command is gone: how long its output may still come
    nap = 0.001  # output closed, the command not reaped yet: it is exiting, most likely
    poller = select.poll()
    poller.register(r, select.POLLIN | select.POLLHUP)
    try:
        if host is not None:
            record = host.command_started(pid)
        while True:
            now = time.monotonic()
            if status is None:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status, grace = st, now + KILLED_OUTPUT_WAIT
            if status is None and now >= deadline:
                for kill in (os.killpg, os.kill):  # the group; itself, had it no group yet
                    try:
                        kill(pid, 9)  # SIGKILL, without the signal module's import
                    except OSError:
                        pass
                _, status = os.waitpid(pid, 0)  # it cannot outlive SIGKILL
                killed, grace = True, now + KILLED_OUTPUT_WAIT
            if status is not None and (eof or now >= grace):
                # what a child left running (setsid, or not in the group) still holds the
                # output: the answer, and the agent lock, must not wait for it
                break
            if eof:  # output closed (or sent elsewhere), the command still runs: its timeout
                time.sleep(min(nap, max(0.0, deadline - now)))
                nap = min(nap * 2, 0.05)
                continue
            # wake at least every 0.1 s: a command that ends with its output still held
            # shows only in waitpid
            until = deadline if grace is None else grace
            if poller.poll(max(1, min(100, int((until - now) * 1000)))):
                chunk = os.read(r, 1 << 16)
                if chunk:
                    chunks.append(chunk)
                else:
                    eof = True
    finally:
        os.close(r)
        if record is not None:
            try:
                os.unlink(record)
            except OSError:
                pass
    out = b"".join(chunks)
    return (None, out) if killed else (_exit_code(status), out)


def _start(argv, env, w):
    """The child, in its own session: stdin from /dev/null, stdout and stderr into `w`."""
    if hasattr(os, "posix_spawn"):  # Python 3.8 on
        return os.posix_spawn(
            argv[0],
            list(argv),
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, w, 1),
                (os.POSIX_SPAWN_DUP2, w, 2),
            ],
            setsid=True,
        )
    pid = os.fork()  # 3.6 and 3.7: the same by hand (the agent runs one thread)
    if pid == 0:
        try:
            os.setsid()
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.execve(argv[0], list(argv), env)
        finally:
            os._exit(127)
    return pid


def _exit_code(status):
    if hasattr(os, "waitstatus_to_exitcode"):  # Python 3.9 on
        return os.waitstatus_to_exitcode(status)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def op_probe(host, args):
    """An HTTP status or a TCP connect, from this host, without starting another program."""
    if args.kind == "http":
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(args.target, timeout=args.timeout) as r:
                return {"ok": r.status == args.status, "got": str(r.status)}
        except urllib.error.HTTPError as e:
            return {"ok": e.code == args.status, "got": str(e.code)}
        except Exception as e:  # any failure to get an answer is the evidence
            return {"ok": False, "got": "error %s" % (e,)}
    import socket

    try:
        socket.create_connection((args.target, int(args.port)), timeout=args.timeout).close()
        return {"ok": True, "got": "connected"}
    except OSError as e:
        return {"ok": False, "got": "error %s" % (e,)}


def op_pull_files(host, args):
    """Write the pull daemon's files into ROOT/.ferry/pull/ (made 0700): `files` is
    [[name, mode, size], ...] and the payload their bytes in that order. Each is written
    atomically (its bytes synced before the rename). They come on the session's own
    stream, not through a command's environment: Linux caps one environment string at
    128 KiB (the agent's base64 is more), and a token there would sit in the shell's
    /proc/PID/environ while it ran."""
    d = os.path.join(host.root, PULL_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    data, at, written = args.payload or b"", 0, []
    for name, mode, size in args.files or []:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise bad_input("bad pull file name %r" % (name,))
        if int(mode) & ~0o777 or int(size) < 0 or at + int(size) > len(data):
            raise bad_input("bad pull file %r: mode %r, size %r" % (name, mode, size))
        write_atomic(os.path.join(d, name), data[at : at + int(size)], int(mode))
        at += int(size)
        written.append(name)
    if at != len(data):
        raise bad_input("%d payload bytes name no file" % (len(data) - at))
    return {"written": written}


# --- container release units (image layers, containers): see orchestrator/containers.py --
# The host's own Docker engine, through the `docker` CLI: DOCKER_HOST, else the endpoint
# in ROOT/.ferry/docker-host (a lab host's own engine), else docker's default socket.
# Containers are named ferry-<unit>; the one they replace is kept stopped as
# ferry-<unit>-prior until the next switch, so a backout restarts it as it was.


def _docker_env(host):
    env = dict(os.environ)
    if not env.get("DOCKER_HOST"):
        try:
            with open(os.path.join(host.root, ".ferry", "docker-host")) as f:
                endpoint = f.read().strip()
            if endpoint:
                env["DOCKER_HOST"] = endpoint
        except FileNotFoundError:
            pass
    return env


def _docker(host, argv, timeout=120, stdin=None, check=True):
    """(rc, output) of one docker CLI command; `check`: a failure is an AgentError."""
    import subprocess

    try:
        proc = subprocess.run(
            ["docker"] + list(argv),
            env=_docker_env(host),
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except FileNotFoundError:
        raise AgentError("docker", "no docker CLI on this host", EXIT_OS)
    except subprocess.TimeoutExpired:
        raise AgentError("docker", "docker %s timed out after %ss" % (argv[0], timeout), EXIT_OS)
    out = proc.stdout.decode(errors="replace").strip()
    if check and proc.returncode != 0:
        raise AgentError("docker", "docker %s: %s" % (" ".join(argv[:2]), out[-800:]), EXIT_OS)
    return proc.returncode, out


def _engine_images(host):
    """image id → its layers' diff_ids, for every image the engine holds."""
    _, out = _docker(host, ["image", "ls", "-q", "--no-trunc"])
    ids = sorted(set(out.split()))
    if not ids:
        return {}
    _, out = _docker(host, ["image", "inspect", "--format", "{{json .}}"] + ids)
    images = {}
    for line in out.splitlines():
        info = loads(line)
        images[info["Id"]] = list((info.get("RootFS") or {}).get("Layers") or [])
    return images


def _container(host, name):
    """{"image", "running", "status"} of a container, or None when there is none."""
    rc, out = _docker(host, ["container", "inspect", "--format", "{{json .}}", name], check=False)
    if rc != 0:
        return None
    info = loads(out.splitlines()[0])
    return {
        "image": info["Image"],
        "running": bool(info["State"]["Running"]),
        "status": info["State"]["Status"],
        "release": (info["Config"].get("Labels") or {}).get("ferry.release"),
    }


def op_images(host, args):
    """What the engine holds: images with their layers, and Ferry's containers."""
    units = list(args.units or [])
    return {
        "images": _engine_images(host),
        "containers": {u: _container(host, "ferry-" + u) for u in units},
        "priors": {u: _container(host, "ferry-%s-prior" % u) for u in units},
    }


def _signed_images(host, rid, digest):
    """The image records of the release's signed manifest (published, or just received)."""
    if os.path.exists(os.path.join(host.meta, rid + ".json")):
        manifest = host.load_manifest(rid, expect=digest)
    else:
        with open(os.path.join(host.incoming, rid + ".manifest"), "rb") as f:
            raw = f.read()
        with open(os.path.join(host.incoming, rid + ".sig"), "rb") as f:
            sig = f.read()
        manifest = host.check_manifest(raw, sig)
    return manifest["content"].get("images") or {}


def _receive_blob(inp, path, digest, size, silence):
    view = memoryview(bytearray(CHUNK))
    if "sha256:" + copy_hashed(inp, path, size, view, "blob %s" % digest, silence) != digest:
        os.unlink(path)
        raise integrity("image blob %s arrived corrupted" % digest)


def op_image_load(host, args):
    """Read the image's config and the layers Ferry sends (the engine has the others),
    check each against the release's signed manifest, and `docker load` them."""
    import shutil

    rid, unit = safe_id(args.id), safe_id(args.unit)
    record = _signed_images(host, rid, args.digest).get(unit)
    if record is None:
        raise integrity("release %s has no image unit %s" % (rid, unit))
    layers = record["layers"]
    sizes = dict((b["digest"], int(b["size"])) for b in layers)
    send = list(args.send or [])
    if any(d not in sizes for d in send):
        raise integrity("a layer sent is not in the signed manifest")
    work = os.path.join(host.incoming, "image-" + unit)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    inp = sys.stdin.buffer
    config = record["config"]
    # the orchestrator gives up on the step `stall` s after it sent the request (whatever
    # the lock's wait took): a load still running a little before then (an engine that
    # hangs) is stopped, so that the step fails in its own words and no process, nor the
    # host's lock, is kept for ever
    ends = (args.read_at or time.monotonic()) + (args.stall or STALL) - LOAD_MARGIN
    try:
        with Silence(args.stall or STALL, "the image's transfer") as silence:
            size = int(config["size"])
            _receive_blob(inp, os.path.join(work, "config.json"), config["digest"], size, silence)
            nbytes = 0
            for digest in send:
                _receive_blob(inp, os.path.join(work, digest[7:]), digest, sizes[digest], silence)
                nbytes += sizes[digest]
        _docker_load(host, work, layers, send, ends)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if config["digest"] not in _engine_images(host):
        raise integrity("the engine did not load image %s" % config["digest"])
    tag = "ferry/%s:%s" % (unit.lower(), config["digest"][7:19])
    _docker(host, ["tag", config["digest"], tag])
    return {"image": config["digest"], "tag": tag, "layers_sent": len(send), "bytes": nbytes}


def _docker_load(host, work, layers, send, ends):
    """`docker load` a docker-save archive of the config and the layers sent, written
    straight into it: the engine's loader takes the layers it has (same chain) from its own
    store and never opens their files. Stopped, its whole process group (a wrapper script's
    children too), when it still runs at `ends` (monotonic), and the step fails."""
    import io
    import subprocess
    import tarfile
    import threading

    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            ["docker", "load", "-q"],
            env=_docker_env(host),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise AgentError("docker", "no docker CLI on this host", EXIT_OS)
    stopped = []

    def stop():
        stopped.append(True)
        try:
            os.killpg(proc.pid, 9)  # SIGKILL (`signal` would import enum)
        except OSError:  # ended just now
            pass

    late = threading.Timer(max(1.0, ends - started), stop)
    late.daemon = True
    late.start()
    names = [b["digest"][7:] + "/layer.tar" for b in layers]
    manifest = [{"Config": "config.json", "RepoTags": None, "Layers": names}]
    try:
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                tar.add(os.path.join(work, "config.json"), "config.json")
                for digest in send:
                    tar.add(os.path.join(work, digest[7:]), digest[7:] + "/layer.tar")
                raw = dumps(manifest).encode()
                info = tarfile.TarInfo("manifest.json")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
            proc.stdin.close()
        except (BrokenPipeError, ValueError):  # it ended (or was stopped) before reading all
            pass
        out = proc.stdout.read().decode(errors="replace")
        rc = proc.wait()
    finally:
        late.cancel()
    if stopped and rc != 0:
        raise AgentError(
            "docker",
            "docker load did not finish within the step's deadline (it ran %.0f s; the "
            "host's Docker engine does not answer?): it was stopped, and this host is let go"
            % (time.monotonic() - started),
            EXIT_OS,
        )
    if rc != 0:
        raise AgentError("docker", "docker load: %s" % out.strip()[-800:], EXIT_OS)


def op_container_switch(host, args):
    """Start ferry-<unit> on the release's image; the container it replaces is stopped
    and kept as ferry-<unit>-prior. Downtime: from the old one's stop to the new start."""
    unit = safe_id(args.unit)
    spec = args.container or {}
    name, prior = "ferry-" + unit, "ferry-%s-prior" % unit
    image = spec["image"]
    now = _container(host, name)
    if now and now["image"] == image and now["running"]:
        # this release's own switch, cut short after its container started (pending), did
        # change it: a backout of the release must still put the prior one back
        last = _switched(host, unit)
        cut = last.get("release") == args.id and last.get("pending")
        _note_switch(host, unit, args.id, changed=bool(cut))
        return {"container": name, "image": image, "already": True, "downtime_s": 0.0}
    run = ["run", "-d", "--name", name, "--network", "host", "--restart", "no"]
    run += ["--label", "ferry.unit=" + unit, "--label", "ferry.release=" + safe_id(args.id)]
    env = spec.get("env") or {}
    env_file = os.path.join(host.incoming, ".env-" + unit)  # no release id starts with "."
    if env:  # a file only root reads, not the command line (any user sees that in ps)
        host.ensure_dirs()
        host.settle_incoming()
        lines = ["%s=%s" % (k, str(env[k]).replace("\n", " ")) for k in sorted(env)]
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        run += ["--env-file", env_file]
    for v in spec.get("volumes") or []:
        run += ["-v", v]
    run.append(image)
    run += list(spec.get("command") or [])
    replaced = None
    started = time.monotonic()
    _note_switch(host, unit, args.id, changed=True, pending=True)  # before any change
    if now is not None:
        if _container(host, prior) is not None:
            _docker(host, ["rm", "-f", prior])
        _docker(host, ["stop", "-t", str(int(spec.get("stop_timeout", 10))), name])
        _docker(host, ["rename", name, prior])
        replaced = now["image"]
    try:
        rc, out = _docker(host, run, check=False)
    finally:
        if env:
            os.unlink(env_file)
    if rc != 0:
        _docker(host, ["rm", "-f", name], check=False)
        back = True
        if replaced is not None:  # put the old one back as it was: the switch did not happen
            back = _docker(host, ["rename", prior, name], check=False)[0] == 0
            back = back and _docker(host, ["start", name], check=False)[0] == 0
        _note_switch(host, unit, args.id, changed=not back)  # not back: a backout reverts
        raise AgentError("docker", "docker run: %s" % out[-800:], EXIT_OS)
    _note_switch(host, unit, args.id, changed=True)
    return {
        "container": name,
        "image": image,
        "prior_image": replaced,
        "downtime_s": round(time.monotonic() - started, 3),
    }


def op_container_health(host, args):
    """Run the health command inside the container until it passes or the time is up."""
    name = "ferry-" + safe_id(args.unit)
    deadline = time.monotonic() + float(args.timeout or 30)
    attempts, rc, out = 0, None, ""
    while True:
        attempts += 1
        state = _container(host, name)
        if state is None or not state["running"]:
            rc, out = 125, "container %s is %s" % (name, state["status"] if state else "missing")
        elif args.command:
            rc, out = _docker(
                host, ["exec", name, "/bin/sh", "-c", args.command], timeout=30, check=False
            )
        else:
            rc, out = 0, "running"
        if rc == 0 or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    return {"ok": rc == 0, "rc": rc, "output": out[-1000:], "attempts": attempts}


def _switches_path(host):
    return os.path.join(host.root, ".ferry", "containers.json")


def _note_switch(host, unit, rid, changed, reverted=False, pending=False):
    """Which release last switched each unit, whether it changed the container, whether
    it was reverted: a backout of a release that found its container already running, or
    one already reverted (a recover run again), leaves the containers alone. `pending`: a
    switch is changing the containers now (written before the first change)."""
    try:
        with open(_switches_path(host)) as f:
            st = loads(f.read())
    except (FileNotFoundError, ValueError):
        st = {}
    st[unit] = {"release": rid, "changed": changed, "reverted": reverted}
    if pending:
        st[unit]["pending"] = True
    host.ensure_dirs()
    write_atomic(_switches_path(host), dumps(st, indent=1).encode())


def _switched(host, unit):
    try:
        with open(_switches_path(host)) as f:
            return loads(f.read()).get(unit) or {}
    except (FileNotFoundError, ValueError):
        return {}


def op_container_state(host, args):
    """Stop or start ferry-<unit> (a backout restores a volume's data with it stopped: a
    restore that replaces the directory would leave a running container on the old one)."""
    name = "ferry-" + safe_id(args.unit)
    if args.action not in ("stop", "start"):
        raise bad_input("action is stop or start, not %r" % (args.action,))
    if _container(host, name) is None:
        return {"container": name, "present": False}
    _docker(host, [args.action, name])
    return {"container": name, "present": True, args.action: True}


def op_container_revert(host, args):
    """Backout: the new container goes; ferry-<unit>-prior (if any) runs again as before."""
    unit = safe_id(args.unit)
    name, prior = "ferry-" + unit, "ferry-%s-prior" % unit
    last = _switched(host, unit)
    if args.id and last.get("release") == args.id:
        if last.get("changed") is False or last.get("reverted"):
            return {"container": name, "image": None, "unchanged": True}
        now = _container(host, name)
        if last.get("pending") and now is not None and now.get("release") != args.id:
            # the switch was cut before its own container ran: ferry-<unit> is still the
            # one it would have replaced (perhaps stopped), and -prior an older one
            stopped = not now["running"]
            if stopped:
                _docker(host, ["start", name])
            _note_switch(host, unit, args.id, changed=True, reverted=True)
            return {"container": name, "image": now["image"], "restarted": stopped}
    old = _container(host, prior)
    if _container(host, name) is not None:
        _docker(host, ["rm", "-f", name])
    if old is not None:
        _docker(host, ["rename", prior, name])
        _docker(host, ["start", name])
    if args.id:
        _note_switch(host, unit, args.id, changed=True, reverted=True)
    return {"container": name, "image": old["image"] if old else None}


OPS = {
    "state": op_state,
    "inspect": op_inspect,
    "pin": op_pin,
    "receive": op_receive,
    "verify": op_verify,
    "config": op_config,
    "switch": op_switch,
    "readback": op_readback,
    "check": op_check,
    "prune": op_prune,
    "run": op_run,
    "probe": op_probe,
    "pull_files": op_pull_files,
    # container release units
    "images": op_images,
    "image_load": op_image_load,
    "container_switch": op_container_switch,
    "container_health": op_container_health,
    "container_revert": op_container_revert,
    "container_state": op_container_state,
}
DEFAULTS = {
    "id": None, "key": None, "none": False, "full": False, "keep": 3, "protect": None,
    "payload": None, "command": None, "env": None, "cwd": None, "timeout": None,
    "kind": None, "target": None, "port": None, "status": 200, "rehash": False,
    "digest": None, "rotations": None, "known": None,
    "unit": None, "units": None, "files": None, "send": None, "container": None, "action": None,
    "lock": None, "stall": None, "read_at": None,
}  # fmt: skip


# what changes the host, under Host.hold; the rest only read it (a no-op deploy takes no lock),
# but for the writes some may come to make (a pin that writes, check's set-aside), which
# take it where they do
CHANGES = frozenset(
    ("receive", "verify", "config", "switch", "prune", "run", "pull_files",
     "image_load", "container_switch", "container_revert", "container_state")
)  # fmt: skip


def dispatch(host, op, args, who="a Ferry session", keep=False):
    """One operation → (result, exit code); every failure is a result, never a traceback.
    An operation that changes the host holds the agent lock (Host.hold): `keep`, a session
    keeps it to its end; otherwise it is let go after the operation. `lock: false` on a
    command: it only reads (a check, a probe) or ends the holder (halt), so never waits."""
    host.who = who
    result, code = _dispatched(host, op, args, keep)
    if host.ended_hooks and isinstance(result, dict):  # said once, with the step, whatever
        result["ended_orphans"], host.ended_hooks = host.ended_hooks, []  # its outcome
    return result, code


def _dispatched(host, op, args, keep):
    try:
        try:
            if op in CHANGES and args.lock is not False:
                host.hold_for(op)
            return OPS[op](host, args), 0
        finally:
            if not keep:
                host.let_go()
    except AgentError as exc:
        return {"error": exc.kind, "message": exc.message}, exc.code
    except OSError as exc:
        kind = "disk-full" if exc.errno == errno.ENOSPC else "os"
        return {"error": kind, "message": str(exc)}, EXIT_OS
    except (ValueError, KeyError, TypeError) as exc:
        return {"error": "input", "message": "%s: %s" % (type(exc).__name__, exc)}, EXIT_INPUT


def _announce_wait(seconds):
    """Before a step waits for another agent: `WAIT <s>`, so that the orchestrator's deadline
    for the step moves by as much, and a busy host is refused in words, not as a timeout."""
    sys.stdout.write("WAIT %g\n" % seconds)
    sys.stdout.flush()


def reply(result):
    sys.stdout.write("RESULT " + dumps(result) + "\n")
    sys.stdout.flush()


def serve(root, peer=None):
    """Answer requests on stdin until it closes: one process for a whole deployment."""
    inp = sys.stdin.buffer
    host = Host(root)
    if peer is not None:
        host.peer = peer
    host.announce = _announce_wait
    try:
        return _serve_requests(host, inp)
    finally:
        host.let_go()  # (a kill lets go too: the kernel's; this also clears its words)


def _serve_requests(host, inp):
    while True:
        if host.held:
            _let_go_when_idle(host, inp)
        line = inp.readline()
        if not line:
            return 0
        try:
            req = loads(line.decode())
            op = req["op"]
            if op not in OPS:
                raise KeyError("no operation %r" % (op,))
            args = Args(**dict(DEFAULTS, **(req.get("args") or {})))
            args.read_at = time.monotonic()  # about when the orchestrator's deadline began
            if req.get("payload"):
                args.payload = _read_exact(inp, int(req["payload"]))
        except (ValueError, KeyError, TypeError, AgentError) as exc:
            reply({"error": "input", "message": "bad request: %s" % (exc,), "_code": EXIT_INPUT})
            return EXIT_INPUT  # the stream cannot be trusted to be in step any more
        result, code = dispatch(host, op, args, keep=True)
        result["_code"] = code
        reply(result)
        if op in ("receive", "image_load") and code:
            return code  # objects may still be on the wire: the stream is out of step


def _let_go_when_idle(host, inp):
    """A session holding the agent lock that gets no request for LOCK_IDLE s lets go of it
    (its next change takes it again, waiting as any step would): its orchestrator may have
    gone without this host's sshd noticing for hours (a crashed machine, a dead worker, a
    NAT that dropped the idle connection), or be pausing (a soak, an approval). LOCK_IDLE is
    LOCK_WAIT: a backout's new session outwaits a session its orchestrator left behind."""
    import select

    fd = inp.fileno()
    try:  # a request already read into the buffer is not idleness (select cannot see it)
        os.set_blocking(fd, False)
        try:
            ready = inp.peek(1)
        except BlockingIOError:
            ready = b""
        finally:
            os.set_blocking(fd, True)
    except (OSError, ValueError, AttributeError):
        return
    if not ready and not select.select([fd], [], [], LOCK_IDLE)[0]:
        host.let_go()


# --- pull mode: the same operations, driven by the agent itself ------------------------------
# ROOT/.ferry/pull/config.json   {"server", "host", "poll", "heartbeat"} written at install
# ROOT/.ferry/pull/token         this host's token (0600); it is never logged or reported
# ROOT/.ferry/pull/ca.pem        the pinned CA of Ferry's DML server (no other CA is trusted)
# ROOT/.ferry/pull/state.json    last generation applied, releases backed out, pending work,
#                                reports not yet delivered (the server may be down)
# ROOT/.ferry/pull/apply-now     a person's request (`apply-now`): apply what is pending
PULL_DIR = os.path.join(".ferry", "pull")
# a fetch cut or refused at the connection is tried again 1, 2, 4, 8 and 16 s later (±50%,
# 15-46 s in all): time for `ferry dml serve` to restart on a loaded machine. No retry starts
# after FETCH_WINDOW s, so a stalled server (each try may wait its timeout) fails the step.
FETCH_TRIES, FETCH_WINDOW = 6, 90.0


def _plog(msg):
    sys.stderr.write(
        "%s ferry-agent: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), msg)
    )
    sys.stderr.flush()


def _passing(exc):
    """A failure of the connection itself, which may pass: refused, reset, cut short, timed
    out (not a certificate that does not verify, nor a local file's error)."""
    import http.client
    import socket
    import ssl
    import urllib.error

    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason
    cut = (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)
    if isinstance(exc, cut + (ssl.SSLEOFError,)):
        return True
    if isinstance(exc, socket.gaierror):  # a name the resolver could not look up just now
        return exc.errno == getattr(socket, "EAI_AGAIN", None)
    return isinstance(exc, OSError) and exc.errno in _NETWORK_DOWN


_NETWORK_DOWN = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


class Refused(Exception):
    """The server refused us (401/403): retrying at once would not change its mind."""


class PullAgent:
    def __init__(self, root):
        self.host = Host(root)
        self.dir = os.path.join(self.host.root, PULL_DIR)
        with open(os.path.join(self.dir, "config.json")) as f:
            self.cfg = loads(f.read())
        with open(os.path.join(self.dir, "token")) as f:
            self.token = f.read().strip()
        self.server = self.cfg["server"].rstrip("/")
        self.name = self.cfg["host"]
        self.poll = float(self.cfg.get("poll", 30))
        self.beat = float(self.cfg.get("heartbeat", 10))
        self.ctx = None
        if self.server.startswith("https://"):
            import ssl

            # only the pinned CA: a certificate any other authority signed is refused
            self.ctx = ssl.create_default_context(cafile=os.path.join(self.dir, "ca.pem"))
        elif not self.cfg.get("insecure_http"):
            raise bad_input("the server is not https:// and insecure_http was not chosen")
        self.state_path = os.path.join(self.dir, "state.json")
        self.st = self._load()
        self.booted = True  # the first answer after a start is the host's "boot"
        self.applying = None
        self.nudge = -1
        self.polling = False  # a long-poll in flight is this host's heartbeat (the server's)
        self.beat_counted = False  # the server said so: an older one would not count it
        self.lock = __import__("threading").Lock()

    # -- local state ---------------------------------------------------------------------
    def _load(self):
        try:
            with open(self.state_path) as f:
                st = loads(f.read())
        except (OSError, ValueError):
            st = {}
        st.setdefault("generation", 0)
        st.setdefault("backed_out", [])
        st.setdefault("outbox", [])
        st.setdefault("pending", None)
        return st

    def _save(self):
        write_atomic(self.state_path, dumps(self.st).encode(), 0o600)

    # -- the wire ------------------------------------------------------------------------
    def call(self, method, path, body=None, timeout=30, raw=False, beat=None):
        import urllib.error
        import urllib.request

        data = None if body is None else dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token)
        if beat is not None:
            req.add_header("X-Ferry-Beat", dumps(beat, separators=(",", ":")))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ctx) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            # closed now: the caller holds the error through its back-off, and an unread
            # answer kept the server's end of the connection open that long
            e.close()
            if e.code in (401, 403):
                raise Refused("%s %s: refused (%d)" % (method, path.split("?")[0], e.code))
            raise
        return payload if raw else loads(payload.decode() or "{}")

    def report(self, d, step, ok, detail=None):
        item = {
            "generation": d["generation"], "deployment": d.get("deployment"),
            "release_id": d.get("release_id"), "step": step, "ok": bool(ok),
            "detail": detail or {}, "host": self.name,
        }  # fmt: skip
        with self.lock:
            self.st["outbox"].append(item)
            self._save()
        self.flush()

    def flush(self):
        """Deliver what the server has not acknowledged yet, in order (kept across restarts)."""
        with self.lock:
            items = list(self.st["outbox"])
        if not items:
            return True
        try:
            self.call("POST", "/v1/hosts/%s/reports" % self.name, items, timeout=20)
        except Refused as exc:
            _plog("reports refused: %s" % exc)
            return False
        except Exception as exc:  # the server down or slow: keep them, try later
            _plog("reports kept for later: %s" % (exc,))
            return False
        with self.lock:
            self.st["outbox"] = self.st["outbox"][len(items) :]
            self._save()
        return True

    def beat_data(self):
        pending = (self.st.get("pending") or {}).get("release_id")
        return {"current": self.host.current(), "pending": pending, "applying": self.applying,
                "backed_out": len(self.st["backed_out"]), "agent": "pull"}  # fmt: skip

    def heartbeats(self):
        while True:
            # while a long-poll waits, it is the heartbeat: the server stamps its host alive
            if not (self.polling and self.beat_counted):
                try:
                    beat = self.beat_data()
                    self.call("POST", "/v1/hosts/%s/heartbeat" % self.name, beat, timeout=10)
                except Exception as exc:  # a missed heartbeat is what the server looks for
                    _plog("heartbeat not delivered: %s" % (exc,))
            time.sleep(self.beat)

    # -- the loop ------------------------------------------------------------------------
    def run(self):
        import random
        import threading

        threading.Thread(target=self.heartbeats, daemon=True).start()
        _plog("pull agent for %s started, server %s" % (self.name, self.server))
        backoff = 1.0
        while True:
            try:
                pending = self.st.get("pending")
                if pending is not None and pending.get("held_back"):
                    self.retry(pending)  # due before: needs no answer of the server's
                self.flush()
                wait = self.poll if self.st.get("pending") is None else min(self.poll, 2.0)
                path = "/v1/hosts/%s/desired?after=%d&nudge=%d&wait=%d" % (
                    self.name,
                    self.st["generation"] if not self.booted else -1,
                    self.nudge,
                    wait,
                )
                self.polling = True
                try:
                    ans = self.call("GET", path, timeout=wait + 30, beat=self.beat_data())
                finally:
                    self.polling = False
                backoff = 1.0
                self.beat_counted = bool(ans.get("beat"))
                self.nudge = ans.get("nudge", self.nudge)
                if ans.get("changed") and ans.get("purpose"):
                    self.consider(ans)
                elif ans.get("changed"):
                    self.st["generation"] = ans.get("generation", 0)
                self.booted = False
                pending = self.st.get("pending")
                if pending is not None:
                    self.retry(pending)
            except Refused as exc:
                _plog("%s; retrying in 30s" % exc)
                time.sleep(30 * random.uniform(0.8, 1.2))
            except Exception as exc:  # down, slow, a certificate that does not verify, …
                _plog(
                    "server not usable: %s: %s; retrying in %.0fs"
                    % (type(exc).__name__, exc, backoff)
                )
                # jitter: agents that lost the server together do not return together
                time.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 30.0)

    def retry(self, pending):
        """Apply pending work whose time has come (it stays pending if another agent holds
        the host: see apply)."""
        if not self.time_has_come(pending, nudge=False):
            return
        if pending.get("held_back"):
            try:
                self.host.hold(self.what(pending), wait=0)
            except (AgentError, OSError):
                return  # still held: tried again shortly, with nothing written meanwhile
        try:
            self.st["pending"] = None
            self._save()
        except BaseException:
            self.host.let_go()
            raise
        self.apply(pending)

    @staticmethod
    def what(d):
        return "the pull agent's %s of %s (deployment %s)" % (
            d.get("purpose"), d.get("release_id") or "no release", d.get("deployment"))  # fmt: skip

    def time_has_come(self, d, nudge=False):
        if os.path.exists(os.path.join(self.dir, "apply-now")):
            try:
                os.unlink(os.path.join(self.dir, "apply-now"))
            except OSError:
                pass
            return True
        how = d.get("apply") or "now"
        if how == "now" or d.get("purpose") == "backout":
            return True
        if how == "boot":  # held back at its boot by another agent: its time came then
            return self.booted or bool(d.get("held_back"))
        if how == "window":
            return in_window((d.get("spec") or {}).get("window"), time.time())
        return False

    def consider(self, d):
        gen = int(d["generation"])
        rid = d.get("release_id")
        if gen == self.st["generation"]:
            pending = self.st.get("pending")
            if pending is None or pending.get("generation") != gen:
                return  # handled before (also before a restart): never applied twice
            if pending.get("held_back"):
                d = dict(d, held_back=True)
        self.st["generation"] = gen
        self.st["pending"] = None
        self._save()
        if d["purpose"] == "deploy" and [d.get("deployment"), rid] in self.st["backed_out"]:
            self.report(
                d,
                "refused",
                False,
                {
                    "reason": "release %s was backed out of deployment %s on this host; "
                    "it is never applied again" % (rid, d.get("deployment"))
                },
            )
            return
        if rid == self.host.current() and not (d.get("spec") or {}).get("actions"):
            self.report(d, "done", True, {"current": rid})
            return
        if not self.time_has_come(d):
            self.st["pending"] = d
            self._save()
            self.report(d, "pending", True, {"apply": d.get("apply")})
            return
        self.apply(d)

    # -- one desired state, applied --------------------------------------------------------
    def apply(self, d):
        rid = d.get("release_id")
        spec = d.get("spec") or {}
        self.host.who = "the pull agent"
        what = self.what(d)
        try:
            self.host.hold(what, wait=0)
        except AgentError as exc:  # a session of Ferry's changes the host: this waits for it
            if not d.get("held_back"):
                _plog("another Ferry agent is changing this host (%s): %s waits until it "
                      "is done" % (exc.holder, what))  # fmt: skip
            self.st["pending"] = dict(d, held_back=True)
            self._save()
            return
        except OSError as exc:  # the lock cannot be taken at all (a read-only root, …)
            self.report(d, "lock", False, {"error": str(exc), "kind": "os"})
            return
        self.applying = rid
        try:
            for action in spec.get("actions", []):
                step = action["step"]
                try:
                    detail = self.do(d, action, spec) or {}
                except AgentError as exc:
                    self.report(
                        d,
                        step,
                        False,
                        {
                            "error": exc.message,
                            "kind": exc.kind,
                            "output": getattr(exc, "output", "")[-1000:],
                        },
                    )
                    if action.get("warn_only"):
                        continue
                    return
                except OSError as exc:
                    kind = "disk-full" if exc.errno == errno.ENOSPC else "os"
                    self.report(d, step, False, {"error": str(exc), "kind": kind})
                    if action.get("warn_only"):
                        continue
                    return
                except Exception as exc:  # noqa: BLE001 - unforeseen: still reported, never
                    # left for the milestone's deadline to find (the step was already taken)
                    error = "%s: %s" % (type(exc).__name__, exc)
                    self.report(d, step, False, {"error": error, "kind": "error"})
                    if action.get("warn_only"):
                        continue
                    return
                self.report(d, step, True, detail)
            if d["purpose"] == "backout" and spec.get("leaving"):
                self.st["backed_out"].append([d.get("deployment"), spec["leaving"]])
                self.st["backed_out"] = self.st["backed_out"][-100:]
                self._save()
            args = Args(
                **dict(DEFAULTS, id=rid, full=bool(spec.get("full", True)), digest=d.get("digest"))
            )
            back = (
                op_readback(self.host, args)
                if rid
                else {
                    "current": self.host.current(),
                    "ok": self.host.current() is None,
                    "mismatches": [],
                }
            )
            self.report(
                d,
                "done",
                bool(back.get("ok")) and back.get("current") == rid,
                {"current": back.get("current"), "mismatches": back.get("mismatches", [])[:5]},
            )
        finally:
            self.applying = None
            self.host.let_go()

    def do(self, d, action, spec):
        step, rid = action["step"], d.get("release_id")
        result = {}
        if step == "stage":
            return self.stage(rid, d.get("digest"))
        if step == "verify":
            return op_verify(self.host, Args(**dict(DEFAULTS, id=rid)))
        if "config" in action and action["config"]:
            payload = dumps(action["config"]).encode()
            result.update(op_config(self.host, Args(**dict(DEFAULTS, id=rid, payload=payload))))
        if "switch" in action:
            target = action["switch"]
            result.update(
                op_switch(self.host, Args(**dict(DEFAULTS, id=target, none=target is None)))
            )
        if action.get("run"):
            res = op_run(
                self.host,
                Args(
                    **dict(
                        DEFAULTS,
                        command=action["run"],
                        env=spec.get("env") or {},
                        cwd=spec.get("cwd"),
                        timeout=spec.get("timeout", 300),
                    )
                ),
            )
            if res["rc"] != 0:
                err = bad_input("%s: hook exited %s" % (step, res["rc"]))
                err.kind, err.output = "hook", res["output"]
                raise err
            result["output"] = res["output"][-500:]
        evidence = []
        for check in action.get("checks") or []:
            ok, ev = self.check(check, spec)
            evidence.append(ev)
            if not ok:
                err = bad_input("%s failed: %s" % (check.get("label"), ev))
                err.kind, err.output = "check", ev
                raise err
        if evidence:
            result["checks"] = evidence
        return result

    def check(self, c, spec):
        if c["kind"] == "command":
            res = op_run(
                self.host,
                Args(
                    **dict(
                        DEFAULTS,
                        command=c["target"],
                        env=spec.get("env") or {},
                        cwd=None,
                        timeout=c.get("timeout", 10),
                    )
                ),
            )
            return res["rc"] == 0, "%s: exit %s %s" % (
                c["label"],
                res["rc"],
                res["output"].strip()[-300:],
            )
        res = op_probe(
            self.host,
            Args(
                **dict(
                    DEFAULTS,
                    kind=c["kind"],
                    target=c["target"],
                    port=c.get("port"),
                    status=c.get("status", 200),
                    timeout=c.get("timeout", 10),
                )
            ),
        )
        return bool(res["ok"]), "%s: %s" % (c["label"], res["got"])

    def stage(self, rid, digest):
        """The signed manifest first, checked against the pinned key before anything else is
        fetched; then only the objects this host lacks, each checked against its sha256."""
        self.host.ensure_dirs()
        self.host.settle_incoming()
        check = op_check(self.host, Args(**dict(DEFAULTS, id=rid, full=True, digest=digest)))
        if check["ok"]:
            return {"already": True, "bytes": 0}
        raw, sig = (
            self.fetching("the %s of %s" % (part, rid), self.call,
                          "GET", "/v1/releases/%s/%s" % (rid, part), raw=True, timeout=60)
            for part in ("manifest", "signature")
        )  # fmt: skip
        manifest = self.host.check_manifest(raw, sig)  # raises: nothing fetched, nothing run
        if digest and manifest.get("digest") != digest:
            raise integrity(
                "the server's manifest for %s is %s, not %s" % (rid, manifest.get("digest"), digest)
            )
        write_atomic(os.path.join(self.host.incoming, rid + ".manifest"), raw)
        write_atomic(os.path.join(self.host.incoming, rid + ".sig"), sig)
        wanted = self.host.missing_objects(manifest)
        nbytes = 0
        for sha, size in sorted(wanted.items()):
            self.fetching("object " + sha, self.fetch_object, sha, size)
            nbytes += size
        return {"needed": len(wanted), "bytes": nbytes}

    def fetch_object(self, sha, size):
        """One object into incoming/, hashed as it arrives; a corrupted one is not kept."""
        import urllib.request

        part = os.path.join(self.host.incoming, sha + ".part")
        req = urllib.request.Request("%s/v1/objects/%s" % (self.server, sha))
        req.add_header("Authorization", "Bearer " + self.token)
        h, got = new_hash(), 0
        try:
            # two withs, not one in parentheses: the host compiles this with its own
            # Python, which may be older than 3.9
            with urllib.request.urlopen(req, timeout=120, context=self.ctx) as r:  # noqa: SIM117
                with open(part, "wb") as out:
                    while True:
                        chunk = r.read(CHUNK)
                        if not chunk:
                            break
                        got += len(chunk)
                        if got > size:
                            break
                        h.update(chunk)
                        out.write(chunk)
                    # http.client ends a body cut short quietly, still expecting bytes: a cut,
                    # fetched again; a whole body of the wrong size is corrupted (below)
                    if got < size and r.length:
                        import http.client

                        raise http.client.IncompleteRead(b"", r.length)
        except BaseException:
            if os.path.exists(part):
                os.unlink(part)
            raise
        if got != size or h.hexdigest() != sha:
            os.unlink(part)
            raise integrity(
                "object %s arrived corrupted (sha256 %s, %d bytes)" % (sha, h.hexdigest(), got)
            )
        os.replace(part, os.path.join(self.host.incoming, sha))

    def fetching(self, what, fetch, *args, **kwargs):
        """`fetch(*args, **kwargs)`, again after a connection that failed or was cut: the
        server restarting (its stop cuts a transfer after its grace), a network blip. What
        comes is checked by its signature or sha256 whichever try brings it; a refusal
        (4xx), a certificate that does not verify, corrupted bytes or a local error (a full
        disk) are not retried. After FETCH_TRIES, or FETCH_WINDOW seconds, the step fails,
        saying why."""
        import random
        import urllib.error

        delay, until = 1.0, time.monotonic() + FETCH_WINDOW
        for attempt in range(1, FETCH_TRIES + 1):
            last = attempt == FETCH_TRIES or time.monotonic() + delay > until
            try:
                return fetch(*args, **kwargs)
            except urllib.error.HTTPError as exc:
                exc.close()  # the step's report follows: do not hold the connection meanwhile
                why = "the server answered %d" % exc.code
                if exc.code < 500 or last:
                    raise AgentError("fetch", "%s: %s" % (what, why), EXIT_OS)
            except Exception as exc:  # noqa: BLE001 - sorted by _passing below
                if not _passing(exc):
                    raise
                why = "%s: %s" % (type(exc).__name__, exc)
                if last:
                    raise AgentError(
                        "fetch",
                        "%s: not fetched (%s; gave up after %d attempt(s))" % (what, why, attempt),
                        EXIT_OS,
                    )
            _plog("%s: %s; trying again (%d of %d)" % (what, why, attempt + 1, FETCH_TRIES))
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay *= 2


def in_window(window, now):
    """Is `now` (seconds since the epoch) inside the host's maintenance window?

    `window` is orchestrator.pullwindow.agent_window's: {"days": [0..6] (Mon = 0), "start":
    "HH:MM", "end": "HH:MM", "tz": zone}, wall-clock in `tz`, ending the next day when end
    <= start (the change calendar's rule); without days every day, without tz UTC.
    """
    if not window:
        return False
    import datetime

    tz = window.get("tz") or "UTC"
    if tz == "UTC":
        zone = datetime.timezone.utc
    else:
        try:
            import zoneinfo

            zone = zoneinfo.ZoneInfo(tz)
        except Exception:  # no tz database on this host: never guess a window open
            _plog("time zone %s is unknown on this host: the window stays closed" % tz)
            return False
    local = datetime.datetime.fromtimestamp(now, zone)
    days = set(window.get("days", range(7)))
    start = [int(x) for x in window["start"].split(":")]
    end = [int(x) for x in window["end"].split(":")]
    a, b = start[0] * 60 + start[1], end[0] * 60 + end[1]
    minute = local.hour * 60 + local.minute
    today, yesterday = local.weekday(), (local.weekday() - 1) % 7
    if a < b:
        return today in days and a <= minute < b
    # past midnight: the tail of yesterday's window, or the start of today's
    return (today in days and minute >= a) or (yesterday in days and minute < b)


def pull_main(mode, root):
    if mode == "apply-now":
        path = os.path.join(os.path.abspath(root), PULL_DIR, "apply-now")
        write_atomic(path, b"1\n")
        reply({"apply_now": True})
        return 0
    try:
        agent = PullAgent(root)
    except (OSError, ValueError, KeyError, AgentError) as exc:
        _plog("cannot start: %s" % (exc,))
        return EXIT_INPUT
    agent.run()
    return 0


def _quit(code):
    """End a session's process without the interpreter's teardown: freeing the manifests,
    identities and modules it holds one by one cost ~10 ms of the host's CPU after its last
    answer (~3 ms with this; one incremental session, 1,000 files), and the orchestrator
    waits for the exit.
    Every file the agent wrote is closed by then; only the answer streams may hold bytes,
    and atexit's functions (none of the agent's own) still run."""
    try:
        import atexit  # built in: no import cost

        atexit._run_exitfuncs()
    except Exception:  # noqa: BLE001 - another Python's atexit; a failing function
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the orchestrator went away: nobody left to tell
            pass
    os._exit(code)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["pull"], ["apply-now"]) and len(argv) == 3 and argv[1] == "--root":
        return pull_main(argv[0], argv[2])
    if argv[:1] == ["serve"] and len(argv) in (3, 5) and argv[1] == "--root":
        # the session's own start: no argparse to import. `--from ADDRESS`: the login's
        # address, which sudo (become) keeps out of the environment, for the lock's note
        peer = argv[4] if len(argv) == 5 and argv[3] == "--from" else None
        return _quit(serve(argv[2], peer))
    import argparse

    p = argparse.ArgumentParser(prog="ferry-agent")
    p.add_argument("op", choices=sorted(OPS) + ["serve"])
    p.add_argument("--root", required=True)
    p.add_argument("--id")
    p.add_argument("--key")
    p.add_argument("--none", action="store_true")
    p.add_argument("--full", action="store_true")
    p.add_argument("--rehash", action="store_true")
    p.add_argument("--digest")
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--protect", action="append")
    args = p.parse_args(argv)
    if args.op == "serve":
        return serve(args.root)
    for key, value in DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    result, code = dispatch(Host(args.root), args.op, args, who="a one-shot agent")
    reply(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
