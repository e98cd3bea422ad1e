//! Outbound HTTP of guests (`wasi:http/outgoing-handler`): the version's
//! allowlist, the guard against server-side request forgery, TLS, limits
//! and metering.
//!
//! A request leaves only when an `--allow-outbound` entry of its version
//! matches its scheme, host, port and path. Its host is then resolved here
//! (never by the guest) and every address it resolves to is checked: a
//! loopback, link-local (the cloud metadata address), private, unique-local
//! or unspecified address refuses the request unless the version names its
//! range with `--allow-private`, and a port of this node's own listeners on
//! a local address refuses it always. The connection goes to an address
//! that was checked, so a second lookup cannot swap it (DNS rebinding).
//! Redirects are never followed here: a guest that follows one sends a new
//! request, checked like the first.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use verge_spec::{Cidr, Grants, OutboundRule, UsageRecord};
use wasmtime_wasi_http::{Error, WasiBody};

use crate::Capture;

/// Outbound settings of the node (the same for every version).
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    /// Names resolved without DNS (`verge up --outbound-resolve NAME=ADDR`,
    /// like curl's `--resolve`); their addresses are checked like any.
    pub resolve: HashMap<String, Vec<IpAddr>>,
    /// Ports of this node's listeners: never reachable from a guest on
    /// any local address, whatever its grants.
    pub own_ports: Vec<u16>,
    /// Largest response body a guest may receive per request.
    pub response_limit: u64,
    /// Outbound requests one invocation may have open at once.
    pub max_concurrent: usize,
    /// Longest wait for a connection (shortened to the invocation's deadline).
    pub connect_timeout: Duration,
}

impl Default for OutboundSettings {
    fn default() -> Self {
        Self {
            resolve: HashMap::new(),
            own_ports: Vec::new(),
            response_limit: 64 << 20,
            max_concurrent: 16,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A version's outbound grants, parsed once when its function is bound.
#[derive(Default)]
pub struct OutboundPolicy {
    rules: Vec<OutboundRule>,
    private: Vec<Cidr>,
    pub(crate) calls: Vec<String>,
    /// Extra roots (`--outbound-ca`), parsed; the TLS configuration is made
    /// on the first HTTPS request.
    ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    tls: OnceLock<Arc<rustls::ClientConfig>>,
}

/// A grant the host cannot use.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error(transparent)]
    Spec(#[from] verge_spec::GrantError),
    #[error(
        "--outbound-ca: {0}; give a PEM file with one or more certificates (-----BEGIN CERTIFICATE-----)"
    )]
    Ca(String),
}

impl OutboundPolicy {
    /// Parses a version's grants (deploys check them the same way first).
    pub fn new(grants: &Grants) -> Result<Self, GrantError> {
        grants.validate()?;
        let ca = match &grants.outbound_ca {
            Some(pem) => parse_ca(pem)?,
            None => Vec::new(),
        };
        Ok(Self {
            rules: grants
                .allow_outbound
                .iter()
                .map(|r| OutboundRule::parse(r))
                .collect::<Result<_, _>>()?,
            private: grants
                .allow_private
                .iter()
                .map(|c| Cidr::parse(c))
                .collect::<Result<_, _>>()?,
            calls: grants.allow_call.clone(),
            ca,
            tls: OnceLock::new(),
        })
    }

    fn tls(&self) -> Arc<rustls::ClientConfig> {
        if self.ca.is_empty() {
            return PLATFORM_TLS.clone();
        }
        self.tls
            .get_or_init(|| {
                let mut roots = platform_roots();
                for cert in &self.ca {
                    // Checked when parsed (`parse_ca`).
                    let _ = roots.add(cert.clone());
                }
                client_config(roots)
            })
            .clone()
    }
}

/// Checks that `pem` holds certificates a TLS client can trust.
pub fn check_ca(pem: &str) -> Result<(), GrantError> {
    parse_ca(pem).map(drop)
}

fn parse_ca(pem: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, GrantError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| GrantError::Ca(format!("not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(GrantError::Ca("no certificate in it".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in &certs {
        roots
            .add(c.clone())
            .map_err(|e| GrantError::Ca(format!("a certificate cannot be a root ({e})")))?;
    }
    Ok(certs)
}

fn platform_roots() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.into(),
    }
}

fn client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    match config {
        Ok(c) => Arc::new(c),
        // ring supports the default versions; this is never reached.
        Err(_) => Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(platform_roots())
                .with_no_client_auth(),
        ),
    }
}

/// The platform's roots (Mozilla's, as webpki-roots ships them).
static PLATFORM_TLS: LazyLock<Arc<rustls::ClientConfig>> =
    LazyLock::new(|| client_config(platform_roots()));

/// What one invocation's outbound requests used, and how many are open.
#[derive(Default)]
pub(crate) struct OutboundUsage {
    requests: AtomicU32,
    sent: AtomicU64,
    received: AtomicU64,
    wait_us: AtomicU64,
    open: AtomicUsize,
}

impl OutboundUsage {
    pub(crate) fn record(&self, r: &mut UsageRecord) {
        r.outbound_requests = self.requests.load(Ordering::Relaxed);
        r.outbound_sent_bytes = self.sent.load(Ordering::Relaxed);
        r.outbound_received_bytes = self.received.load(Ordering::Relaxed);
        r.outbound_wait_us = self.wait_us.load(Ordering::Relaxed);
    }
}

/// One open request of an invocation; closing it (the response body done
/// or dropped, or the request failed) frees its place.
struct Open(Arc<OutboundUsage>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What sending needs of the invocation.
pub(crate) struct Sender {
    pub policy: Arc<OutboundPolicy>,
    pub settings: Arc<OutboundSettings>,
    pub usage: Arc<OutboundUsage>,
    pub deadline: Instant,
    pub stderr: Capture,
    pub function: String,
}

pub(crate) type Sent = (
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
);

/// Where a request goes, as the allowlist sees it.
struct Target {
    scheme: &'static str,
    /// Lowercase; IPv6 without brackets.
    host: String,
    port: u16,
    path: String,
}

fn target(uri: &http::Uri) -> Option<Target> {
    let scheme = match uri.scheme_str()? {
        s if s.eq_ignore_ascii_case("http") => "http",
        s if s.eq_ignore_ascii_case("https") => "https",
        _ => return None,
    };
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    let port = uri.port_u16().or(verge_spec::default_port(scheme))?;
    Some(Target {
        scheme,
        host,
        port,
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
    })
}

impl Sender {
    /// A line on the guest's stderr (what its owner reads in `verge logs`)
    /// and one in the node's log.
    fn refuse<T>(&self, line: String, error: Error) -> wasmtime_wasi_http::Result<T> {
        tracing::info!(function = %self.function, "{line}");
        use wasmtime_wasi::p2::OutputStream;
        let _ = self
            .stderr
            .clone()
            .write(Bytes::from(format!("verge: {line}\n")));
        Err(error)
    }

    pub(crate) async fn send(
        self,
        request: http::Request<WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
    ) -> wasmtime_wasi_http::Result<Sent> {
        let Some(t) = target(request.uri()) else {
            return self.refuse(
                format!(
                    "outbound request to {} refused: only http and https URLs with a host are sent",
                    request.uri()
                ),
                Error::HttpRequestUriInvalid,
            );
        };
        let shown = format!("{}://{}:{}{}", t.scheme, show_host(&t.host), t.port, t.path);
        if !self
            .policy
            .rules
            .iter()
            .any(|r| r.matches(t.scheme, &t.host, t.port, &t.path))
        {
            let port = if verge_spec::default_port(t.scheme) == Some(t.port) {
                String::new()
            } else {
                format!(":{}", t.port)
            };
            return self.refuse(
                format!(
                    "outbound request to {shown} denied: function {:?} may not reach it; deploy it with --allow-outbound {}://{}{port}",
                    self.function,
                    t.scheme,
                    show_host(&t.host)
                ),
                Error::HttpRequestDenied,
            );
        }
        let max = self.settings.max_concurrent;
        if self.usage.open.fetch_add(1, Ordering::Relaxed) >= max {
            self.usage.open.fetch_sub(1, Ordering::Relaxed);
            return self.refuse(
                format!(
                    "outbound request to {shown} refused: at most {max} outbound requests may be open at once per invocation"
                ),
                Error::ConnectionLimitReached,
            );
        }
        let open = Open(self.usage.clone());
        self.usage.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self
            .connect_and_send(&t, &shown, request, options, open)
            .await;
        self.usage.wait_us.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        result
    }

    /// The addresses `t.host` stands for, each checked.
    async fn addresses(&self, t: &Target, shown: &str) -> wasmtime_wasi_http::Result<Vec<IpAddr>> {
        let addrs: Vec<IpAddr> = if let Ok(ip) = t.host.parse::<IpAddr>() {
            vec![ip]
        } else if let Some(ips) = self.settings.resolve.get(&t.host) {
            ips.clone()
        } else {
            let lookup = tokio::net::lookup_host((t.host.as_str(), t.port));
            match tokio::time::timeout_at(self.connect_deadline().into(), lookup).await {
                Err(_) => return Err(Error::DnsTimeout),
                Ok(Err(e)) => {
                    return self.refuse(
                        format!(
                            "outbound request to {shown} failed: {} does not resolve ({e})",
                            t.host
                        ),
                        Error::DnsError {
                            rcode: Some(e.to_string()),
                            info_code: None,
                        },
                    );
                }
                Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            }
        };
        if addrs.is_empty() {
            return Err(Error::DestinationNotFound);
        }
        for ip in &addrs {
            let ip = verge_spec::canonical(*ip);
            if self.settings.own_ports.contains(&t.port) && is_local(ip) {
                return self.refuse(
                    format!(
                        "outbound request to {shown} refused: {ip} port {} is this node's own listener, which no guest may reach",
                        t.port
                    ),
                    Error::DestinationIpProhibited,
                );
            }
            if let Some(why) = verge_spec::forbidden_reason(ip)
                && !self.policy.private.iter().any(|c| c.contains(ip))
            {
                let via = if t.host.parse::<IpAddr>().is_ok() {
                    String::new()
                } else {
                    format!(" ({} resolves to it)", t.host)
                };
                return self.refuse(
                    format!(
                        "outbound request to {shown} refused: {ip} is a {why} address{via}; if the function is meant to reach it, deploy it with --allow-private {ip}/{}",
                        if ip.is_ipv4() { 32 } else { 128 }
                    ),
                    Error::DestinationIpProhibited,
                );
            }
        }
        Ok(addrs)
    }

    fn connect_deadline(&self) -> Instant {
        (Instant::now() + self.settings.connect_timeout).min(self.deadline)
    }

    async fn connect_and_send(
        &self,
        t: &Target,
        shown: &str,
        request: http::Request<WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        open: Open,
    ) -> wasmtime_wasi_http::Result<Sent> {
        let addrs = self.addresses(t, shown).await?;
        let now = Instant::now();
        let mut connect_by = self.connect_deadline();
        let mut first_byte_by = self.deadline;
        if let Some(o) = options {
            if let Some(d) = o.connect_timeout {
                connect_by = connect_by.min(now + d);
            }
            if let Some(d) = o.first_byte_timeout {
                first_byte_by = first_byte_by.min(now + d);
            }
        }
        let mut last = None;
        let mut stream = None;
        for ip in addrs {
            let addr = SocketAddr::new(ip, t.port);
            match tokio::time::timeout_at(connect_by.into(), tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = Some(Error::Connect(e)),
                Err(_) => {
                    last = Some(Error::ConnectionTimeout);
                    break;
                }
            }
        }
        let Some(stream) = stream else {
            return Err(last.unwrap_or(Error::DestinationUnavailable));
        };
        let _ = stream.set_nodelay(true);
        let (parts, body) = request.into_parts();
        let usage = self.usage.clone();
        let body = body
            .map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    usage.sent.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                f
            })
            .boxed_unsync();
        let mut request = http::Request::from_parts(parts, body);
        *request.uri_mut() = http::Uri::builder()
            .path_and_query(t.path.as_str())
            .build()
            .map_err(|_| Error::HttpRequestUriInvalid)?;

        let handshake = async {
            if t.scheme == "https" {
                let name = rustls_pki_types::ServerName::try_from(t.host.clone())
                    .map_err(|_| Error::TlsProtocolError)?;
                let tls = tokio_rustls::TlsConnector::from(self.policy.tls())
                    .connect(name, stream)
                    .await
                    .map_err(|e| {
                        if e.to_string().contains("certificate") {
                            Error::TlsCertificateError
                        } else {
                            Error::Tls(e)
                        }
                    })?;
                handshake(Box::new(tls)).await
            } else {
                handshake(Box::new(stream)).await
            }
        };
        let (mut sender, conn) = match tokio::time::timeout_at(connect_by.into(), handshake).await {
            Ok(r) => r?,
            Err(_) => return Err(Error::ConnectionTimeout),
        };
        // The connection is driven by its own task, stopped at the
        // invocation's deadline if the response is not done by then.
        let conn_deadline = self.deadline + Duration::from_secs(1);
        tokio::spawn(async move {
            let _ = tokio::time::timeout_at(conn_deadline.into(), conn).await;
        });
        let response =
            match tokio::time::timeout_at(first_byte_by.into(), sender.send_request(request)).await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(Error::from(e)),
                Err(_) => return Err(Error::ConnectionReadTimeout),
            };
        let limit = self.settings.response_limit;
        if let Some(n) = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && n > limit
        {
            return self.refuse(
                format!(
                    "outbound response from {shown} refused: {n} bytes, over the limit of {limit} bytes per response"
                ),
                Error::HttpResponseBodySize(Some(n)),
            );
        }
        let deadline = self.deadline;
        let usage = self.usage.clone();
        let response = response.map(move |incoming| {
            Incoming {
                inner: incoming,
                usage,
                seen: 0,
                limit,
                deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
                _open: open,
            }
            .boxed_unsync()
        });
        Ok((response, Box::new(async { Ok(()) })))
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T> Io for T where T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

type Conn = hyper::client::conn::http1::Connection<
    hyper_util::rt::TokioIo<Box<dyn Io>>,
    http_body_util::combinators::UnsyncBoxBody<Bytes, Error>,
>;

async fn handshake(
    io: Box<dyn Io>,
) -> wasmtime_wasi_http::Result<(
    hyper::client::conn::http1::SendRequest<
        http_body_util::combinators::UnsyncBoxBody<Bytes, Error>,
    >,
    Conn,
)> {
    hyper::client::conn::http1::Builder::new()
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(Error::from)
}

fn show_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Is `ip` an address of this machine (so that a port of this node's own
/// listeners on it is the node itself)? Binding to it says so without
/// listing interfaces.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// A response body as the guest reads it: counted, bounded in size, and
/// cut at the invocation's deadline.
struct Incoming {
    inner: hyper::body::Incoming,
    usage: Arc<OutboundUsage>,
    seen: u64,
    limit: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _open: Open,
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    self.seen += n;
                    self.usage.received.fetch_add(n, Ordering::Relaxed);
                    if self.seen > self.limit {
                        return Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(
                            self.limit,
                        )))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Error::from(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Error::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
