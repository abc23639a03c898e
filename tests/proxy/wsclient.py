"""A bare WebSocket client on asyncio streams, for tests that need thousands of
tunnels, exact bytes on the wire, or a client that stops reading: the upgrade
request by hand, masked frames out, unmasked frames in (RFC 6455 §5)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade_request(path: str = "/echo", host: str = "gw", extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A final, masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + _mask(payload, mask)


def _mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)



class WsClient:
    """One upgraded connection through the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.head = head  # the 101's head, as received

    @classmethod
    async def connect(cls, port: int, path: str = "/echo", first: bytes = b"", rcvbuf: int = 0,
                      extra: str = "") -> WsClient:
        """Upgrade; ``first``: bytes sent in the same write as the request (a frame the
        client sends before it has the 101). Raises AssertionError if the answer is
        not a 101 (its head in the message)."""
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**22)
        writer.write(upgrade_request(path, extra=extra) + first)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer, head)

    async def echo(self, payload: bytes, timeout: float = 5.0) -> bytes:
        self.writer.write(frame(payload))
        _, data = await asyncio.wait_for(read_frame(self.reader), timeout)
        return data

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Whether the connection ends (EOF or reset) within ``timeout``, frames read
        and dropped meanwhile."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()
