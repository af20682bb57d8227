//! process.Process over native gRPC (tonic client, h2c) against a real in-process guestd.

mod common;

use std::time::Duration;

use common::*;
use guestd::proto::process::*;
use sha2::{Digest, Sha256};
use tonic::Code;

#[tokio::test]
async fn start_streams_start_output_and_end_in_order() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let out = run(&mut client, sh("echo out; echo err >&2; exit 3")).await;
    assert!(out.pid.is_some());
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit_code(), 3);
    let end = out.end.as_ref().unwrap();
    assert!(end.exited);
    assert_eq!(end.status, "exit status 3");
    assert_eq!(end.error.as_deref(), Some("exit status 3"));
    assert_eq!(out.out_of_order, 0);
    assert!(out.error.is_none());

    let ok = run(&mut client, sh("true")).await;
    assert_eq!(ok.exit_code(), 0);
    assert_eq!(ok.status(), "exit status 0");
    assert_eq!(ok.end.unwrap().error, None);
    server.stop().await;
}

#[tokio::test]
async fn env_cwd_and_user_rules() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut req = sh("echo $HOME $USER $LOGNAME $FOO; pwd; echo $PATH");
    let config = req.process.as_mut().unwrap();
    config.envs.insert("FOO".into(), "bar".into());
    config.cwd = Some("/tmp".into());
    let out = run(&mut client, req).await;
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "/root root root bar");
    assert_eq!(lines[1], "/tmp");
    assert!(lines[2].contains("/usr/bin"), "{text}");

    // Empty cwd → the user's home.
    let out = run(&mut client, sh("pwd")).await;
    assert_eq!(out.stdout, b"/root\n");
    server.stop().await;
}

#[tokio::test]
async fn spawn_failures_name_their_cause() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let err = client.start(start_request("/no/such/binary", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("/no/such/binary"), "{}", err.message());

    let mut req = sh("true");
    req.process.as_mut().unwrap().cwd = Some("/no/such/dir".into());
    let err = client.start(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("/no/such/dir"), "{}", err.message());

    let mut req = sh("true");
    req.process.as_mut().unwrap().cwd = Some("/etc/passwd".into());
    let err = client.start(req).await.unwrap_err();
    assert!(err.message().contains("not a directory"), "{}", err.message());

    let mut req = tonic::Request::new(sh("true"));
    req.metadata_mut().insert("authorization", "Basic bm9ib2R5LWF0LWFsbDo=".parse().unwrap());
    let err = client.start(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("nobody-at-all"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn stdin_pipe_send_input_and_close() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    // `sleep` after `cat` keeps the process alive past EOF, so a second CloseStdin finds it.
    let mut req = sh("cat; sleep 0.5");
    req.stdin = Some(true);
    let mut stream = client.start(req).await.unwrap().into_inner();
    let mut out = Outcome::default();
    out.add(stream.message().await.unwrap().unwrap().event.unwrap());
    let pid = out.pid.unwrap();
    let input = |data: &str| SendInputRequest {
        process: common::pid(pid),
        input: Some(ProcessInput { input: Some(process_input::Input::Stdin(data.to_owned().into())) }),
    };
    client.send_input(input("hello ")).await.unwrap();
    client.send_input(input("world")).await.unwrap();
    client.close_stdin(CloseStdinRequest { process: common::pid(pid) }).await.unwrap();
    // Idempotent.
    client.close_stdin(CloseStdinRequest { process: common::pid(pid) }).await.unwrap();
    while let Some(msg) = stream.message().await.unwrap() {
        out.add(msg.event.unwrap());
    }
    assert_eq!(out.stdout, b"hello world");
    assert_eq!(out.exit_code(), 0);
    let err = client.send_input(input("late")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // stdin: false → /dev/null: cat ends at once.
    let out = run(&mut client, start_request("/bin/cat", &[])).await;
    assert_eq!(out.exit_code(), 0);
    assert!(out.stdout.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn stream_input_feeds_a_process() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut req = start_request("/bin/cat", &[]);
    req.stdin = Some(true);
    let mut stream = client.start(req).await.unwrap().into_inner();
    let mut out = Outcome::default();
    out.add(stream.message().await.unwrap().unwrap().event.unwrap());
    let pid = out.pid.unwrap();
    let data = |s: &str| StreamInputRequest {
        event: Some(stream_input_request::Event::Data(stream_input_request::DataEvent {
            input: Some(ProcessInput { input: Some(process_input::Input::Stdin(s.to_owned().into())) }),
        })),
    };
    let start = StreamInputRequest {
        event: Some(stream_input_request::Event::Start(stream_input_request::StartEvent { process: common::pid(pid) })),
    };
    let keepalive =
        StreamInputRequest { event: Some(stream_input_request::Event::Keepalive(stream_input_request::KeepAlive {})) };
    let inputs = futures_util::stream::iter(vec![start, data("a"), keepalive, data("b")]);
    client.stream_input(inputs).await.unwrap();
    client.close_stdin(CloseStdinRequest { process: common::pid(pid) }).await.unwrap();
    while let Some(msg) = stream.message().await.unwrap() {
        out.add(msg.event.unwrap());
    }
    assert_eq!(out.stdout, b"ab");

    // Data before start is a clear error, not a crash.
    let err = client.stream_input(futures_util::stream::iter(vec![data("x")])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("before the start event"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn pty_has_the_requested_size_and_resizes() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut req = start_request("/bin/sh", &[]);
    req.pty = Some(Pty { size: Some(pty::Size { cols: 100, rows: 30 }) });
    let mut stream = client.start(req).await.unwrap().into_inner();
    let mut out = Outcome::default();
    out.add(stream.message().await.unwrap().unwrap().event.unwrap());
    let pid = out.pid.unwrap();
    let pty_input = |s: &str| SendInputRequest {
        process: common::pid(pid),
        input: Some(ProcessInput { input: Some(process_input::Input::Pty(s.to_owned().into())) }),
    };
    client.send_input(pty_input("stty size; tty\n")).await.unwrap();
    // Resize only after the first answer, so it reports the size the PTY was created with.
    while !String::from_utf8_lossy(&out.pty).contains("/dev/pts/") {
        out.add(stream.message().await.unwrap().unwrap().event.unwrap());
    }
    client
        .update(UpdateRequest {
            process: common::pid(pid),
            pty: Some(Pty { size: Some(pty::Size { cols: 120, rows: 40 }) }),
        })
        .await
        .unwrap();
    client.send_input(pty_input("stty size; exit 7\n")).await.unwrap();
    while let Some(msg) = stream.message().await.unwrap() {
        out.add(msg.event.unwrap());
    }
    let text = String::from_utf8_lossy(&out.pty);
    assert!(text.contains("30 100"), "{text}");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("40 120"), "{text}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_eq!(out.exit_code(), 7);

    // Stdin operations on a PTY process and resize of a pipe process are refused, naming why.
    let non_pty = client.start(start_request("/bin/sleep", &["5"])).await.unwrap().into_inner();
    let mut non_pty = non_pty;
    let first = non_pty.message().await.unwrap().unwrap().event.unwrap();
    let Some(process_event::Event::Start(process_event::StartEvent { pid: sleeper })) = first.event else { panic!() };
    let err = client
        .update(UpdateRequest {
            process: common::pid(sleeper),
            pty: Some(Pty { size: Some(pty::Size { cols: 1, rows: 1 }) }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    client
        .send_signal(SendSignalRequest { process: common::pid(sleeper), signal: Signal::Sigkill as i32 })
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn signals_reach_the_whole_process_group() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut stream = client.start(sh("sleep 1000 & echo $!; wait")).await.unwrap().into_inner();
    let mut out = Outcome::default();
    while out.stdout.last() != Some(&b'\n') {
        out.add(stream.message().await.unwrap().unwrap().event.unwrap());
    }
    let grandchild: u32 = String::from_utf8(out.stdout.clone()).unwrap().trim().parse().unwrap();
    assert!(pid_exists(grandchild));
    client
        .send_signal(SendSignalRequest { process: common::pid(out.pid.unwrap()), signal: Signal::Sigterm as i32 })
        .await
        .unwrap();
    while let Some(msg) = stream.message().await.unwrap() {
        out.add(msg.event.unwrap());
    }
    let end = out.end.clone().unwrap();
    assert!(!end.exited);
    assert_eq!(end.exit_code, -1);
    assert_eq!(end.status, "signal: terminated");
    assert!(eventually(Duration::from_secs(5), || !pid_exists(grandchild)).await, "sleep {grandchild} survived");

    let err = client
        .send_signal(SendSignalRequest { process: common::pid(out.pid.unwrap()), signal: Signal::Unspecified as i32 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    server.stop().await;
}

/// A command whose exec hangs holds up nothing else: other commands start, run, end and take
/// signals meanwhile, and the held one runs once its exec proceeds (before, the spawn held the
/// reaper's lock and a runtime worker for as long as the exec hung: guestd stopped starting or
/// ending any process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_exec_holds_up_no_other_process() {
    let held = match HeldExec::new() {
        Ok(held) => held,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut hung_client = client.clone();
    let hung_cmd = held.path.to_str().unwrap().to_owned();
    let hung = tokio::spawn(async move { run(&mut hung_client, start_request(&hung_cmd, &[])).await });
    tokio::task::spawn_blocking(move || held.held.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the exec was never attempted");

    let others = async {
        let out = run(&mut client, sh("echo meanwhile")).await;
        assert_eq!((out.stdout.as_slice(), out.exit_code()), (&b"meanwhile\n"[..], 0));
        let mut stream = client.start(sh("echo up; sleep 1000")).await.unwrap().into_inner();
        let mut out = Outcome::default();
        while out.stdout != b"up\n" {
            out.add(stream.message().await.unwrap().unwrap().event.unwrap());
        }
        let request = SendSignalRequest { process: common::pid(out.pid.unwrap()), signal: Signal::Sigkill as i32 };
        client.send_signal(request).await.unwrap();
        while let Some(msg) = stream.message().await.unwrap() {
            out.add(msg.event.unwrap());
        }
        assert_eq!(out.status(), "signal: killed");
    };
    tokio::time::timeout(Duration::from_secs(20), others).await.expect("other commands were held up by a hung exec");
    assert!(!hung.is_finished(), "the held command must still be starting");

    // Hung spawns hold blocking-pool threads: past a limit, new commands are refused instead.
    // Every accepted Start of the held file stays in flight, so starting them until one is
    // refused fills the limit exactly, however the starts interleave.
    let held_start = |client: &process_client::ProcessClient<tonic::transport::Channel>| {
        let (mut client, cmd) = (client.clone(), held.path.to_str().unwrap().to_owned());
        tokio::spawn(async move { try_run(&mut client, start_request(&cmd, &[])).await })
    };
    let mut more: Vec<_> = (1..guestd::process::MAX_SPAWNS_IN_FLIGHT).map(|_| held_start(&client)).collect();
    let refused = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let done = more.iter().position(|task| task.is_finished());
            if let Some(at) = done {
                break more.swap_remove(at).await.unwrap().expect_err("a held Start can only end refused");
            }
            more.push(held_start(&client));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("starts are refused once the limit of hung spawns is reached");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("commands are still starting"), "{}", refused.message());
    let refused_too = more.iter().filter(|task| task.is_finished()).count();

    held.release.send(()).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), hung).await.expect("released exec").unwrap();
    assert_eq!(out.exit_code(), 0, "{:?}", out.error);
    let mut ran = 1;
    for task in more {
        match tokio::time::timeout(Duration::from_secs(20), task).await.expect("released exec").unwrap() {
            Ok(out) => {
                assert_eq!(out.exit_code(), 0, "{:?}", out.error);
                ran += 1;
            }
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert!(ran >= guestd::process::MAX_SPAWNS_IN_FLIGHT - refused_too, "{ran} held commands ran");
    assert_eq!(run(&mut client, sh("true")).await.exit_code(), 0, "starts are accepted again");
    server.stop().await;
}

/// tonic's decoder turns each repeated element into a value of its own (a 16 MiB request of
/// empty args: ~200 MiB); native gRPC requests are checked first, as Connect ones are.
#[tokio::test]
async fn a_request_with_too_many_values_is_refused_before_decoding() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let args = vec![""; 300_000];
    let err = client.start(start_request("/bin/true", &args)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("more than 262144 values"), "{}", err.message());
    let out = run(&mut client, start_request("/bin/echo", &vec!["x"; 1000])).await;
    assert_eq!(out.stdout.len(), 2000, "a request under the limit still runs");
    server.stop().await;
}

#[tokio::test]
async fn timeout_kills_the_tree_and_ends_the_stream() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut req = tonic::Request::new(sh("sleep 1000 & echo $!; wait"));
    req.set_timeout(Duration::from_millis(1500));
    let mut stream = client.start(req).await.unwrap().into_inner();
    let mut out = Outcome::default();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => out.add(msg.event.unwrap()),
            Ok(None) => break,
            Err(status) => {
                out.error = Some(status);
                break;
            }
        }
    }
    let grandchild: u32 = String::from_utf8(out.stdout.clone()).unwrap().trim().parse().unwrap();
    let leader = out.pid.unwrap();
    // Either the end event (signal: killed) or a deadline error may finish the stream first.
    match (&out.end, &out.error) {
        (Some(end), _) => assert_eq!(end.status, "signal: killed"),
        (None, Some(status)) => assert_eq!(status.code(), Code::DeadlineExceeded),
        (None, None) => panic!("stream ended without end or error"),
    }
    assert!(eventually(Duration::from_secs(5), || !pid_exists(grandchild) && !pid_exists(leader)).await);
    server.stop().await;
}

#[tokio::test]
async fn connect_reattaches_by_pid_and_tag_and_after_exit() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut tagged = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let mut req = sh("read line; echo got $line");
        req.tag = Some(name.into());
        req.stdin = Some(true);
        let mut stream = client.start(req).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap().event.unwrap();
        let Some(process_event::Event::Start(start)) = first.event else { panic!("start first") };
        tagged.push((name, start.pid, stream));
    }
    let listed = client.list(ListRequest {}).await.unwrap().into_inner().processes;
    for (name, pid, _) in &tagged {
        let info = listed.iter().find(|p| p.pid == *pid).expect("listed");
        assert_eq!(info.tag.as_deref(), Some(*name));
        assert_eq!(info.config.as_ref().unwrap().cmd, "/bin/sh");
    }
    // Every tag resolves to its own process, whatever the table order.
    for (name, pid, _) in &tagged {
        let mut stream = client.connect(ConnectRequest { process: common::tag(name) }).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap().event.unwrap();
        assert!(matches!(first.event, Some(process_event::Event::Start(s)) if s.pid == *pid), "{name}");
    }
    let (_, beta_pid, beta_start) = tagged.remove(1);
    let mut attached = client.connect(ConnectRequest { process: common::pid(beta_pid) }).await.unwrap().into_inner();
    client
        .send_input(SendInputRequest {
            process: common::pid(beta_pid),
            input: Some(ProcessInput { input: Some(process_input::Input::Stdin("x\n".into())) }),
        })
        .await
        .unwrap();
    let mut seen = Outcome::default();
    while let Some(msg) = attached.message().await.unwrap() {
        seen.add(msg.event.unwrap());
    }
    assert_eq!(seen.stdout, b"got x\n");
    assert_eq!(seen.exit_code(), 0);
    drop(beta_start);

    // A finished process can still be reattached: start + end.
    let mut again = client.connect(ConnectRequest { process: common::pid(beta_pid) }).await.unwrap().into_inner();
    let mut replay = Outcome::default();
    while let Some(msg) = again.message().await.unwrap() {
        replay.add(msg.event.unwrap());
    }
    assert_eq!(replay.pid, Some(beta_pid));
    assert_eq!(replay.exit_code(), 0);

    let err = client.connect(ConnectRequest { process: common::pid(999_999_999) }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for (_, pid, _) in tagged {
        client
            .send_signal(SendSignalRequest { process: common::pid(pid), signal: Signal::Sigkill as i32 })
            .await
            .unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_subscriber_never_blocks_the_process_or_others() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    // 64 MiB: far more than any per-subscriber buffer and HTTP/2 window.
    let total: usize = 64 << 20;
    let mut req = sh(&format!("sleep 0.3; head -c {total} /dev/zero | tr '\\0' 'x'"));
    req.tag = Some("flood".into());
    let mut stream = client.start(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap().event.unwrap();
    let Some(process_event::Event::Start(start)) = first.event else { panic!() };
    // A second client attaches and never reads.
    let mut stalled_client = server.grpc().await;
    let stalled = stalled_client.connect(ConnectRequest { process: common::pid(start.pid) }).await.unwrap();
    let mut out = Outcome::default();
    let reading = async {
        while let Some(msg) = stream.message().await.unwrap() {
            out.add(msg.event.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(60), reading).await.expect("the live subscriber finished");
    assert_eq!(out.stdout.len(), total);
    assert!(out.stdout.iter().all(|&b| b == b'x'));
    assert_eq!(out.exit_code(), 0);
    assert_eq!(out.out_of_order, 0);
    drop(stalled);
    server.stop().await;
}

#[tokio::test]
async fn large_output_arrives_intact() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let out = run(&mut client, sh("head -c 20000000 /dev/urandom | tee /tmp/guestd-grpc-large | sha256sum")).await;
    let expected = String::from_utf8(out.stdout).unwrap();
    let out = run(&mut client, sh("cat /tmp/guestd-grpc-large; rm /tmp/guestd-grpc-large")).await;
    assert_eq!(out.stdout.len(), 20_000_000);
    let digest = format!("{:x}", Sha256::digest(&out.stdout));
    assert!(expected.starts_with(&digest), "{expected} vs {digest}");
    server.stop().await;
}

#[tokio::test]
async fn thirty_two_concurrent_commands() {
    let server = TestServer::start().await;
    let client = server.grpc().await;
    let runs = (0..32).map(|i| {
        let mut client = client.clone();
        async move { (i, run(&mut client, sh(&format!("sleep 0.2; echo {i}; exit {}", i % 7))).await) }
    });
    for (i, out) in futures_util::future::join_all(runs).await {
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        assert_eq!(out.exit_code(), i % 7);
    }
    server.stop().await;
}

#[tokio::test]
async fn keepalives_follow_the_requested_interval() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut req = tonic::Request::new(sh("sleep 2.5"));
    req.metadata_mut().insert("keepalive-ping-interval", "1".parse().unwrap());
    let mut stream = client.start(req).await.unwrap().into_inner();
    let mut out = Outcome::default();
    while let Some(msg) = stream.message().await.unwrap() {
        out.add(msg.event.unwrap());
    }
    assert!(out.keepalives >= 2, "{} keepalives", out.keepalives);
    // Junk and non-positive intervals fall back to the default instead of crashing anything.
    for junk in ["0", "-1", "soon"] {
        let mut req = tonic::Request::new(sh("true"));
        req.metadata_mut().insert("keepalive-ping-interval", junk.parse().unwrap());
        let out = run(&mut client, req.into_inner()).await;
        assert_eq!(out.exit_code(), 0);
    }
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let server = TestServer::start().await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut client = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses =
        client.server_reflection_info(futures_util::stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = responses.message().await.unwrap().unwrap();
    let Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected reflection answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"process.Process".to_owned()), "{names:?}");
    assert!(names.contains(&"filesystem.Filesystem".to_owned()), "{names:?}");
    server.stop().await;
}
