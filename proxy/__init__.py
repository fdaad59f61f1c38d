"""sidestep: a local proxy that notices censorship and routes around it.

Layers, from the wire up (each imports only from the ones above it):

* ``proxy.protocols`` - sans-IO codecs: bytes in, events and bytes out. No sockets, no clock.
* ``proxy.net`` - trio I/O primitives: dialing (Happy Eyeballs), relaying, TLS.
* ``proxy.resolve`` - name resolution behind one ``Resolver`` interface.
* ``proxy.inbound`` - listeners that turn client bytes into a ``Request``.
* ``proxy.route`` - the connection pipeline: first flight, strategy, relay, one log line.
* ``proxy.app`` / ``proxy.cli`` - wiring, reload, shutdown, the ``sidestep`` command.
"""

__version__ = "0.1.0"
