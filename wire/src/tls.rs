//! TLS to the broker and the Redis result backend, configured with Celery's names.
//!
//! * `amqps://` and `rediss://` URLs turn TLS on; the server certificate is always verified (against the
//!   CA named below, otherwise the system's roots) and its name must match the URL's host.
//! * The CA and client certificate are named as Celery names them: the `broker_use_ssl` /
//!   `redis_backend_use_ssl` settings (`ca_certs`, `cert_reqs`, `certfile`, `keyfile`, or redis-py's
//!   `ssl_ca_certs`, `ssl_cert_reqs`, `ssl_certfile`, `ssl_keyfile`), or the same `ssl_*` keys in the URL's
//!   query as kombu and redis-py read them (`rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem`).
//!   URL values win over settings.
//! * `ssl_cert_reqs` may be `required` (default; `CERT_REQUIRED`, `2`) or `optional` (`CERT_OPTIONAL`,
//!   `1`, verified all the same when a certificate is presented, which TLS servers always do).
//!   `none` (`CERT_NONE`, `0`) is refused: celeriac does not talk to a broker it cannot authenticate.

use std::path::PathBuf;

use serde_json::{Map, Value};

/// Why a TLS setting cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TlsError {
    #[error("ssl_cert_reqs={0} is not supported: celeriac always verifies the server certificate (use required, and ssl_ca_certs for a private CA)")]
    VerificationOff(String),
    #[error("invalid ssl_cert_reqs value {0:?} (expected required, optional or none)")]
    BadCertReqs(String),
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0} is set without {1}: a client certificate needs both")]
    HalfIdentity(&'static str, &'static str),
    #[error("invalid TLS setting {key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// TLS options for one connection (all optional: the defaults verify against the system's roots).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsOptions {
    /// PEM file of the CA certificate(s) to trust instead of the system's roots.
    pub ca_certs: Option<PathBuf>,
    /// PEM client certificate and key (mutual TLS).
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
}

/// The loaded PEM material.
#[derive(Clone, Default, PartialEq)]
pub struct TlsMaterial {
    pub ca_pem: Option<Vec<u8>>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca_pem.as_ref().map(Vec::len))
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("client_key", &self.client_key_pem.is_some())
            .finish()
    }
}

fn key<'a>(m: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names
        .iter()
        .find_map(|n| m.get(*n))
        .filter(|v| !v.is_null())
}

fn check_cert_reqs(v: &str) -> Result<(), TlsError> {
    let t = v.trim().trim_start_matches("ssl.").to_ascii_lowercase();
    match t.as_str() {
        "required" | "cert_required" | "2" | "optional" | "cert_optional" | "1" => Ok(()),
        "none" | "cert_none" | "0" => Err(TlsError::VerificationOff(v.to_string())),
        _ => Err(TlsError::BadCertReqs(v.to_string())),
    }
}

impl TlsOptions {
    /// Reads Celery's `broker_use_ssl` / `redis_backend_use_ssl` mapping. `true` (kombu's "TLS with
    /// defaults") gives the defaults.
    pub fn from_setting(v: &Value) -> Result<TlsOptions, TlsError> {
        let m = match v {
            Value::Null | Value::Bool(_) => return Ok(TlsOptions::default()),
            Value::Object(m) => m,
            other => {
                return Err(TlsError::Invalid {
                    key: "broker_use_ssl".into(),
                    reason: format!("expected a mapping or true, got {other}"),
                })
            }
        };
        let path = |names: &[&str]| -> Result<Option<PathBuf>, TlsError> {
            match key(m, names) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(PathBuf::from(s))),
                Some(other) => Err(TlsError::Invalid {
                    key: names[0].into(),
                    reason: format!("expected a path, got {other}"),
                }),
            }
        };
        if let Some(r) = key(m, &["cert_reqs", "ssl_cert_reqs"]) {
            let text = match r {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            check_cert_reqs(&text)?;
        }
        Ok(TlsOptions {
            ca_certs: path(&["ca_certs", "ssl_ca_certs"])?,
            certfile: path(&["certfile", "ssl_certfile"])?,
            keyfile: path(&["keyfile", "ssl_keyfile"])?,
        })
    }

    /// Splits the `ssl_*` query parameters (kombu / redis-py names) off `url`: returns the URL without
    /// them and these options laid over `self`.
    pub fn from_url_query(&self, url: &str) -> Result<(String, TlsOptions), TlsError> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), self.clone()));
        };
        let (query, fragment) = match query.split_once('#') {
            Some((q, f)) => (q, Some(f)),
            None => (query, None),
        };
        let mut out = self.clone();
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned();
            match k {
                "ssl_ca_certs" | "ca_certs" => out.ca_certs = Some(PathBuf::from(value)),
                "ssl_certfile" | "certfile" => out.certfile = Some(PathBuf::from(value)),
                "ssl_keyfile" | "keyfile" => out.keyfile = Some(PathBuf::from(value)),
                "ssl_cert_reqs" | "cert_reqs" => check_cert_reqs(&value)?,
                _ => kept.push(pair),
            }
        }
        let mut rebuilt = base.to_string();
        if !kept.is_empty() {
            rebuilt.push('?');
            rebuilt.push_str(&kept.join("&"));
        }
        if let Some(f) = fragment {
            rebuilt.push('#');
            rebuilt.push_str(f);
        }
        Ok((rebuilt, out))
    }

    /// Whether anything differs from the system defaults.
    pub fn is_default(&self) -> bool {
        *self == TlsOptions::default()
    }

    /// Reads the PEM files.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let read = |what: &'static str, p: &Option<PathBuf>| -> Result<Option<Vec<u8>>, TlsError> {
            p.as_ref()
                .map(|p| {
                    std::fs::read(p).map_err(|e| TlsError::Read {
                        what,
                        path: p.display().to_string(),
                        reason: e.to_string(),
                    })
                })
                .transpose()
        };
        match (&self.certfile, &self.keyfile) {
            (Some(_), None) => return Err(TlsError::HalfIdentity("ssl_certfile", "ssl_keyfile")),
            (None, Some(_)) => return Err(TlsError::HalfIdentity("ssl_keyfile", "ssl_certfile")),
            _ => {}
        }
        Ok(TlsMaterial {
            ca_pem: read("ssl_ca_certs", &self.ca_certs)?,
            client_cert_pem: read("ssl_certfile", &self.certfile)?,
            client_key_pem: read("ssl_keyfile", &self.keyfile)?,
        })
    }
}

impl TlsMaterial {
    pub fn is_empty(&self) -> bool {
        self.ca_pem.is_none() && self.client_cert_pem.is_none()
    }
}

/// rustls needs one process-wide crypto provider; the build has two (ring for kube, aws-lc-rs from
/// lapin's TLS stack), so pick ring explicitly, as the Kubernetes client does.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A Redis client for `url` trusting `tls`'s CA (and presenting its client certificate).
pub(crate) fn redis_client(url: &str, tls: &TlsMaterial) -> redis::RedisResult<redis::Client> {
    if url.starts_with("rediss") {
        install_crypto_provider();
    }
    if tls.is_empty() || !url.starts_with("rediss") {
        return redis::Client::open(url);
    }
    let client_tls = match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        _ => None,
    };
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert: tls.ca_pem.clone(),
        },
    )
}

/// lapin's TLS settings from `tls`.
pub(crate) fn amqp_config(tls: &TlsMaterial) -> lapin::tcp::OwnedTLSConfig {
    lapin::tcp::OwnedTLSConfig {
        identity: match (&tls.client_cert_pem, &tls.client_key_pem) {
            (Some(pem), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: pem.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
        cert_chain: tls
            .ca_pem
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    }
}

/// Adds a hint to a connection error that is about the server's certificate.
pub fn explain(reason: String) -> String {
    let r = reason.to_ascii_lowercase();
    if r.contains("certificate") || r.contains("unknownissuer") || r.contains("handshake") {
        format!("{reason} (TLS: the server's certificate is not trusted or does not match the host; name its CA with ssl_ca_certs in the URL or broker_use_ssl.ca_certs)")
    } else {
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_parameters_are_taken_off_the_url() {
        let (url, o) = TlsOptions::default()
            .from_url_query("rediss://:pw@h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=%2Ftmp%2Fca.pem&protocol=resp2")
            .expect("valid");
        assert_eq!(url, "rediss://:pw@h:6380/0?protocol=resp2");
        assert_eq!(o.ca_certs, Some(PathBuf::from("/tmp/ca.pem")));
        let (url, _) = TlsOptions::default()
            .from_url_query("amqps://u:p@h:5671/v?ssl_cert_reqs=CERT_REQUIRED")
            .expect("valid");
        assert_eq!(url, "amqps://u:p@h:5671/v");
    }

    #[test]
    fn verification_cannot_be_turned_off() {
        for v in ["none", "CERT_NONE", "0", "ssl.CERT_NONE"] {
            let e = TlsOptions::default()
                .from_url_query(&format!("rediss://h/0?ssl_cert_reqs={v}"))
                .expect_err("refused");
            assert!(e.to_string().contains("always verifies"), "{e}");
        }
        assert!(TlsOptions::from_setting(&json!({"cert_reqs": 0})).is_err());
        assert!(
            TlsOptions::from_setting(&json!({"cert_reqs": "CERT_REQUIRED", "ca_certs": "/x"}))
                .is_ok()
        );
        assert!(TlsOptions::from_setting(&json!({"ssl_cert_reqs": "bogus"})).is_err());
    }

    #[test]
    fn celery_setting_names() {
        let o = TlsOptions::from_setting(
            &json!({"ssl_ca_certs": "/ca", "ssl_certfile": "/c", "ssl_keyfile": "/k"}),
        )
        .expect("valid");
        assert_eq!(o.ca_certs, Some(PathBuf::from("/ca")));
        assert_eq!(o.keyfile, Some(PathBuf::from("/k")));
        assert!(TlsOptions::from_setting(&json!(true))
            .expect("true")
            .is_default());
        let half = TlsOptions {
            certfile: Some("/c".into()),
            ..Default::default()
        };
        assert!(matches!(half.load(), Err(TlsError::HalfIdentity(..))));
        let missing = TlsOptions {
            ca_certs: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = missing.load().expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
