//! TEMPORARY local measurement (not part of the suite).
use axum::Router;
use guestd::http::files::{FilesState, method_router};
use guestd::session::Session;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn serve_forever() {
    let app = Router::new().route("/files", method_router(FilesState { session: Session::new("root") }));
    let listener = TcpListener::bind("127.0.0.1:47111").await.unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        stream.set_nodelay(true).unwrap();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
