//! Bounded capture of a guest's stdout and stderr.
//!
//! Output past the limit is dropped and the capture is marked truncated: the
//! guest never sees an error for printing too much, and the host never holds
//! more than the limit.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Debug, Default)]
struct Inner {
    buf: BytesMut,
    truncated: bool,
}

/// A cloneable, bounded in-memory sink for one invocation's output stream.
#[derive(Debug, Clone)]
pub struct Capture {
    limit: usize,
    inner: Arc<Mutex<Inner>>,
}

impl Capture {
    /// A capture that keeps at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            inner: Arc::default(),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.limit.saturating_sub(inner.buf.len());
        if bytes.len() > room {
            inner.truncated = true;
        }
        let take = bytes.len().min(room);
        inner.buf.extend_from_slice(&bytes[..take]);
    }

    /// Forgets what was captured (an instance kept for its next request).
    pub(crate) fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.buf.clear();
        inner.truncated = false;
    }

    /// What was captured, and whether some output was dropped.
    pub fn contents(&self) -> (Bytes, bool) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (Bytes::copy_from_slice(&inner.buf), inner.truncated)
    }

    /// The captured text, lossily decoded, with a marker when truncated.
    pub fn text(&self) -> String {
        let (bytes, truncated) = self.contents();
        let mut s = String::from_utf8_lossy(&bytes).into_owned();
        if truncated {
            s.push_str("\n[output truncated]");
        }
        s
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always accept: excess output is dropped, not refused.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_and_marks() {
        let c = Capture::new(4);
        c.push(b"ab");
        c.push(b"cdef");
        let (bytes, truncated) = c.contents();
        assert_eq!(&bytes[..], b"abcd");
        assert!(truncated);
        assert!(c.text().ends_with("[output truncated]"));
    }
}
