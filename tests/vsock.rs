//! Serving on AF_VSOCK shares the TCP code path. The round trip needs a local vsock transport
//! (vsock_loopback, CID 1); where the kernel has none, the test says so and checks only that
//! guestd binds and serves the vsock listener. The micro-VM tier covers the real guest path.

#![allow(clippy::print_stdout, reason = "a skipped check says why on stdout")]

mod common;

use std::time::Duration;

use guestd::config::{Config, ListenAddr, VSOCK_CID_ANY};
use guestd::proto::process::process_client::ProcessClient;
use guestd::server::Server;

/// `VMADDR_CID_LOCAL`: the local-loopback CID.
const CID_LOCAL: u32 = 1;

#[tokio::test]
async fn vsock_round_trip_where_the_kernel_allows_it() {
    let port = 40_000 + (std::process::id() % 10_000);
    let mut config = Config::loopback("root");
    config.listen = vec![ListenAddr::Vsock { cid: VSOCK_CID_ANY, port }];
    let server = match Server::bind(&config).await {
        Ok(server) => server,
        Err(err) => {
            println!("SKIPPED vsock round trip: this kernel cannot bind AF_VSOCK ({err:#})");
            return;
        }
    };
    assert_eq!(server.local_addrs(), vec![ListenAddr::Vsock { cid: VSOCK_CID_ANY, port }]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));

    let connect = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(CID_LOCAL, port)),
    )
    .await;
    match connect {
        Ok(Ok(_probe)) => {
            let channel = tonic::transport::Endpoint::from_static("http://vsock.local")
                .connect_with_connector(tower::service_fn(move |_: http::Uri| async move {
                    let stream =
                        tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(CID_LOCAL, port)).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }))
                .await
                .expect("gRPC over vsock");
            let mut client = ProcessClient::new(channel);
            let out = common::run(&mut client, common::sh("echo over vsock")).await;
            assert_eq!(out.stdout, b"over vsock\n");
            assert_eq!(out.exit_code(), 0);
        }
        Ok(Err(err)) => println!("SKIPPED vsock round trip: no local vsock transport (connect to CID 1: {err})"),
        Err(_) => println!("SKIPPED vsock round trip: no local vsock transport (connect to CID 1 timed out after 2 s)"),
    }
    let _ = stop.send(());
    task.await.unwrap();
}
