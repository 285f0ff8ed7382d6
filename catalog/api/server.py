"""The HTTP protocol the API is served with: uvicorn's httptools protocol, answering JSON when a
request cannot even be parsed (a URL or header block over llhttp's 80 kB limit, bad bytes), so
that every error a client sees has the API's shape ``{"detail": ...}`` rather than plain text."""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

UNREADABLE = "the request could not be read as HTTP (a URL or a header over 80 kB, or malformed bytes)"


class JsonErrorsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        payload = json.dumps({"detail": UNREADABLE}).encode()
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: application/json\r\n",
                        b"content-length: " + str(len(payload)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n", b"\r\n", payload])
        self.transport.write(b"".join(content))
        self.transport.close()
