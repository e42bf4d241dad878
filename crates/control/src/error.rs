//! The engine's error type. Each variant maps to one stable API error code; the API layer turns
//! the code into an HTTP status and nothing else decides it.

use gpuvisor_wire::code;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InsufficientResources(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// A concurrency limit was reached (execs per tenant, requests per key).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Node(#[from] gpuvisor_node::NodeError),
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    /// The stable machine-readable code (see `gpuvisor_wire::code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => code::NOT_FOUND,
            Self::InvalidArgument(_) => code::INVALID_ARGUMENT,
            Self::AlreadyExists(_) => code::ALREADY_EXISTS,
            Self::InsufficientResources(_) => code::INSUFFICIENT_RESOURCES,
            Self::QuotaExceeded(_) => code::QUOTA_EXCEEDED,
            Self::InUse(_) => code::IN_USE,
            Self::InvalidState(_) => code::INVALID_STATE,
            Self::Unavailable(_) => code::UNAVAILABLE,
            Self::Unauthorized(_) => code::UNAUTHORIZED,
            Self::Forbidden(_) => code::FORBIDDEN,
            Self::ResourceExhausted(_) => code::RESOURCE_EXHAUSTED,
            Self::PayloadTooLarge(_) => code::PAYLOAD_TOO_LARGE,
            Self::DeadlineExceeded(_) => code::DEADLINE_EXCEEDED,
            Self::Store(crate::store::StoreError::Conflict(_)) => code::ALREADY_EXISTS,
            // What the instance's runtime cannot do is the caller's to change, not a fault.
            Self::Node(gpuvisor_node::NodeError::Unsupported { .. }) => code::INVALID_ARGUMENT,
            Self::Node(gpuvisor_node::NodeError::RuntimeUnavailable { .. }) => code::UNAVAILABLE,
            Self::Store(_) | Self::Node(_) | Self::Internal(_) => code::INTERNAL,
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Shorthand for an invalid-argument error.
pub fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument(msg.into())
}
