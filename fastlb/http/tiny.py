"""A minimal HTTP/1.1 responder for fastlb's own endpoints (admin, demo backends): small bodies only.

`handler(method, path, headers) -> (status, content_type, body)`; keep-alive per RFC 9112 §9.3.
"""

import asyncio
from email.utils import formatdate
from http import HTTPStatus

import httptools


class TinyHTTP(asyncio.Protocol):
    def __init__(self, handler):
        self.handler = handler
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, "text/plain", b"bad request\n", close=True)

    def on_message_begin(self):
        self.url = b""
        self.headers = []

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_message_complete(self):
        method = self.parser.get_method().decode()
        path = self.url.decode("latin-1")
        status, ctype, body = self.handler(method, path, self.headers)
        if method == "HEAD":
            body = b""
        self._send(status, ctype, body, close=not self.parser.should_keep_alive())

    def _send(self, status, ctype, body, close):
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        self.transport.write(head.encode() + body)
        if close:
            self.transport.close()


async def serve(loop, sock, handler):
    return await loop.create_server(lambda: TinyHTTP(handler), sock=sock)
