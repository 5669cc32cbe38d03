//! What can go wrong in a pod request, by the answer containerd gets (see
//! `containerd::task`).
use std::path::PathBuf;

use crate::{sandbox::SandboxError, stdio::StdioError};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("process {exec_id} of container {container_id} not found")]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("exec {exec_id} already exists in container {container_id}")]
    ExecExists {
        container_id: String,
        exec_id: String,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("cannot read the OCI spec {path}: {why}")]
    Spec { path: PathBuf, why: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
}

pub type Result<T, E = PodError> = std::result::Result<T, E>;
