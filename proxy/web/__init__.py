"""The status page on a loopback web port: what sidestep is doing, in a browser.

* :mod:`proxy.web.api` gathers the status document (open connections, totals, learned
  verdicts per site, resolver health, recent evidence) - the one source of every view;
* :mod:`proxy.web.pages` renders it as HTML with an inline SVG timeline (no external assets);
* :mod:`proxy.web.metrics` renders it in the Prometheus text format;
* :mod:`proxy.web.server` serves those, the JSON and the PAC file over HTTP/1.1 (h11 on trio),
  and :class:`~proxy.web.server.WebRunner` starts, moves and stops it with the config.

The live connections come from :mod:`proxy.status`, which the dispatcher keeps up to date.
"""
