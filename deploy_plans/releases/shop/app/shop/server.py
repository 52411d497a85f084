"""Serve /health and /version on the configured port; `--check` answers /health once."""

import http.server
import json
import os
import sys

from shop import VERSION


def health() -> dict:
    """What /health reports; a release is healthy when `ok` is true."""
    return {"ok": True, "version": VERSION}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(health()).encode()
        self.send_response(200 if self.path in ("/health", "/version") else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    if "--check" in sys.argv:
        state = health()
        print(json.dumps(state))
        sys.exit(0 if state["ok"] else 1)
    port = int(os.environ.get("SHOP_PORT", "8080"))
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
