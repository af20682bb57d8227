//! `filesystem.Filesystem`: declared so clients see the whole contract; every method answers
//! `unimplemented` until the filesystem domain lands (tracked as its own issue).

use tonic::{Request, Response, Status};

use crate::proto::filesystem::filesystem_server::Filesystem;
use crate::proto::filesystem::*;

pub(crate) struct FilesystemRpc;

fn not_yet(method: &str) -> Status {
    Status::unimplemented(format!("filesystem.Filesystem/{method} is not implemented by this guestd yet"))
}

#[tonic::async_trait]
impl Filesystem for FilesystemRpc {
    async fn stat(&self, _: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        Err(not_yet("Stat"))
    }
    async fn make_dir(&self, _: Request<MakeDirRequest>) -> Result<Response<MakeDirResponse>, Status> {
        Err(not_yet("MakeDir"))
    }
    async fn r#move(&self, _: Request<MoveRequest>) -> Result<Response<MoveResponse>, Status> {
        Err(not_yet("Move"))
    }
    async fn list_dir(&self, _: Request<ListDirRequest>) -> Result<Response<ListDirResponse>, Status> {
        Err(not_yet("ListDir"))
    }
    async fn remove(&self, _: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        Err(not_yet("Remove"))
    }
    type WatchDirStream = futures_util::stream::Empty<Result<WatchDirResponse, Status>>;
    async fn watch_dir(&self, _: Request<WatchDirRequest>) -> Result<Response<Self::WatchDirStream>, Status> {
        Err(not_yet("WatchDir"))
    }
    async fn create_watcher(
        &self,
        _: Request<CreateWatcherRequest>,
    ) -> Result<Response<CreateWatcherResponse>, Status> {
        Err(not_yet("CreateWatcher"))
    }
    async fn get_watcher_events(
        &self,
        _: Request<GetWatcherEventsRequest>,
    ) -> Result<Response<GetWatcherEventsResponse>, Status> {
        Err(not_yet("GetWatcherEvents"))
    }
    async fn remove_watcher(
        &self,
        _: Request<RemoveWatcherRequest>,
    ) -> Result<Response<RemoveWatcherResponse>, Status> {
        Err(not_yet("RemoveWatcher"))
    }
}
