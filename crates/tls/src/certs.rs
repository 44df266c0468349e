//! `tandem certs create`: a private CA and one certificate per site.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::TlsError;

/// File name of the CA certificate in the output directory.
pub const CA_CERT: &str = "ca.pem";
/// File name of the CA private key in the output directory.
pub const CA_KEY: &str = "ca.key";
/// Common name of a generated CA, followed by an id from its key.
pub const CA_NAME: &str = "Tandem CA";
/// File name of the witness's certificate in the output directory.
pub const WITNESS_CERT: &str = "witness.pem";
/// File name of the witness's private key in the output directory.
pub const WITNESS_KEY: &str = "witness.key";

const DAY: u64 = 24 * 3600;
/// Site certificates are valid for 10 years.
pub(crate) const SITE_VALIDITY: Duration = Duration::from_secs(10 * 365 * DAY + 3 * DAY);
/// The CA is valid for 20 years.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * DAY + 5 * DAY);
/// Certificates are valid from an hour before their creation, so a peer
/// whose clock is slightly behind accepts them.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Checks that `name` can be a site's certificate name: the configuration's
/// name rule (1-64 characters of `A-Za-z0-9._-`, not starting with `.` or
/// `-`) and a DNS name that TLS accepts as a server name.
pub fn check_site_name(name: &str) -> Result<(), TlsError> {
    let bad = |reason: &str| TlsError::InvalidSiteName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("site names are 1-64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        || name.starts_with(['.', '-'])
    {
        return Err(bad(
            "site names are characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' or '-'",
        ));
    }
    match rustls::pki_types::ServerName::try_from(name) {
        Ok(rustls::pki_types::ServerName::DnsName(_)) => Ok(()),
        Ok(_) => Err(bad(
            "an IP address cannot be a site name (the certificate names the site)",
        )),
        Err(_) => Err(bad(
            "not usable as a TLS server name (each dot-separated part must be 1-63 characters, \
             not start or end with '-', and the last part must not be all digits)",
        )),
    }
}

/// Creates `DIR/ca.pem`, `DIR/ca.key`, for each site `DIR/<site>.pem`,
/// `DIR/<site>.key`, and the witness's `DIR/witness.pem`, `DIR/witness.key`
/// (SAN `DNS:witness`, for TLS server authentication only: it cannot act
/// as a site).
///
/// Keys are written with mode 0600; an existing file is never overwritten
/// (the error names it, and nothing is written). Site certificates are
/// ECDSA P-256 with SAN `DNS:<site>` and CN `<site>`, usable for both TLS
/// server and client authentication, signed by the CA and valid 10 years;
/// the CA is a P-256 `basicConstraints CA` (path length 0) valid 20 years.
/// `DIR` is created if missing. Returns the paths written, CA first.
pub fn create(out: &Path, sites: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    if sites.is_empty() {
        return Err(TlsError::InvalidSiteName {
            name: String::new(),
            reason: "no site names given".to_owned(),
        });
    }
    for (i, site) in sites.iter().enumerate() {
        check_site_name(site)?;
        if sites[..i].contains(site) {
            return Err(TlsError::InvalidSiteName {
                name: site.clone(),
                reason: "given twice".to_owned(),
            });
        }
        if site == "ca" {
            return Err(TlsError::InvalidSiteName {
                name: site.clone(),
                reason: "\"ca\" is reserved for the CA's own files".to_owned(),
            });
        }
        if site == crate::https::WITNESS_NAME {
            return Err(TlsError::InvalidSiteName {
                name: site.clone(),
                reason: "\"witness\" is reserved for the witness's certificate".to_owned(),
            });
        }
    }

    // Plan every file, and refuse before generating or writing anything.
    let mut files: Vec<(PathBuf, bool)> =
        vec![(out.join(CA_CERT), false), (out.join(CA_KEY), true)];
    for site in sites {
        files.push((out.join(format!("{site}.pem")), false));
        files.push((out.join(format!("{site}.key")), true));
    }
    files.push((out.join(WITNESS_CERT), false));
    files.push((out.join(WITNESS_KEY), true));
    for (path, _) in &files {
        if fs::symlink_metadata(path).is_ok() {
            return Err(TlsError::Exists { path: path.clone() });
        }
    }

    let now = now();
    let (ca_params, ca_key) = ca_params(now)?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| TlsError::Generate {
            what: "the CA certificate".to_owned(),
            reason: e.to_string(),
        })?;
    let mut contents = vec![ca_cert.pem(), ca_key.serialize_pem()];
    let issuer = Issuer::new(ca_params, ca_key);
    for site in sites {
        let (cert, key) = site_cert(site, now, &issuer)?;
        contents.push(cert);
        contents.push(key);
    }
    let (cert, key) = crate::https::witness_cert(now, &issuer)?;
    contents.push(cert);
    contents.push(key);

    fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let mut written = Vec::with_capacity(files.len());
    for ((path, secret), text) in files.iter().zip(&contents) {
        if let Err(e) = write_new(path, text.as_bytes(), *secret) {
            // Leave no half-made set behind.
            for done in &written {
                let _ = fs::remove_file(done);
            }
            return Err(e);
        }
        written.push(path.clone());
    }
    Ok(written)
}

/// The current time, as a duration since the Unix epoch.
fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Sets the validity of `params` to `[now - BACKDATE, now + validity]`
/// (rcgen's date type is built from the epoch, so the `time` crate need not
/// be named here).
pub(crate) fn set_validity(params: &mut CertificateParams, now: Duration, validity: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + validity;
}

pub(crate) fn new_key(what: &str) -> Result<KeyPair, TlsError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| TlsError::Generate {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

fn ca_params(now: Duration) -> Result<(CertificateParams, KeyPair), TlsError> {
    let key = new_key("the CA key")?;
    let mut params = CertificateParams::default();
    // Each CA gets a distinct name ("Tandem CA 1a2b3c4d", from its key), so
    // that a certificate from another Tandem CA is reported as an unknown
    // issuer rather than as a bad signature.
    let id: String = params
        .key_identifier(&key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{CA_NAME} {id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, now, CA_VALIDITY);
    Ok((params, key))
}

fn site_cert(
    site: &str,
    now: Duration,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate {
        what: format!("the certificate of site {site:?}"),
        reason: e.to_string(),
    };
    let key = new_key(&format!("the key of site {site:?}"))?;
    let mut params = CertificateParams::new(vec![site.to_owned()]).map_err(generate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, site);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every site is a TLS server (replica) and a TLS client (primary).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, now, SITE_VALIDITY);
    let cert = params.signed_by(&key, issuer).map_err(generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a new file (never replacing one); `secret` files get mode 0600.
fn write_new(path: &Path, data: &[u8], secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            err(e)
        }
    })?;
    file.write_all(data).map_err(err)?;
    file.sync_all().map_err(err)
}
