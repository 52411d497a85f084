"""NAME@VERSION has one parser, `ReleaseRef`, shared by the DML store, the catalog and RFCs."""

from __future__ import annotations

import pytest

from dml.ref import ReleaseRef
from orchestrator.errors import BadInput


def test_a_release_ref_parses_and_prints_back_as_name_at_version():
    ref = ReleaseRef.parse("shop@1.4.0~rc1+build.7")
    assert ref == ReleaseRef("shop", "1.4.0~rc1+build.7")
    assert (ref.name, ref.version) == ("shop", "1.4.0~rc1+build.7")
    assert str(ref) == "shop@1.4.0~rc1+build.7"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("shop-1.4.0", "it has no '@'"),
        ("@1.4.0", "the name is empty"),
        ("shop@", "the version is empty"),
        ("my shop@1.4.0", "the name 'my shop' must be"),
        ("../shop@1.4.0", "the name '../shop' must be"),
        ("shop@1.4@2", "the version '1.4@2' must be"),
        ("shop@1.4.0\n", "the version '1.4.0\\n' must be"),
        ("s" * 101 + "@1", "1-100 letters"),
    ],
)
def test_a_bad_release_ref_is_one_line_naming_the_fault_and_the_form(text, problem):
    with pytest.raises(BadInput) as caught:
        ReleaseRef.parse(text)
    message = caught.value.message
    assert message.startswith(f"{text!r} is not a release: ")
    assert problem in message
    assert message.endswith("expected NAME@VERSION, e.g. shop@1.4.0")
    assert "\n" not in message


def test_a_release_ref_cannot_be_built_invalid():
    with pytest.raises(BadInput, match="the version is empty"):
        ReleaseRef("shop", "")
