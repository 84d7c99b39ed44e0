//! TLS over rustls (ring provider) for both servers.
//!
//! PostgreSQL follows libpq's `sslmode`: `disable` no TLS; `prefer` (the default) TLS when the
//! server offers it; `require` TLS without checking the certificate; `verify-ca` the chain must
//! lead to a trusted CA; `verify-full` that and the host name. `sslrootcert=/path/ca.pem` names
//! the trusted CAs (and, as in libpq, makes `prefer` and `require` check the chain too);
//! without it, or with `sslrootcert=system`, the operating system's CA store is used.
//! tokio-postgres parses only `disable`, `prefer` and `require` and no `sslrootcert`, so
//! [`split_pg_tls`] takes both out of the connection string first.
//!
//! Redis uses the redis crate's own rustls support (`rediss://`), with `[redis] ca_file` as
//! the trusted CAs instead of the system store.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use std::sync::Arc;

/// libpq's `sslmode` values that outboxd supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err(
                "sslmode=allow is not supported (use prefer, or disable for no TLS)".to_string(),
            ),
            other => Err(format!(
                "unknown sslmode {other:?} (expected disable, prefer, require, verify-ca or verify-full)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether to ask for TLS and whether it must get it.
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// The TLS settings of one PostgreSQL connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file of trusted CA certificates, or `system`.
    pub root_cert: Option<String>,
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

impl PgTls {
    fn check(&self) -> Check {
        match (self.mode, &self.root_cert) {
            (SslMode::VerifyFull, _) => Check::ChainAndName,
            (SslMode::VerifyCa, _) => Check::Chain,
            // libpq: a root certificate file makes require (and prefer) verify the chain.
            (SslMode::Prefer | SslMode::Require, Some(_)) => Check::Chain,
            _ => Check::Nothing,
        }
    }

    /// The rustls configuration this connection string asks for. Reads the `sslrootcert`
    /// file (or the system store) when certificates are checked.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let check = self.check();
        if check == Check::Nothing {
            let verifier = AnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            };
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth());
        }
        let roots = match self.root_cert.as_deref() {
            None | Some("system") => system_roots()?,
            Some(path) => roots_from_file(path).map_err(|e| format!("sslrootcert {e}"))?,
        };
        if check == Check::ChainAndName {
            return Ok(builder.with_root_certificates(roots).with_no_client_auth());
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("TLS setup: {e}"))?;
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly { inner }))
            .with_no_client_auth())
    }
}

/// Splits a PostgreSQL connection string (`postgres://...?sslmode=...&sslrootcert=...` or
/// `host=... sslmode=... sslrootcert=...`) into the string tokio-postgres is given, without
/// `sslmode` and `sslrootcert`, and those two settings. The error never quotes the string
/// (it may hold a password).
pub fn split_pg_tls(conn: &str) -> Result<(String, PgTls), String> {
    let mut mode = None;
    let mut root_cert = None;
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => mode = Some(SslMode::parse(value)?),
            "sslrootcert" => root_cert = Some(value.to_string()),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(format!(
                    "{key} is not supported (no client certificates or certificate revocation lists in this version)"
                ))
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        match conn.split_once('?') {
            None => conn.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for param in query.split('&') {
                    let (key, value) = param.split_once('=').unwrap_or((param, ""));
                    if !take(&percent_decode(key)?, &percent_decode(value)?)? {
                        kept.push(param);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (key, value) in key_values(conn)? {
            if !take(&key, &value)? {
                kept.push(format!(
                    "{key}='{}'",
                    value.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            }
        }
        kept.join(" ")
    };
    let tls = PgTls {
        mode: mode.unwrap_or(SslMode::Prefer),
        root_cert: root_cert.filter(|r| !r.is_empty()),
    };
    if tls.root_cert.as_deref() == Some("system") && tls.mode != SslMode::VerifyFull {
        return Err(format!(
            "sslrootcert=system needs sslmode=verify-full, not {}",
            tls.mode.name()
        ));
    }
    Ok((rest, tls))
}

/// The `key = value` pairs of a libpq key=value connection string, values unquoted and
/// unescaped as libpq does it.
pub fn key_values(conn: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = conn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            if chars.peek().is_some() {
                return Err("a connection string parameter has no name".to_string());
            }
            return Ok(pairs);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not naming the word: it may be a stray password rather than a parameter name.
            return Err(format!(
                "parameter {} of the connection string has no `=`",
                pairs.len() + 1
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(format!(
                            "connection string parameter {key:?} has an unterminated quoted value"
                        ))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("the connection URL has a bad %-escape")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the connection URL %-decodes to invalid UTF-8".to_string())
}

/// Reads a PEM file of CA certificates into a trust store; the error names the file and
/// what is wrong with it.
pub fn roots_from_file(path: &str) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{path}: cannot read: {e}"))?;
    roots_from_pem(&pem).map_err(|e| format!("{path}: {e}"))
}

fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate file: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string());
    }
    Ok(roots)
}

/// Reads `[redis] ca_file` and checks that it holds CA certificates; returns its PEM text.
pub fn read_ca_file(path: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{path}: cannot read: {e}"))?;
    roots_from_pem(&pem).map_err(|e| format!("{path}: {e}"))?;
    Ok(pem)
}

/// The operating system's CA store (rustls-native-certs: the one the redis crate reads for
/// `rediss://` as well, and where administrators add their own CAs).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!(
            "no CA certificates in the system store{why}; name the CA with sslrootcert=/path/ca.pem"
        ));
    }
    Ok(roots)
}

/// Makes ring rustls's process-wide default, for the TLS the redis crate sets up itself.
/// Harmless when already done.
pub fn install_default_provider() {
    if CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Whether an error (or one of its causes) is a server certificate that failed the check:
/// a configuration problem that retrying will not cure.
pub fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if is_certificate_error_here(e) {
            return true;
        }
        // The redis crate keeps its cause behind an Arc, whose `source` skips the cause itself.
        if let Some(inner) = e.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            if is_certificate_error(inner.as_ref()) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

fn is_certificate_error_here(e: &(dyn std::error::Error + 'static)) -> bool {
    let rustls_error = e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    });
    matches!(
        rustls_error,
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::UnsupportedNameType)
    )
}

/// `prefer`/`require` without `sslrootcert`, as in libpq: encryption, no check of who the
/// server is. The handshake signatures are still verified, so the server holds the key of the
/// certificate it shows.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full webpki check, except that a certificate issued for another name is
/// accepted. webpki checks the chain before the name, so a name error means the chain passed.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(conn: &str) -> (String, PgTls) {
        split_pg_tls(conn).expect("splits")
    }

    #[test]
    fn url_form_loses_the_tls_parameters_and_keeps_the_rest() {
        let (rest, tls) = split(
            "postgres://u:p@h:5/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem",
        );
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some("/etc/ca x.pem"));
        let (rest, tls) = split("postgresql://h/db?sslmode=verify-ca");
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        let (rest, tls) = split("postgres://h/db");
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(
            tls,
            PgTls {
                mode: SslMode::Prefer,
                root_cert: None
            }
        );
    }

    #[test]
    fn key_value_form_loses_the_tls_parameters_and_keeps_the_rest() {
        let (rest, tls) = split(
            "host=h  sslmode = require password='a b\\'c' sslrootcert='/tmp/my ca.pem' dbname=d",
        );
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(tls.root_cert.as_deref(), Some("/tmp/my ca.pem"));
        assert_eq!(rest, "host='h' password='a b\\'c' dbname='d'");
        let config: tokio_postgres::Config = rest.parse().expect("tokio-postgres parses it");
        assert_eq!(config.get_password(), Some("a b'c".as_bytes()));
        assert_eq!(config.get_dbname(), Some("d"));
    }

    #[test]
    fn bad_values_are_refused_without_quoting_the_string() {
        let e = split_pg_tls("postgres://u:secret@h/db?sslmode=allow").expect_err("allow");
        assert!(e.contains("allow") && !e.contains("secret"), "{e}");
        let e = split_pg_tls("host=h password=secret sslmode=verify").expect_err("unknown");
        assert!(e.contains("verify") && !e.contains("secret"), "{e}");
        let e = split_pg_tls("host=h password='secret").expect_err("unterminated");
        assert!(!e.contains("secret"), "{e}");
        let e = split_pg_tls("host=h secret").expect_err("no =");
        assert!(!e.contains("secret") && e.contains("parameter 2"), "{e}");
        let e =
            split_pg_tls("postgres://h/db?sslmode=require&sslrootcert=system").expect_err("weak");
        assert!(e.contains("verify-full"), "{e}");
        assert!(split_pg_tls("postgres://h/db?sslrootcert=%zz").is_err());
        let e = split_pg_tls("host=h sslmode=verify-full sslcert=/c.pem").expect_err("sslcert");
        assert!(e.contains("sslcert is not supported"), "{e}");
    }

    #[test]
    fn root_certificate_makes_require_check_the_chain_as_libpq_does() {
        let tls = |mode, root: Option<&str>| PgTls {
            mode,
            root_cert: root.map(str::to_string),
        };
        assert_eq!(tls(SslMode::Require, None).check(), Check::Nothing);
        assert_eq!(tls(SslMode::Prefer, None).check(), Check::Nothing);
        assert_eq!(tls(SslMode::Require, Some("/ca")).check(), Check::Chain);
        assert_eq!(tls(SslMode::VerifyCa, None).check(), Check::Chain);
        assert_eq!(tls(SslMode::VerifyFull, None).check(), Check::ChainAndName);
    }

    #[test]
    fn unreadable_or_empty_ca_files_are_named() {
        let e = tls_with_root("/nonexistent/ca.pem").expect_err("missing");
        assert!(
            e.contains("/nonexistent/ca.pem") && e.contains("cannot read"),
            "{e}"
        );
        let path = std::env::temp_dir().join(format!("outboxd_not_pem_{}", std::process::id()));
        std::fs::write(&path, "not a certificate").expect("write");
        let e = tls_with_root(path.to_str().expect("utf-8")).expect_err("no certificate");
        assert!(e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_file(path);
    }

    fn tls_with_root(path: &str) -> Result<ClientConfig, String> {
        PgTls {
            mode: SslMode::VerifyFull,
            root_cert: Some(path.to_string()),
        }
        .client_config()
    }
}
