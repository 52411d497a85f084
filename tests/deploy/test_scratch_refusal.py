from pathlib import Path

import pytest

from tests.deploy.helpers import build, deploy, plan, rfc

pytestmark = pytest.mark.fleet


def test_scratch(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    build(work, "2.0")
    p = plan(work, fleet)
    r = rfc(run_ferry, "shop@2.0")
    for args in (
        ("999",),
        (r,),
    ):
        res = deploy(run_ferry, p, "shop@1.0", *args)
        print("=====", args, res.returncode)
        print(res.stdout[:600])
        print(res.stderr[-3000:])
    assert 0
