"""Counter: answers how many requests its instance has served, this one
included: always 1 on a fresh instance per request, 1, 2, 3... on an
instance reused (`verge deploy --reuse N`)."""

from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)
from componentize_py_types import Ok


SERVED = 0


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        global SERVED
        SERVED += 1
        response = OutgoingResponse(
            Fields.from_list([("content-type", b"text/plain; charset=utf-8")])
        )
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        stream = body.write()
        stream.blocking_write_and_flush(f"{SERVED}\n".encode())
        stream.__exit__(None, None, None)
        OutgoingBody.finish(body, None)
