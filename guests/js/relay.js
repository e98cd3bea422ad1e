// Relay (componentize-js): an event handler for the event-chain test. Prints
// `received <ce-id> <ce-type> hops=<ce-vergehops>`; when the event carries a
// `nexttype` extension (header ce-nexttype), emits an event of that type (id
// `<incoming id>/<nexttype>`, the incoming data passed on) to Verge's events
// URL, then answers 200.
import {
  Fields,
  OutgoingBody,
  OutgoingRequest,
  OutgoingResponse,
  ResponseOutparam,
} from "wasi:http/types@0.2.12";
import { handle as send } from "wasi:http/outgoing-handler@0.2.12";

const enc = new TextEncoder();
const dec = new TextDecoder();
const EVENTS_AUTHORITY = "events.verge.internal";

function header(request, name) {
  const values = request.headers().get(name);
  return values.length ? dec.decode(values[0]) : "";
}

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
      break;
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

function emit(id, type, data) {
  const request = new OutgoingRequest(
    Fields.fromList([
      ["ce-specversion", enc.encode("1.0")],
      ["ce-id", enc.encode(id)],
      ["ce-source", enc.encode("/relay-js")],
      ["ce-type", enc.encode(type)],
      ["content-type", enc.encode("application/json")],
    ]),
  );
  request.setMethod({ tag: "post" });
  request.setScheme({ tag: "HTTP" });
  request.setAuthority(EVENTS_AUTHORITY);
  request.setPathWithQuery("/");
  const body = request.body();
  const stream = body.write();
  stream.blockingWriteAndFlush(data);
  stream[Symbol.dispose]?.();
  OutgoingBody.finish(body, undefined);
  const future = send(request, undefined);
  future.subscribe().block();
  let result = future.get();
  while (result && result.tag !== undefined) result = result.val;
  return result.status();
}

export const incomingHandler = {
  handle(request, responseOut) {
    const id = header(request, "ce-id");
    const type = header(request, "ce-type");
    console.log(`received ${id} ${type} hops=${header(request, "ce-vergehops")}`);
    const next = header(request, "ce-nexttype");
    let data = readBody(request);
    if (data.length === 0) data = enc.encode("{}");
    let message = `relayed ${id}\n`;
    if (next) {
      message += `emitted ${next}: ${emit(`${id}/${next}`, next, data)}\n`;
    }
    const response = new OutgoingResponse(
      Fields.fromList([["content-type", enc.encode("text/plain")]]),
    );
    const out = response.body();
    ResponseOutparam.set(responseOut, { tag: "ok", val: response });
    const stream = out.write();
    stream.blockingWriteAndFlush(enc.encode(message));
    stream[Symbol.dispose]?.();
    OutgoingBody.finish(out, undefined);
  },
};
