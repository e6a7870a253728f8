//! The one place where domain errors become gRPC and HTTP statuses.

use axum::http::StatusCode;
use quiver_core::{Error, ErrorKind};

/// gRPC code of an error kind.
pub fn grpc_code(kind: ErrorKind) -> tonic::Code {
    match kind {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorKind::Internal => tonic::Code::Internal,
        ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
        // gRPC's code for rate and concurrency limits.
        ErrorKind::TooManyRequests => tonic::Code::ResourceExhausted,
    }
}

/// HTTP status of an error kind.
pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::FailedPrecondition => StatusCode::CONFLICT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
    }
}

/// Longest error message sent to a client, in bytes. Messages quote
/// caller input only through `quiver_core::error::quote` (80 bytes each),
/// but a message can also list a registry's names; the gRPC message travels
/// percent-encoded in a trailer (up to 3 bytes per byte) and clients refuse
/// trailers past 8 KiB by default, which would hide the real status.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// `m`, cut at [`MAX_MESSAGE_BYTES`] (at a character boundary) with its
/// full length added.
pub fn bounded(m: &str) -> std::borrow::Cow<'_, str> {
    if m.len() <= MAX_MESSAGE_BYTES {
        return m.into();
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... (message of {} bytes cut)", &m[..end], m.len()).into()
}

/// A domain error as a gRPC status. Internal errors are logged here, once.
pub fn to_status(e: Error) -> tonic::Status {
    if e.kind() == ErrorKind::Internal {
        tracing::error!(error = %e, "internal error");
    }
    tonic::Status::new(grpc_code(e.kind()), bounded(e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let m = "é".repeat(MAX_MESSAGE_BYTES);
        let b = bounded(&m);
        assert!(b.len() < MAX_MESSAGE_BYTES + 64, "{}", b.len());
        assert!(
            b.ends_with(&format!("(message of {} bytes cut)", m.len())),
            "{b}"
        );
        let status = to_status(Error::invalid(m));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + 64);
    }
}
