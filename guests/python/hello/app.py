"""Hello: answers every request with a greeting (componentize-py, wasi:http/proxy)."""

from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)
from componentize_py_types import Ok


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        response = OutgoingResponse(
            Fields.from_list([("content-type", b"text/plain; charset=utf-8")])
        )
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        stream = body.write()
        stream.blocking_write_and_flush(b"Hello from Python!\n")
        stream.__exit__(None, None, None)
        OutgoingBody.finish(body, None)
