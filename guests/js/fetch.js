// Fetch (componentize-js): outbound HTTP for the grants tests. `/fetch` with
// `x-fetch-url: URL` sends a request there (method from x-fetch-method,
// default GET; the request body and every x- header but x-fetch-* passed on)
// and answers with the upstream's status, its x- headers and content-type,
// and its body; on an error, 502 and `error: <wasi:http error code>`.
import {
  Fields,
  OutgoingBody,
  OutgoingRequest,
  OutgoingResponse,
  ResponseOutparam,
} from "wasi:http/types@0.2.12";
import { handle as send } from "wasi:http/outgoing-handler@0.2.12";

const enc = new TextEncoder();

function readStream(body) {
  const chunks = [];
  let total = 0;
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

function writeAll(body, data) {
  const stream = body.write();
  for (let i = 0; i < data.length; i += 4096) {
    stream.blockingWriteAndFlush(data.subarray(i, i + 4096));
  }
  stream[Symbol.dispose]?.();
  OutgoingBody.finish(body, undefined);
}

function respond(responseOut, status, headers, data) {
  const response = new OutgoingResponse(Fields.fromList(headers));
  response.setStatusCode(status);
  const out = response.body();
  ResponseOutparam.set(responseOut, { tag: "ok", val: response });
  writeAll(out, data);
}

function describe(code) {
  return JSON.stringify(code?.payload ?? code);
}

function fetch(request) {
  const headers = request.headers().entries();
  const get = (name) => {
    const found = headers.find(([k]) => k === name);
    return found ? new TextDecoder().decode(found[1]) : "";
  };
  const url = get("x-fetch-url");
  if (!url) return [400, [["content-type", enc.encode("text/plain")]], enc.encode("give x-fetch-url\n")];
  const method = (get("x-fetch-method") || "GET").toLowerCase();
  const passed = headers.filter(([k]) => k.startsWith("x-") && !k.startsWith("x-fetch-"));
  const data = readStream(request.consume());
  if (data.length > 0) passed.push(["content-length", enc.encode(String(data.length))]);
  const [scheme, rest] = url.split("://");
  const slash = rest.indexOf("/");
  const authority = slash < 0 ? rest : rest.slice(0, slash);
  const path = slash < 0 ? "/" : rest.slice(slash);
  const out = new OutgoingRequest(Fields.fromList(passed));
  out.setMethod({ tag: method });
  out.setScheme({ tag: scheme === "https" ? "HTTPS" : "HTTP" });
  out.setAuthority(authority);
  out.setPathWithQuery(path);
  const outBody = out.body();
  // Sent first, then the body streams (a large body would fill the pipe).
  let future;
  try {
    future = send(out, undefined);
  } catch (e) {
    return [502, [["content-type", enc.encode("text/plain")]], enc.encode(`error: ${describe(e)}\n`)];
  }
  writeAll(outBody, data);
  future.subscribe().block();
  let result = future.get();
  while (result && result.tag !== undefined) {
    if (result.tag === "err") {
      return [502, [["content-type", enc.encode("text/plain")]], enc.encode(`error: ${describe(result.val)}\n`)];
    }
    result = result.val;
  }
  const kept = result
    .headers()
    .entries()
    .filter(([k]) => k.startsWith("x-") || k === "content-type");
  const status = result.status();
  const body = readStream(result.consume());
  return [status, kept, body];
}

export const incomingHandler = {
  handle(request, responseOut) {
    const path = request.pathWithQuery() || "/";
    if (path.split("?")[0].endsWith("/fetch")) {
      const [status, headers, body] = fetch(request);
      respond(responseOut, status, headers, body);
    } else {
      respond(responseOut, 404, [["content-type", enc.encode("text/plain")]], enc.encode("try /fetch\n"));
    }
  },
};
