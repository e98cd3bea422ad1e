"""Fetch (componentize-py): outbound HTTP and wasi:config for the grants tests.

- /fetch with x-fetch-url: URL: sends a request there (method from
  x-fetch-method, default GET; the request body and every x- header but
  x-fetch-* passed on) and answers with the upstream's status, its x- headers
  and content-type, and its body; on an error, 502 and "error: <code>".
- /config/KEY: the value of KEY from wasi:config/store (404 when absent).
"""

from wit_world import exports
from wit_world.imports import outgoing_handler
from wit_world.imports import wasi_config_store as config
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Get,
    Method_Other,
    Method_Post,
    Method_Put,
    OutgoingBody,
    OutgoingRequest,
    OutgoingResponse,
    ResponseOutparam,
    Scheme_Http,
    Scheme_Https,
)
from componentize_py_types import Err, Ok


def read_body(request: IncomingRequest) -> bytes:
    return read_all(request.consume())


def read_all(body) -> bytes:
    """An incoming body (of a request or a response), whole."""
    chunks = []
    stream = body.stream()
    while True:
        try:
            chunks.append(stream.blocking_read(65536))
        except Err:
            break
    stream.__exit__(None, None, None)
    body.__exit__(None, None, None)
    return b"".join(chunks)


def respond(out, status: int, headers, data: bytes) -> None:
    response = OutgoingResponse(Fields.from_list(headers))
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(out, Ok(response))
    stream = body.write()
    for i in range(0, len(data), 4096):
        stream.blocking_write_and_flush(data[i : i + 4096])
    stream.__exit__(None, None, None)
    OutgoingBody.finish(body, None)


def method_of(name: str):
    name = name.upper()
    if name == "GET":
        return Method_Get()
    if name == "POST":
        return Method_Post()
    if name == "PUT":
        return Method_Put()
    return Method_Other(name)


def fetch(request: IncomingRequest):
    headers = dict(request.headers().entries())
    url = headers.get("x-fetch-url", b"").decode()
    if not url:
        return 400, [("content-type", b"text/plain")], b"give x-fetch-url\n"
    method = method_of(headers.get("x-fetch-method", b"GET").decode())
    passed = [
        (k, v)
        for k, v in request.headers().entries()
        if k.startswith("x-") and not k.startswith("x-fetch-")
    ]
    data = read_body(request)
    scheme, rest = url.split("://", 1)
    authority, _, path = rest.partition("/")
    if data:
        passed.append(("content-length", str(len(data)).encode()))
    out = OutgoingRequest(Fields.from_list(passed))
    out.set_method(method)
    out.set_scheme(Scheme_Https() if scheme == "https" else Scheme_Http())
    out.set_authority(authority)
    out.set_path_with_query("/" + path)
    body = out.body()
    # Sent first, then the body streams (a large body would fill the pipe).
    try:
        future = outgoing_handler.handle(out, None)
    except Err as e:
        return 502, [("content-type", b"text/plain")], f"error: {e.value}\n".encode()
    stream = body.write()
    for i in range(0, len(data), 4096):
        stream.blocking_write_and_flush(data[i : i + 4096])
    stream.__exit__(None, None, None)
    OutgoingBody.finish(body, None)
    future.subscribe().block()
    got = future.get()
    inner = got.value if isinstance(got, (Ok, Err)) else got
    if isinstance(inner, Err):
        return 502, [("content-type", b"text/plain")], f"error: {inner.value}\n".encode()
    response = inner.value if isinstance(inner, Ok) else inner
    kept = [
        (k, v)
        for k, v in response.headers().entries()
        if k.startswith("x-") or k == "content-type"
    ]
    return response.status(), kept, read_all(response.consume())


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = request.path_with_query() or "/"
        route = path.split("?", 1)[0]
        if "/config/" in route:
            route = "/config/" + route.split("/config/", 1)[1]
        elif route.endswith("/fetch"):
            route = "/fetch"
        if route == "/fetch":
            status, headers, data = fetch(request)
            respond(response_out, status, headers, data)
        elif route.startswith("/config/"):
            try:
                value = config.get(route[len("/config/"):])
            except Err as e:
                respond(response_out, 500, [("content-type", b"text/plain")], f"config error: {e.value}\n".encode())
                return
            if value is None:
                respond(response_out, 404, [("content-type", b"text/plain")], b"absent\n")
            else:
                respond(response_out, 200, [("content-type", b"text/plain")], value.encode())
        else:
            respond(response_out, 404, [("content-type", b"text/plain")], b"try /fetch or /config/KEY\n")
