"""Serve /health and /version on the configured port."""

import http.server
import json
import os

from shop import VERSION


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"ok": True, "version": VERSION}).encode()
        self.send_response(200 if self.path in ("/health", "/version") else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    port = int(os.environ.get("SHOP_PORT", "8080"))
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
