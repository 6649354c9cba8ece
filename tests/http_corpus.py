"""Raw HTTP/1.1 requests with what the bundled services must make of them (RFC 9110/9112).

``VALID``: (name, raw request, expected parse) where the parse is what workers.wsgi hands the
app: method, PATH_INFO, QUERY_STRING, body, and a few environ keys. ``INVALID``: (name, raw
request, expected status); each is answered with that status and the connection closed.
tests/test_http_corpus.py sends each to both services, with the limits of ``LIMITS``.

Where llhttp is more lenient than the RFC's grammar and harmless, the corpus says what the
services do, with the reason: characters such as ``|`` or ``{`` in a target are served (nginx
does too; they cannot change where a request ends); a method llhttp does not know by name is
refused with 400 (not 501: llhttp refuses it while parsing).
"""

from __future__ import annotations

from typing import Any

# The limits the corpus is run with (settings of the same names).
LIMITS = {"max_request_line": 2048, "max_header_count": 50, "max_header_bytes": 8192, "max_body_size": 4096}

Expected = dict[str, Any]


def _req(line: str, *headers: str, body: bytes = b"", host: bool = True) -> bytes:
    head = [line] + (["Host: example.com"] if host else []) + list(headers)
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _chunked(*chunks: bytes, trailers: tuple[str, ...] = (), ext: str = "") -> bytes:
    parts = [b"%x%s\r\n%s\r\n" % (len(chunk), ext.encode(), chunk) for chunk in chunks]
    tail = "".join(f"{t}\r\n" for t in trailers).encode()
    return b"".join(parts) + b"0\r\n" + tail + b"\r\n"


def _parse(method: str = "GET", path: str = "/", query: str = "", body: str = "", **environ: str) -> Expected:
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "body": body, **environ}


def _valid() -> list[tuple[str, bytes, Expected]]:
    cases: list[tuple[str, bytes, Expected]] = []
    add = cases.append
    # Methods (RFC 9110 9): every standard one, and the registered ones llhttp knows.
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "PROPFIND", "MKCOL",
                   "COPY", "MOVE", "LOCK", "UNLOCK", "PURGE", "REPORT", "SEARCH", "QUERY"):
        add((f"method {method}", _req(f"{method} /m HTTP/1.1"), _parse(method, "/m")))
    # Targets (RFC 9112 3.2): origin-form with percent-encoding, queries, asterisk, absolute-form.
    targets = [
        ("/", "/", ""), ("/a/b/c", "/a/b/c", ""), ("/%41%42", "/AB", ""), ("/a%20b", "/a b", ""),
        ("/a?x=1&y=2", "/a", "x=1&y=2"), ("/a?", "/a", ""), ("/?q=%E2%82%AC", "/", "q=%E2%82%AC"),
        ("/caf%C3%A9", "/caf\xc3\xa9", ""), ("/a;p=1", "/a;p=1", ""), ("/~user/", "/~user/", ""),
        ("/a/../b", "/a/../b", ""), ("/a//b", "/a//b", ""), ("/a?x=%2F", "/a", "x=%2F"), ("/%2F", "//", ""),
        ("/a+b", "/a+b", ""), ("/!$&'()*+,;=:@", "/!$&'()*+,;=:@", ""), ("/a?b?c", "/a", "b?c"),
        ("/x#frag", "/x", ""), ("/a|b", "/a|b", ""), ("/{a}", "/{a}", ""), ("/" + "p" * 1500, "/" + "p" * 1500, ""),
    ]
    for target, path, query in targets:
        add((f"target {target[:30]}", _req(f"GET {target} HTTP/1.1"), _parse("GET", path, query)))
    add(("asterisk-form", _req("OPTIONS * HTTP/1.1"), _parse("OPTIONS", "*")))
    add(("absolute-form", _req("GET http://other.example/p?q=1 HTTP/1.1"),
         _parse("GET", "/p", "q=1", HTTP_HOST="other.example")))
    add(("absolute-form with port", _req("GET http://other.example:8080/ HTTP/1.1"),
         _parse("GET", "/", HTTP_HOST="other.example:8080")))
    # Versions: HTTP/1.0 without Host, with keep-alive.
    add(("HTTP/1.0 no Host", _req("GET /old HTTP/1.0", host=False), _parse("GET", "/old", SERVER_PROTOCOL="HTTP/1.0")))
    add(("HTTP/1.0 keep-alive", _req("GET /ka HTTP/1.0", "Connection: keep-alive", host=False),
         _parse("GET", "/ka", SERVER_PROTOCOL="HTTP/1.0")))
    add(("HTTP/1.1", _req("GET /v HTTP/1.1"), _parse("GET", "/v", SERVER_PROTOCOL="HTTP/1.1")))
    # Header fields (RFC 9110 5, RFC 9112 5): names in any case, values trimmed, obs-text, lists.
    headers = [
        ("X-Test: value", "HTTP_X_TEST", "value"), ("x-test: lower", "HTTP_X_TEST", "lower"),
        ("X-TEST: upper", "HTTP_X_TEST", "upper"), ("X-Test:no-space", "HTTP_X_TEST", "no-space"),
        ("X-Test:   padded   ", "HTTP_X_TEST", "padded"), ("X-Test:\ttab\t", "HTTP_X_TEST", "tab"),
        ("X-Test: a\tb", "HTTP_X_TEST", "a\tb"), ("X-Test: a  b", "HTTP_X_TEST", "a  b"),
        ("X-Test:", "HTTP_X_TEST", ""), ("X-Test: caf\xe9", "HTTP_X_TEST", "caf\xe9"),
        ("X-Test: \"quoted, string\"", "HTTP_X_TEST", "\"quoted, string\""),
        ("X-Test: a=1; b=2", "HTTP_X_TEST", "a=1; b=2"), ("Accept: */*", "HTTP_ACCEPT", "*/*"),
        ("User-Agent: curl/8.0 (x86_64)", "HTTP_USER_AGENT", "curl/8.0 (x86_64)"),
        ("Cookie: a=b; c=d", "HTTP_COOKIE", "a=b; c=d"), ("Content-Type: text/plain", "CONTENT_TYPE", "text/plain"),
        ("X-!#$%&'*+-.^_`|~: token chars", "HTTP_X_!#$%&'*+_.^_`|~", "token chars"),
        ("X-Long: " + "v" * 4000, "HTTP_X_LONG", "v" * 4000), ("X-Digits-123: 9", "HTTP_X_DIGITS_123", "9"),
        ("Accept-Language: en-US,en;q=0.5", "HTTP_ACCEPT_LANGUAGE", "en-US,en;q=0.5"),
    ]
    for line, key, value in headers:
        if "_" in line.partition(":")[0]:
            continue  # names with '_' are dropped (see workers.wsgi)
        add((f"header {line[:30]!r}", _req("GET /h HTTP/1.1", line), _parse("GET", "/h", **{key: value})))
    add(("header name with underscore is dropped", _req("GET /h HTTP/1.1", "X_User: spoof"), _parse("GET", "/h")))
    add(("repeated header joined", _req("GET /h HTTP/1.1", "X-A: 1", "X-A: 2"), _parse("GET", "/h", HTTP_X_A="1,2")))
    add(("host with port", _req("GET / HTTP/1.1", host=False) [:-2] + b"Host: example.com:8080\r\n\r\n",
         _parse("GET", "/", HTTP_HOST="example.com:8080")))
    add(("host IPv6", _req("GET / HTTP/1.1", host=False)[:-2] + b"Host: [::1]:80\r\n\r\n", _parse("GET", "/", HTTP_HOST="[::1]:80")))
    add(("49 fields", _req("GET /many HTTP/1.1", *(f"X-F{i}: {i}" for i in range(48))),
         _parse("GET", "/many", HTTP_X_F47="47")))
    add(("leading empty line", b"\r\n" + _req("GET /after HTTP/1.1"), _parse("GET", "/after")))
    # Bodies (RFC 9112 6): Content-Length, chunked with extensions and trailers.
    for size in (0, 1, 10, 100, 1000, 4096):
        data = bytes(ord("a") + i % 26 for i in range(size))
        add((f"content-length {size}", _req("POST /b HTTP/1.1", f"Content-Length: {size}", body=data),
             _parse("POST", "/b", body=data.decode())))
    add(("content-length leading zeros", _req("POST /b HTTP/1.1", "Content-Length: 003", body=b"abc"),
         _parse("POST", "/b", body="abc")))
    add(("content-length in upper case name", _req("POST /b HTTP/1.1", "CONTENT-LENGTH: 2", body=b"hi"),
         _parse("POST", "/b", body="hi")))
    chunked_bodies: list[tuple[str, bytes, str]] = [
        ("one chunk", _chunked(b"hello"), "hello"), ("three chunks", _chunked(b"ab", b"cd", b"ef"), "abcdef"),
        ("empty", _chunked(), ""), ("extension", _chunked(b"abc", ext=";name=value"), "abc"),
        ("quoted extension", _chunked(b"abc", ext=';n="v"'), "abc"),
        ("trailers", _chunked(b"abc", trailers=("X-Sum: 3", "X-More: y")), "abc"),
        ("upper-case hex", b"A\r\n0123456789\r\n0\r\n\r\n", "0123456789"),
        ("leading zeros", b"0003\r\nabc\r\n0\r\n\r\n", "abc"), ("big chunk", _chunked(b"x" * 4000), "x" * 4000),
        ("many small chunks", _chunked(*[b"y"] * 100), "y" * 100),
        ("chunk with CRLF inside", _chunked(b"a\r\nb"), "a\r\nb"),
    ]
    for name, data, body in chunked_bodies:
        add((f"chunked {name}", _req("POST /c HTTP/1.1", "Transfer-Encoding: chunked", body=data),
             _parse("POST", "/c", body=body)))
    add(("chunked in any case", _req("POST /c HTTP/1.1", "Transfer-Encoding: Chunked", body=_chunked(b"ok")),
         _parse("POST", "/c", body="ok")))
    add(("expect 100-continue", _req("POST /e HTTP/1.1", "Expect: 100-continue", "Content-Length: 2", body=b"ok"),
         _parse("POST", "/e", body="ok")))
    add(("expect in any case", _req("POST /e HTTP/1.1", "Expect: 100-Continue", "Content-Length: 2", body=b"ok"),
         _parse("POST", "/e", body="ok")))
    add(("get with a body", _req("GET /g HTTP/1.1", "Content-Length: 4", body=b"data"), _parse("GET", "/g", body="data")))
    add(("connection close", _req("GET /c HTTP/1.1", "Connection: close"), _parse("GET", "/c")))
    # Heads as real clients send them.
    clients = {
        "curl": ["User-Agent: curl/8.5.0", "Accept: */*"],
        "wrk": [],
        "browser": ["User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
                    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                    "Accept-Language: en-US,en;q=0.5", "Accept-Encoding: gzip, deflate, br", "DNT: 1",
                    "Connection: keep-alive", "Upgrade-Insecure-Requests: 1", "Sec-Fetch-Dest: document",
                    "Sec-Fetch-Mode: navigate", "Sec-Fetch-Site: none", "Sec-Fetch-User: ?1"],
        "python-requests": ["User-Agent: python-requests/2.32.3", "Accept-Encoding: gzip, deflate",
                            "Accept: */*", "Connection: keep-alive"],
        "haproxy check": ["Connection: close"],
    }
    for client, lines in clients.items():
        add((f"client {client}", _req("GET /page?id=7 HTTP/1.1", *lines), _parse("GET", "/page", "id=7")))
    forms = [("form", "application/x-www-form-urlencoded", b"a=1&b=two"), ("json", "application/json", b'{"k": [1, 2]}'),
             ("text", "text/plain; charset=utf-8", b"plain text"),
             ("multipart", "multipart/form-data; boundary=XyZ",
              b'--XyZ\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n--XyZ--\r\n')]
    for name, ctype, data in forms:
        add((f"post {name}", _req("POST /form HTTP/1.1", f"Content-Type: {ctype}", f"Content-Length: {len(data)}",
                                  body=data), _parse("POST", "/form", body=data.decode(), CONTENT_TYPE=ctype)))
        add((f"post {name} chunked", _req("PUT /form HTTP/1.1", f"Content-Type: {ctype}", "Transfer-Encoding: chunked",
                                          body=_chunked(data[:3], data[3:])),
             _parse("PUT", "/form", body=data.decode(), CONTENT_TYPE=ctype)))
    add(("connection list", _req("GET /c HTTP/1.1", "Connection: keep-alive, x-custom", "X-Custom: 1"),
         _parse("GET", "/c", HTTP_X_CUSTOM="1")))
    return cases


def _invalid() -> list[tuple[str, bytes, int]]:
    cases: list[tuple[str, bytes, int]] = []
    add = cases.append
    post = "POST / HTTP/1.1"
    # Request smuggling (RFC 9112 6.1, 6.3, 11.2): every way the body's end could be disputed.
    add(("CL with TE", _req(post, "Content-Length: 3", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400))
    add(("TE with CL", _req(post, "Transfer-Encoding: chunked", "Content-Length: 3", body=b"0\r\n\r\n"), 400))
    add(("duplicate CL same", _req(post, "Content-Length: 3", "Content-Length: 3", body=b"abc"), 400))
    add(("duplicate CL differing", _req(post, "Content-Length: 3", "Content-Length: 4", body=b"abcd"), 400))
    for value in ("3, 3", "-1", "+3", "0x3", "3.0", "1 2", "", "abc", "3a", "99999999999999999999999"):
        add((f"CL {value!r}", _req(post, f"Content-Length: {value}", body=b"abc"), 400))
    for value in ("chunked, chunked", "chunked, gzip"):
        add((f"TE {value!r}", _req(post, f"Transfer-Encoding: {value}", body=b"0\r\n\r\n"), 400))
    for value in ("gzip, chunked", "deflate, chunked", "identity", "xchunked", "chunked;q=1"):
        add((f"TE {value!r} (unsupported coding)", _req(post, f"Transfer-Encoding: {value}", body=b"0\r\n\r\n"), 501))
    add(("TE twice", _req(post, "Transfer-Encoding: gzip", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 501))
    te = "Transfer-Encoding: chunked"
    for name, data in [("non-hex size", b"zz\r\nabc\r\n0\r\n\r\n"), ("0x size", b"0x3\r\nabc\r\n0\r\n\r\n"),
                       ("negative size", b"-3\r\nabc\r\n0\r\n\r\n"), ("size overflow", b"f" * 20 + b"\r\nabc\r\n"),
                       ("space after size", b"3 \r\nabc\r\n0\r\n\r\n"), ("bare LF after size", b"3\nabc\r\n0\r\n\r\n"),
                       ("data longer than size", b"3\r\nabcd\r\n0\r\n\r\n"), ("no CRLF after data", b"3\r\nabc0\r\n\r\n"),
                       ("bad extension", b"3;\x01\r\nabc\r\n0\r\n\r\n"), ("empty size", b"\r\nabc\r\n0\r\n\r\n"),
                       ("obs-fold trailer", b"0\r\nX-T: a\r\n b\r\n\r\n"), ("bad trailer name", b"0\r\nX T: a\r\n\r\n")]:
        add((f"chunk {name}", _req(post, te, body=data), 400))
    # Field syntax (RFC 9112 5.1, 5.2): no whitespace before the colon, no obs-fold, tokens only.
    get = "GET / HTTP/1.1"
    add(("space before colon", _req(get, "X-A : a"), 400))
    add(("tab before colon", _req(get, "X-A\t: a"), 400))
    add(("obs-fold", _req(get, "X-A: a", " b"), 400))
    add(("obs-fold with tab", _req(get, "X-A: a", "\tb"), 400))
    add(("obs-fold first line", _req(get, " X-A: a"), 400))
    add(("empty field name", _req(get, ": a"), 400))
    add(("no colon", _req(get, "X-A a"), 400))
    for char in '()<>@,;\\"/[]?={} \x00\x01\x7f\x80\xff':
        add((f"name char {char!r}", _req(get, f"X{char}A: v"), 400))
    for char in "\x00\x01\x08\x0b\x0c\x0e\x1f\x7f\r":
        add((f"value char {char!r}", _req(get, f"X-A: a{char}b"), 400))
    # Methods and targets (RFC 9110 9.1, RFC 9112 3.1, 3.2).
    for method in ("G@T", "get", "GE T", "G\x00T", "FOO", "", "GET\t"):
        add((f"method {method!r}", _req(f"{method} / HTTP/1.1"), 400))
    for char in "\x00\x01\x09\x1f\x7f\x80\xe9 ":
        add((f"target char {char!r}", _req(f"GET /a{char}b HTTP/1.1"), 400))
    add(("empty target", _req("GET  HTTP/1.1"), 400))
    # Request line and version (RFC 9112 2.3, 3).
    for line in ("GET / HTTP/1.2", "GET / HTTP/1.10", "GET / http/1.1", "GET / HTTP/1.1 ", "GET / HTTP/ 1.1",
                 "GET / HTTP/1", "GET / HTTP", "GET /", "GET / FOO/1.1", "GET / HTTP/1.1/"):
        add((f"request line {line!r}", _req(line), 400))
    add(("HTTP/0.9", b"GET /\r\n\r\n", 400))
    for line in ("GET / HTTP/2.0", "GET / HTTP/3.0"):
        add((f"version {line[-8:]}", _req(line), 400 if line.endswith("3.0") else 505))
    add(("bare LF line ends", b"GET / HTTP/1.1\nHost: x\n\n", 400))
    add(("bare CR line ends", b"GET / HTTP/1.1\rHost: x\r\r", 400))
    add(("bare LF after a header", b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400))
    add(("binary garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400))
    # Host (RFC 9112 3.2): exactly one in HTTP/1.1.
    add(("no Host in HTTP/1.1", _req(get, host=False), 400))
    add(("two Hosts", _req(get, "Host: other.example"), 400))
    # Semantics refused at the door.
    add(("CONNECT", _req("CONNECT example.com:443 HTTP/1.1"), 405))
    add(("unknown expectation", _req(post, "Expect: teapot", "Content-Length: 0"), 417))
    # Limits (LIMITS; RFC 9110 15.5.14, 15.5.15, RFC 6585 5).
    add(("target too long", _req("GET /" + "a" * 2100 + " HTTP/1.1"), 414))
    add(("too many fields", _req(get, *(f"X-F{i}: {i}" for i in range(60))), 431))
    add(("one field too large", _req(get, "X-Big: " + "b" * 9000), 431))
    add(("fields too large together", _req(get, *(f"X-F{i}: {'c' * 400}" for i in range(30))), 431))
    add(("body too large (CL)", _req(post, "Content-Length: 5000", body=b"d" * 5000), 413))
    add(("body too large (chunked)", _req(post, te, body=_chunked(*[b"e" * 1000] * 5)), 413))
    return cases


VALID = _valid()
INVALID = _invalid()
