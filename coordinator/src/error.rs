//! The one place where coordinator errors become gRPC statuses.

use drover_common::{ids::HostIdError, labels::LabelError};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidHostId(#[from] HostIdError),
    #[error("{0}")]
    InvalidLabel(#[from] LabelError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts what is stored (and changes nothing).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A request or stream that breaks the protocol (no header, a second
    /// one, a first message that is not a Hello).
    #[error("{0}")]
    Malformed(String),
    /// Nothing came in time (a Hello, a command's result).
    #[error("{0}")]
    TimedOut(String),
    /// A bound is reached (the registry's host limit).
    #[error("{0}")]
    Full(String),
    /// A newer stream for the same host took over this one.
    #[error("{0}")]
    Replaced(String),
    /// The peer's identity could not be established (or has expired).
    #[error("{0}")]
    Unauthenticated(String),
    /// Stored bytes are gone or damaged beyond repair.
    #[error("{0}")]
    DataLoss(String),
    /// A read past the end (a fetch offset beyond the blob).
    #[error("{0}")]
    OutOfRange(String),
    /// Our own failure: a store, a disk, a task.
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Pipeline(#[from] crate::deploy::pipeline::PipelineError),
    #[error(transparent)]
    Deploy(#[from] crate::deploy::deployments::DeployError),
}

impl From<crate::notify::NotifyError> for ApiError {
    fn from(e: crate::notify::NotifyError) -> ApiError {
        use crate::notify::NotifyError as N;
        match e {
            N::Invalid(t) => ApiError::Invalid(t),
            N::NotFound(t) => ApiError::NotFound(t),
            N::Store(s) => ApiError::Unavailable(format!("store: {s}")),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::InvalidHostId(_) | ApiError::InvalidLabel(_) | ApiError::Invalid(_) => {
                Status::invalid_argument(msg)
            }
            ApiError::NotFound(_) => Status::not_found(msg),
            ApiError::Conflict(_) => Status::failed_precondition(msg),
            ApiError::Unavailable(_) => Status::unavailable(msg),
            ApiError::PermissionDenied(_) => Status::permission_denied(msg),
            ApiError::Malformed(_) => Status::invalid_argument(msg),
            ApiError::TimedOut(_) => Status::deadline_exceeded(msg),
            ApiError::Full(_) => Status::resource_exhausted(msg),
            ApiError::Replaced(_) => Status::aborted(msg),
            ApiError::Unauthenticated(_) => Status::unauthenticated(msg),
            ApiError::DataLoss(_) => Status::data_loss(msg),
            ApiError::OutOfRange(_) => Status::out_of_range(msg),
            ApiError::Internal(_) => Status::internal(msg),
            ApiError::Deploy(e) => {
                use crate::deploy::deployments::DeployError as D;
                match e {
                    D::Invalid(_) => Status::invalid_argument(msg),
                    D::NotFound(_) => Status::not_found(msg),
                    D::Conflict(_) => Status::failed_precondition(msg),
                    D::Pipeline(p) => Status::from(ApiError::Pipeline(p)),
                    D::Store(_) => Status::internal(msg),
                    D::NotLeader(_) => Status::unavailable(msg),
                    D::Forbidden(_) => Status::permission_denied(msg),
                }
            }
            ApiError::Pipeline(e) => {
                use crate::deploy::pipeline::PipelineError as P;
                match e {
                    P::Invalid(_) => Status::invalid_argument(msg),
                    P::Exists(_) => Status::already_exists(msg),
                    P::NotFound(_) => Status::not_found(msg),
                    P::Conflict { .. } => Status::failed_precondition(msg),
                    P::Store(_) | P::Corrupt(..) => Status::internal(msg),
                }
            }
        }
    }
}
