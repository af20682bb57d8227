//! RPC adapters: tonic service implementations of `process.Process` and `filesystem.Filesystem`.
//!
//! Every method is a few lines: decode the proto request into domain values, authorize (pick the
//! user), call the domain, map the result back. No domain logic lives here. gRPC clients reach
//! these services directly; Connect clients reach them through `crate::connect`, which
//! translates Connect requests into gRPC ones in front of the same router.

mod auth;
mod filesystem;
mod metadata;
mod process;
mod status;

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tower::ServiceExt as _;
use tower::util::{BoxCloneSyncService, Oneshot};

use crate::proto;
use crate::{Agent, connect};

/// The tonic routes for every service guestd serves, plus gRPC reflection, as an axum router.
pub fn router(agent: Arc<Agent>) -> axum::Router {
    let reflection = LazyReflection::default();
    // tonic's own 4 MiB default would refuse messages the Connect layer accepts.
    let process = proto::process::process_server::ProcessServer::new(process::ProcessRpc::new(agent.clone()))
        .max_decoding_message_size(connect::MAX_MESSAGE_BYTES);
    let process = tonic::service::interceptor::InterceptedService::new(process, auth::known_basic_user);
    let filesystem =
        proto::filesystem::filesystem_server::FilesystemServer::new(filesystem::FilesystemRpc::new(agent.clone()))
            .max_decoding_message_size(connect::MAX_MESSAGE_BYTES);
    let filesystem = tonic::service::interceptor::InterceptedService::new(filesystem, auth::known_basic_user);
    tonic::service::Routes::new(process).add_service(filesystem).add_service(reflection).into_axum_router()
}

type ReflectionService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// gRPC reflection, built on its first call: building it decodes the whole descriptor set, which
/// is a large share of guestd's start-up work, for a service few clients ever call.
#[derive(Clone, Default)]
struct LazyReflection(Arc<OnceLock<ReflectionService>>);

impl LazyReflection {
    fn service(&self) -> &ReflectionService {
        self.0.get_or_init(|| {
            let server = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .build_v1()
                .expect("the embedded descriptor set is valid: it was produced by the build script");
            BoxCloneSyncService::new(server)
        })
    }
}

impl NamedService for LazyReflection {
    const NAME: &'static str = tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME;
}

impl tower::Service<http::Request<Body>> for LazyReflection {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Oneshot<ReflectionService, http::Request<Body>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The built service is always ready (tonic servers are); readiness is driven by oneshot.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.service().clone().oneshot(request)
    }
}
