//! The node's HTTP server: hyper connections (HTTP/1.1 and HTTP/2) with
//! read timeouts, so that a client that sends its request slowly cannot
//! hold a connection, a task and (for the body) an instance for long.
//!
//! - The request head must arrive within the header timeout
//!   (`verge up --header-timeout`, 10 s), or the connection is closed.
//! - A request body that sends nothing for the body timeout
//!   (`verge up --body-timeout`, 10 s) is cut: the guest's read fails, its
//!   invocation ends and the instance is freed ([`Stalling`]).
//! - Shutdown stops accepting and lets open connections finish.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Read timeouts of client connections.
#[derive(Debug, Clone, Copy)]
pub struct ReadTimeouts {
    /// Longest a client may take to send a request's head.
    pub header: Duration,
    /// Longest a request body may send nothing before it is cut.
    pub body: Duration,
}

impl Default for ReadTimeouts {
    fn default() -> Self {
        Self {
            header: Duration::from_secs(10),
            body: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for
/// the open connections to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: ReadTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(timeouts.header))
        .keep_alive_timeout(timeouts.header);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or a connection reset before it
                    // was accepted: the listener itself is fine.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // TCP_NODELAY: a response goes out as a head and body frames; with
        // Nagle's algorithm on, a small frame behind another waits for the
        // client's delayed ACK (40 ms), which was the p99 of every benchmark.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A request body that fails when it sends nothing for `limit`: a stalled
/// upload is cut instead of holding its instance until the time limit. The
/// timer is armed only once the body has to wait (most bodies are already
/// complete when the guest reads them).
pub(crate) struct Stalling<B> {
    inner: B,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Stalling<B> {
    pub(crate) fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
        }
    }
}

/// The error of a [`Stalling`] body that waited too long.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?} and was cut")]
pub(crate) struct Stalled(Duration);

impl<B> Body for Stalling<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(timer) = &mut this.timer {
                    let now = tokio::time::Instant::now();
                    timer.as_mut().reset(
                        now.checked_add(this.limit)
                            .unwrap_or(now + Duration::from_secs(86_400)),
                    );
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = this.limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled(limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_is_cut_and_one_that_flows_is_not() {
        let (mut tx, body) =
            http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
        let mut body = Stalling::new(body, Duration::from_secs(10));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match body.frame().await {
                    Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
                    Some(Err(e)) => return (got, Some(e.to_string())),
                    None => return (got, None),
                }
            }
        });
        // Slower than the limit in total, never idle for it: flows.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            tx.send_data(Bytes::from_static(b"ab")).await.unwrap();
        }
        // Then nothing: cut after the limit.
        let (got, err) = reader.await.unwrap();
        assert_eq!(got, b"ababababab");
        assert!(err.unwrap().contains("sent nothing"), "cut");
        drop(tx);
    }
}
