"""The bridge server side: its identity and bridge URI (``identity``), its config file
(``config``), the server and ``sidestep bridge`` (``server``), the WebSocket carrier
(``carriers``) and the trio session both ends share (``session``). The protocol itself is
sans-IO in :mod:`proxy.protocols.bridge`; the client is :mod:`proxy.strategies.bridge`."""
