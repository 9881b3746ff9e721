"""A service not written with Keel, for the sidecar test: Python's http.server.

`app.py PORT OUT echo`  answers every GET with the headers it got (JSON).
`app.py PORT OUT app`   answers GET /<path> by calling the outbound sidecar at OUT
                        (`/users/<path>`), passing on the trace and deadline headers it got,
                        and answers with what it got and what the call returned.
"""
import http.server
import json
import sys
import urllib.request

port, out, role = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
PASSED_ON = ("traceparent", "tracestate", "keel-timeout", "x-request-id", "baggage")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        got = {k.lower(): v for k, v in self.headers.items()}
        got["path"] = self.path
        if role == "echo":
            body = got
        else:
            headers = {k: v for k, v in got.items() if k in PASSED_ON}
            call = urllib.request.Request(f"http://127.0.0.1:{out}/users{self.path}", headers=headers)
            with urllib.request.urlopen(call, timeout=5) as answer:
                body = {"inbound": got, "upstream": json.loads(answer.read())}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
