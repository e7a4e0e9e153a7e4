//! The ring's data plane on the wire (`proto/proto/collective.proto` describes
//! it): one TCP connection per ring link, optionally TLS, a protobuf
//! handshake, then fixed little-endian frame headers, each followed by its raw
//! payload. A chunk's payload is read from the socket straight into a pooled
//! buffer, and written from the caller's buffer or the buffer the sum went
//! into, so the only copies on the wire path are the kernel's (and rustls's,
//! with TLS).

use super::error::CollectiveError;
use super::layout::{BufPool, Pooled};
use prost::Message;
use rlhf_proto::auth::{TlsFiles, MAX_CHUNK_MESSAGE};
use rlhf_proto::v1::{ring_status, RingHello, RingStatus};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Largest handshake or status frame.
pub(crate) const MAX_HANDSHAKE: usize = 4096;
/// Bytes of a data frame header.
pub(crate) const HEADER_BYTES: usize = 40;
/// What the listener sends once it has taken the end frame and every chunk before it.
pub(crate) const END_ACK: u8 = 1;

const KIND_CHUNK: u32 = 0;
const KIND_END: u32 = 1;

/// A connection: plain TCP or TLS over it, either side.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub(crate) type BoxIo = Box<dyn Io>;

/// A chunk of an all-reduce as it arrives from the left neighbour, in a
/// pooled buffer the ring reduces into and forwards.
pub(crate) struct Chunk {
    pub op: u64,
    pub step: u32,
    pub offset: u64,
    pub total_len: u64,
    /// Little-endian f32 elements.
    pub data: Pooled,
}

/// One data frame read off a connection.
pub(crate) enum Frame {
    Chunk(Chunk),
    End,
}

fn header(
    kind: u32,
    op: u64,
    step: u32,
    offset: u64,
    total_len: u64,
    len: usize,
) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&step.to_le_bytes());
    h[8..16].copy_from_slice(&op.to_le_bytes());
    h[16..24].copy_from_slice(&offset.to_le_bytes());
    h[24..32].copy_from_slice(&total_len.to_le_bytes());
    h[32..36].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// The header of a chunk frame of `len` payload bytes.
pub(crate) fn chunk_header(
    op: u64,
    step: u32,
    offset: u64,
    total_len: u64,
    len: usize,
) -> [u8; HEADER_BYTES] {
    header(KIND_CHUNK, op, step, offset, total_len, len)
}

/// Write the end-of-generation frame and flush.
pub(crate) async fn write_end<W: AsyncWrite + Unpin + ?Sized>(w: &mut W) -> std::io::Result<()> {
    w.write_all(&header(KIND_END, 0, 0, 0, 0, 0)).await?;
    w.flush().await
}

/// Why reading a frame failed: the connection, or what came over it.
pub(crate) enum ReadError {
    Io(std::io::Error),
    Protocol(String),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Read one data frame; the payload goes from the socket into a buffer of `pool`.
pub(crate) async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    pool: &BufPool,
) -> Result<Frame, ReadError> {
    let mut h = [0u8; HEADER_BYTES];
    r.read_exact(&mut h).await?;
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    let (kind, len) = (u32_at(0), u32_at(32) as usize);
    match kind {
        KIND_END if len == 0 => return Ok(Frame::End),
        KIND_CHUNK => {}
        _ => {
            return Err(ReadError::Protocol(format!(
                "frame of kind {kind} with {len} bytes"
            )))
        }
    }
    if len > MAX_CHUNK_MESSAGE {
        return Err(ReadError::Protocol(format!(
            "a chunk of {len} bytes (at most {MAX_CHUNK_MESSAGE})"
        )));
    }
    let mut buf = pool.take(len);
    // Into the spare capacity: no zeroing, no intermediate buffer.
    while buf.vec().len() < len {
        let want = (len - buf.vec().len()) as u64;
        if (&mut *r).take(want).read_buf(buf.vec()).await? == 0 {
            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(Frame::Chunk(Chunk {
        step: u32_at(4),
        op: u64_at(8),
        offset: u64_at(16),
        total_len: u64_at(24),
        data: buf,
    }))
}

/// Write a length-prefixed protobuf message (handshake and status frames).
pub(crate) async fn write_message<W: AsyncWrite + Unpin + ?Sized, M: Message>(
    w: &mut W,
    m: &M,
) -> std::io::Result<()> {
    let body = m.encode_to_vec();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await
}

/// Read a length-prefixed protobuf message of at most [`MAX_HANDSHAKE`] bytes.
pub(crate) async fn read_message<R: AsyncRead + Unpin + ?Sized, M: Message + Default>(
    r: &mut R,
) -> Result<M, ReadError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HANDSHAKE {
        return Err(ReadError::Protocol(format!(
            "a handshake frame of {len} bytes (at most {MAX_HANDSHAKE})"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    M::decode(body.as_slice()).map_err(|e| ReadError::Protocol(format!("bad handshake: {e}")))
}

/// What the dialling side makes of a refusal.
pub(crate) fn refusal(peer: &str, generation: u64, st: &RingStatus) -> CollectiveError {
    let peer = peer.to_string();
    let detail = st.message.clone();
    match st.code() {
        ring_status::Code::Unauthenticated => CollectiveError::Unauthenticated { peer, detail },
        ring_status::Code::GenerationRefused => CollectiveError::GenerationRefused {
            peer,
            generation,
            detail,
        },
        ring_status::Code::BadRequest | ring_status::Code::Ok => {
            CollectiveError::Protocol { peer, detail }
        }
    }
}

/// The handshake's status for a refusal.
pub(crate) fn status(code: ring_status::Code, message: impl Into<String>) -> RingStatus {
    RingStatus {
        code: code as i32,
        message: message.into(),
    }
}

/// Dial `addr`, set TCP_NODELAY, wrap in TLS if configured, and run the
/// handshake. Err on refusal (classified), on connection failure (PeerLost).
pub(crate) async fn dial(
    addr: &str,
    peer: &str,
    tls: Option<&TlsClient>,
    hello: RingHello,
    connect_timeout: std::time::Duration,
) -> Result<BoxIo, CollectiveError> {
    let lost = |detail: String| CollectiveError::PeerLost {
        peer: peer.to_string(),
        detail,
    };
    let generation = hello.generation;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| lost(format!("connecting: {e}")))?;
        tcp.set_nodelay(true)
            .map_err(|e| lost(format!("TCP_NODELAY: {e}")))?;
        let io: BoxIo = match tls {
            None => Box::new(tcp),
            Some(t) => Box::new(
                t.connector
                    .connect(t.name.clone(), tcp)
                    .await
                    .map_err(|e| lost(format!("TLS handshake: {e}")))?,
            ),
        };
        Ok::<_, CollectiveError>(io)
    };
    let mut io = tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| lost(format!("connecting took longer than {connect_timeout:?}")))??;
    write_message(&mut io, &hello)
        .await
        .map_err(|e| lost(format!("sending the handshake: {e}")))?;
    // No timeout: the neighbour may wait for its ring of this generation; the
    // ring's own I/O timeout covers a silent ring.
    let st: RingStatus = match read_message(&mut io).await {
        Ok(st) => st,
        Err(ReadError::Io(e)) => return Err(lost(format!("reading the handshake status: {e}"))),
        Err(ReadError::Protocol(d)) => {
            return Err(CollectiveError::Protocol {
                peer: peer.to_string(),
                detail: d,
            })
        }
    };
    if st.code() != ring_status::Code::Ok {
        return Err(refusal(peer, generation, &st));
    }
    Ok(io)
}

/// A client's TLS set-up for one peer.
pub(crate) struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

fn tls_err(e: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Config(format!("TLS: {e}"))
}

fn read_file(what: &str, p: &std::path::Path) -> Result<Vec<u8>, CollectiveError> {
    std::fs::read(p)
        .map_err(|e| CollectiveError::Config(format!("reading TLS {what} {}: {e}", p.display())))
}

fn certs(what: &str, p: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, CollectiveError> {
    let pem = read_file(what, p)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(format!("{}: {e}", p.display())))?;
    if certs.is_empty() {
        return Err(tls_err(format!("no certificate in {}", p.display())));
    }
    Ok(certs)
}

fn key(p: &std::path::Path) -> Result<PrivateKeyDer<'static>, CollectiveError> {
    PrivateKeyDer::from_pem_slice(&read_file("key", p)?)
        .map_err(|e| tls_err(format!("{}: {e}", p.display())))
}

fn roots(p: &std::path::Path) -> Result<rustls::RootCertStore, CollectiveError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("CA", p)? {
        roots.add(c).map_err(tls_err)?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listener's TLS: its certificate, and client certificates required when
/// a CA is given (mutual TLS).
pub(crate) fn tls_acceptor(tls: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, CollectiveError> {
    let (Some(cert), Some(key_path)) = (&tls.cert, &tls.key) else {
        return Err(tls_err("a TLS server needs both --tls-cert and --tls-key"));
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let builder = match &tls.ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(tls_err)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder
        .with_single_cert(certs("certificate", cert)?, key(key_path)?)
        .map_err(tls_err)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// The dialling side's TLS for `addr` ("host:port"): the CA to trust, our
/// certificate for mutual TLS, and the name checked (tls.domain or the host).
pub(crate) fn tls_client(tls: &TlsFiles, addr: &str) -> Result<TlsClient, CollectiveError> {
    let Some(ca) = &tls.ca else {
        return Err(tls_err(
            "the collective needs --tls-ca to check its neighbours' certificates",
        ));
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(roots(ca)?);
    let cfg = match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(certs("certificate", c)?, key(k)?)
            .map_err(tls_err)?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(tls_err("mutual TLS needs both --tls-cert and --tls-key")),
    };
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = tls.domain.clone().unwrap_or_else(|| host.to_string());
    let name = ServerName::try_from(name.clone())
        .map_err(|e| tls_err(format!("server name {name:?}: {e}")))?;
    Ok(TlsClient {
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        name,
    })
}
