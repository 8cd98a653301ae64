//! Host identity: the envoy's Ed25519 host key and the certificate that carries it.
//!
//! Each envoy has one Ed25519 key, created on first start and kept in its state
//! directory as `host.key` (PKCS#8 DER, mode 0600). Peers name each other by the
//! public half ([`PeerKey`], text `ed25519:<64 lowercase hex>`), never by hostname or
//! IP: the TLS layer (`tls.rs`) checks the key during the handshake.
//!
//! The certificate is a wrapper, not a credential: self-signed, regenerated at every
//! start (`VALIDITY`), and it *claims* its key again as a SAN DNS name
//! `<32 hex>.<32 hex>.key.vigo` (two labels because a DNS label holds at most 63
//! octets, RFC 1035 §2.3.4). The verifier checks that claim against the key the
//! certificate actually carries, so a certificate that says one thing and holds
//! another is refused with a clear reason instead of being trusted for either.
//!
//! Creating the key file: a temp file opened `O_CREAT|O_EXCL` with mode 0600, written,
//! fsynced, then *hard-linked* to `host.key` and the directory fsynced. A link, unlike
//! a rename, never replaces an existing key: if another process created `host.key`
//! first, we load its key instead of silently changing this host's identity.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// File name of the host key inside the state directory.
pub const HOST_KEY_FILE: &str = "host.key";

/// How long a certificate from [`HostKey::certificate`] is valid. Certificates are
/// regenerated at every daemon start, so this only bounds how long a daemon may run
/// without a restart before peers start refusing it.
pub const CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// How far back a fresh certificate's `not_before` is set, so that a peer whose
/// clock runs a little behind ours still accepts it.
pub const CERT_BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The DNS suffix of the SAN by which a certificate claims its key.
pub const KEY_NAME_SUFFIX: &str = ".key.vigo";

/// Largest host key file we read (a PKCS#8 Ed25519 key is 83..=85 bytes).
const HOST_KEY_FILE_BYTES_MAX: u64 = 4096;

/// Mode bits that must be clear on `host.key`: no access at all for group or others.
const HOST_KEY_MODE_FORBIDDEN: u32 = 0o077;

/// An Ed25519 public key: the identity of an envoy.
///
/// Text form (`Display`, `Debug`, `FromStr`): `ed25519:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey(pub [u8; 32]);

const PEER_KEY_PREFIX: &str = "ed25519:";

impl PeerKey {
    /// The SAN DNS name by which a certificate claims this key:
    /// `<first 32 hex>.<last 32 hex>.key.vigo`.
    pub fn claim_name(&self) -> String {
        let hex = hex::encode(self.0);
        format!("{}.{}{KEY_NAME_SUFFIX}", &hex[..32], &hex[32..])
    }

    /// Parses a name made by [`PeerKey::claim_name`]. `None` when `name` is not a
    /// key claim at all (no `.key.vigo` suffix); `Some(Err)` when it is one but
    /// malformed.
    pub fn from_claim_name(name: &str) -> Option<Result<PeerKey, ParsePeerKeyError>> {
        let labels = name.strip_suffix(KEY_NAME_SUFFIX)?;
        let Some((first, second)) = labels.split_once('.') else {
            return Some(Err(ParsePeerKeyError::Malformed));
        };
        if first.len() != 32 || second.len() != 32 {
            return Some(Err(ParsePeerKeyError::Malformed));
        }
        Some(parse_hex_key(&format!("{first}{second}")))
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PEER_KEY_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a text is not a [`PeerKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParsePeerKeyError {
    #[error("expected \"ed25519:\" followed by 64 lowercase hex digits")]
    Malformed,
}

impl FromStr for PeerKey {
    type Err = ParsePeerKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix(PEER_KEY_PREFIX)
            .ok_or(ParsePeerKeyError::Malformed)?;
        parse_hex_key(hex)
    }
}

/// 64 lowercase hex digits to a key. Uppercase is refused so that every key has
/// exactly one text form (keys are compared and logged as text by people).
fn parse_hex_key(hex: &str) -> Result<PeerKey, ParsePeerKeyError> {
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ParsePeerKeyError::Malformed);
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex, &mut key).map_err(|_| ParsePeerKeyError::Malformed)?;
    Ok(PeerKey(key))
}

/// This envoy's Ed25519 host key (private). `Debug` shows only the public key.
pub struct HostKey {
    /// The PKCS#8 document, exactly as stored in `host.key`.
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl HostKey {
    /// Loads `<state_dir>/host.key` (PKCS#8 DER), or creates it when absent (mode 0600;
    /// temp file, fsync, link, directory fsync: see the module comment).
    /// Creates `state_dir` with mode 0700 if it is missing.
    ///
    /// Refuses, with an error naming the file, a key file that grants group or others
    /// any access, that is not a regular file, or that does not parse as an Ed25519
    /// PKCS#8 key. It never overwrites an existing file.
    pub fn load_or_create(state_dir: &Path) -> Result<HostKey> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
        let path = state_dir.join(HOST_KEY_FILE);
        match load(&path) {
            Ok(key) => return Ok(key),
            Err(LoadError::Absent) => {}
            Err(LoadError::Refused(e)) => return Err(e),
        }
        let key = HostKey::generate()?;
        match publish(state_dir, &path, &key.pkcs8)? {
            Published::Created => Ok(key),
            // Another process created the key between our look and our link: its key
            // is this host's identity now.
            Published::Exists => match load(&path) {
                Ok(key) => Ok(key),
                Err(LoadError::Absent) => bail!("{} vanished while being created", path.display()),
                Err(LoadError::Refused(e)) => Err(e),
            },
        }
    }

    /// A fresh key in memory only (tests, tools).
    pub fn generate() -> Result<HostKey> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| {
            anyhow::anyhow!("cannot generate an Ed25519 key: system random source failed")
        })?;
        HostKey::from_pkcs8(doc.as_ref().to_vec())
            .context("ring produced an unreadable Ed25519 key")
    }

    /// Parses a PKCS#8 Ed25519 private key (v1 or v2; a v2 document's public key is
    /// checked against the private key).
    pub fn from_pkcs8(pkcs8: Vec<u8>) -> Result<HostKey> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|e| anyhow::anyhow!("not an Ed25519 PKCS#8 private key ({e})"))?;
        Ok(HostKey { pkcs8, pair })
    }

    /// The public key: this envoy's identity.
    pub fn public(&self) -> PeerKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PeerKey(key)
    }

    /// A fresh self-signed certificate carrying this key and claiming it, valid from
    /// now − `CERT_BACKDATE` to now + `CERT_VALIDITY`.
    pub fn certificate(&self) -> Result<CertificateDer<'static>> {
        let now = SystemTime::now();
        self.certificate_with(now - CERT_BACKDATE, now + CERT_VALIDITY, self.public())
    }

    /// A self-signed certificate carrying this key with an explicit validity window
    /// and an explicit *claimed* key (the SAN). Meant for tests that need expired,
    /// not-yet-valid or lying certificates; [`HostKey::certificate`] is the real one.
    pub fn certificate_with(
        &self,
        not_before: SystemTime,
        not_after: SystemTime,
        claimed: PeerKey,
    ) -> Result<CertificateDer<'static>> {
        let signer = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(self.pkcs8.as_slice()),
            &rcgen::PKCS_ED25519,
        )
        .context("rcgen cannot use the host key")?;
        let mut params = rcgen::CertificateParams::new(vec![claimed.claim_name()])
            .context("cannot build certificate parameters")?;
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + Duration::from_secs(cert_time_s(not_before)?);
        params.not_after = epoch + Duration::from_secs(cert_time_s(not_after)?);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "vigo envoy");
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .self_signed(&signer)
            .context("cannot sign the host certificate")?;
        Ok(cert.der().clone())
    }

    /// The private key for rustls (PKCS#8).
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }
}

/// A certificate time as whole seconds since the epoch. rcgen takes
/// `time::OffsetDateTime`; callers build it as `rcgen::date_time_ymd(1970, 1, 1)`
/// plus these seconds, which avoids a direct dependency on the `time` crate.
/// X.509 times have one-second resolution, so sub-seconds are dropped.
fn cert_time_s(t: SystemTime) -> Result<u64> {
    let since_epoch = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| anyhow::anyhow!("certificate time {t:?} is before 1970"))?;
    // GeneralizedTime ends with year 9999 (9999-12-31T23:59:59Z).
    const YEAR_9999_END_S: u64 = 253_402_300_799;
    if since_epoch.as_secs() > YEAR_9999_END_S {
        bail!("certificate time {t:?} is after year 9999");
    }
    Ok(since_epoch.as_secs())
}

enum LoadError {
    Absent,
    Refused(anyhow::Error),
}

/// Reads and checks an existing key file. The mode is checked on the opened file
/// (`fstat`), so what is checked is what is read.
fn load(path: &Path) -> Result<HostKey, LoadError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LoadError::Absent),
        Err(e) => {
            return Err(LoadError::Refused(
                anyhow::Error::new(e).context(format!("cannot open host key {}", path.display())),
            ));
        }
    };
    let refuse =
        |why: String| LoadError::Refused(anyhow::anyhow!("host key {}: {why}", path.display()));
    let meta = file
        .metadata()
        .map_err(|e| refuse(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & HOST_KEY_MODE_FORBIDDEN != 0 {
        return Err(refuse(format!(
            "mode {mode:04o} lets group or others access the private key; \
             run `chmod 600 {}` if it was never exposed, else remove it to create a new identity",
            path.display()
        )));
    }
    if meta.len() > HOST_KEY_FILE_BYTES_MAX {
        return Err(refuse(format!(
            "{} bytes, larger than any Ed25519 PKCS#8 key ({HOST_KEY_FILE_BYTES_MAX} max)",
            meta.len()
        )));
    }
    let mut pkcs8 = Vec::with_capacity(meta.len() as usize);
    file.take(HOST_KEY_FILE_BYTES_MAX + 1)
        .read_to_end(&mut pkcs8)
        .map_err(|e| refuse(format!("cannot read: {e}")))?;
    HostKey::from_pkcs8(pkcs8).map_err(|e| refuse(format!("{e:#}")))
}

enum Published {
    Created,
    Exists,
}

/// Durably creates `path` holding `pkcs8` without ever replacing an existing file.
fn publish(dir: &Path, path: &Path, pkcs8: &[u8]) -> Result<Published> {
    let tmp: PathBuf = dir.join(format!(".{HOST_KEY_FILE}.tmp-{}", std::process::id()));
    // A leftover from a crashed process that had our PID: never a live key.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale {}", tmp.display())),
    }
    let result = (|| -> Result<Published> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(pkcs8)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot fsync {}", tmp.display()))?;
        drop(file);
        let published = match fs::hard_link(&tmp, path) {
            Ok(()) => Published::Created,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Published::Exists,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
        };
        Ok(published)
    })();
    // The temp name must not outlive this call whatever happened above.
    let _ = fs::remove_file(&tmp);
    let published = result?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(published)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_key_text_round_trip() {
        let key = PeerKey([0xab; 32]);
        let text = key.to_string();
        assert_eq!(text, format!("ed25519:{}", "ab".repeat(32)));
        assert_eq!(format!("{key:?}"), text);
        assert_eq!(text.parse::<PeerKey>(), Ok(key));
    }

    #[test]
    fn peer_key_refuses_other_forms() {
        let hex = "ab".repeat(32);
        for bad in [
            hex.clone(), // no prefix
            format!("ed25519:{}", hex.to_uppercase()),
            format!("ed25519:{}", &hex[..62]),   // short
            format!("ed25519:{hex}00"),          // long
            format!("ed25519:{}zz", &hex[..62]), // not hex
            format!("ED25519:{hex}"),
        ] {
            assert_eq!(
                bad.parse::<PeerKey>(),
                Err(ParsePeerKeyError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn claim_name_round_trip() {
        let key = PeerKey(core::array::from_fn(|i| i as u8));
        let name = key.claim_name();
        assert!(name.split('.').all(|label| label.len() <= 63), "{name}");
        assert_eq!(PeerKey::from_claim_name(&name), Some(Ok(key)));
        assert_eq!(PeerKey::from_claim_name("envoy.vigo"), None);
        assert_eq!(
            PeerKey::from_claim_name(&format!("{}.key.vigo", "ab".repeat(32))),
            Some(Err(ParsePeerKeyError::Malformed))
        );
    }

    #[test]
    fn host_key_pkcs8_round_trip() {
        let key = HostKey::generate().unwrap();
        let again = HostKey::from_pkcs8(key.pkcs8.clone()).unwrap();
        assert_eq!(key.public(), again.public());
        assert!(HostKey::from_pkcs8(vec![0x30, 0x03, 0x02, 0x01, 0x00]).is_err());
    }
}
