"""The GDB remote stub's server: a socket GDB connects to (`target remote HOST:PORT` or a Unix
socket), one client at a time, speaking the remote serial protocol in all-stop mode.

One thread serves a connection. It reads what the client sends (packets, acks, Ctrl-C) and waits
for the debugger's stops at the same time (selectors over the socket and the debugger's
eventfd), so a Ctrl-C reaches a running guest and a stop reaches a waiting client. A client that
vanishes, mid-packet or not, is detached: its breakpoints go and the guest runs on; the next
client may connect. Nothing a client sends can raise out of here: malformed packets get `-`,
unknown ones the empty reply, bad arguments an error reply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.errors import VmmError
from pyvmm.gdb import packets
from pyvmm.gdb.commands import EFAULT, EINVAL, Inspector, MemoryFault, error
from pyvmm.gdb.debugger import SIGTRAP, Debugger, Stop
from pyvmm.gdb.monitor import Monitor
from pyvmm.sockets import claim

log = logging.getLogger("pyvmm")

SEND_TIMEOUT = 10.0  # a client that stops reading for this long is dropped
RECV_SIZE = 1 << 16
EIO = 5


def parse_address(spec: str) -> tuple[str, Any]:
    """`tcp:[HOST:]PORT` (HOST defaults to 127.0.0.1; PORT 0 picks a free one) or `unix:PATH`."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp" and rest:
        host, _, port_text = rest.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if port_text.isdigit() and int(port_text) <= 65535:
            return "tcp", (host, int(port_text))
    raise VmmError(f"--gdb {spec}: give tcp:[HOST:]PORT or unix:PATH")


class GdbServer:
    def __init__(self, spec: str, debugger: Debugger, monitor: Monitor, kill: Callable[[str], None]) -> None:
        self.debugger, self.monitor, self.kill = debugger, monitor, kill
        kind, address = parse_address(spec)
        self._path: str | None = None
        try:
            if kind == "unix":
                claim(address, "--gdb")
                self._server: socketserver.BaseServer = _UnixServer(address, self)
                self._path = address
                self.address = f"unix:{address}"
            else:
                family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
                server = _TcpServer(address, self, family)
                self._server = server
                host, port = server.socket.getsockname()[:2]
                self.address = f"tcp:{host}:{port}"
        except OSError as e:
            raise VmmError(f"--gdb {spec}: cannot listen there: {e.strerror or e}") from None
        self._thread: threading.Thread | None = None
        self._client: socket.socket | None = None
        self._lock = threading.Lock()
        self._closing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="gdb-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving: a connected client is cut off first (the VM is about to be freed)."""
        with self._lock:
            self._closing = True
            if self._client is not None:
                with contextlib.suppress(OSError):
                    self._client.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None

    def serve(self, sock: socket.socket) -> None:
        """One client, until it detaches, kills the guest or goes away."""
        with self._lock:
            if self._closing:
                return
            self._client = sock
        session = _Session(sock, self)
        try:
            session.run()
        except OSError as e:  # the client went away or stopped reading
            log.info("gdb: the client is gone (%s); the guest runs on", e)
        finally:
            with self._lock:
                self._client = None
            self.debugger.detach()
            self.monitor.reset()  # the next client starts with no trace and no old console lines


class _Handler(socketserver.BaseRequestHandler):
    request: socket.socket

    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _TcpServer | _UnixServer)
        server.owner.serve(self.request)


class _OneLineErrors:
    def handle_error(self, request: object, client_address: object) -> None:
        log.warning("gdb: a connection failed")  # one line, not socketserver's traceback


class _TcpServer(_OneLineErrors, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: GdbServer, family: int) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, _Handler)


class _UnixServer(_OneLineErrors, socketserver.UnixStreamServer):
    def __init__(self, path: str, owner: GdbServer) -> None:
        self.owner = owner
        super().__init__(path, _Handler)


def stop_reply(stop: Stop, breaks: bool = True) -> bytes:
    """A T stop reply (GDB manual, "Stop Reply Packets"): the signal, the thread, and why;
    swbreak and hwbreak only to a client that said it takes them (`breaks`, from qSupported)."""
    reply = f"T{stop.signal:02x}thread:{stop.cpu + 1:x};"
    if stop.reason in ("swbreak", "hwbreak") and breaks:
        reply += f"{stop.reason}:;"
    elif stop.reason in ("watch", "rwatch", "awatch"):
        reply += f"{stop.reason}:{stop.address:x};"
    return reply.encode()


def exit_reply(reason: str) -> bytes:
    """The guest is gone: W00 for a power-off, else as if killed (X09, SIGKILL)."""
    return b"W00" if reason == "poweroff" else b"X09"


class _Session:
    def __init__(self, sock: socket.socket, server: GdbServer) -> None:
        self.sock, self.server = sock, server
        self.debugger = server.debugger
        self.inspector = Inspector(self.debugger)
        self.reader = packets.Reader()
        self.no_ack = False
        self.last = b""
        self.running = False
        self.done = False
        self.continue_cpu = 0  # Hc's thread: what s and c act on
        self.stop = Stop(0, SIGTRAP, "attach")  # the last stop, which `?` reports
        self.breaks = False  # the client takes swbreak/hwbreak stop reasons

    def run(self) -> None:
        self.sock.settimeout(SEND_TIMEOUT)
        self.debugger.attach()
        self.running = True  # until the attach stop is taken: `?` then reports it
        self._wait_for_stop(report=False)
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self.debugger.wakeup, selectors.EVENT_READ)
            while not self.done:
                for key, _ in sel.select(0.5 if self.running else None):
                    if key.fileobj is self.debugger.wakeup:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self.debugger.wakeup)
                    else:
                        data = self.sock.recv(RECV_SIZE)
                        if not data:
                            return
                        self._feed(data)
                if self.running and not self.done:
                    self._flush_console()
                    self._wait_for_stop(report=True)

    def _wait_for_stop(self, *, report: bool) -> None:
        """If the guest has stopped (or ended), tell the client (`report`) and note it."""
        ended = self.debugger.ended
        if ended is not None:
            if report:
                self._send_packet(exit_reply(ended.reason))
            self.running = False
            return
        stop = self.debugger.take_stop()
        if stop is None:
            return
        self.running = False
        self.inspector.selected = self.continue_cpu = self.inspector.stopped_cpu = stop.cpu
        self.stop = stop
        if report:
            if stop.note:
                self._send_packet(b"O" + (stop.note + "\n").encode().hex().encode())
            self._send_packet(stop_reply(stop, self.breaks))

    def _flush_console(self) -> None:
        console = self.server.monitor.console
        while console:
            self._send_packet(b"O" + console.popleft().encode().hex().encode())

    def _feed(self, data: bytes) -> None:
        for event in self.reader.feed(data):
            if isinstance(event, packets.Packet):
                if not self.no_ack:
                    self.sock.sendall(b"+")
                self._packet(event.data)
            elif isinstance(event, packets.Malformed):
                log.debug("gdb: malformed packet: %s", event.why)
                if not self.no_ack:
                    self.sock.sendall(b"-")
            elif isinstance(event, packets.Interrupt):
                if self.running:
                    self.debugger.interrupt()
            elif not event.good and self.last and not self.no_ack:  # `-`: send the last reply again
                self.sock.sendall(self.last)
            if self.done:
                return

    def _send_packet(self, data: bytes) -> None:
        self.last = packets.frame(data)
        self.sock.sendall(self.last)

    # --- packets -----------------------------------------------------------------------------
    def _packet(self, data: bytes) -> None:
        if self.running:  # all-stop: a running target only hears Ctrl-C
            return
        try:
            reply = self._dispatch(data)
        except MemoryFault:
            reply = error(EFAULT)
        except (ValueError, IndexError, KeyError):
            reply = error(EINVAL)
        except VmmError as e:  # a register KVM would not read or write
            log.info("gdb: %s", e)
            reply = error(EIO)
        if reply is not None:
            self._send_packet(reply)
        if data == b"QStartNoAckMode" and reply == b"OK":
            self.no_ack = True

    def _dispatch(self, data: bytes) -> bytes | None:
        """The reply, or None when the guest was resumed (the stop reply comes later)."""
        head = data[:1]
        if data == b"?":
            ended = self.debugger.ended
            return exit_reply(ended.reason) if ended is not None else stop_reply(self.stop, self.breaks)
        if data.startswith(b"qSupported"):
            features = data.partition(b":")[2].split(b";")
            self.breaks = b"swbreak+" in features and b"hwbreak+" in features
            return self.inspector.handle(data) + b";swbreak+;hwbreak+"
        if data.startswith(b"qRcmd,"):
            line = bytes.fromhex(data[6:].decode("ascii")).decode("utf-8", "replace")
            return self.server.monitor.run(line).encode().hex().encode()
        if data.startswith(b"Hc"):
            reply = self.inspector.handle(data)
            if reply == b"OK":
                self.continue_cpu = self.inspector.thread(data[2:])
            return reply
        if head in (b"c", b"s"):
            if data[1:]:
                self.debugger.target.write_pc(self.continue_cpu, int(data[1:], 16))
            if head == b"c":
                self.debugger.resume_vcpus(set(), run_others=True)
            else:
                self.debugger.resume_vcpus({self.continue_cpu}, run_others=False)
            self.running = True
            return None
        if data == b"vCont?":
            return b"vCont;c;C;s;S"
        if data.startswith(b"vCont;"):
            return self._vcont(data[6:])
        if head in (b"Z", b"z"):
            return self._breakpoint(data)
        if head == b"D":
            self.done = True
            self._send_packet(b"OK")
            return None
        if head == b"k" or data.startswith(b"vKill"):
            self.done = True
            if data.startswith(b"vKill"):
                self._send_packet(b"OK")
            self.server.kill("killed from GDB")  # the session ends next, and detaches (serve)
            return None
        if data.startswith(b"qAttached"):
            return b"1"
        return self.inspector.handle(data)

    def _vcont(self, text: bytes) -> bytes | None:
        """vCont;ACTION[:THREAD]...: each vCPU takes the leftmost action that names it or names
        no thread (or -1); one no action names stays stopped (GDB manual, "Packets", vCont). C
        and S are c and s: a signal means nothing to a vCPU."""
        actions: list[tuple[bytes, int | None]] = []
        for item in text.split(b";"):
            action, _, thread = item.partition(b":")
            kind = action[:1].lower()
            if kind not in (b"c", b"s"):
                return b""  # t, r and the like are not offered (vCont? says so)
            actions.append((kind, None if not thread or thread == b"-1" else self.inspector.thread(thread)))
        step: set[int] = set()
        cont: set[int] = set()
        for cpu in range(self.debugger.vcpus()):
            chosen = next((k for k, target in actions if target is None or target == cpu), None)
            if chosen is not None:
                (step if chosen == b"s" else cont).add(cpu)
        self.debugger.resume_vcpus(step, run_others=False, cpus=cont)
        self.running = True
        return None

    def _breakpoint(self, data: bytes) -> bytes:
        kind_text, address_text, length_text = data[1:].split(b";", 1)[0].split(b",")
        kind, address, length = int(kind_text), int(address_text, 16), int(length_text, 16)
        if not 0 <= kind <= 4:
            return b""
        if not 0 <= address < 1 << 64 or not 0 <= length <= 1 << 32:
            return error(EINVAL)
        if data[:1] == b"Z":
            code = self.debugger.insert(kind, address, length, self.inspector.selected)
        else:
            code = self.debugger.remove(kind, address, length)
        return b"OK" if code == 0 else error(code)
