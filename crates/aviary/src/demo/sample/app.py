#!/usr/bin/env python3
"""hello-aviary: the demo's sample service. Answers on / with its version and
host, and on /health with 200 while healthy (a file `unhealthy` next to this
script, shipped by a bad commit, makes it answer 503)."""
import http.server
import os
import socket
import subprocess
import sys

NAME = "hello-aviary"
HERE = os.path.dirname(os.path.abspath(__file__))


def version():
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", NAME],
            capture_output=True, text=True, check=True)
        return out.stdout.strip() or "dev"
    except (OSError, subprocess.CalledProcessError):
        return "dev"


VERSION = version()


def healthy():
    return not os.path.exists(os.path.join(HERE, "unhealthy"))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            ok = healthy()
            self.answer(200 if ok else 503, f"{'ok' if ok else 'unhealthy'} {VERSION}\n")
        else:
            self.answer(200, f"hello from {NAME} {VERSION} on {socket.gethostname()} ({os.environ.get('AVIARY_HOST', '-')})\n")

    def answer(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-App-Version", VERSION)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("PORT", "8080"))
    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
