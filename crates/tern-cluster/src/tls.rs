//! Cluster CA and node identities. Links are mutual TLS: each side presents a
//! certificate signed by the cluster CA and requires the same of its peer. `tern dev`
//! makes a throwaway CA; `tern certs` writes a CA and node certificates as PEM files,
//! which `tern serve` reads (`[cluster] ca_cert`, `cert`, `key`).

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;

use crate::ClusterError;

/// The name every node certificate carries and every client verifies.
pub const NODE_NAME: &str = "tern-node";
/// ALPN protocol of inter-node links.
pub const ALPN: &[u8] = b"tern/1";

fn tls_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Tls(e.to_string())
}

/// A cluster certificate authority.
pub struct ClusterCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A node's certificate chain and key, and the CA it trusts.
#[derive(Clone)]
pub struct NodeIdentity {
    pub cert: CertificateDer<'static>,
    pub key_der: Vec<u8>,
    pub ca: CertificateDer<'static>,
}

impl ClusterCa {
    /// A new, throwaway CA.
    pub fn generate() -> Result<ClusterCa, ClusterError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tern cluster CA");
        let key = KeyPair::generate().map_err(tls_err)?;
        Ok(ClusterCa {
            issuer: CertifiedIssuer::self_signed(params, key).map_err(tls_err)?,
        })
    }

    /// The CA certificate and its private key, PEM.
    pub fn to_pem(&self) -> (String, String) {
        (self.issuer.pem(), self.issuer.key().serialize_pem())
    }

    /// A certificate for one node, signed by this CA.
    pub fn issue(&self) -> Result<NodeIdentity, ClusterError> {
        let params = CertificateParams::new(vec![NODE_NAME.to_string()]).map_err(tls_err)?;
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(tls_err)?;
        Ok(NodeIdentity {
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
            ca: self.issuer.der().clone(),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl NodeIdentity {
    /// The node certificate and key, PEM (the CA certificate is [`ClusterCa::to_pem`]).
    pub fn to_pem(&self) -> (String, String) {
        (
            pem_block("CERTIFICATE", &self.cert),
            pem_block("PRIVATE KEY", &self.key_der),
        )
    }

    /// Loads a node identity from PEM: its certificate, its PKCS#8 key, the CA.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        ca_pem: &[u8],
    ) -> Result<NodeIdentity, ClusterError> {
        use rustls::pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(cert_pem).map_err(tls_err)?;
        let ca = CertificateDer::from_pem_slice(ca_pem).map_err(tls_err)?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem).map_err(tls_err)?;
        Ok(NodeIdentity {
            cert,
            key_der: key.secret_pkcs8_der().to_vec(),
            ca,
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, ClusterError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(tls_err)?;
        Ok(Arc::new(roots))
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Server side: TLS 1.3, our certificate, peers must present a CA-signed one.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, ClusterError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(tls_err)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key())
            .map_err(tls_err)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side: TLS 1.3, trusts only the cluster CA, presents our certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, ClusterError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(vec![self.cert.clone()], self.key())
            .map_err(tls_err)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
