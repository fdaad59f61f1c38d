"""Tests for proxy.protocols.http_proxy: CONNECT, absolute-form, headers, auth, fuzz."""

from __future__ import annotations

import base64

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import (
    ConnectRefused,
    ConnectTimeout,
    NotAllowed,
    RemoteProtocolError,
    ResolveError,
    Unreachable,
    UpstreamError,
)
from proxy.protocols.http_proxy import (
    BodyData,
    BodyEnded,
    ClientDisconnected,
    ConnectRequested,
    Event,
    ForwardRequested,
    HttpProxyServerConnection,
    OriginFormRequested,
    ResponseHead,
    State,
    connect_established,
    error_response,
    parse_proxy_authorization,
    request_headers_for_upstream,
    response_headers_for_client,
    status_for,
)


def feed(data: bytes, *, bytewise: bool = False) -> tuple[HttpProxyServerConnection, list[Event]]:
    conn = HttpProxyServerConnection()
    events: list[Event] = []
    if bytewise:
        for i in range(len(data)):
            events += conn.receive_data(data[i : i + 1])
    else:
        events += conn.receive_data(data)
    return conn, events


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- CONNECT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_http_proxy_connect_keeps_trailing_data(bytewise: bool) -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc"
    data = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + hello
    conn, events = feed(data, bytewise=bytewise)
    assert events == [ConnectRequested("example.com", 443, ((b"host", b"example.com:443"),), None)]
    assert conn.trailing_data == hello
    assert conn.state is State.TUNNEL
    # later bytes also belong to the tunnel
    assert conn.receive_data(b"more") == []
    assert conn.trailing_data == hello + b"more"


def test_http_proxy_connect_ipv6_and_auth() -> None:
    data = (
        b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n"
        b"Proxy-Authorization: " + basic("alice", "s3:cret").encode() + b"\r\n\r\n"
    )
    _, events = feed(data)
    (event,) = events
    assert isinstance(event, ConnectRequested)
    assert (event.host, event.port) == ("2001:db8::1", 8443)
    assert event.proxy_auth == ("alice", "s3:cret")


@pytest.mark.parametrize(
    "target",
    [
        b"example.com",
        b"example.com:0",
        b"example.com:65536",
        b"example.com:99999999",
        b"example.com:-1",
        b"example.com:https",
        b"[::1]",
        b"[::1",
        b"[not-ip]:443",
        b"::1:443",
        b"/path",
        b"http://example.com:80",
        b"bad_host!:443",
        b":443",
    ],
)
def test_http_proxy_connect_rejects_bad_authority(target: bytes) -> None:
    conn = HttpProxyServerConnection()
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert info.value.reply_code == 400
    assert conn.state is State.CLOSED
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"more")


# --- absolute-form -----------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_http_proxy_forward_get(bytewise: bool) -> None:
    data = (
        b"GET http://Example.com/index.html?q=1 HTTP/1.1\r\n"
        b"Host: wrong.example\r\nAccept: */*\r\nProxy-Connection: keep-alive\r\n\r\n"
    )
    _, events = feed(data, bytewise=bytewise)
    assert events == [
        ForwardRequested(
            method="GET",
            host="Example.com",
            port=80,
            path="/index.html?q=1",
            headers=((b"host", b"Example.com"), (b"accept", b"*/*")),
            proxy_auth=None,
            keep_alive=True,
        ),
        BodyEnded(),
    ]


@pytest.mark.parametrize(
    ("url", "host", "port", "path", "host_header"),
    [
        (b"http://a.example:8080", "a.example", 8080, "/", b"a.example:8080"),
        (b"http://a.example:/x", "a.example", 80, "/x", b"a.example"),
        (b"HTTP://a.example?x=1", "a.example", 80, "/?x=1", b"a.example"),
        (b"http://[::1]:8000/p#frag", "::1", 8000, "/p", b"[::1]:8000"),
        (b"http://127.0.0.1/", "127.0.0.1", 80, "/", b"127.0.0.1"),
    ],
)
def test_http_proxy_forward_urls(
    url: bytes, host: str, port: int, path: str, host_header: bytes
) -> None:
    _, events = feed(b"GET " + url + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    event = events[0]
    assert isinstance(event, ForwardRequested)
    assert (event.host, event.port, event.path) == (host, port, path)
    assert event.headers[0] == (b"host", host_header)


@pytest.mark.parametrize(
    "url",
    [b"https://example.com/", b"ftp://example.com/", b"http://user:pw@example.com/", b"http:///x"],
)
def test_http_proxy_forward_rejects_bad_urls(url: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        feed(b"GET " + url + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert info.value.reply_code == 400


def test_http_proxy_hop_by_hop_headers_removed() -> None:
    data = (
        b"POST http://example.com/upload HTTP/1.1\r\nHost: example.com\r\n"
        b"Connection: X-Secret, keep-alive\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\n"
        b"TE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"X-Kept: yes\r\nContent-Length: 3\r\n\r\nabc"
    )
    _, events = feed(data)
    forward = events[0]
    assert isinstance(forward, ForwardRequested)
    assert forward.headers == (
        (b"host", b"example.com"),
        (b"x-kept", b"yes"),
        (b"content-length", b"3"),
    )
    assert forward.proxy_auth == ("foo", "bar")
    assert forward.upgrade == "h2c"
    assert events[1:] == [BodyData(b"abc"), BodyEnded()]


def test_http_proxy_chunked_request_stays_chunked_without_content_length() -> None:
    data = (
        b"POST http://example.com/ HTTP/1.1\r\nHost: example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    _, events = feed(data, bytewise=True)
    forward = events[0]
    assert isinstance(forward, ForwardRequested)
    assert forward.headers == ((b"host", b"example.com"), (b"transfer-encoding", b"chunked"))
    body = b"".join(e.data for e in events if isinstance(e, BodyData))
    assert body == b"abcde"
    assert events[-1] == BodyEnded()
    # the cleaned headers are valid for an h11 client, which re-chunks the body
    client = h11.Connection(h11.CLIENT)
    head = client.send(h11.Request(method="POST", target="/", headers=list(forward.headers)))
    assert head is not None and b"transfer-encoding: chunked" in head
    assert client.send(h11.Data(data=b"abc")) == b"3\r\nabc\r\n"


def test_http_proxy_header_helpers() -> None:
    both = [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked"), (b"X", b"1")]
    assert request_headers_for_upstream(both, b"h") == (
        (b"host", b"h"),
        (b"x", b"1"),
        (b"transfer-encoding", b"chunked"),
    )
    assert response_headers_for_client(both) == ((b"x", b"1"),)
    assert response_headers_for_client([(b"Content-Length", b"5"), (b"Connection", b"close")]) == (
        (b"content-length", b"5"),
    )


def test_http_proxy_http10_is_not_keep_alive() -> None:
    _, events = feed(b"GET http://example.com/ HTTP/1.0\r\n\r\n")
    forward = events[0]
    assert isinstance(forward, ForwardRequested) and not forward.keep_alive
    _, events = feed(b"GET http://e.com/ HTTP/1.1\r\nHost: e.com\r\nConnection: close\r\n\r\n")
    forward = events[0]
    assert isinstance(forward, ForwardRequested) and not forward.keep_alive


def test_http_proxy_expect_continue() -> None:
    conn, events = feed(
        b"PUT http://e.com/ HTTP/1.1\r\nHost: e.com\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\n\r\n"
    )
    forward = events[0]
    assert isinstance(forward, ForwardRequested) and forward.expects_continue
    assert (b"expect", b"100-continue") not in forward.headers
    assert conn.expects_continue
    conn.send_continue()
    assert conn.data_to_send().startswith(b"HTTP/1.1 100 ")
    assert conn.receive_data(b"ok") == [BodyData(b"ok"), BodyEnded()]


def test_http_proxy_origin_form() -> None:
    _, events = feed(b"GET /proxy.pac HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert events == [
        OriginFormRequested("GET", "/proxy.pac", ((b"host", b"127.0.0.1"),)),
        BodyEnded(),
    ]


# --- keep-alive and pipelining -----------------------------------------------------------------


def respond(conn: HttpProxyServerConnection, body: bytes = b"hi") -> bytes:
    conn.send(ResponseHead(200, ((b"content-length", str(len(body)).encode()),), b"OK"))
    conn.send(BodyData(body))
    conn.send(BodyEnded())
    return conn.data_to_send()


def test_http_proxy_pipelined_requests_are_kept() -> None:
    one = b"GET http://a.example/1 HTTP/1.1\r\nHost: a.example\r\n\r\n"
    two = b"GET http://b.example/2 HTTP/1.1\r\nHost: b.example\r\n\r\n"
    conn, events = feed(one + two)
    assert len(events) == 2 and isinstance(events[0], ForwardRequested)
    assert events[0].path == "/1"
    assert conn.state is State.RESPONDING
    assert respond(conn) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
    assert conn.can_keep_alive
    events = conn.next_request()
    assert isinstance(events[0], ForwardRequested) and events[0].host == "b.example"
    respond(conn)
    assert conn.next_request() == []
    assert conn.receive_eof() == [ClientDisconnected()]


def test_http_proxy_response_without_length_is_chunked_for_http11() -> None:
    conn, _ = feed(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
    conn.send(ResponseHead(200, ()))
    conn.send(BodyData(b"abc"))
    conn.send(BodyEnded())
    out = conn.data_to_send()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.lower().endswith(b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert conn.can_keep_alive


def test_http_proxy_connection_close_ends_keep_alive() -> None:
    conn, _ = feed(b"GET http://a.example/ HTTP/1.0\r\n\r\n")
    out = respond(conn)
    assert b"connection: close" in out.lower()
    assert not conn.can_keep_alive
    with pytest.raises(Exception, match="another request"):
        conn.next_request()


def test_http_proxy_half_close_after_request_is_answered_first() -> None:
    conn, events = feed(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert isinstance(events[0], ForwardRequested)
    assert conn.receive_eof() == []
    assert conn.receive_eof() == []
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"late")
    respond(conn)
    assert conn.next_request() == [ClientDisconnected()]
    assert conn.state is State.CLOSED


def test_http_proxy_eof_mid_head_is_an_error() -> None:
    conn = HttpProxyServerConnection()
    assert conn.receive_data(b"GET http://a/ HTTP/1.1\r\nHo") == []
    with pytest.raises(RemoteProtocolError):
        conn.receive_eof()


def test_http_proxy_head_size_is_bounded() -> None:
    conn = HttpProxyServerConnection(max_head_size=1024)
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 2000)
    assert info.value.reply_code == 431


# --- auth, replies, error mapping --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (basic("u", "p"), ("u", "p")),
        (basic("ü", "pä:ss"), ("ü", "pä:ss")),
        (basic("", ""), ("", "")),
        ("basic " + base64.b64encode(b"a:b").decode(), ("a", "b")),
        (b"Basic " + base64.b64encode(b"x:y"), ("x", "y")),
        ("Basic " + base64.b64encode(b"nocolon").decode(), None),
        ("Basic !!!notbase64", None),
        ("Bearer abc", None),
        ("", None),
        ("Basic", None),
        ("Basic ü", None),
    ],
)
def test_http_proxy_parse_proxy_authorization(
    value: str | bytes, expected: tuple[str, str] | None
) -> None:
    assert parse_proxy_authorization(value) == expected


def test_http_proxy_replies() -> None:
    assert connect_established() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    reply = error_response(407)
    assert reply.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'Proxy-Authenticate: Basic realm="sidestep"\r\n' in reply
    assert b"Connection: close\r\n" in reply
    head, _, body = error_response(502, extra_headers=[("X-Why", "dead")]).partition(b"\r\n\r\n")
    assert b"X-Why: dead" in head
    assert f"Content-Length: {len(body)}".encode() in head
    # the reply parses as a valid HTTP response
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(error_response(400, message="bad\r\nthing"))
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 400


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotAllowed("no"), 403),
        (ConnectTimeout("slow"), 504),
        (ResolveError("nx"), 502),
        (ConnectRefused("rst"), 502),
        (Unreachable("icmp"), 502),
        (UpstreamError("other"), 502),
        (RemoteProtocolError("bad", reply_code=431), 431),
        (TimeoutError(), 504),
        (RuntimeError("?"), 502),
    ],
)
def test_http_proxy_status_for(error: BaseException, status: int) -> None:
    assert status_for(error) == status


# --- fuzz --------------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=200), max_size=6), st.booleans())
def test_http_proxy_garbage_raises_only_remote_protocol_error(
    chunks: list[bytes], eof: bool
) -> None:
    conn = HttpProxyServerConnection(max_head_size=4096)
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
        if eof:
            conn.receive_eof()
    except RemoteProtocolError as exc:
        assert exc.reply_code is None or 400 <= exc.reply_code < 600
        assert conn.state is State.CLOSED


_REQUEST_LINES = st.sampled_from(
    [
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"POST http://e.com/ HTTP/1.1\r\nHost: e.com\r\nContent-Length: 4\r\n\r\nbody",
        b"POST http://e.com/ HTTP/1.1\r\nHost: e.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nbody\r\n0\r\n\r\n",
    ]
)


@given(_REQUEST_LINES, st.data())
def test_http_proxy_mutated_requests_raise_only_remote_protocol_error(
    request: bytes, data: st.DataObject
) -> None:
    raw = bytearray(request)
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    conn = HttpProxyServerConnection()
    try:
        conn.receive_data(bytes(raw[:cut]))
        conn.receive_data(bytes(raw[cut:]))
    except RemoteProtocolError:
        pass


@given(_REQUEST_LINES, st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_http_proxy_any_split_gives_the_same_events(request: bytes, sizes: list[int]) -> None:
    _, whole = feed(request)
    conn = HttpProxyServerConnection()
    events: list[Event] = []
    pos = 0
    for size in [*sizes, len(request)]:
        events += conn.receive_data(request[pos : pos + size])
        pos += size

    # body chunking may differ; compare with bodies joined
    def squash(evs: list[Event]) -> list[object]:
        out: list[object] = []
        for e in evs:
            if isinstance(e, BodyData) and out and isinstance(out[-1], bytes):
                out[-1] += e.data
            else:
                out.append(e.data if isinstance(e, BodyData) else e)
        return out

    assert squash(events) == squash(whole)
