"""A wave's progress (orchestrator/progress.py): what a pipeline's log and a terminal show
while hosts work, fed as the executor and the sessions feed it."""

from __future__ import annotations

import io
import sys
import threading

import pytest

from orchestrator import progress as progress_mod
from orchestrator.progress import WaveProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", c)
    return c


def test_a_pipeline_sees_bytes_move_during_a_transfer_and_failed_hosts_by_name(clock):
    lines: list[str] = []
    p = WaveProgress("wave 2", 5, lines.append, every=5.0)
    clock.now += 1
    p.sending(3_000_000)  # under 5 s since the start: nothing yet
    assert lines == []
    clock.now += 4
    p.sending(2_000_000)  # 5 s: the transfer is shown before any host finished
    assert lines == ["  wave 2: 0/5 hosts done, 5.0 MB sent (1.0 MB/s), 5.0s"]
    clock.now += 1
    p.host_done("h3", False)
    p.host_done("h1", True)
    assert len(lines) == 1  # not twice within 5 s
    for name in ("h4", "h5"):
        p.host_done(name, False)
    clock.now += 5
    p.sending(5_000_000)
    assert lines[-1] == (
        "  wave 2: 4/5 hosts done, 3 failed (h3, h4, h5), 10.0 MB sent (0.9 MB/s), 11.0s"
    )
    p.host_done("h2", False)
    assert p.detail().startswith("4 failed (h3, h4, h5, …)")
    clock.now += 10
    p.sending(1)
    assert len(lines) == 2  # the wave is done: the executor reports its outcome itself
    p.close()


def test_one_host_long_transfer_is_shown_too_and_a_wave_without_bytes_says_so(clock):
    lines: list[str] = []
    p = WaveProgress("wave 1", 1, lines.append, every=5.0)
    clock.now += 6
    p.sending(12_500_000)
    assert lines == ["  wave 1: 0/1 hosts done, 12.5 MB sent (2.1 MB/s), 6.0s"]
    quiet = WaveProgress("wave 3", 2, lines.append)
    assert quiet.line() == "wave 3: 0/2 hosts done, 0.0s"  # no "0 bytes" noise
    p.close()
    quiet.close()


def test_many_sessions_report_at_once_and_every_byte_is_counted():
    p = WaveProgress("wave 1", 8, lambda _l: None, every=0.0)

    def host(i: int) -> None:
        for _ in range(1000):
            p.sending(1000)
        p.host_done(f"h{i}", i % 2 == 0)

    threads = [threading.Thread(target=host, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (p.sent, p.done, len(p.failed)) == (8_000_000, 8, 4)
    p.close()


def test_a_wave_whose_bytes_stopped_still_says_where_it_stands():
    """A link gone quiet, a long hook: no report comes, and the line still comes, on time."""
    import time

    lines: list[str] = []
    p = WaveProgress("wave 1", 2, lines.append, every=0.2)
    p.sending(1_000_000)
    time.sleep(0.75)
    p.close()
    assert len(lines) >= 2, lines  # twice at least in 0.75 s, with not a byte more
    assert all(ln.startswith("  wave 1: 0/2 hosts done, 1.0 MB sent (") for ln in lines), lines
    settled = len(lines)
    time.sleep(0.3)
    assert len(lines) == settled  # closed: its beat has ended


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_on_stderr_with_hosts_bytes_and_failures(monkeypatch):
    """The bar is drawn on stderr (stdout may carry a JSON result), with hosts counted as
    hosts and bytes as bytes."""
    err, out = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    p = WaveProgress("wave 1", 3, lambda _l: None)
    try:
        p.sending(40_000_000)
        p.host_done("h2", False)
        p.host_done("h1", True)
        p._bar.refresh()
        drawn = err.getvalue()
    finally:
        p.close()
    assert "wave 1" in drawn and "2/3 hosts" in drawn, drawn
    assert "1 failed (h2)" in drawn and "40.0 MB sent" in drawn, drawn
    assert out.getvalue() == ""
