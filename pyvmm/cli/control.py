"""A running VM's control socket: how a person (or a script) reaches it from another shell.

`pyvmm run --control PATH` listens on a Unix stream socket; `pyvmm sdei signal|status` and
`pyvmm stop` connect to it. One JSON object per line each way:

  {"cmd": "sdei-signal", "event": 100, "cpu": 0}  ->  {"ok": true, "pending": true}
  {"cmd": "sdei-status"}                          ->  {"ok": true, "events": [...], "masked": [...]}
  {"cmd": "stop"}                                 ->  {"ok": true}
  anything wrong                                  ->  {"ok": false, "error": "one line"}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvmm.errors import VmmError
from pyvmm.sockets import claim

if TYPE_CHECKING:
    from pyvmm.services.sdei import Sdei

log = logging.getLogger("pyvmm")
MAX_REQUEST = 4096
NOT_AN_OBJECT = "bad request: not one JSON object"
# pyvmm's requests nest two levels. Deeper ones are refused before the JSON parser sees them,
# whose own limit differs between Pythons (3.11 stops at its recursion limit, 3.13 goes far
# deeper): the same bytes get the same reply on every Python.
MAX_DEPTH = 32
CLIENT_TIMEOUT = 5.0  # for a whole request line: a client trickling bytes is dropped as a silent one is
MAX_CLIENTS = 16  # connections served at once; more are closed at once (each has a thread)


class ControlServer:
    """Serves a VM's `stop` and, when the VM has SDEI, its `sdei`: one request per connection, each
    on its own thread (the standard library's socketserver), so a slow, silent or vanished client
    holds up nobody, and whatever a client sends gets a one-line error reply or a closed
    connection while the socket goes on serving."""

    def __init__(self, path: str, stop: Callable[[str], None], sdei: Sdei | None) -> None:
        self.path, self._stop, self._sdei = path, stop, sdei
        self._lock = threading.Lock()  # requests, and close(): none is served once it has returned
        self._closed = False
        claim(path)
        try:
            self._server = _Server(path, self)
        except OSError as e:
            raise VmmError(f"cannot listen on {path}: {e.strerror or e}") from None  # AF_UNIX: "path too long"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,), name="control",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._lock:  # a request being served finishes first; none is served after
            self._closed = True
        if self._thread.is_alive():
            self._server.shutdown()  # serve_forever returns within its poll interval
        self._server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def reply(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line, whatever its bytes."""
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": f"bad request: longer than {MAX_REQUEST} bytes"}
        if nesting(line) > MAX_DEPTH:
            return {"ok": False, "error": f"bad request: nested deeper than {MAX_DEPTH} levels"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": NOT_AN_OBJECT}
        with self._lock:
            if self._closed:
                return {"ok": False, "error": "the VM is going away"}
            return self.handle(request)

    def handle(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return {"ok": False, "error": NOT_AN_OBJECT}
        cmd = request.get("cmd")
        try:
            if cmd == "stop":
                self._stop("stopped through the control socket")
                return {"ok": True}
            if cmd in ("sdei-signal", "sdei-status"):
                sdei = self._sdei
                if sdei is None:
                    return {"ok": False, "error": "this VM runs without SDEI (start it with --sdei, on Linux >= 6.4)"}
                if cmd == "sdei-status":
                    return {"ok": True, "events": sdei.status(), "masked": sdei.pe_masks()}
                event, cpu = request.get("event"), request.get("cpu")
                if not isinstance(event, int) or not (cpu is None or isinstance(cpu, int)):
                    return {"ok": False, "error": "sdei-signal takes an integer event and an optional integer cpu"}
                return {"ok": True, "pending": sdei.trigger(event, cpu)}
        except VmmError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def nesting(line: bytes) -> int:
    """How deep the JSON arrays and objects in `line` nest (brackets inside strings aside)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


class _Connection(socketserver.BaseRequestHandler):
    server: _Server
    request: socket.socket

    def handle(self) -> None:
        line = self._read_line(time.monotonic() + CLIENT_TIMEOUT)
        if line is None:
            return  # too slow, or gone: the connection just closes
        try:
            reply = self.server.control.reply(line)
        except Exception as e:  # a pyvmm bug: the client is told, the server goes on
            log.warning("control socket: internal error: %s: %s", type(e).__name__, e)
            reply = {"ok": False, "error": f"internal error: {type(e).__name__}"}
        with contextlib.suppress(OSError):
            self.request.settimeout(CLIENT_TIMEOUT)
            self.request.sendall(json.dumps(reply).encode() + b"\n")

    def _read_line(self, deadline: float) -> bytes | None:
        """One line (with its newline), or MAX_REQUEST + 1 bytes of one, within `deadline`."""
        data = b""
        while b"\n" not in data and len(data) <= MAX_REQUEST:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self.request.settimeout(left)
                chunk = self.request.recv(MAX_REQUEST + 1 - len(data))
            except OSError:
                return None
            if not chunk:
                return data or None  # the client half-closed after its request
            data += chunk
        return data[:data.index(b"\n") + 1] if b"\n" in data else data


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # a connection's thread never holds the process up
    block_on_close = False

    def __init__(self, path: str, control: ControlServer) -> None:
        self.control = control
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(path, _Connection)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: closed at once, the client may try again
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        log.warning("control socket: a request failed")  # one line, not socketserver's traceback


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.decode()


def request(path: str, message: dict[str, Any]) -> dict[str, Any]:
    """Send one request to the VM listening on `path`; its reply, or a VmmError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CLIENT_TIMEOUT)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply: dict[str, Any] = json.loads(_read_line(sock))
    except FileNotFoundError:
        raise VmmError(f"no VM listens on {path} (start one with pyvmm run --control {path})") from None
    except ConnectionRefusedError:
        raise VmmError(f"the VM that listened on {path} is gone") from None
    except (OSError, ValueError) as e:
        raise VmmError(f"talking to the VM on {path} failed: {e}") from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise VmmError(str(reply.get("error", "the VM refused the request")))
    return reply


