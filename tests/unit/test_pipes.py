"""The bulk transfer's pipe capacity (orchestrator/transport/pipes.py), on real pipes."""

from __future__ import annotations

import fcntl
import os

import pytest

from orchestrator.transport.pipes import (
    BULK,
    F_GETPIPE_SZ,
    F_SETPIPE_SZ,
    WidePipes,
    wide_pipes_allowed,
)

DEFAULT = 1 << 16  # a new pipe's capacity: Linux's default with 4 KiB pages


@pytest.fixture
def pipes():
    made: list[int] = []

    def make() -> tuple[int, int]:
        r, w = os.pipe()
        made.extend((r, w))
        return r, w

    yield make
    for fd in made:
        os.close(fd)


def size(fd: int) -> int:
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


@pytest.mark.parametrize(
    ("euid", "soft_pages", "allowed"),
    [
        (0, 16384, None),  # root: the kernel's per-user limits do not apply
        (1000, 0, None),  # no soft limit set
        (1000, 16384, 32),  # the default 64 MiB: half of it in 1 MiB pipes
        (1000, 300, 0),  # too small for even one: every pipe keeps the default
    ],
)
def test_how_many_pipes_a_user_may_widen_at_once(euid, soft_pages, allowed):
    assert wide_pipes_allowed(euid, soft_pages) == allowed


def test_a_pipe_is_widened_for_the_transfer_and_given_back_after(pipes):
    _, w = pipes()
    budget = WidePipes(None)
    assert size(w) == DEFAULT
    assert budget.widen(w) == DEFAULT and size(w) == BULK and budget.held == 1
    assert budget.narrow(w, DEFAULT) and size(w) == DEFAULT and budget.held == 0


def test_a_pipe_gets_back_the_capacity_it_had_not_the_default(pipes):
    _, w = pipes()
    fcntl.fcntl(w, F_SETPIPE_SZ, DEFAULT * 4)  # as on a kernel with larger pages
    budget = WidePipes(None)
    before = budget.widen(w)
    assert before == DEFAULT * 4 and size(w) == BULK
    assert budget.narrow(w, before) and size(w) == DEFAULT * 4 and budget.held == 0


def test_a_pipe_already_as_wide_is_left_alone_and_costs_no_budget(pipes):
    _, w = pipes()
    fcntl.fcntl(w, F_SETPIPE_SZ, BULK)
    budget = WidePipes(1)
    assert budget.widen(w) is None and size(w) == BULK and budget.held == 0


def test_a_pipe_still_holding_more_than_the_default_keeps_its_capacity(pipes):
    r, w = pipes()
    budget = WidePipes(None)
    assert budget.widen(w) == DEFAULT
    os.write(w, b"x" * (DEFAULT * 2))  # what ssh has not read yet is never cut off
    assert not budget.narrow(w, DEFAULT) and size(w) == BULK and budget.held == 1
    assert len(os.read(r, DEFAULT * 2)) == DEFAULT * 2
    assert budget.narrow(w, DEFAULT) and size(w) == DEFAULT and budget.held == 0


def test_past_the_budget_a_pipe_keeps_the_default(pipes):
    (_, a), (_, b) = pipes(), pipes()
    budget = WidePipes(1)
    assert budget.widen(a) == DEFAULT
    assert budget.widen(b) is None and size(b) == DEFAULT and budget.held == 1
    budget.forget()  # a's session ended: the kernel took its pages back
    assert budget.widen(b) == DEFAULT and size(b) == BULK and budget.held == 1
