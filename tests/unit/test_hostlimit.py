"""`ferry deploy --hosts`: narrows inside the plan's targets, never widens (pure)."""

from __future__ import annotations

import pytest

from orchestrator.errors import BadInput
from orchestrator.hostlimit import narrow

TARGETS = ["web1", "web2", "web3", "db1"]
GROUPS = {"web": ["web1", "web2", "web3"], "db": ["db1", "db2"], "all": TARGETS + ["db2"]}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("web2", ["web2"]),
        ("web*", ["web1", "web2", "web3"]),
        ("db1,web1", ["web1", "db1"]),  # the plan's order, not the pattern's
        ("web,!web2", ["web1", "web3"]),
        ("!db1", ["web1", "web2", "web3"]),
        ("db", ["db1"]),  # db2 is in the group but not a target of the plan: never added
        ("all", TARGETS),
    ],
)
def test_hosts_narrows_to_the_plans_targets_it_names(pattern, expected):
    assert narrow(TARGETS, pattern, GROUPS) == expected


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("db2", "'db2' names none of the plan's 4 target host(s)"),
        ("web9", "'web9' names none"),
        ("web1,!web1", "leaves no host"),
        (" , ", "empty pattern"),
    ],
)
def test_a_pattern_naming_no_target_host_is_bad_input(pattern, message):
    with pytest.raises(BadInput) as err:
        narrow(TARGETS, pattern, GROUPS)
    assert message in err.value.message and err.value.exit_code == 2
