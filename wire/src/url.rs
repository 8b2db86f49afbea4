//! Broker and result-backend URLs as Celery and Dagster write them.
//!
//! Accepted brokers: `amqp://`, `pyamqp://`, `amqps://` (`//` at the end = vhost `/`, kombu's default
//! credentials `guest`/`guest`), `redis://[:password@]host[:port][/db]`, `rediss://`. Backends: `rpc://`,
//! `redis://…`, `rediss://…`, `disabled://`. [`redact`] hides passwords before anything is logged.

use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("invalid URL {url}: {reason}")]
    Invalid { url: String, reason: String },
    #[error("unsupported scheme {scheme:?} in {url} (supported: {supported})")]
    Unsupported {
        scheme: String,
        url: String,
        supported: &'static str,
    },
}

/// A broker location.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerUrl {
    /// A normalized `amqp(s)://user:pass@host:port/<percent-encoded vhost>` URI for lapin.
    Amqp { uri: String },
    /// A `redis(s)://` URL and its database number (used in kombu's pub/sub channel prefix `/<db>.`).
    Redis { url: String, db: i64 },
}

/// A result-backend location.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendUrl {
    Rpc,
    Redis { url: String, db: i64 },
    Disabled,
}

/// Parses a Celery broker URL.
pub fn parse_broker(s: &str) -> Result<BrokerUrl, UrlError> {
    let url = parse(s)?;
    match url.scheme() {
        "amqp" | "pyamqp" | "librabbitmq" | "amqps" => {
            let scheme = if url.scheme() == "amqps" {
                "amqps"
            } else {
                "amqp"
            };
            let user = if url.username().is_empty() {
                "guest".to_string()
            } else {
                url.username().to_string()
            };
            let pass = url.password().unwrap_or("guest");
            let host = url.host_str().unwrap_or("localhost");
            let port = url
                .port()
                .unwrap_or(if scheme == "amqps" { 5671 } else { 5672 });
            // kombu: everything after the first '/' is the vhost; empty means '/'.
            let raw_path = url.path().strip_prefix('/').unwrap_or("");
            let vhost = percent_decode_str(raw_path).decode_utf8_lossy().to_string();
            let vhost = if vhost.is_empty() {
                "/".to_string()
            } else {
                vhost
            };
            let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
            Ok(BrokerUrl::Amqp {
                uri: format!(
                    "{scheme}://{user}:{pass}@{host}:{port}/{}{query}",
                    utf8_percent_encode(&vhost, NON_ALPHANUMERIC)
                ),
            })
        }
        "redis" | "rediss" => Ok(BrokerUrl::Redis {
            db: redis_db(&url, s)?,
            url: s.to_string(),
        }),
        other => Err(UrlError::Unsupported {
            scheme: other.into(),
            url: redact(s),
            supported: "amqp://, pyamqp://, amqps://, redis://, rediss://",
        }),
    }
}

/// Where a broker is, as `celery inspect stats` reports it under `broker` (kombu's `Connection.info()`),
/// the password left out.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerInfo {
    pub hostname: String,
    pub port: u16,
    /// `None` where the URL names no user (Redis).
    pub userid: Option<String>,
    /// AMQP: the vhost (`/` by default); Redis: the database number as written (`/` when none).
    pub virtual_host: String,
    pub ssl: bool,
}

impl BrokerUrl {
    /// The broker's location for `inspect stats` (default ports as kombu's: 5672, 5671 with TLS, 6379).
    pub fn describe(&self) -> BrokerInfo {
        let (raw, default_port) = match self {
            BrokerUrl::Amqp { uri } => (uri.as_str(), 5672),
            BrokerUrl::Redis { url, .. } => (url.as_str(), 6379),
        };
        let Ok(url) = Url::parse(raw) else {
            return BrokerInfo {
                hostname: "localhost".into(),
                port: default_port,
                userid: None,
                virtual_host: "/".into(),
                ssl: false,
            };
        };
        let ssl = matches!(url.scheme(), "amqps" | "rediss");
        let port = url.port().unwrap_or(match url.scheme() {
            "amqps" => 5671,
            _ => default_port,
        });
        let path = percent_decode_str(url.path().trim_start_matches('/'))
            .decode_utf8_lossy()
            .to_string();
        BrokerInfo {
            hostname: url.host_str().unwrap_or("localhost").to_string(),
            port,
            userid: (!url.username().is_empty()).then(|| url.username().to_string()),
            virtual_host: if path.is_empty() { "/".into() } else { path },
            ssl,
        }
    }
}

/// Parses a Celery `result_backend` URL.
pub fn parse_backend(s: &str) -> Result<BackendUrl, UrlError> {
    if s.is_empty() || s == "disabled" || s.starts_with("disabled://") {
        return Ok(BackendUrl::Disabled);
    }
    if s == "rpc" || s.starts_with("rpc://") {
        return Ok(BackendUrl::Rpc);
    }
    let url = parse(s)?;
    match url.scheme() {
        "redis" | "rediss" => Ok(BackendUrl::Redis {
            db: redis_db(&url, s)?,
            url: s.to_string(),
        }),
        other => Err(UrlError::Unsupported {
            scheme: other.into(),
            url: redact(s),
            supported: "rpc://, redis://, rediss://, disabled://",
        }),
    }
}

fn parse(s: &str) -> Result<Url, UrlError> {
    Url::parse(s).map_err(|e| UrlError::Invalid {
        url: redact(s),
        reason: e.to_string(),
    })
}

fn redis_db(url: &Url, original: &str) -> Result<i64, UrlError> {
    let path = url.path().trim_matches('/');
    if path.is_empty() {
        return Ok(0);
    }
    path.parse().map_err(|_| UrlError::Invalid {
        url: redact(original),
        reason: format!("redis database {path:?} is not a number"),
    })
}

/// The URL with any password replaced by `***`, safe to log.
pub fn redact(s: &str) -> String {
    match Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => match s.find('@') {
            Some(at) => match s.find("://") {
                Some(p) if p < at => format!("{}://***{}", &s[..p], &s[at..]),
                _ => "<unparseable url>".into(),
            },
            None => s.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_amqp_urls_normalize() {
        assert_eq!(
            parse_broker("pyamqp://guest@localhost:5672//").unwrap(),
            BrokerUrl::Amqp {
                uri: "amqp://guest:guest@localhost:5672/%2F".into()
            }
        );
        assert_eq!(
            parse_broker("amqp://u:p@rabbit/dagster").unwrap(),
            BrokerUrl::Amqp {
                uri: "amqp://u:p@rabbit:5672/dagster".into()
            }
        );
    }

    #[test]
    fn broker_info_names_the_broker_without_its_password() {
        let info = |s: &str| parse_broker(s).map(|b| b.describe()).unwrap();
        assert_eq!(
            info("amqps://u:secret@rabbit/dagster"),
            BrokerInfo {
                hostname: "rabbit".into(),
                port: 5671,
                userid: Some("u".into()),
                virtual_host: "dagster".into(),
                ssl: true
            }
        );
        let default = info("pyamqp://localhost//");
        assert_eq!(
            (
                default.port,
                default.userid.as_deref(),
                default.virtual_host.as_str()
            ),
            (5672, Some("guest"), "/")
        );
        assert!(!default.ssl);
        let redis = info("rediss://:secret@cache/3");
        assert_eq!(
            (
                redis.port,
                redis.userid,
                redis.virtual_host.as_str(),
                redis.ssl
            ),
            (6379, None, "3", true)
        );
        assert_eq!(info("redis://localhost:6380").virtual_host, "/");
    }

    #[test]
    fn redis_urls_carry_db() {
        assert_eq!(
            parse_broker("redis://:secret@127.0.0.1:6379/5").unwrap(),
            BrokerUrl::Redis {
                url: "redis://:secret@127.0.0.1:6379/5".into(),
                db: 5
            }
        );
        assert_eq!(parse_backend("rpc://").unwrap(), BackendUrl::Rpc);
        assert!(matches!(
            parse_backend("redis://h/x"),
            Err(UrlError::Invalid { .. })
        ));
        assert!(matches!(
            parse_broker("sqs://x"),
            Err(UrlError::Unsupported { .. })
        ));
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact("redis://:secret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert!(!redact("amqp://user:hunter2@host//").contains("hunter2"));
    }
}
