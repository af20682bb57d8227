//! `filesystem.Filesystem`: decode → pick the user → resolve the path (E2B rules, `crate::paths`)
//! → call `crate::fs` / `crate::watch` → encode. Blocking filesystem calls run on tokio's
//! blocking pool so a slow disk never stalls the reactor.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::auth::request_user;
use super::metadata::{Step, keepalive_interval, with_keepalives};
use crate::Agent;
use crate::fs::{self, EntryInfo, FileKind, Owner};
use crate::proto::filesystem::filesystem_server::Filesystem;
use crate::proto::filesystem::*;
use crate::users::User;
use crate::watch::{EventKind, FsEvent, WatchManager, WatchOptions, WatchStream};
use crate::{paths, watch};

pub(crate) struct FilesystemRpc {
    agent: Arc<Agent>,
}

impl FilesystemRpc {
    pub(crate) fn new(agent: Arc<Agent>) -> FilesystemRpc {
        FilesystemRpc { agent }
    }

    /// The request's user and `path` resolved for it.
    fn resolve<T>(&self, request: &Request<T>, path: &str) -> Result<(User, PathBuf), Status> {
        let defaults = self.agent.session.defaults();
        let user = request_user(request, &defaults)?;
        let resolved = paths::resolve(path, &user, defaults.workdir.as_deref())?;
        Ok((user, resolved))
    }

    /// Runs a (blocking: stat, statfs, directory walks) watch-manager call off the reactor.
    async fn with_watches<T: Send + 'static>(
        &self,
        f: impl FnOnce(WatchManager) -> Result<T, watch::WatchError> + Send + 'static,
    ) -> Result<T, Status> {
        let manager = self.agent.watches.as_ref().map_err(|err| Status::from(err.clone()))?.clone();
        match tokio::task::spawn_blocking(move || f(manager)).await {
            Ok(result) => result.map_err(Status::from),
            Err(join) => Err(Status::internal(format!("watch task failed: {join}"))),
        }
    }
}

/// Runs a blocking filesystem call off the reactor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, fs::FsError> + Send + 'static) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(Status::from),
        Err(join) => Err(Status::internal(format!("filesystem task failed: {join}"))),
    }
}

fn owner(user: &User) -> Owner {
    Owner { uid: user.uid, gid: user.gid }
}

type WatchEvents = Pin<Box<dyn Stream<Item = Result<WatchDirResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Filesystem for FilesystemRpc {
    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let (_, path) = self.resolve(&request, &request.get_ref().path)?;
        let entry = blocking(move || fs::stat(&path)).await?;
        Ok(Response::new(StatResponse { entry: Some(entry_info(entry)) }))
    }

    async fn make_dir(&self, request: Request<MakeDirRequest>) -> Result<Response<MakeDirResponse>, Status> {
        let (user, path) = self.resolve(&request, &request.get_ref().path)?;
        let entry = blocking(move || fs::make_dir(&path, owner(&user))).await?;
        Ok(Response::new(MakeDirResponse { entry: Some(entry_info(entry)) }))
    }

    async fn r#move(&self, request: Request<MoveRequest>) -> Result<Response<MoveResponse>, Status> {
        let (user, source) = self.resolve(&request, &request.get_ref().source)?;
        let (_, destination) = self.resolve(&request, &request.get_ref().destination)?;
        let entry = blocking(move || fs::rename(&source, &destination, owner(&user))).await?;
        Ok(Response::new(MoveResponse { entry: Some(entry_info(entry)) }))
    }

    async fn list_dir(&self, request: Request<ListDirRequest>) -> Result<Response<ListDirResponse>, Status> {
        let (_, path) = self.resolve(&request, &request.get_ref().path)?;
        let depth = request.get_ref().depth;
        let entries = blocking(move || fs::list_dir(&path, depth)).await?;
        Ok(Response::new(ListDirResponse { entries: entries.into_iter().map(entry_info).collect() }))
    }

    async fn remove(&self, request: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        // envd resolves "" to the home directory (or workdir) and deletes it; nobody means that.
        if request.get_ref().path.is_empty() {
            return Err(Status::invalid_argument(
                "refusing to remove an empty path: it would resolve to the home or working directory",
            ));
        }
        let (_, path) = self.resolve(&request, &request.get_ref().path)?;
        blocking(move || fs::remove(&path)).await?;
        Ok(Response::new(RemoveResponse {}))
    }

    type WatchDirStream = WatchEvents;

    async fn watch_dir(&self, request: Request<WatchDirRequest>) -> Result<Response<Self::WatchDirStream>, Status> {
        let keepalive = keepalive_interval(request.metadata());
        let (_, path) = self.resolve(&request, &request.get_ref().path)?;
        let req = request.get_ref();
        let opts = watch_options(req.recursive, req.include_entry, req.allow_network_mounts);
        let stream = self.with_watches(move |w| w.watch(&path, opts)).await?;
        Ok(Response::new(Box::pin(watch_events(stream, keepalive))))
    }

    async fn create_watcher(
        &self,
        request: Request<CreateWatcherRequest>,
    ) -> Result<Response<CreateWatcherResponse>, Status> {
        let (_, path) = self.resolve(&request, &request.get_ref().path)?;
        let req = request.get_ref();
        let opts = watch_options(req.recursive, req.include_entry, req.allow_network_mounts);
        let watcher_id = self.with_watches(move |w| w.create_watcher(&path, opts)).await?;
        Ok(Response::new(CreateWatcherResponse { watcher_id }))
    }

    async fn get_watcher_events(
        &self,
        request: Request<GetWatcherEventsRequest>,
    ) -> Result<Response<GetWatcherEventsResponse>, Status> {
        let id = request.into_inner().watcher_id;
        let events = self.with_watches(move |w| w.take_events(&id)).await?;
        Ok(Response::new(GetWatcherEventsResponse { events: events.into_iter().map(fs_event).collect() }))
    }

    async fn remove_watcher(
        &self,
        request: Request<RemoveWatcherRequest>,
    ) -> Result<Response<RemoveWatcherResponse>, Status> {
        let id = request.into_inner().watcher_id;
        self.with_watches(move |w| w.remove_watcher(&id)).await?;
        Ok(Response::new(RemoveWatcherResponse {}))
    }
}

/// WatchDirRequest and CreateWatcherRequest carry the same three flags.
fn watch_options(recursive: bool, include_entry: bool, allow_network_mounts: bool) -> WatchOptions {
    WatchOptions { recursive, include_entry, allow_network_mounts }
}

/// `start{}`, then events and keepalives; the keepalive timer restarts after every event.
fn watch_events(stream: WatchStream, keepalive: Duration) -> impl Stream<Item = Result<WatchDirResponse, Status>> {
    let message = |event| WatchDirResponse { event: Some(event) };
    let start = message(watch_dir_response::Event::Start(watch_dir_response::StartEvent {}));
    let keepalive_event =
        || WatchDirResponse { event: Some(watch_dir_response::Event::Keepalive(watch_dir_response::KeepAlive {})) };
    let events = futures_util::stream::unfold(stream, |mut stream| async move { Some((stream.next().await?, stream)) });
    with_keepalives(start, events, keepalive, keepalive_event, move |next| match next {
        Ok(event) => Step::Next(message(watch_dir_response::Event::Filesystem(fs_event(event)))),
        Err(err) => Step::Last(Err(Status::from(err))),
    })
}

fn fs_event(event: FsEvent) -> FilesystemEvent {
    let kind = match event.kind {
        EventKind::Create => EventType::Create,
        EventKind::Write => EventType::Write,
        EventKind::Remove => EventType::Remove,
        EventKind::Rename => EventType::Rename,
        EventKind::Chmod => EventType::Chmod,
    };
    FilesystemEvent { name: event.name, r#type: kind as i32, entry: event.entry.map(entry_info) }
}

fn entry_info(entry: EntryInfo) -> crate::proto::filesystem::EntryInfo {
    let kind = match entry.kind {
        FileKind::File => FileType::File,
        FileKind::Directory => FileType::Directory,
        FileKind::Other => FileType::Unspecified,
    };
    crate::proto::filesystem::EntryInfo {
        name: entry.name,
        r#type: kind as i32,
        path: entry.path,
        size: entry.size,
        mode: entry.mode,
        permissions: entry.permissions,
        owner: entry.owner,
        group: entry.group,
        modified_time: entry.modified.map(timestamp),
        symlink_target: entry.symlink_target,
        metadata: entry.metadata.into_iter().collect(),
        is_symlink: entry.is_symlink,
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 },
        Err(before) => {
            let d = before.duration();
            let (mut seconds, mut nanos) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i32));
            if nanos < 0 {
                seconds -= 1;
                nanos += 1_000_000_000;
            }
            prost_types::Timestamp { seconds, nanos }
        }
    }
}
