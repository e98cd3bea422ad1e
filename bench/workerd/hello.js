// The JavaScript hello for workerd (a service-worker script): the same work
// as guests/js/hello.js does in Verge, for bench/languages.sh.
addEventListener("fetch", (event) => {
  event.respondWith(
    new Response("Hello from JavaScript!\n", {
      headers: { "content-type": "text/plain; charset=utf-8" },
    }),
  );
});
