//! The one place that maps domain errors to RPC status codes. Connect codes and HTTP statuses
//! follow from these (`crate::connect` translates gRPC codes for Connect clients).

use tonic::{Code, Status};

use crate::paths::PathError;
use crate::process::ProcessError;

impl From<ProcessError> for Status {
    fn from(err: ProcessError) -> Status {
        let code = match &err {
            ProcessError::NotFound(_) => Code::NotFound,
            ProcessError::CwdMissing { .. }
            | ProcessError::CwdNotDirectory { .. }
            | ProcessError::Path(_)
            | ProcessError::ExecutableNotFound { .. }
            | ProcessError::Spawn { .. }
            | ProcessError::Pty(_) => Code::InvalidArgument,
            ProcessError::PermissionDenied { .. } => Code::PermissionDenied,
            ProcessError::NotPty { .. } | ProcessError::IsPty { .. } | ProcessError::StdinClosed { .. } => {
                Code::FailedPrecondition
            }
            ProcessError::Write { .. } | ProcessError::Signal { .. } | ProcessError::Resize { .. } => Code::Internal,
        };
        Status::new(code, crate::error_chain(&err))
    }
}

impl From<PathError> for Status {
    fn from(err: PathError) -> Status {
        Status::invalid_argument(crate::error_chain(&err))
    }
}
