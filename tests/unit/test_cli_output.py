"""What Ferry prints for people is the words it was given: brackets included."""

from __future__ import annotations

from orchestrator.cli import output as out
from orchestrator.cli.deploy import print_report


def test_a_hosts_failure_in_brackets_is_printed_not_taken_for_markup(capsys):
    """rich reads `[check: …]` as a style tag: the deploy summary once dropped every host's
    failure that way, and progress lines lost their bracketed words."""
    out.use(out.Format.text)
    failure = {"step": "check", "reason": "exit 1: [app] not ready"}
    print_report({
        "id": 3, "status": "backed-out", "release": "shop@2.0", "bytes_sent": 1e6,
        "hosts": {"h1": {"status": "backed out", "release": "shop@1.0", "failure": failure}},
        "needs_remediation": [],
    })  # fmt: skip
    out.progress("  h2: [stage] waiting for [bold]")
    out.error({}, "plan.yaml: waves.0: [qa] is not a wave")
    got = capsys.readouterr()
    assert "  h1: backed out → shop@1.0  [check: exit 1: [app] not ready]\n" in got.out
    assert "  h2: [stage] waiting for [bold]\n" in got.err
    assert "error: plan.yaml: waves.0: [qa] is not a wave\n" in got.err
