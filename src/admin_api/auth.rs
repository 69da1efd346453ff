//! Who may use the admin API. With `--admin-token-file`, every caller must
//! send `authorization: Bearer <token>` (compared in constant time), from
//! anywhere. Without it, only loopback peers are served, and startup says
//! so. Both surfaces (gRPC and HTTP) ask [`AdminAuth::check`].

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// The admin API's authentication.
#[derive(Clone)]
pub enum AdminAuth {
    /// A bearer token is required.
    Token(Arc<[u8]>),
    /// No token is configured: loopback peers only.
    LoopbackOnly,
}

/// An authenticated caller, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// How it was let in: `token` or `loopback`.
    pub by: &'static str,
    /// Its address, when the transport knows it.
    pub peer: Option<SocketAddr>,
}

/// Why a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A token is required and none was sent.
    #[error("admin API: missing bearer token (authorization: Bearer <token>)")]
    MissingToken,
    /// The token sent is not the configured one.
    #[error("admin API: invalid bearer token")]
    WrongToken,
    /// No token is configured and the caller is not on loopback.
    #[error("admin API: no --admin-token-file is configured, so only loopback callers are served")]
    NotLoopback,
}

// === impl AdminAuth ===

impl AdminAuth {
    /// Requires the token in `text` (a token file's content; surrounding
    /// whitespace, such as a trailing newline, is not part of it).
    ///
    /// # Errors
    ///
    /// A message when the token is empty.
    pub fn from_token_file(text: &[u8]) -> Result<Self, String> {
        let token = text.trim_ascii();
        if token.is_empty() {
            return Err("the admin token file is empty".to_owned());
        }
        Ok(Self::Token(Arc::from(token)))
    }

    /// Lets the caller at `peer`, who sent `authorization`, in or not.
    ///
    /// # Errors
    ///
    /// [`Refusal`] saying why not.
    pub fn check(
        &self,
        peer: Option<SocketAddr>,
        authorization: Option<&[u8]>,
    ) -> Result<Caller, Refusal> {
        match self {
            AdminAuth::Token(token) => {
                let sent = authorization
                    .and_then(|value| value.strip_prefix(b"Bearer "))
                    .ok_or(Refusal::MissingToken)?;
                if equal_in_constant_time(token, sent.trim_ascii()) {
                    Ok(Caller { by: "token", peer })
                } else {
                    Err(Refusal::WrongToken)
                }
            }
            AdminAuth::LoopbackOnly => match peer {
                Some(addr) if addr.ip().is_loopback() => Ok(Caller {
                    by: "loopback",
                    peer,
                }),
                _ => Err(Refusal::NotLoopback),
            },
        }
    }

    /// One line for the startup log.
    pub fn describe(&self) -> &'static str {
        match self {
            AdminAuth::Token(_) => "bearer token required (--admin-token-file)",
            AdminAuth::LoopbackOnly => {
                "no --admin-token-file: admin API served to loopback callers only"
            }
        }
    }
}

impl fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token.
        f.write_str(match self {
            AdminAuth::Token(_) => "AdminAuth::Token",
            AdminAuth::LoopbackOnly => "AdminAuth::LoopbackOnly",
        })
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.peer {
            Some(peer) => write!(f, "{}@{peer}", self.by),
            None => f.write_str(self.by),
        }
    }
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of a guess was right (only whether the lengths differ).
fn equal_in_constant_time(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, byte) in expected.iter().enumerate() {
        diff |= byte ^ given.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(format!("{ip}:1234").parse().unwrap())
    }

    #[test]
    fn a_token_is_required_from_everyone_when_configured() {
        let auth = AdminAuth::from_token_file(b"s3cret\n").unwrap();
        assert_eq!(
            auth.check(peer("127.0.0.1"), None),
            Err(Refusal::MissingToken)
        );
        assert_eq!(
            auth.check(peer("127.0.0.1"), Some(b"Bearer s3cre")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            auth.check(peer("127.0.0.1"), Some(b"Bearer s3cret!")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            auth.check(peer("10.0.0.1"), Some(b"Bearer s3cret"))
                .unwrap()
                .by,
            "token"
        );
        assert!(AdminAuth::from_token_file(b" \n").is_err());
    }

    #[test]
    fn without_a_token_only_loopback_is_served() {
        let auth = AdminAuth::LoopbackOnly;
        assert!(auth.check(peer("127.0.0.1"), None).is_ok());
        assert!(auth.check(peer("[::1]"), None).is_ok());
        assert_eq!(
            auth.check(peer("10.0.0.1"), None),
            Err(Refusal::NotLoopback)
        );
        assert_eq!(auth.check(None, None), Err(Refusal::NotLoopback));
    }
}
