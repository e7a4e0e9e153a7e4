//! What every RPC carries and checks: a shared bearer token, optional TLS, and
//! bounded message sizes. Used by the coordinator service and by the workers'
//! collective service alike.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};

/// The environment variable a token may come from (`rlhf run` sets it for its children).
pub const TOKEN_ENV: &str = "RLHF_TOKEN";

/// Largest coordinator message (stage arguments, status JSON, metrics).
pub const MAX_CONTROL_MESSAGE: usize = 4 << 20;
/// Largest collective message: one chunk of an all-reduce plus its header.
pub const MAX_CHUNK_MESSAGE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: pass --token-file FILE or set {TOKEN_ENV}")]
    Missing,
    #[error("reading token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token {origin} is empty or shorter than 16 characters")]
    TooShort { origin: String },
    #[error(
        "token {origin} has characters that cannot go in an HTTP header (use printable ASCII)"
    )]
    NotAscii { origin: String },
    #[error("reading TLS {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("bad address {addr}: {reason}")]
    Address { addr: String, reason: String },
}

/// The shared secret. Debug never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    pub fn new(s: &str, origin: &str) -> Result<Token, AuthError> {
        let s = s.trim();
        if s.len() < 16 {
            return Err(AuthError::TooShort {
                origin: origin.into(),
            });
        }
        if !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(AuthError::NotAscii {
                origin: origin.into(),
            });
        }
        Ok(Token(s.to_string()))
    }

    /// A fresh random token (128 bits, hex).
    pub fn generate() -> Token {
        let bytes: [u8; 16] = rand::random();
        Token(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// From `file` if given, else from $RLHF_TOKEN.
    pub fn load(file: Option<&Path>) -> Result<Token, AuthError> {
        match file {
            Some(p) => {
                let s = std::fs::read_to_string(p).map_err(|source| AuthError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Token::new(&s, &format!("in {}", p.display()))
            }
            None => match std::env::var(TOKEN_ENV) {
                Ok(s) => Token::new(&s, &format!("in ${TOKEN_ENV}")),
                Err(_) => Err(AuthError::Missing),
            },
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn header(&self) -> MetadataValue<tonic::metadata::Ascii> {
        // Checked printable ASCII in `new`; `generate` is hex.
        format!("Bearer {}", self.0)
            .parse()
            .expect("token is ASCII")
    }

    /// Whether an `authorization` header value carries this token (constant time).
    pub fn matches_header(&self, value: &[u8]) -> bool {
        ct_eq(value, format!("Bearer {}", self.0).as_bytes())
    }

    /// Whether `candidate` is this token (constant time in the contents; the
    /// length is not secret).
    pub fn matches(&self, candidate: &str) -> bool {
        ct_eq(candidate.as_bytes(), self.0.as_bytes())
    }
}

/// Byte equality that looks at every byte whatever the first difference.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side: refuse any request without the token with UNAUTHENTICATED.
#[derive(Clone, Debug)]
pub struct RequireToken(pub Token);

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get("authorization") {
            Some(v) if self.0.matches_header(v.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated(
                "no token: this service needs `authorization: Bearer <token>`",
            )),
        }
    }
}

/// Client side: put the token on every request.
#[derive(Clone, Debug)]
pub struct AttachToken(pub Token);

impl Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.header());
        Ok(req)
    }
}

/// PEM files for TLS, and the command-line flags that give them (the same
/// on every subcommand). A server needs cert+key (and ca to require client
/// certificates); a client needs ca (and cert+key for mutual TLS).
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate: this process's identity (a server's; a client's for mutual TLS).
    #[arg(long = "tls-cert")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key")]
    pub key: Option<PathBuf>,
    /// PEM CA: the servers a client trusts; a server requires client certificates it signed.
    #[arg(long = "tls-ca")]
    pub ca: Option<PathBuf>,
    /// Clients: the name the server's certificate is checked against (default: the address's host).
    #[arg(long = "tls-domain")]
    pub domain: Option<String>,
}

fn read_pem(what: &'static str, p: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(p).map_err(|source| AuthError::TlsFile {
        what,
        path: p.to_path_buf(),
        source,
    })
}

impl TlsFiles {
    pub fn is_enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    pub fn server_config(&self) -> Result<ServerTlsConfig, AuthError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(AuthError::Tls(
                "a TLS server needs both --tls-cert and --tls-key".into(),
            ));
        };
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(
            read_pem("certificate", cert)?,
            read_pem("key", key)?,
        ));
        if let Some(ca) = &self.ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read_pem("CA", ca)?));
        }
        Ok(cfg)
    }

    pub fn client_config(&self, host: &str) -> Result<ClientTlsConfig, AuthError> {
        let mut cfg =
            ClientTlsConfig::new().domain_name(self.domain.clone().unwrap_or(host.into()));
        if let Some(ca) = &self.ca {
            cfg = cfg.ca_certificate(Certificate::from_pem(read_pem("CA", ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                cfg = cfg.identity(Identity::from_pem(
                    read_pem("certificate", c)?,
                    read_pem("key", k)?,
                ))
            }
            (None, None) => {}
            _ => {
                return Err(AuthError::Tls(
                    "mutual TLS needs both --tls-cert and --tls-key".into(),
                ))
            }
        }
        Ok(cfg)
    }
}

/// An endpoint for `addr` ("host:port" or a URL): http:// without TLS,
/// https:// with it, with connect and keep-alive timeouts so that a dead peer
/// is an error, not a hang.
pub fn endpoint(
    addr: &str,
    tls: &TlsFiles,
    connect_timeout: Duration,
) -> Result<Endpoint, AuthError> {
    let bad = |reason: String| AuthError::Address {
        addr: addr.into(),
        reason,
    };
    let hostport = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let scheme = if tls.is_enabled() { "https" } else { "http" };
    let url = format!("{scheme}://{hostport}");
    let mut ep = Endpoint::from_shared(url)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20));
    if tls.is_enabled() {
        let host = hostport
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(hostport);
        ep = ep
            .tls_config(tls.client_config(host)?)
            .map_err(|e| AuthError::Tls(e.to_string()))?;
    }
    Ok(ep)
}

/// Connect lazily (the first call dials): errors surface per call.
pub fn channel(
    addr: &str,
    tls: &TlsFiles,
    connect_timeout: Duration,
) -> Result<Channel, AuthError> {
    Ok(endpoint(addr, tls, connect_timeout)?.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks_length_and_charset_and_never_prints() {
        assert!(matches!(
            Token::new("short", "x"),
            Err(AuthError::TooShort { .. })
        ));
        assert!(matches!(
            Token::new("0123456789abcdef\u{e9}", "x"),
            Err(AuthError::NotAscii { .. })
        ));
        let t = Token::new("  0123456789abcdef\n", "x").unwrap();
        assert_eq!(t.as_str(), "0123456789abcdef");
        assert_eq!(format!("{t:?}"), "Token(..)");
        assert!(t.matches_header(b"Bearer 0123456789abcdef"));
        assert!(!t.matches_header(b"Bearer 0123456789abcdeF"));
        assert!(!t.matches_header(b"Bearer 0123456789abcde"));
        assert!(t.matches("0123456789abcdef"));
        assert!(!t.matches("0123456789abcdeF"));
        assert!(!t.matches("0123456789abcdef0"));
        assert!(!t.matches(""));
        let g = Token::generate();
        assert_eq!(g.as_str().len(), 32);
        assert_ne!(g, Token::generate());
    }

    #[test]
    fn interceptor_refuses_missing_and_wrong_tokens() {
        let t = Token::generate();
        let mut check = RequireToken(t.clone());
        let err = check.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut wrong = AttachToken(Token::generate());
        let err = check
            .call(wrong.call(Request::new(())).unwrap())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut right = AttachToken(t);
        assert!(check.call(right.call(Request::new(())).unwrap()).is_ok());
    }
}
