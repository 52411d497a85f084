"""Webhook notifications of a deployment: start, each milestone, backout, finish.

The plan's `notify: {webhook: URL}` names a Slack-compatible incoming webhook (Slack,
Mattermost, Rocket.Chat, Teams workflows and most chat tools accept its shape): one JSON
POST per event with a `text` line for people and a `ferry` object for machines:

    {"text": "ferry: deployment 12 (shop@1.4.0 to prod): milestone 1 passed: 0/1 failed",
     "username": "ferry",
     "ferry": {"event": "milestone", "deployment": 12, "release": "shop@1.4.0",
               "environment": "prod", "rfc": 7, "status": "running", ...}}

A notification is told, never waited on: a webhook that is down, slow (5 s at most) or
answers an error is one warning on stderr, and the deployment goes on exactly as it would
have. The URL is never written to a log line (it usually carries a token).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

TIMEOUT = 5.0
EVENTS = ("start", "milestone", "backout", "finish")


def payload(event: str, text: str, facts: dict[str, Any]) -> dict[str, Any]:
    return {"text": f"ferry: {text}", "username": "ferry", "ferry": {"event": event, **facts}}


def send(
    url: str, body: dict[str, Any], warn: Callable[[str], None], timeout: float = TIMEOUT
) -> bool:
    """POST `body` to `url`; False (and one warning) on any failure, never an exception."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body, default=str).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "ferry"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only (plan.Notify)
            response.read(1024)
        return True
    except urllib.error.HTTPError as exc:
        event = body["ferry"]["event"]
        warn(f"warning: the notify webhook answered HTTP {exc.code} to the {event} notification")
    except Exception as exc:  # noqa: BLE001 - a notification must never fail a deployment
        reason = getattr(exc, "reason", exc)
        warn(f"warning: the notify webhook could not be told ({body['ferry']['event']}): {reason}")
    return False


class Notifier:
    """One deployment's notifications; a no-op when its plan names no webhook."""

    def __init__(
        self, config: dict[str, Any] | None, facts: dict[str, Any], warn: Callable[[str], None]
    ) -> None:
        self.url = (config or {}).get("webhook")
        self.facts = facts
        self.warn = warn

    def tell(self, event: str, text: str, **facts: Any) -> None:
        if not self.url:
            return
        f = self.facts
        head = f"deployment {f.get('deployment')} ({f.get('release')} to {f.get('environment')})"
        send(self.url, payload(event, f"{head}: {text}", {**self.facts, **facts}), self.warn)
