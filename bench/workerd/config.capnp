# workerd serving bench/workerd/hello.js on 127.0.0.1:18082 (bench/languages.sh).
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [ (name = "main", worker = .hello) ],
  sockets = [ (name = "http", address = "127.0.0.1:18082", http = (), service = "main") ],
);

const hello :Workerd.Worker = (
  serviceWorkerScript = embed "hello.js",
  compatibilityDate = "2024-09-23",
);
