//! The guest's filesystem over RPC: stat, list, make-dir, remove, and directory watches.
//! File contents move over plain HTTP (`http.rs`), which streams.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};

use super::{Client, ClientError, EntryInfo, EventType};
use crate::proto::filesystem::{self as pb, watch_dir_response};

/// One change under a watched directory.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// Path of the changed entry, relative to the watched directory.
    pub name: String,
    pub kind: EventType,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchDirResponse, tonic::Status>> + Send>>;

/// An armed directory watch. Dropping it ends the watch.
pub struct Watcher {
    events: WatchStream,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Watcher {
    /// The next change; `None` when guestd ends the watch. Keepalives are skipped.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        loop {
            let response = match self.events.next().await? {
                Ok(r) => r,
                Err(status) => return Some(Err(ClientError::rpc("WatchDir", status))),
            };
            if let Some(watch_dir_response::Event::Filesystem(event)) = response.event {
                let kind = EventType::try_from(event.r#type).unwrap_or(EventType::Unspecified);
                return Some(Ok(WatchEvent { name: event.name, kind }));
            }
        }
    }
}

impl Client {
    pub async fn stat(&self, path: &str) -> Result<EntryInfo, ClientError> {
        let response = self
            .filesystem_rpc()
            .stat(pb::StatRequest { path: path.to_owned() })
            .await
            .map_err(|s| ClientError::rpc("Stat", s))?;
        response.into_inner().entry.ok_or(ClientError::Protocol { what: "Stat", detail: "no entry".into() })
    }

    /// Entries under `path`, `depth` levels deep (1: the directory's own entries).
    pub async fn list(&self, path: &str, depth: u32) -> Result<Vec<EntryInfo>, ClientError> {
        let request = pb::ListDirRequest { path: path.to_owned(), depth };
        let response = self.filesystem_rpc().list_dir(request).await.map_err(|s| ClientError::rpc("ListDir", s))?;
        Ok(response.into_inner().entries)
    }

    /// Creates `path` and its missing parents.
    pub async fn make_dir(&self, path: &str) -> Result<EntryInfo, ClientError> {
        let response = self
            .filesystem_rpc()
            .make_dir(pb::MakeDirRequest { path: path.to_owned() })
            .await
            .map_err(|s| ClientError::rpc("MakeDir", s))?;
        response.into_inner().entry.ok_or(ClientError::Protocol { what: "MakeDir", detail: "no entry".into() })
    }

    /// Removes a file or a whole directory tree.
    pub async fn remove(&self, path: &str) -> Result<(), ClientError> {
        self.filesystem_rpc()
            .remove(pb::RemoveRequest { path: path.to_owned() })
            .await
            .map_err(|s| ClientError::rpc("Remove", s))?;
        Ok(())
    }

    /// Watches `path`; returns once guestd has armed the watch, so every change made after this
    /// returns is reported.
    pub async fn watch(&self, path: &str, recursive: bool) -> Result<Watcher, ClientError> {
        let request =
            pb::WatchDirRequest { path: path.to_owned(), recursive, include_entry: false, allow_network_mounts: false };
        let mut events: WatchStream = Box::pin(
            self.filesystem_rpc().watch_dir(request).await.map_err(|s| ClientError::rpc("WatchDir", s))?.into_inner(),
        );
        loop {
            match events.next().await {
                Some(Ok(pb::WatchDirResponse { event: Some(watch_dir_response::Event::Start(_)) })) => {
                    return Ok(Watcher { events });
                }
                Some(Ok(pb::WatchDirResponse { event: Some(watch_dir_response::Event::Keepalive(_)) })) => {}
                Some(Ok(other)) => {
                    return Err(ClientError::Protocol {
                        what: "WatchDir",
                        detail: format!("expected the start event first, got {other:?}"),
                    });
                }
                Some(Err(status)) => return Err(ClientError::rpc("WatchDir", status)),
                None => {
                    return Err(ClientError::Protocol {
                        what: "WatchDir",
                        detail: "stream ended before the start event".into(),
                    });
                }
            }
        }
    }
}
