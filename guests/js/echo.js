// Echo: the request body back byte for byte; method and path in x-echo-method /
// x-echo-path; every x- request header copied back (componentize-js).
import { Fields, OutgoingBody, OutgoingResponse, ResponseOutparam } from "wasi:http/types@0.2.12";

const enc = new TextEncoder();

function readBody(request) {
  const chunks = [];
  let total = 0;
  const body = request.consume();
  const stream = body.stream();
  for (;;) {
    let chunk;
    try {
      chunk = stream.blockingRead(65536n);
    } catch (e) {
      break; // closed
    }
    chunks.push(chunk);
    total += chunk.length;
  }
  stream[Symbol.dispose]?.();
  body[Symbol.dispose]?.();
  const all = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return all;
}

export const incomingHandler = {
  handle(request, responseOut) {
    const method = request.method();
    const headers = [
      ["content-type", enc.encode("application/octet-stream")],
      ["x-echo-method", enc.encode(method.tag === "other" ? method.val : method.tag.toUpperCase())],
      ["x-echo-path", enc.encode(request.pathWithQuery() ?? "")],
      ["x-echo-language", enc.encode("javascript")],
    ];
    for (const [name, value] of request.headers().entries()) {
      if (name.startsWith("x-")) headers.push([name, value]);
    }
    const data = readBody(request);
    const response = new OutgoingResponse(Fields.fromList(headers));
    const body = response.body();
    ResponseOutparam.set(responseOut, { tag: "ok", val: response });
    const stream = body.write();
    for (let i = 0; i < data.length; i += 4096) {
      stream.blockingWriteAndFlush(data.subarray(i, i + 4096));
    }
    stream[Symbol.dispose]?.();
    OutgoingBody.finish(body, undefined);
  },
};
