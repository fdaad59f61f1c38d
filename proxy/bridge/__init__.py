"""The bridge server side: its identity and bridge URI (``identity``) and its config file
(``config``). The protocol itself is sans-IO in :mod:`proxy.protocols.bridge`."""
