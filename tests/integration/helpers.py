"""Small images and archives for the loopback source tests."""

from __future__ import annotations

import io
import socket
import struct
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A distinct ``size`` x ``size`` RGB PNG per seed."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class ArchiveServer:
    """An HTTP server on 127.0.0.1 serving ``files`` by path; Range requests get 206.

    Faults switch per test: ``status`` forces an error status per path; ``cut_after`` sends that
    many body bytes once and closes the connection cleanly (FIN); ``reset_after`` sends that many
    once and resets it (RST, as a dropped connection or a restarted proxy does). ``requests``
    records (path, Range header) and ``sent`` the body bytes of each response.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.clear()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if self.path in server.status:
                    self.send_error(server.status[self.path])
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    # Drop the connection once, mid-body, like a flaky network.
                    self._send(body[: server.cut_after])
                    server.cut_after = None
                    self.close_connection = True
                    return
                if server.reset_after is not None:
                    self._send(body[: server.reset_after])
                    server.reset_after = None
                    time.sleep(0.2)  # let the client take in what was sent
                    # linger 0: closing sends RST instead of FIN
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.rfile.close()
                    self.connection.close()
                    self.close_connection = True
                    return
                self._send(body)

            def _send(self, chunk: bytes) -> None:
                self.wfile.write(chunk)
                self.wfile.flush()
                server.sent.append(len(chunk))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def clear(self) -> None:
        """Forget the faults and the recorded requests (between tests sharing the server)."""
        self.status: dict[str, int] = {}
        self.cut_after: int | None = None
        self.reset_after: int | None = None
        self.requests: list[tuple[str, str | None]] = []
        self.sent: list[int] = []

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
