"""A separate OS process that appends audit events, for the concurrent-writer tests.

    python -m tests.cms.appender URL WRITER COUNT GO_FILE

Touches GO_FILE.WRITER.ready once imported, waits until GO_FILE exists (so that every writer
starts at once), then appends COUNT events,
one transaction each, as actor WRITER with data {"i": 0…COUNT-1}. The database need not be
migrated yet: the first writers then race to migrate it as well.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator.cms import audit, db


def main(url: str, writer: str, count: int, go_file: Path) -> None:
    go_file.with_name(f"{go_file.name}.{writer}.ready").touch()
    deadline = time.monotonic() + 60
    while not go_file.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{writer}: {go_file} never appeared")
        time.sleep(0.002)
    started = time.monotonic()
    for i in range(count):
        with db.session_scope(url) as session:
            audit.append(
                session, actor=writer, action="test.append", subject_type="test",
                subject_id=writer, data={"i": i},
            )  # fmt: skip
    print(f"{writer}: {count} events in {time.monotonic() - started:.2f}s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
