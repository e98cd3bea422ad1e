//! What a version may reach beyond its caller: outbound HTTP by allowlist
//! (`--allow-outbound`, `--allow-private`, `--outbound-ca`), calls to other
//! functions (`--allow-call`), configuration values (`--config`) and the
//! secrets it is granted (`--secret`). Parsing and matching only; the host
//! enforces them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// The grants of one version, stored with it (part of its configuration:
/// two deploys of the same bytes with different grants are two versions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// Outbound HTTP allowlist entries, as written (see [`OutboundRule`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_outbound: Vec<String>,
    /// Address ranges an allowed name may resolve to although they are
    /// private, loopback or link-local (see [`Cidr`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_private: Vec<String>,
    /// PEM certificates of private CAs trusted for HTTPS besides the
    /// platform's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_ca: Option<String>,
    /// Functions this version may call in process (`http://NAME.fn.verge.internal/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_call: Vec<String>,
    /// Plain configuration values the guest reads through `wasi:config/store`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Names of the secrets the guest reads through `wasi:config/store`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

/// No grant at all, for callers that need a `&'static Grants`.
pub static NO_GRANTS: Grants = Grants {
    allow_outbound: Vec::new(),
    allow_private: Vec::new(),
    outbound_ca: None,
    allow_call: Vec::new(),
    config: BTreeMap::new(),
    secrets: Vec::new(),
};

impl Grants {
    /// No grant at all (what every version had before grants existed).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks every entry; the error names the first bad one.
    pub fn validate(&self) -> Result<(), GrantError> {
        for r in &self.allow_outbound {
            OutboundRule::parse(r)?;
        }
        for c in &self.allow_private {
            Cidr::parse(c)?;
        }
        for f in &self.allow_call {
            crate::validate_function_name(f).map_err(|_| GrantError::Call(f.clone()))?;
        }
        for (k, v) in &self.config {
            validate_config_key(k)?;
            if v.len() > MAX_CONFIG_VALUE {
                return Err(GrantError::ConfigValue(k.clone()));
            }
        }
        for s in &self.secrets {
            validate_secret_name(s)?;
            if self.config.contains_key(s) {
                return Err(GrantError::SecretShadowsConfig(s.clone()));
            }
        }
        Ok(())
    }

    /// Sorted and deduplicated, so that equal grants compare (and key) equal.
    pub fn normalized(mut self) -> Self {
        for v in [
            &mut self.allow_outbound,
            &mut self.allow_private,
            &mut self.allow_call,
            &mut self.secrets,
        ] {
            v.sort();
            v.dedup();
        }
        self
    }
}

/// The largest secret value accepted.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// The largest `--config` value accepted.
pub const MAX_CONFIG_VALUE: usize = 64 * 1024;

/// A grant that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error(
        "invalid --allow-outbound entry {entry:?}: {reason}; write [SCHEME://]HOST[:PORT][/PATH], for example https://api.example.com, https://*.example.com:8443/v1 or * for any host"
    )]
    Outbound { entry: String, reason: &'static str },
    #[error(
        "invalid --allow-private range {0:?}: write an address or a CIDR range such as 10.0.0.0/8, 127.0.0.1 or fd00::/8"
    )]
    Cidr(String),
    #[error("invalid --allow-call entry {0:?}: give a function name (a-z, 0-9 and '-')")]
    Call(String),
    #[error(
        "invalid configuration key {0:?}: use 1 to 128 characters from a-z, A-Z, 0-9, '_', '-' and '.'"
    )]
    ConfigKey(String),
    #[error("configuration value of {0:?} is over 64 KiB")]
    ConfigValue(String),
    #[error(
        "invalid secret name {0:?}: use 1 to 128 characters from a-z, A-Z, 0-9, '_', '-' and '.'"
    )]
    SecretName(String),
    #[error("secret {0:?} has the name of a --config value too: rename one of them")]
    SecretShadowsConfig(String),
}

fn valid_key(k: &str) -> bool {
    (1..=128).contains(&k.len())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Checks a `--config` key.
pub fn validate_config_key(k: &str) -> Result<(), GrantError> {
    if valid_key(k) {
        Ok(())
    } else {
        Err(GrantError::ConfigKey(k.to_string()))
    }
}

/// Checks a secret's name.
pub fn validate_secret_name(k: &str) -> Result<(), GrantError> {
    if valid_key(k) {
        Ok(())
    } else {
        Err(GrantError::SecretName(k.to_string()))
    }
}

/// The host part of an allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any host.
    Any,
    /// `*.example.com`: any name ending in `.example.com` (not the bare domain).
    Suffix(String),
    /// One name or address literal, lowercase (IPv6 without brackets).
    Exact(String),
}

/// One parsed `--allow-outbound` entry: `[SCHEME://]HOST[:PORT][/PATH]`.
/// No scheme: http and https. No port: the scheme's default (`*`: any).
/// A path matches itself and what lies below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRule {
    /// `http` or `https`; `None`: both.
    pub scheme: Option<&'static str>,
    pub host: HostPattern,
    /// `None`: the scheme's default port; `Some(None)`: any port.
    pub port: Option<Option<u16>>,
    /// Path prefix, `/` for all.
    pub path: String,
}

impl OutboundRule {
    pub fn parse(entry: &str) -> Result<Self, GrantError> {
        let bad = |reason| GrantError::Outbound {
            entry: entry.to_string(),
            reason,
        };
        let e = entry.trim();
        if e.is_empty() {
            return Err(bad("it is empty"));
        }
        if e == "*" {
            return Ok(Self {
                scheme: None,
                host: HostPattern::Any,
                port: Some(None),
                path: "/".into(),
            });
        }
        let (scheme, rest) = match e.split_once("://") {
            Some((s, rest)) => (
                match s.to_ascii_lowercase().as_str() {
                    "http" => Some("http"),
                    "https" => Some("https"),
                    "*" => None,
                    _ => return Err(bad("the scheme must be http, https or *")),
                },
                rest,
            ),
            None => (None, e),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.contains(['?', '#']) || authority.contains('@') {
            return Err(bad("it may not have a query, fragment or user"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            addr.parse::<Ipv6Addr>()
                .map_err(|_| bad("the bracketed host is not an IPv6 address"))?;
            (addr.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            None => None,
            Some("*") => Some(None),
            Some(p) => Some(Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad("the port must be 1 to 65535 or *"))?,
            )),
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_host_name(suffix) {
                return Err(bad("the part after *. is not a host name"));
            }
            HostPattern::Suffix(format!(".{suffix}"))
        } else if host.parse::<IpAddr>().is_ok() || valid_host_name(&host) {
            HostPattern::Exact(host)
        } else {
            return Err(bad("the host is not a name, an address or a *. wildcard"));
        };
        Ok(Self {
            scheme,
            host,
            port,
            path: path.to_string(),
        })
    }

    /// Does a request to `scheme://host:port/path` fall under this entry?
    /// `host` lowercase, IPv6 without brackets; `port` explicit or the
    /// scheme's default.
    pub fn matches(&self, scheme: &str, host: &str, port: u16, path: &str) -> bool {
        if let Some(s) = self.scheme
            && s != scheme
        {
            return false;
        }
        let host_ok = match &self.host {
            HostPattern::Any => true,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            HostPattern::Exact(h) => h == host,
        };
        let port_ok = match self.port {
            Some(None) => true,
            Some(Some(p)) => p == port,
            None => default_port(scheme) == Some(port),
        };
        host_ok && port_ok && path_under(path, &self.path)
    }
}

/// The default port of `http` and `https`.
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `path` is `prefix` or below it (segment-wise unless the prefix ends in `/`).
fn path_under(path: &str, prefix: &str) -> bool {
    let path = if path.is_empty() { "/" } else { path };
    let path = path.split(['?', '#']).next().unwrap_or(path);
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn valid_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// An address range, `ADDR/BITS` (a bare address: that address only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, GrantError> {
        let bad = || GrantError::Cidr(s.to_string());
        let (a, bits) = match s.trim().split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(bad());
        }
        Ok(Self { addr, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Why an address is no place for a guest's request unless its version
/// names it with `--allow-private`; `None` for a public address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("unique-local (private)")
            } else if seg[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if seg[0] == 0x0064 && seg[1] == 0xff9b {
                // NAT64: the IPv4 address it embeds decides.
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                v4_reason(Ipv4Addr::new(a, b, c, d))
            } else if seg[0] == 0x2002 {
                // 6to4: likewise.
                let [a, b] = seg[1].to_be_bytes();
                let [c, d] = seg[2].to_be_bytes();
                v4_reason(Ipv4Addr::new(a, b, c, d))
            } else if seg[0..6] == [0, 0, 0, 0, 0, 0] {
                // IPv4-compatible (deprecated) addresses.
                Some("IPv4-compatible")
            } else {
                None
            }
        }
    }
}

fn v4_reason(v4: Ipv4Addr) -> Option<&'static str> {
    let o = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if o[0] == 0 {
        Some("unspecified")
    } else if v4.is_link_local() {
        Some("link-local (the cloud metadata address among them)")
    } else if v4.is_private() {
        Some("private")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("shared (carrier-grade NAT)")
    } else if o[0] >= 224 {
        Some("multicast or reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else if o[0] == 198 && (o[1] == 18 || o[1] == 19) {
        Some("benchmarking")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> OutboundRule {
        OutboundRule::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn allowlist_entries_parse_and_match() {
        let r = rule("https://api.example.com");
        assert!(r.matches("https", "api.example.com", 443, "/v1/x"));
        assert!(!r.matches("http", "api.example.com", 80, "/"));
        assert!(!r.matches("https", "api.example.com", 8443, "/"));
        assert!(!r.matches("https", "evil.com", 443, "/"));

        let r = rule("*.example.com:8443/v1");
        assert!(r.matches("https", "a.example.com", 8443, "/v1"));
        assert!(r.matches("http", "b.a.example.com", 8443, "/v1/users?x=1"));
        assert!(!r.matches("https", "a.example.com", 8443, "/v10"));
        assert!(!r.matches("https", "example.com", 8443, "/v1"));
        assert!(!r.matches("https", "badexample.com", 8443, "/v1"));

        let r = rule("http://[::1]:*");
        assert!(r.matches("http", "::1", 9, "/"));
        let r = rule("*");
        assert!(r.matches("https", "anything", 1, "/x"));
        let r = rule("HTTPS://Api.Example.com/v1/");
        assert!(r.matches("https", "api.example.com", 443, "/v1/"));
        assert!(!r.matches("https", "api.example.com", 443, "/v1"));
    }

    #[test]
    fn bad_entries_name_what_is_wrong() {
        for bad in [
            "",
            "ftp://x.com",
            "https://x.com:0",
            "https://x.com:99999",
            "https://u@x.com",
            "https://x.com/a?b",
            "https://exa mple.com",
            "https://*x.com",
            "https://[::1",
        ] {
            let e = OutboundRule::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("--allow-outbound"), "{e}");
        }
    }

    #[test]
    fn private_and_special_addresses_are_named() {
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("fd00::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
            ("100.64.0.1", "carrier-grade"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let got = forbidden_reason(ip).unwrap_or_else(|| panic!("{ip} allowed"));
            assert!(got.contains(why), "{ip}: {got}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "1.1.1.1"] {
            assert_eq!(forbidden_reason(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn cidr_ranges_contain_their_addresses() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let c = Cidr::parse("127.0.0.1").unwrap();
        assert!(c.contains("127.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.contains("127.0.0.2".parse().unwrap()));
        let c = Cidr::parse("fd00::/8").unwrap();
        assert!(c.contains("fd12::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "x", "::/129", "10.0.0.0/"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grants_validate_every_entry() {
        let mut g = Grants {
            allow_outbound: vec!["https://ok.com".into()],
            allow_private: vec!["10.0.0.0/8".into()],
            allow_call: vec!["b".into()],
            secrets: vec!["API_KEY".into()],
            ..Grants::default()
        };
        g.config.insert("region".into(), "eu".into());
        assert_eq!(g.validate(), Ok(()));
        g.secrets.push("region".into());
        assert!(matches!(
            g.validate(),
            Err(GrantError::SecretShadowsConfig(_))
        ));
        g.secrets.pop();
        g.allow_call.push("Bad Name".into());
        assert!(matches!(g.validate(), Err(GrantError::Call(_))));
    }
}
