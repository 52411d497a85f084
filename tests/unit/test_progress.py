"""A wave's progress (orchestrator/progress.py): what a pipeline's log and a terminal show
while hosts work, fed as the executor and the sessions feed it."""

from __future__ import annotations

import io
import sys
import threading
import time

from orchestrator.progress import WaveProgress


def test_a_pipeline_sees_bytes_move_during_a_transfer_and_failed_hosts_by_name():
    lines: list[str] = []
    p = WaveProgress("wave 2", 5, lines.append, every=5.0, beat=False)
    t0 = p.started
    p.sending(3_000_000)
    p.beat_once(t0 + 1)  # under 5 s since the start: nothing yet
    assert lines == []
    p.sending(2_000_000)
    p.beat_once(t0 + 5)  # the transfer is shown before any host finished
    assert lines == ["  wave 2: 0/5 hosts done, 5.0 MB sent (1.0 MB/s), 5.0s"]
    p.host_done("h3", False)
    p.host_done("h1", True)
    p.beat_once(t0 + 6)
    assert len(lines) == 1  # not twice within 5 s
    for name in ("h4", "h5"):
        p.host_done(name, False)
    p.sending(5_000_000)
    p.beat_once(t0 + 11)
    assert lines[-1] == (
        "  wave 2: 4/5 hosts done, 3 failed (h3, h4, h5), 10.0 MB sent (0.9 MB/s), 11.0s"
    )
    p.host_done("h2", False)
    assert p.detail(t0 + 12).startswith("4 failed (h3, h4, h5, …)")
    p.beat_once(t0 + 20)
    assert len(lines) == 2  # the wave is done: the executor reports its outcome itself
    p.close()


def test_one_host_long_transfer_is_shown_too_and_a_wave_without_bytes_says_so():
    lines: list[str] = []
    p = WaveProgress("wave 1", 1, lines.append, every=5.0, beat=False)
    p.sending(12_500_000)
    p.beat_once(p.started + 6)
    assert lines == ["  wave 1: 0/1 hosts done, 12.5 MB sent (2.1 MB/s), 6.0s"]
    quiet = WaveProgress("wave 3", 2, lines.append, beat=False)
    assert quiet.line(quiet.started) == "wave 3: 0/2 hosts done, 0.0s"  # no "0 bytes" noise


def test_many_sessions_report_at_once_and_every_byte_is_counted():
    p = WaveProgress("wave 1", 8, lambda _l: None, every=0.01)

    def host(i: int) -> None:
        for _ in range(1000):
            p.sending(1000)
        p.host_done(f"h{i}", i % 2 == 0)

    threads = [threading.Thread(target=host, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.close()
    assert (p.sent, p.done, len(p.failed)) == (8_000_000, 8, 4)


def test_a_wave_whose_bytes_stopped_still_says_where_it_stands():
    """A link gone quiet, a long hook: no report comes, and the line still comes, on time."""
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


def test_a_say_that_blocks_never_holds_up_a_transfer():
    """`say` prints and logs: on a stderr pipe nobody reads it blocks. The sessions' byte
    counts go on meanwhile."""
    stuck = threading.Event()
    p = WaveProgress("wave 1", 2, lambda _l: stuck.wait(5), every=0.05)
    time.sleep(0.2)  # the beat is stuck in `say` by now
    started = time.monotonic()
    for _ in range(1000):
        p.sending(1000)
    p.host_done("h1", True)
    took = time.monotonic() - started
    stuck.set()
    p.close()
    assert took < 0.5 and p.sent == 1_000_000, took


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_on_stderr_with_hosts_bytes_and_failures(monkeypatch):
    """The bar is drawn on stderr (stdout may carry a JSON result), with hosts counted as
    hosts and bytes as bytes."""
    err, out = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    p = WaveProgress("wave 1", 3, lambda _l: None, beat=False)
    try:
        p.sending(40_000_000)
        p.host_done("h2", False)
        p.host_done("h1", True)
        p.beat_once()
        p._bar.refresh()
        drawn = err.getvalue()
    finally:
        p.close()
    assert "wave 1" in drawn and "2/3 hosts" in drawn, drawn
    assert "1 failed (h2)" in drawn and "40.0 MB sent" in drawn, drawn
    assert out.getvalue() == ""
