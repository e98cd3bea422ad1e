// Hello: answers every request with a greeting (componentize-js, wasi:http/proxy).
import { Fields, OutgoingBody, OutgoingResponse, ResponseOutparam } from "wasi:http/types@0.2.12";

export const incomingHandler = {
  handle(_request, responseOut) {
    const response = new OutgoingResponse(
      Fields.fromList([["content-type", new TextEncoder().encode("text/plain; charset=utf-8")]]),
    );
    const body = response.body();
    ResponseOutparam.set(responseOut, { tag: "ok", val: response });
    const stream = body.write();
    stream.blockingWriteAndFlush(new TextEncoder().encode("Hello from JavaScript!\n"));
    stream[Symbol.dispose]?.();
    OutgoingBody.finish(body, undefined);
  },
};
