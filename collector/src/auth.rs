//! Who may talk to the collector: a shared bearer token and TLS (optionally mutual).
//!
//! Both services carry the same check because an agent's token must not be weaker than an
//! admin's: anyone who can ingest can plant fake resets, and anyone who can query learns which
//! connections exist. The token travels as `authorization: Bearer <token>` and is compared in
//! constant time. TLS keeps it secret on the wire; `--client-ca` additionally demands a client
//! certificate signed by that CA (mTLS), for sites that hand out certificates rather than tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The metadata key the token travels in.
pub const AUTHORIZATION: &str = "authorization";

/// Problems with the authentication settings, found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A certificate or key file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file it was meant to be (`certificate`, `key`, `client CA`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token is empty or has characters a header cannot carry.
    #[error("the token must be 1 to 4096 visible ASCII characters without spaces")]
    BadToken,
}

/// Checks that a token can travel in an HTTP header and is not empty.
pub fn check_token(token: &str) -> Result<(), AuthError> {
    let ok = !token.is_empty() && token.len() <= 4096 && token.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadToken)
    }
}

/// The `authorization` header value for a token.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Whether an `authorization` header value carries exactly `expected`. Constant time in the
/// token's content, so the comparison leaks at most its length.
pub fn check_bearer(expected: &[u8], header: Option<&[u8]>) -> Result<(), &'static str> {
    let header = header.ok_or("missing authorization: Bearer <token> (set --token / RSTSCOPE_TOKEN)")?;
    let presented = header.strip_prefix(b"Bearer ").ok_or("the authorization header is not 'Bearer <token>'")?;
    let same_length = presented.len() == expected.len();
    let difference = presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if same_length && difference == 0 {
        Ok(())
    } else {
        Err("the token is wrong")
    }
}

/// A tonic interceptor that admits a request only with the right bearer token; it admits
/// everything when no token is configured.
#[derive(Clone, Default)]
pub struct TokenCheck {
    expected: Option<Arc<[u8]>>,
}

impl TokenCheck {
    /// Requires `token` when it is `Some`.
    pub fn new(token: Option<&str>) -> Self {
        TokenCheck { expected: token.map(|t| Arc::from(t.as_bytes())) }
    }

    /// The same check on a request's HTTP headers (for calls served outside an interceptor).
    pub fn check_headers(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        if self.expected.is_none() {
            return Ok(());
        }
        self.check(&MetadataMap::from_headers(headers.clone()))
    }

    fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.expected else { return Ok(()) };
        let header = metadata.get(AUTHORIZATION).map(|v| v.as_bytes());
        check_bearer(expected, header).map_err(Status::unauthenticated)
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// A client-side interceptor that adds `authorization: Bearer <token>` to every request, or
/// nothing without a token.
#[derive(Clone, Debug, Default)]
pub struct AddToken {
    header: Option<AsciiMetadataValue>,
}

impl AddToken {
    /// Adds `token` when it is `Some`; refuses a token a header cannot carry.
    pub fn new(token: Option<&str>) -> Result<Self, AuthError> {
        let header = match token {
            Some(token) => {
                check_token(token)?;
                Some(AsciiMetadataValue::try_from(bearer(token)).map_err(|_| AuthError::BadToken)?)
            }
            None => None,
        };
        Ok(AddToken { header })
    }
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert(AUTHORIZATION, header.clone());
        }
        Ok(request)
    }
}

/// Where the server's TLS material lives.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain of the collector.
    pub cert: PathBuf,
    /// PEM private key of the collector.
    pub key: PathBuf,
    /// PEM CA that client certificates must chain to; `None`: no client certificates asked.
    pub client_ca: Option<PathBuf>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::Read { what, path: path.to_path_buf(), source })
}

/// Reads the files into a tonic server TLS configuration (rustls). The PEM contents are parsed
/// when the server starts, which reports malformed files.
pub fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig, AuthError> {
    let identity = Identity::from_pem(read("certificate", &files.cert)?, read("key", &files.key)?);
    let mut config = ServerTlsConfig::new().identity(identity).timeout(std::time::Duration::from_secs(10));
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("client CA", ca)?));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_must_match_exactly() {
        assert!(check_bearer(b"s3cret", Some(b"Bearer s3cret")).is_ok());
        assert!(check_bearer(b"s3cret", Some(b"Bearer s3cre")).is_err());
        assert!(check_bearer(b"s3cret", Some(b"Bearer s3cret2")).is_err());
        assert!(check_bearer(b"s3cret", Some(b"bearer s3cret")).is_err());
        assert!(check_bearer(b"s3cret", Some(b"s3cret")).is_err());
        assert!(check_bearer(b"s3cret", None).is_err());
    }

    #[test]
    fn tokens_must_fit_a_header() {
        assert!(check_token("abc-123_XYZ").is_ok());
        assert!(check_token("").is_err());
        assert!(check_token("with space").is_err());
        assert!(check_token("tab\there").is_err());
    }
}
