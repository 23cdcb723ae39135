//! Mutual TLS for every Drover connection (rustls, ring).
//!
//! - [`ca`]: the built-in CA (`droverctl ca init|issue`), rcgen.
//! - [`identity`]: the SPIFFE-style identity a certificate carries.
//! - [`verify`]: the checks on a peer's certificate and the deny list.
//! - [`server`]: the coordinator's listener: handshakes, each connection's
//!   [`server::PeerInfo`] for the handlers.
//! - [`client`]: dialing a coordinator, with TLS or (loopback) without.
//!
//! A daemon names its material with [`TlsFiles`]; [`Reloadable`] holds the
//! config built from them, and `reload` (on SIGHUP) swaps in a new one for
//! new connections, keeping the old one when the new files do not load.

pub mod ca;
pub mod client;
pub mod identity;
pub mod server;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use identity::PeerCert;
use verify::{ClientIdentityVerifier, CoordinatorVerifier, DenyList};

/// Why certificate material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Material { path: PathBuf, reason: String },
    #[error("building the TLS config: {0}")]
    Config(String),
}

/// The PEM files of one daemon or client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Our certificate (and any intermediates after it).
    pub cert: PathBuf,
    /// Its private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The CA certificates peers must chain to.
    pub ca: PathBuf,
    /// Certificates refused although they chain to the CA.
    pub deny_list: Option<PathBuf>,
}

/// Material loaded from [`TlsFiles`], checked to be usable.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    trust_domain: Option<String>,
    deny: DenyList,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn material_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Material {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn pem_certs(what: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material_err(what, e))?;
    if certs.is_empty() {
        return Err(material_err(what, "no CERTIFICATE block"));
    }
    Ok(certs)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material_err(path, e))?;
    if certs.is_empty() {
        return Err(material_err(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

impl TlsFiles {
    fn load(&self) -> Result<Material, TlsError> {
        let chain = read_certs(&self.cert)?;
        // Our own certificate must be a Drover identity too.
        PeerCert::from_der(&chain[0]).map_err(|e| material_err(&self.cert, e))?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| TlsError::File {
            path: self.key.clone(),
            reason: e.to_string(),
        })?;
        let ca = read_certs(&self.ca)?;
        let trust_domain = ca.iter().find_map(|c| identity::ca_trust_domain(c));
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| material_err(&self.ca, e))?;
        }
        let deny = match &self.deny_list {
            None => DenyList::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| TlsError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                DenyList::parse(&text).map_err(|e| material_err(path, e))?
            }
        };
        Ok(Material {
            chain,
            key,
            roots: Arc::new(roots),
            trust_domain,
            deny,
        })
    }

    /// A server config that requires a client certificate of our CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let m = self.load()?;
        let inner = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let verifier = ClientIdentityVerifier {
            inner,
            trust_domain: m.trust_domain,
            deny: m.deny,
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(m.chain, m.key)
            .map_err(|e| material_err(&self.key, e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client config that presents our certificate and accepts only
    /// coordinator certificates of our CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        client_config(self.load()?, &self.key, false)
    }

    /// A client config for an agent dialing its peers: the server may be
    /// an agent (or a coordinator) of our CA.
    pub fn peer_client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        client_config(self.load()?, &self.key, true)
    }

    /// The identity our own certificate carries.
    pub fn own_identity(&self) -> Result<PeerCert, TlsError> {
        let chain = read_certs(&self.cert)?;
        PeerCert::from_der(&chain[0]).map_err(|e| material_err(&self.cert, e))
    }
}

/// A client config from PEM text (drover-fleetsim's thousands of agents).
pub fn client_config_from_pem(
    cert: &str,
    key: &str,
    ca: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let what = Path::new("<memory>");
    let chain = pem_certs(what, cert.as_bytes())?;
    PeerCert::from_der(&chain[0]).map_err(|e| material_err(what, e))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| material_err(what, e))?;
    let ca_certs = pem_certs(what, ca.as_bytes())?;
    let trust_domain = ca_certs.iter().find_map(|c| identity::ca_trust_domain(c));
    let mut roots = RootCertStore::empty();
    for c in ca_certs {
        roots.add(c).map_err(|e| material_err(what, e))?;
    }
    client_config(
        Material {
            chain,
            key,
            roots: Arc::new(roots),
            trust_domain,
            deny: DenyList::default(),
        },
        what,
        false,
    )
}

fn client_config(
    m: Material,
    key_path: &Path,
    accept_agents: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = CoordinatorVerifier {
        roots: m.roots,
        trust_domain: m.trust_domain,
        deny: m.deny,
        algorithms: provider.signature_verification_algorithms,
        accept_agents,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(m.chain, m.key)
        .map_err(|e| material_err(key_path, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A config built from files, replaced as a whole by [`Reloadable::reload`].
pub struct Reloadable<T> {
    /// `None`: built from memory, nothing to reload.
    files: Option<TlsFiles>,
    build: fn(&TlsFiles) -> Result<Arc<T>, TlsError>,
    current: RwLock<Arc<T>>,
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("files", &self.files)
            .finish()
    }
}

/// The server side of mutual TLS.
pub type ServerTls = Reloadable<ServerConfig>;
/// The client side of mutual TLS.
pub type ClientTls = Reloadable<ClientConfig>;

impl Reloadable<ServerConfig> {
    pub fn server(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
        Reloadable::new(files, TlsFiles::server_config)
    }
}

impl Reloadable<ClientConfig> {
    pub fn client(files: TlsFiles) -> Result<Arc<ClientTls>, TlsError> {
        Reloadable::new(files, TlsFiles::client_config)
    }

    /// The client side of an agent dialing its peers (reloaded like the rest).
    pub fn peer_client(files: TlsFiles) -> Result<Arc<ClientTls>, TlsError> {
        Reloadable::new(files, TlsFiles::peer_client_config)
    }

    /// A client config made in memory (never reloaded).
    pub fn fixed(config: Arc<ClientConfig>) -> Arc<ClientTls> {
        Arc::new(Reloadable {
            files: None,
            build: TlsFiles::client_config,
            current: RwLock::new(config),
        })
    }
}

impl<T> Reloadable<T> {
    fn new(
        files: TlsFiles,
        build: fn(&TlsFiles) -> Result<Arc<T>, TlsError>,
    ) -> Result<Arc<Reloadable<T>>, TlsError> {
        let current = RwLock::new(build(&files)?);
        Ok(Arc::new(Reloadable {
            files: Some(files),
            build,
            current,
        }))
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<T> {
        self.current.read().expect("tls config lock").clone()
    }

    /// Re-reads the files; on error the config in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let Some(files) = &self.files else {
            return Ok(());
        };
        let next = (self.build)(files)?;
        *self.current.write().expect("tls config lock") = next;
        Ok(())
    }

    pub fn files(&self) -> Option<&TlsFiles> {
        self.files.as_ref()
    }
}

/// Installs ring as the process-wide rustls provider (for crates that use
/// the default, such as etcd-client). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
