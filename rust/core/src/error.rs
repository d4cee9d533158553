//! One error type for the whole core; the binding crate maps it to Python exceptions.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A Kubernetes object is invalid; names the object and the field.
    #[error("{kind} {object}: {field}: {message}")]
    InvalidObject {
        kind: &'static str,
        object: String,
        field: String,
        message: String,
    },
    /// A configuration value handed to the core is invalid.
    #[error("invalid config: {field}: {message}")]
    InvalidConfig { field: String, message: String },
    /// Input that is not JSON of the expected shape.
    #[error("invalid JSON: {0}")]
    Json(String),
}

impl Error {
    pub fn object(
        kind: &'static str,
        object: &str,
        field: &str,
        message: impl Into<String>,
    ) -> Self {
        Error::InvalidObject {
            kind,
            object: object.to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn config(field: &str, message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Json(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
