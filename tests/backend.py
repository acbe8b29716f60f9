"""A real HTTP/1.1 test backend (h11, asyncio), run as its own process by the tests.

Every request it receives is appended to a JSON-lines log (method, target, headers, body length and
digest), so tests can compare what fastlb forwarded with what the client sent.  h11 is an independent
parser from fastlb's llhttp, which makes the comparison meaningful.

Paths:  /status/NNN  answer NNN;  /sleep/SECONDS  answer after a delay;  /big/N[?mode=cl|chunked|close]
stream N bytes;  /health  the status written in --health-file (200 without it);  anything else: a
JSON echo of the request.  --close-after-response closes every connection right after its first
response without saying so (the keep-alive race a proxy's pool must survive).
"""

import argparse
import asyncio
import hashlib
import json
import sys
from urllib.parse import parse_qs, urlsplit

import h11

CHUNK = 64 * 1024


class Backend:
    def __init__(self, name: str, log_path: str | None, health_file: str | None, close_after: bool):
        self.name = name
        self.log = open(log_path, "a", buffering=1) if log_path else None
        self.health_file = health_file
        self.close_after = close_after

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        peer = writer.get_extra_info("peername")[1]
        try:
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    break
                if not isinstance(event, h11.Request):
                    break
                body = hashlib.sha256()
                size = 0
                while True:
                    ev = await self._next(conn, reader)
                    if isinstance(ev, h11.Data):
                        body.update(ev.data)
                        size += len(ev.data)
                    elif isinstance(ev, h11.EndOfMessage) or ev is None:
                        break
                record = {
                    "backend": self.name,
                    "method": event.method.decode(),
                    "target": event.target.decode("latin-1"),
                    "headers": [[k.decode(), v.decode("latin-1")] for k, v in event.headers.raw_items()],
                    "body_len": size,
                    "body_sha256": body.hexdigest(),
                    "peer_port": peer,
                }
                if self.log:
                    self.log.write(json.dumps(record) + "\n")
                await self._respond(conn, writer, event, record)
                if self.close_after:
                    break
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _next(self, conn, reader):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(CHUNK)
                conn.receive_data(data)
                if not data and conn.their_state is h11.DONE:
                    return None
                continue
            return event

    async def _respond(self, conn, writer, request, record) -> None:
        url = urlsplit(request.target.decode("latin-1"))
        query = parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        headers = [("X-Backend", self.name)]
        if parts[0] == "sleep" and len(parts) > 1:
            await asyncio.sleep(float(parts[1]))
        if parts[0] == "health" and self.health_file:
            try:
                with open(self.health_file) as f:
                    parts = ["status", f.read().strip() or "200"]
            except FileNotFoundError:
                parts = ["status", "200"]
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
            body = b"" if status in (204, 304) else f"{self.name} {status}\n".encode()
        elif parts[0] == "big" and len(parts) > 1:
            await self._stream(conn, writer, int(parts[1]), query.get("mode", ["cl"])[0], headers)
            return
        else:
            status = 200
            body = json.dumps(record).encode()
            headers.append(("Content-Type", "application/json"))
        if status not in (204, 304):
            headers.append(("Content-Length", str(len(body))))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        if request.method != b"HEAD" and body:
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _stream(self, conn, writer, size: int, mode: str, headers) -> None:
        if mode == "cl":
            headers.append(("Content-Length", str(size)))
        elif mode == "close":
            headers.append(("Connection", "close"))
        conn_headers = h11.Response(status_code=200, headers=headers, http_version=b"1.1")
        if mode == "close":
            # h11 won't send a close-delimited body to an HTTP/1.1 peer: write it raw.
            writer.write(b"HTTP/1.1 200 OK\r\nX-Backend: %s\r\nConnection: close\r\n\r\n" % self.name.encode())
            send = writer.write
        else:
            writer.write(conn.send(conn_headers))

            def send(data):
                writer.write(conn.send(h11.Data(data=data)))
        block = b"x" * CHUNK
        left = size
        while left > 0:
            n = min(left, CHUNK)
            send(block[:n])
            left -= n
            await writer.drain()
        if mode != "close":
            writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        if mode == "close":
            writer.close()
            raise ConnectionError("close-delimited body sent")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--name", required=True)
    ap.add_argument("--log")
    ap.add_argument("--health-file")
    ap.add_argument("--close-after-response", action="store_true")
    args = ap.parse_args()
    backend = Backend(args.name, args.log, args.health_file, args.close_after_response)
    server = await asyncio.start_server(backend.handle, args.host, args.port, reuse_address=True)
    print("ready", flush=True)
    sys.stdout.close()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
