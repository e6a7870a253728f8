//! The error type of `quiver-core`.
//!
//! Every error carries an [`ErrorKind`], a small code shared by all crates
//! that the server maps once to a gRPC status and an HTTP status. Expected
//! errors (bad input, unknown names, a backend that is down) have their own
//! kinds; `Internal` means a bug or corrupted data and is logged loudly.

use std::fmt;

/// What kind of failure an [`Error`] is, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or inconsistent with the registry.
    InvalidArgument,
    /// A named feature service, feature view, feature or entity does not exist.
    NotFound,
    /// The request exceeds a configured limit.
    ResourceExhausted,
    /// The system is not in the state the operation needs (e.g. a feature
    /// table that has not been computed yet); fix that state, then retry.
    FailedPrecondition,
    /// A backend is unreachable or refused the operation; retrying may help.
    Unavailable,
    /// A backend did not answer within the deadline.
    DeadlineExceeded,
    /// A bug or corrupted stored data.
    Internal,
    /// The request carries no valid credentials (none, unknown, revoked or
    /// expired); send valid ones.
    Unauthenticated,
    /// The credentials are valid but do not allow this operation (a scope
    /// or a feature view, feature service or event type the key lacks).
    PermissionDenied,
    /// The caller has too many requests in flight; retry after some finish.
    TooManyRequests,
}

impl ErrorKind {
    /// Every kind, in declaration order (the `code` values of JSON errors,
    /// as the OpenAPI description lists them).
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::ResourceExhausted,
        ErrorKind::FailedPrecondition,
        ErrorKind::Unavailable,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Internal,
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::TooManyRequests,
    ];

    /// Stable lower-case name, used as a metrics label and in JSON errors.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Internal => "internal",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::TooManyRequests => "too_many_requests",
        }
    }
}

/// An error with a kind and a message that tells the user what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// Creates an error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// Shorthand for [`ErrorKind::FailedPrecondition`].
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    /// Shorthand for [`ErrorKind::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    /// Shorthand for [`ErrorKind::PermissionDenied`].
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }
    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Longest piece of caller input quoted in an error message, in bytes.
pub const MAX_QUOTED_BYTES: usize = 80;

/// Caller input quoted for an error message: `"text"`, cut after
/// [`MAX_QUOTED_BYTES`] (at a character boundary) with the full length
/// added, so that a huge input cannot make a huge message.
pub fn quote(s: &str) -> String {
    if s.len() <= MAX_QUOTED_BYTES {
        return format!("{s:?}");
    }
    format!("{:?}... ({} bytes)", head(s), s.len())
}

/// Caller input named in an error without quotes (a path like
/// `entities.user_id[0]`), cut like [`quote`].
pub fn cut(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MAX_QUOTED_BYTES {
        return s.into();
    }
    format!("{}... ({} bytes)", head(s), s.len()).into()
}

/// The first [`MAX_QUOTED_BYTES`] of `s`, at a character boundary.
fn head(s: &str) -> &str {
    let mut end = MAX_QUOTED_BYTES.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Result alias of `quiver-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_kind_once() {
        // A new kind fails to compile here until it is listed in ALL.
        let index = |k: ErrorKind| match k {
            ErrorKind::InvalidArgument => 0,
            ErrorKind::NotFound => 1,
            ErrorKind::ResourceExhausted => 2,
            ErrorKind::FailedPrecondition => 3,
            ErrorKind::Unavailable => 4,
            ErrorKind::DeadlineExceeded => 5,
            ErrorKind::Internal => 6,
            ErrorKind::Unauthenticated => 7,
            ErrorKind::PermissionDenied => 8,
            ErrorKind::TooManyRequests => 9,
        };
        for (i, k) in ErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(index(k), i, "{k:?}");
        }
    }

    #[test]
    fn quoted_input_is_cut_with_its_length() {
        assert_eq!(quote("user_id"), "\"user_id\"");
        assert_eq!(cut("user_id"), "user_id");
        let long = "é".repeat(100);
        let q = quote(&long);
        assert!(q.ends_with("... (200 bytes)"), "{q}");
        assert!(q.len() < MAX_QUOTED_BYTES + 24, "{q}");
        let c = cut(&long);
        assert!(!c.starts_with('"') && c.ends_with("... (200 bytes)"), "{c}");
    }
}
