//! The one place that maps domain errors to RPC status codes. Connect codes and HTTP statuses
//! follow from these (`crate::connect` translates gRPC codes for Connect clients).

use tonic::{Code, Status};

use crate::fs::FsError;
use crate::paths::PathError;
use crate::process::ProcessError;
use crate::watch::WatchError;

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
            ProcessError::TooManyStarting { .. } => Code::ResourceExhausted,
            ProcessError::ShuttingDown { .. } => Code::Unavailable,
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

impl From<FsError> for Status {
    fn from(err: FsError) -> Status {
        let code = match &err {
            FsError::NotFound { .. } => Code::NotFound,
            FsError::AlreadyExists { .. } => Code::AlreadyExists,
            FsError::NotADirectory { .. }
            | FsError::IsADirectory { .. }
            | FsError::NotRegularFile { .. }
            | FsError::ParentNotDirectory { .. }
            | FsError::NetworkMount { .. } => Code::InvalidArgument,
            FsError::CyclicSymlink { .. } => Code::FailedPrecondition,
            FsError::PermissionDenied { .. } => Code::PermissionDenied,
            FsError::NoSpace { .. } | FsError::ListingTooLarge { .. } => Code::ResourceExhausted,
            FsError::Io { .. } => Code::Internal,
        };
        Status::new(code, crate::error_chain(&err))
    }
}

impl From<WatchError> for Status {
    fn from(err: WatchError) -> Status {
        let code = match &err {
            WatchError::NotFound { .. } | WatchError::WatcherNotFound { .. } => Code::NotFound,
            WatchError::NotADirectory { .. } | WatchError::NetworkMount { .. } => Code::InvalidArgument,
            WatchError::WatchLimit { .. } | WatchError::TooManyWatchers { .. } => Code::ResourceExhausted,
            WatchError::QueueOverflow { .. } | WatchError::SubscriberOverflow { .. } => Code::DataLoss,
            WatchError::Moved { .. } => Code::FailedPrecondition,
            WatchError::Init { .. } | WatchError::Io { .. } => Code::Internal,
        };
        Status::new(code, crate::error_chain(&err))
    }
}
