"""Echo: the request body back byte for byte; method and path in x-echo-method /
x-echo-path; every x- request header copied back (componentize-py)."""

from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Other,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)
from componentize_py_types import Err, Ok


def method_name(method) -> str:
    if isinstance(method, Method_Other):
        return method.value
    return type(method).__name__.split("_", 1)[1].upper()


def read_body(request: IncomingRequest) -> bytes:
    chunks = []
    body = request.consume()
    stream = body.stream()
    while True:
        try:
            chunks.append(stream.blocking_read(65536))
        except Err:
            break
    stream.__exit__(None, None, None)
    body.__exit__(None, None, None)
    return b"".join(chunks)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        headers = [
            ("content-type", b"application/octet-stream"),
            ("x-echo-method", method_name(request.method()).encode()),
            ("x-echo-path", (request.path_with_query() or "").encode()),
            ("x-echo-language", b"python"),
        ]
        for name, value in request.headers().entries():
            if name.startswith("x-"):
                headers.append((name, value))
        data = read_body(request)
        response = OutgoingResponse(Fields.from_list(headers))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        stream = body.write()
        for i in range(0, len(data), 4096):
            stream.blocking_write_and_flush(data[i : i + 4096])
        stream.__exit__(None, None, None)
        OutgoingBody.finish(body, None)
