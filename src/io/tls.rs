//! TLS for `turns:` listeners: rustls with ALPN "stun.turn" and
//! "stun.nat-discovery" (clients without ALPN are accepted too), TLS 1.2 and
//! 1.3, and a certificate that can be replaced while the server runs: new
//! handshakes get the new pair, established connections keep theirs.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol ids of RFC 7443.
pub const ALPN: [&[u8]; 2] = [b"stun.turn", b"stun.nat-discovery"];

/// The current certificate and where it came from.
#[derive(Debug)]
pub struct CertStore {
    certificate: PathBuf,
    private_key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    loaded_mtimes: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a PEM chain and key: parseable, non-empty, and the key
/// belongs to the first certificate.
pub fn load_pair(certificate: &Path, private_key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .map_err(|e| format!("{}: {e}", certificate.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", certificate.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate found", certificate.display()));
    }
    let key = PrivateKeyDer::from_pem_file(private_key).map_err(|e| format!("{}: {e}", private_key.display()))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| format!("{} and {}: {e}", certificate.display(), private_key.display()))
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl CertStore {
    pub fn load(certificate: &Path, private_key: &Path) -> io::Result<Arc<CertStore>> {
        let pair = load_pair(certificate, private_key).map_err(io::Error::other)?;
        Ok(Arc::new(CertStore {
            certificate: certificate.to_owned(),
            private_key: private_key.to_owned(),
            current: RwLock::new(Arc::new(pair)),
            loaded_mtimes: Mutex::new((mtime(certificate), mtime(private_key))),
        }))
    }

    /// Re-reads the files. An unreadable or mismatched pair is refused and
    /// the running certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let mtimes = (mtime(&self.certificate), mtime(&self.private_key));
        let pair = load_pair(&self.certificate, &self.private_key)?;
        if let Ok(mut c) = self.current.write() {
            *c = Arc::new(pair);
        }
        if let Ok(mut m) = self.loaded_mtimes.lock() {
            *m = mtimes;
        }
        Ok(())
    }

    /// Reloads when either file's modification time changed since the last load.
    /// Returns what happened, for the log: `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), String>> {
        let now = (mtime(&self.certificate), mtime(&self.private_key));
        let changed = self.loaded_mtimes.lock().map(|m| *m != now).unwrap_or(false);
        if !changed {
            return None;
        }
        let result = self.reload();
        if result.is_err() {
            // Do not retry the same broken files every poll.
            if let Ok(mut m) = self.loaded_mtimes.lock() {
                *m = now;
            }
        }
        Some(result)
    }

    /// DER of the certificate new handshakes get (for tests and logs).
    pub fn current_certificate(&self) -> Option<CertificateDer<'static>> {
        self.current.read().ok().and_then(|c| c.cert.first().cloned())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }
}

/// The rustls configuration of every TLS listener.
pub fn server_config(store: Arc<CertStore>) -> io::Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
