//! Client TLS (`[server.tls]`): `https://` and `wss://` on the client port, with rustls
//! (TLS 1.2 and 1.3, ring; no OpenSSL). The certificate chain and key are PEM files; a
//! reload (SIGHUP) reads them again and new connections get the new certificate, while
//! connections already open keep theirs. A reload that fails keeps the old one.
//!
//! [`throwaway`] makes a CA and a certificate for given names, for `tern dev --tls` and
//! `tern certs --edge-names`: a real chain that clients trust through the CA file
//! (`NODE_EXTRA_CA_CERTS` for Node, `SSL_CERT_FILE` for Python).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("certificate and key: {0}")]
    Config(String),
    #[error("generating a certificate: {0}")]
    Generate(String),
}

/// The client port's TLS: the files it came from and the acceptor new connections use.
pub struct ClientTls {
    cert: PathBuf,
    key: PathBuf,
    acceptor: RwLock<TlsAcceptor>,
}

impl ClientTls {
    /// Loads the certificate chain and key (PEM; PKCS#8, PKCS#1 or SEC1 key).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ClientTls>, TlsError> {
        let acceptor = acceptor(cert, key)?;
        Ok(Arc::new(ClientTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            acceptor: RwLock::new(acceptor),
        }))
    }

    /// Reads the files again; new connections get what they hold. On error nothing
    /// changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = acceptor(&self.cert, &self.key)?;
        *self
            .acceptor
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let pem_error = |path: &Path, reason: String| TlsError::Pem {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(cert, "no certificate in it".into()));
    }
    let key_der =
        PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| pem_error(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // HTTP/1.1 only: the edge serves HTTP/1.1 (and WebSocket upgrades over it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A throwaway CA and a certificate it signed for `names` (DNS names or IP addresses),
/// as PEM: `(ca certificate, certificate, key)`.
pub fn throwaway(names: &[String]) -> Result<(String, String, String), TlsError> {
    let err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tern throwaway CA");
    let issuer = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("tern", String::as_str),
    );
    for name in names {
        params.subject_alt_names.push(match name.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into().map_err(err)?),
        });
    }
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    Ok((issuer.pem(), cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway certificate loads, a reload picks up new files, and a reload of
    /// broken files keeps the working certificate.
    #[test]
    fn load_and_reload() {
        let dir = std::env::temp_dir().join(format!("tern-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("edge.pem"), dir.join("edge.key"));
        let (_, pem, key_pem) = throwaway(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        std::fs::write(&cert, pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        let tls = ClientTls::load(&cert, &key).unwrap();
        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Pem { .. })));
        let (_, pem, key_pem) = throwaway(&["localhost".into()]).unwrap();
        std::fs::write(&cert, pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        tls.reload().unwrap();
        assert!(ClientTls::load(&dir.join("missing.pem"), &key).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
