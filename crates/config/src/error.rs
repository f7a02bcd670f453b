//! The fleet file's errors: each names the file, and where it can, the line and the field.

use crate::manifests;
use crate::position::Position;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read fleet file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_norway::Error,
    },
    #[error(transparent)]
    Manifest(#[from] manifests::ManifestError),
    /// A field's value is refused: the file, the field's line where the file has the field (its
    /// column too, in `position`), the field's path and why.
    #[error("{path}{}: {field}: {message}", position.map(|p| format!(":{}", p.line)).unwrap_or_default())]
    Invalid {
        path: String,
        position: Option<Position>,
        field: String,
        message: String,
    },
}
