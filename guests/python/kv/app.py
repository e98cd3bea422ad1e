"""KV (componentize-py, Verge's `function` world from wit/): a page-view
counter on wasi:keyvalue. `GET /count/<page>` increments the page's counter
in bucket `views` and answers `views <n>`; `GET /get/<page>` reads it."""

from wit_world import exports
from wit_world.imports import atomics
from wit_world.imports import wasi_keyvalue_store as store
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)
from componentize_py_types import Err, Ok


def respond(response_out: ResponseOutparam, status: int, text: str) -> None:
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    stream = body.write()
    stream.blocking_write_and_flush(text.encode())
    stream.__exit__(None, None, None)
    OutgoingBody.finish(body, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        parts = (request.path_with_query() or "/").strip("/").split("/")
        try:
            bucket = store.open("views")
            if len(parts) == 2 and parts[0] == "count":
                n = atomics.increment(bucket, parts[1], 1)
                respond(response_out, 200, f"views {n}\n")
            elif len(parts) == 2 and parts[0] == "get":
                value = bucket.get(parts[1])
                respond(response_out, 200 if value is not None else 404, f"{(value or b'').decode()}\n")
            else:
                respond(response_out, 404, "no such route\n")
        except Err as e:
            respond(response_out, 500, f"key-value error: {e.value}\n")
