"""A SOCKS5 proxy "outside the country": the lab's stand-in for a VPS abroad.

Tests of verdicts and escalation need a path that the censor does not touch, like an upstream
proxy or a bridge would give. :class:`OutsideProxy` is a plain SOCKS5 server (no
authentication, CONNECT only) that resolves names from the lab zone honestly and dials the
*private twin* of a public lab address (:func:`~proxy.lab.world.private_ip`), so its traffic
never crosses a middlebox. An address with no twin (one outside the lab plan) is dialled as
given. Start it inside a lab with :meth:`Lab.start_service`::

    outside = OutsideProxy(lab)
    address = await lab.start_service(outside.serve)

``connections`` counts what it carried, so a test can tell whether a strategy used it.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import trio

from proxy.errors import RemoteProtocolError
from proxy.net.relay import relay
from proxy.protocols import socks5

if TYPE_CHECKING:
    from proxy.lab.world import Lab

Address = tuple[str, int]


class OutsideProxy:
    """An uncensored SOCKS5 exit into the lab (see the module docstring)."""

    def __init__(self, lab: Lab, *, host: str = "127.0.0.1") -> None:
        self.lab = lab
        self.host = host
        #: targets carried so far, as ``host:port`` strings in order
        self.connections: list[str] = []

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on a free port of ``host`` and serve until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        name = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            task_status.started((name[0], name[1]))
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def dial_address(self, host: str) -> str | None:
        """Where a CONNECT to ``host`` really goes: the private twin of its public address."""
        from proxy.lab.world import private_ip

        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            found = self.lab.addresses(host.rstrip(".").lower())
            if not found:
                return None
            ip = found[0]
        try:
            return private_ip(ip)
        except ValueError:
            return ip

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            conn = socks5.Socks5ServerConnection(require_auth=False)
            try:
                request = await self._request(client, conn)
            except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if request is None:
                return
            ip = self.dial_address(request.host)
            upstream: trio.SocketStream | None = None
            if ip is not None:
                try:
                    upstream = await trio.open_tcp_stream(ip, request.port)
                except OSError:
                    upstream = None
            if upstream is None:
                conn.send(socks5.Reply(socks5.ReplyCode.HOST_UNREACHABLE))
                await _send_quietly(client, conn.data_to_send())
                return
            self.connections.append(f"{request.host}:{request.port}")
            async with upstream:
                conn.send(socks5.Reply(socks5.ReplyCode.SUCCEEDED))
                if not await _send_quietly(client, conn.data_to_send()):
                    return
                if conn.trailing_data:
                    await upstream.send_all(conn.trailing_data)
                await relay(client, upstream, idle_timeout=60.0, closing=True)

    async def _request(
        self, client: trio.SocketStream, conn: socks5.Socks5ServerConnection
    ) -> socks5.CommandRequested | None:
        while True:
            data = await client.receive_some(4096)
            events = conn.receive_data(data) if data else conn.receive_eof()
            out = conn.data_to_send()
            if out:
                await client.send_all(out)
            for event in events:
                if isinstance(event, socks5.ConnectionClosed):
                    return None
                if isinstance(event, socks5.CommandRequested):
                    if event.command is not socks5.Command.CONNECT:
                        conn.send(socks5.Reply(socks5.ReplyCode.COMMAND_NOT_SUPPORTED))
                        await _send_quietly(client, conn.data_to_send())
                        return None
                    return event


async def _send_quietly(stream: trio.SocketStream, data: bytes) -> bool:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
