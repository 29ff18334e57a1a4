//! Cluster CA and node identities. Links are mutual TLS: each side presents a
//! certificate signed by the cluster CA and requires the same of its peer. `tern dev`
//! makes a throwaway CA; `tern certs` writes a CA and node certificates as PEM files,
//! which `tern serve` reads (`[cluster] ca_cert`, `cert`, `key`).
//!
//! A node certificate names its node: besides the DNS name [`NODE_NAME`] (which every
//! client verifies), it carries one URI SAN `tern-node:<node id>` ([`NODE_ID_URI_PREFIX`]).
//! The CA signs that, so a peer's node id is read from its verified certificate
//! ([`node_id_of`]), never taken from what the peer says: a link whose `Hello` names
//! another node is refused (`link.rs`). A certificate issued before node ids were
//! carried (no such SAN) is refused too; issue it again with `tern certs`.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;

use crate::ClusterError;

/// The name every node certificate carries and every client verifies.
pub const NODE_NAME: &str = "tern-node";
/// ALPN protocol of inter-node links.
pub const ALPN: &[u8] = b"tern/1";
/// How a node certificate names its node: the URI SAN `tern-node:<node id>`.
pub const NODE_ID_URI_PREFIX: &str = "tern-node:";
/// Longest node id a certificate carries.
pub const NODE_ID_BYTES_MAX: usize = 128;

/// Whether `id` can be a node id in a certificate: 1 to [`NODE_ID_BYTES_MAX`] bytes of
/// `A-Z a-z 0-9 - . _ ~` (what a URI carries unescaped, so the SAN is the id itself).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= NODE_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Why a certificate names no node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIdError {
    /// Not a certificate webpki can parse.
    Unparsable,
    /// No `tern-node:` URI SAN (a certificate from before node ids), or one whose id
    /// is not a valid node id.
    Missing,
    /// More than one `tern-node:` URI SAN: the certificate names no single node.
    Ambiguous,
}

impl std::fmt::Display for NodeIdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeIdError::Unparsable => "the certificate cannot be parsed",
            NodeIdError::Missing => {
                "the certificate names no node (issued before node ids: run `tern certs` again)"
            }
            NodeIdError::Ambiguous => "the certificate names more than one node",
        })
    }
}

/// The node id a (verified) node certificate names.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<String, NodeIdError> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|_| NodeIdError::Unparsable)?;
    let mut ids = parsed
        .valid_uri_names()
        .filter_map(|uri| uri.strip_prefix(NODE_ID_URI_PREFIX));
    let id = ids.next().ok_or(NodeIdError::Missing)?;
    if ids.next().is_some() {
        return Err(NodeIdError::Ambiguous);
    }
    if !valid_node_id(id) {
        return Err(NodeIdError::Missing);
    }
    Ok(id.to_string())
}

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

    /// A certificate for the node `node_id` (see [`valid_node_id`]), signed by this CA.
    /// Every path that makes node certificates comes here, so every one names its node.
    pub fn issue(&self, node_id: &str) -> Result<NodeIdentity, ClusterError> {
        if !valid_node_id(node_id) {
            return Err(ClusterError::Tls(format!(
                "node id {node_id:?} must be 1 to {NODE_ID_BYTES_MAX} of A-Z a-z 0-9 - . _ ~"
            )));
        }
        let mut params = CertificateParams::new(vec![NODE_NAME.to_string()]).map_err(tls_err)?;
        let uri = format!("{NODE_ID_URI_PREFIX}{node_id}");
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().map_err(tls_err)?));
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

    /// The node this identity's certificate names.
    pub fn node_id(&self) -> Result<String, ClusterError> {
        node_id_of(&self.cert).map_err(tls_err)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A node certificate names exactly its node, read back from the DER (and from PEM);
    /// ids a URI cannot carry unescaped, or too long, are not issued; a certificate
    /// without the SAN (the CA's own here) names no node.
    #[test]
    fn a_node_certificate_names_its_node() {
        let ca = ClusterCa::generate().unwrap();
        let identity = ca.issue("us-east-1").unwrap();
        assert_eq!(identity.node_id().unwrap(), "us-east-1");
        let (cert, key) = identity.to_pem();
        let (ca_pem, _) = ca.to_pem();
        let loaded =
            NodeIdentity::from_pem(cert.as_bytes(), key.as_bytes(), ca_pem.as_bytes()).unwrap();
        assert_eq!(loaded.node_id().unwrap(), "us-east-1");
        for bad in [
            "",
            "a b",
            "a/b",
            "a:b",
            "ü",
            &"x".repeat(NODE_ID_BYTES_MAX + 1),
        ] {
            assert!(ca.issue(bad).is_err(), "{bad:?}");
        }
        assert!(ca.issue(&"x".repeat(NODE_ID_BYTES_MAX)).is_ok());
        assert_eq!(node_id_of(&identity.ca), Err(NodeIdError::Missing));
        assert_eq!(
            node_id_of(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])),
            Err(NodeIdError::Unparsable)
        );
    }
}
