//! Identity: JWT issue and verification, password hashing, and the WebSocket origin check.
//!
//! Tokens are the only source of identity. A valid token for a user the server has never seen is
//! accepted (the user is created on first use), so an existing login system can mint tokens
//! with the shared secret and never call our register endpoint.

use std::path::Path;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use confab_proto::UserRef;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token or password was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials in the request.
    #[error("missing token")]
    Missing,
    /// Signature, format or expiry check failed.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Wrong username or password.
    #[error("invalid username or password")]
    BadCredentials,
    /// The key material could not be loaded.
    #[error("cannot load key: {0}")]
    Key(String),
}

/// The claims confab reads from (and writes into) a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Display name (optional: the user id stands in for it).
    #[serde(default)]
    pub name: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

/// Signs and verifies tokens. Cheap to share: keys are precomputed once.
pub struct TokenKeys {
    encoding: EncodingKey,
    hs256: DecodingKey,
    rs256: Option<DecodingKey>,
    ttl_secs: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("rs256", &self.rs256.is_some())
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// Keys from the shared HS256 secret and, optionally, an RSA public key file for RS256
    /// tokens minted elsewhere.
    pub fn new(
        secret: &[u8],
        rsa_public_pem: Option<&Path>,
        ttl_secs: u64,
    ) -> Result<Self, AuthError> {
        let rs256 = match rsa_public_pem {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|err| AuthError::Key(format!("{}: {err}", path.display())))?;
                Some(
                    DecodingKey::from_rsa_pem(&pem)
                        .map_err(|err| AuthError::Key(err.to_string()))?,
                )
            }
            None => None,
        };
        Ok(TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            hs256: DecodingKey::from_secret(secret),
            rs256,
            ttl_secs,
        })
    }

    /// Mints an HS256 token for `user`, valid for the configured lifetime (or `ttl_secs`).
    pub fn issue(&self, user: &UserRef, ttl_secs: Option<u64>) -> String {
        let claims = Claims {
            sub: user.id.clone(),
            name: user.name.clone(),
            exp: jsonwebtoken::get_current_timestamp() + ttl_secs.unwrap_or(self.ttl_secs),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key cannot fail")
    }

    /// Checks signature and expiry and returns who the token speaks for.
    pub fn verify(&self, token: &str) -> Result<UserRef, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|err| AuthError::Invalid(err.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => &self.hs256,
            Algorithm::RS256 => self
                .rs256
                .as_ref()
                .ok_or_else(|| AuthError::Invalid("RS256 tokens are not configured".into()))?,
            other => {
                return Err(AuthError::Invalid(format!(
                    "algorithm {other:?} not accepted"
                )));
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Identity providers put their own audience in tokens; confab does not check it.
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|err| AuthError::Invalid(err.to_string()))?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > 128 {
            return Err(AuthError::Invalid("sub must be 1 to 128 characters".into()));
        }
        let name = if claims.name.trim().is_empty() {
            claims.sub.clone()
        } else {
            claims.name
        };
        Ok(UserRef {
            id: claims.sub,
            name,
        })
    }
}

/// Hashes a password with Argon2id. Slow by design: call it off the async threads.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail")
        .to_string()
}

/// Checks a password against a stored PHC hash. Slow by design: call it off the async threads.
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// At most one Argon2 computation per core at a time: each takes tens of milliseconds and
/// ~19 MiB, and a flood of logins must not take every core and blocking thread from chat.
static HASHING: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    tokio::sync::Semaphore::new(cores)
});

/// [`hash_password`] off the async threads, within the process-wide hashing limit.
pub async fn hash_password_limited(password: String) -> Option<String> {
    let _permit = HASHING.acquire().await.ok()?;
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .ok()
}

/// [`verify_password`] off the async threads, within the process-wide hashing limit.
pub async fn verify_password_limited(hash: String, password: String) -> bool {
    let Ok(_permit) = HASHING.acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || verify_password(&hash, &password))
        .await
        .unwrap_or(false)
}

/// Decides whether a browser `Origin` may open a WebSocket.
///
/// `allowed` empty means "same origin only": the origin's host must equal the request's `Host`.
/// `*` in the list allows everything. No `Origin` header at all (native clients) is allowed:
/// the origin check protects browsers from cross-site use of their cookies, nothing more.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    if allowed.is_empty() {
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(origin)
            .trim_end_matches('/');
        return host.is_some_and(|host| host.eq_ignore_ascii_case(origin_host));
    }
    let origin = origin.trim_end_matches('/');
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// Reads the JWT secret from `data_dir/jwt_secret`, creating a random one on first start.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) if !secret.trim().is_empty() => return Ok(secret.trim().to_string()),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, &secret)?;
    Ok(secret)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> UserRef {
        UserRef {
            id: "u1".into(),
            name: "ann".into(),
        }
    }

    #[test]
    fn issued_tokens_verify() {
        let keys = TokenKeys::new(b"secret", None, 60).unwrap();
        let token = keys.issue(&user(), None);
        assert_eq!(keys.verify(&token).unwrap(), user());
    }

    #[test]
    fn forged_and_expired_tokens_fail() {
        let keys = TokenKeys::new(b"secret", None, 60).unwrap();
        let other = TokenKeys::new(b"other", None, 60).unwrap();
        assert!(keys.verify(&other.issue(&user(), None)).is_err());
        let claims = Claims {
            sub: "u1".into(),
            name: "ann".into(),
            exp: jsonwebtoken::get_current_timestamp() - 3600,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(keys.verify(&expired).is_err());
        assert!(keys.verify("not.a.token").is_err());
    }

    #[test]
    fn passwords() {
        let hash = hash_password("hunter22");
        assert!(verify_password(&hash, "hunter22"));
        assert!(!verify_password(&hash, "hunter23"));
        assert!(!verify_password("garbage", "hunter22"));
    }

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed(None, Some("x"), &none));
        assert!(origin_allowed(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080"),
            &none
        ));
        assert!(!origin_allowed(
            Some("http://evil.example"),
            Some("127.0.0.1:8080"),
            &none
        ));
        let list = vec!["https://app.example".to_string()];
        assert!(origin_allowed(
            Some("https://app.example"),
            Some("h"),
            &list
        ));
        assert!(!origin_allowed(
            Some("https://evil.example"),
            Some("h"),
            &list
        ));
        assert!(origin_allowed(
            Some("https://any"),
            Some("h"),
            &["*".to_string()]
        ));
    }

    #[test]
    fn secret_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_secret(dir.path()).unwrap();
        let second = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.len(), 64);
    }
}
