// Counter: answers how many requests its instance has served, this one
// included: always 1 on a fresh instance per request, 1, 2, 3... on an
// instance reused (`verge deploy --reuse N`).
import { Fields, OutgoingBody, OutgoingResponse, ResponseOutparam } from "wasi:http/types@0.2.12";

let served = 0;

export const incomingHandler = {
  handle(_request, responseOut) {
    served += 1;
    const response = new OutgoingResponse(
      Fields.fromList([["content-type", new TextEncoder().encode("text/plain; charset=utf-8")]]),
    );
    const body = response.body();
    ResponseOutparam.set(responseOut, { tag: "ok", val: response });
    const stream = body.write();
    stream.blockingWriteAndFlush(new TextEncoder().encode(`${served}\n`));
    stream[Symbol.dispose]?.();
    OutgoingBody.finish(body, undefined);
  },
};
