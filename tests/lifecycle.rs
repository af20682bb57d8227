//! Sandbox lifecycle over HTTP against a real guestd: `/init` (env vars, default user and
//! workdir, ordering, concurrency), the access-token gate on every route, signed `/files` URLs,
//! `/envs`, `/metrics`, and the start command at boot with `/ready`.

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use guestd::config::Config;
use guestd::http::auth::sign;
use guestd::proto::process::*;
use serde_json::json;

/// An RFC 3339 timestamp `offset` away from now (within the clock tolerance, so tests never
/// step the machine's clock).
fn timestamp(offset_ms: i64) -> String {
    let now = time::OffsetDateTime::from(SystemTime::now()) + time::Duration::milliseconds(offset_ms);
    now.format(&time::format_description::well_known::Rfc3339).unwrap()
}

#[tokio::test]
async fn init_env_vars_user_and_workdir_reach_processes() {
    let server = TestServer::start().await;
    let resp = post_json(
        server.addr,
        "/init",
        &[],
        json!({"envVars": {"FROM_INIT": "yes", "E2B_SANDBOX": "overridden"}, "defaultUser": "nobody",
               "defaultWorkdir": "/tmp", "timestamp": timestamp(0), "unknownField": 1}),
    )
    .await;
    assert_eq!(resp.status, 204, "{:?}", resp.body);
    assert_eq!(resp.headers["x-envd-version"], "0.6.13");
    assert_eq!(resp.headers["x-guestd-restore-epoch"], "0");

    let mut client = server.grpc().await;
    let out = run(&mut client, sh("echo $FROM_INIT $E2B_SANDBOX $(id -un) $(pwd)")).await;
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "yes true nobody /tmp\n");
    // Request envs win over /init ones.
    let mut req = sh("echo $FROM_INIT");
    req.process.as_mut().unwrap().envs.insert("FROM_INIT".into(), "request".into());
    assert_eq!(run(&mut client, req).await.stdout, b"request\n");

    let envs = get(server.addr, "/envs", &[]).await;
    assert_eq!(envs.status, 200);
    assert_eq!(envs.json(), json!({"E2B_SANDBOX": "true", "FROM_INIT": "yes"}));
    server.stop().await;
}

#[tokio::test]
async fn init_ordering_errors_and_concurrency() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let newer = post_json(addr, "/init", &[], json!({"timestamp": timestamp(0), "envVars": {"V": "new"}})).await;
    assert_eq!(newer.status, 204);
    let older = post_json(addr, "/init", &[], json!({"timestamp": timestamp(-30), "envVars": {"V": "old"}})).await;
    assert_eq!(older.status, 204, "acknowledged");
    assert_eq!(get(addr, "/envs", &[]).await.json()["V"], "new", "but not applied");

    let bad = http(addr, "POST", "/init", &[("content-type", "application/json")], Bytes::from_static(b"{nope")).await;
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("invalid JSON"));
    let empty = http(addr, "POST", "/init", &[], Bytes::new()).await;
    assert_eq!(empty.status, 204, "an empty body is an empty request");

    let calls = (0..40).map(|i| post_json(addr, "/init", &[], json!({"envVars": {"N": i.to_string()}})));
    for resp in futures_util::future::join_all(calls).await {
        assert_eq!(resp.status, 204);
    }
    server.stop().await;
}

#[tokio::test]
async fn access_token_gates_every_route_but_the_exempt_ones() {
    let server = TestServer::start().await;
    let addr = server.addr;
    assert_eq!(post_json(addr, "/init", &[], json!({"accessToken": "s3cret"})).await.status, 204);

    // Exempt: /health, /ready, /init (with the same token).
    assert_eq!(get(addr, "/health", &[]).await.status, 204);
    assert_eq!(get(addr, "/ready", &[]).await.status, 200);
    assert_eq!(post_json(addr, "/init", &[], json!({"accessToken": "s3cret"})).await.status, 204);
    let wrong_init = post_json(addr, "/init", &[], json!({"accessToken": "other"})).await;
    assert_eq!(wrong_init.status, 401);

    for (method, path) in
        [("GET", "/metrics"), ("GET", "/envs"), ("GET", "/nowhere"), ("POST", "/process.Process/List")]
    {
        let resp = http(addr, method, path, &[("content-type", "application/json")], Bytes::from_static(b"{}")).await;
        assert_eq!(resp.status, 401, "{method} {path}");
        // envd's jsonError, header for header (the same writer as /files errors).
        assert_eq!(resp.headers["content-type"], "application/json; charset=utf-8");
        assert_eq!(resp.headers["x-content-type-options"], "nosniff");
        assert!(resp.body.ends_with(b"}\n"));
        assert_eq!(
            resp.json(),
            json!({"code": 401, "message": "unauthorized access, please provide a valid access token or method signing if supported"})
        );
        let wrong = http(addr, method, path, &[("x-access-token", "nope")], Bytes::new()).await;
        assert_eq!(wrong.status, 401, "{method} {path} with a wrong token");
    }
    let ok = connect_unary(addr, "/process.Process/List", json!({})).await;
    assert_eq!(ok.status, 401);
    let authed = http(
        addr,
        "POST",
        "/process.Process/List",
        &[("content-type", "application/json"), ("x-access-token", "s3cret")],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(authed.status, 200);

    // Native gRPC sees the 401 as unauthenticated.
    let mut client = server.grpc().await;
    let err = client.list(ListRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(ListRequest {});
    req.metadata_mut().insert("x-access-token", "s3cret".parse().unwrap());
    client.list(req).await.unwrap();

    // /files: header or signature.
    std::fs::write("/tmp/guestd-signed.txt", b"signed").unwrap();
    let unsigned = get(addr, "/files?path=/tmp/guestd-signed.txt", &[]).await;
    assert_eq!(unsigned.status, 401);
    assert_eq!(unsigned.json()["message"], "missing signature query parameter");
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64 + 60;
    let sig = sign("/tmp/guestd-signed.txt", "read", "", "s3cret", Some(exp));
    let enc: String = form_urlencoded::byte_serialize(sig.as_bytes()).collect();
    let signed =
        get(addr, &format!("/files?path=/tmp/guestd-signed.txt&signature={enc}&signature_expiration={exp}"), &[]).await;
    assert_eq!(signed.status, 200);
    assert_eq!(&signed.body[..], b"signed");
    let tampered = get(addr, &format!("/files?path=/etc/passwd&signature={enc}&signature_expiration={exp}"), &[]).await;
    assert_eq!(tampered.status, 401);
    assert_eq!(tampered.json()["message"], "invalid signature");
    let with_header = get(addr, "/files?path=/tmp/guestd-signed.txt", &[("x-access-token", "s3cret")]).await;
    assert_eq!(with_header.status, 200);
    std::fs::remove_file("/tmp/guestd-signed.txt").unwrap();
    server.stop().await;
}

#[tokio::test]
async fn unknown_basic_auth_user_is_refused_everywhere() {
    let server = TestServer::start().await;
    let bad = [("authorization", "Basic bm9ib2R5LWF0LWFsbDo=")];
    let health = get(server.addr, "/health", &bad).await;
    assert_eq!(health.status, 401);
    assert_eq!(health.json()["code"], "unauthenticated");
    let list = http(
        server.addr,
        "POST",
        "/process.Process/List",
        &[("content-type", "application/json"), bad[0]],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(list.status, 401);
    assert_eq!(list.json()["code"], "unauthenticated");
    server.stop().await;
}

#[tokio::test]
async fn metrics_report_the_host() {
    let server = TestServer::start().await;
    let resp = get(server.addr, "/metrics", &[]).await;
    assert_eq!(resp.status, 200);
    let m = resp.json();
    let keys: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
    for key in [
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total_mib",
        "mem_used_mib",
        "mem_total",
        "mem_used",
        "mem_cache",
        "disk_used",
        "disk_total",
    ] {
        assert!(keys.contains(&key), "{key} missing from {m}");
    }
    assert!(m["mem_total"].as_u64().unwrap() >= m["mem_used"].as_u64().unwrap());
    assert!(m["cpu_count"].as_u64().unwrap() >= 1);
    server.stop().await;
}

async fn ready_json(server: &TestServer) -> (u16, serde_json::Value) {
    let resp = get(server.addr, "/ready", &[]).await;
    (resp.status, resp.json())
}

#[tokio::test]
async fn start_command_output_is_replayed_to_a_late_connect() {
    let mut config = Config::loopback("root");
    config.start.cmd = Some("echo first line from boot; echo to stderr >&2; exec sleep 60".into());
    let server = TestServer::with_config(config).await;
    let mut client = server.grpc().await;
    // Wait until the start command is listed by its tag.
    let mut pid = None;
    for _ in 0..200 {
        let list = client.list(ListRequest {}).await.unwrap().into_inner().processes;
        if let Some(p) = list.iter().find(|p| p.tag.as_deref() == Some("start_cmd")) {
            pid = Some(p.pid);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pid = pid.expect("start_cmd listed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, ready) = ready_json(&server).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["state"], "ready");
    assert_eq!(ready["pid"], pid);

    // A client connecting well after the output was printed still sees all of it.
    let mut stream = client.connect(ConnectRequest { process: tag("start_cmd") }).await.unwrap().into_inner();
    let mut out = Outcome::default();
    while !String::from_utf8_lossy(&out.stdout).contains("first line") || out.stderr.is_empty() {
        out.add(stream.message().await.unwrap().unwrap().event.unwrap());
    }
    assert_eq!(out.pid, Some(pid));
    assert_eq!(out.stdout, b"first line from boot\n");
    assert_eq!(out.stderr, b"to stderr\n");
    server.stop().await;
}

#[tokio::test]
async fn ready_command_gates_ready_and_a_dead_start_command_is_reported() {
    let flag = std::env::temp_dir().join(format!("guestd-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let mut config = Config::loopback("root");
    config.start.cmd = Some("sleep 60".into());
    config.start.ready_cmd = Some(format!("test -f {}", flag.display()));
    let server = TestServer::with_config(config).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, ready) = ready_json(&server).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["state"], "starting");
    std::fs::write(&flag, b"").unwrap();
    assert!(eventually_async(Duration::from_secs(10), || async { ready_json(&server).await.0 == 200 }).await);
    std::fs::remove_file(&flag).unwrap();
    server.stop().await;

    let mut config = Config::loopback("root");
    config.start.cmd = Some("echo dying; exit 3".into());
    let server = TestServer::with_config(config).await;
    assert!(
        eventually_async(Duration::from_secs(10), || async { ready_json(&server).await.1["state"] == "exited" }).await
    );
    let (status, ready) = ready_json(&server).await;
    assert_eq!(status, 503);
    assert_eq!(ready["exit_code"], 3);
    assert_eq!(ready["status"], "exit status 3");
    server.stop().await;
}

/// A ready command that never passes fails readiness once its time is up, saying how its last
/// attempt failed.
#[tokio::test]
async fn a_ready_command_that_never_passes_says_why() {
    let mut config = Config::loopback("root");
    config.start.cmd = Some("sleep 60".into());
    config.start.ready_cmd = Some("echo checking >&2; echo 'port 8000: connection refused' >&2; exit 7".into());
    config.start.ready_timeout = Some(Duration::from_millis(1500));
    let server = TestServer::with_config(config).await;
    assert!(
        eventually_async(Duration::from_secs(10), || async { ready_json(&server).await.1["state"] == "failed" }).await
    );
    let (status, ready) = ready_json(&server).await;
    assert_eq!(status, 503);
    let error = ready["error"].as_str().unwrap();
    assert!(error.starts_with("ready command did not pass within 1.5s"), "{error}");
    assert!(error.ends_with("last attempt: exit status 7: port 8000: connection refused"), "{error}");
    server.stop().await;
}

/// A ready command that hangs (a probe that never gets an answer) is killed at the deadline and
/// readiness fails on time; before, `/ready` stayed "starting" for as long as it hung.
#[tokio::test]
async fn a_ready_command_that_hangs_is_killed_at_the_deadline() {
    let mut config = Config::loopback("root");
    config.start.cmd = Some("sleep 60".into());
    config.start.ready_cmd = Some("echo probing; exec sleep 600".into());
    config.start.ready_timeout = Some(Duration::from_millis(1500));
    let server = TestServer::with_config(config).await;
    assert!(
        eventually_async(Duration::from_secs(10), || async { ready_json(&server).await.1["state"] == "failed" }).await
    );
    let (_, ready) = ready_json(&server).await;
    let error = ready["error"].as_str().unwrap();
    assert!(error.starts_with("ready command did not pass within 1.5s"), "{error}");
    assert!(error.ends_with("last attempt: still running at the deadline, signal: killed"), "{error}");
    server.stop().await;
}

#[tokio::test]
async fn start_after_init_lets_init_env_vars_and_start_cmd_reach_the_start_command() {
    let out_file = std::env::temp_dir().join(format!("guestd-after-init-{}", std::process::id()));
    let _ = std::fs::remove_file(&out_file);
    let mut config = Config::loopback("root");
    config.start.cmd = Some(format!("echo image $SECRET > {}", out_file.display()));
    config.start.after_init = Some(Duration::from_secs(30));
    let server = TestServer::with_config(config).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, ready) = ready_json(&server).await;
    assert_eq!((status, ready["state"].as_str()), (503, Some("waiting_for_init")));
    assert!(!out_file.exists(), "started before /init");
    let resp = post_json(
        server.addr,
        "/init",
        &[],
        json!({"envVars": {"SECRET": "per-sandbox"}, "startCmd": format!("echo override $SECRET > {}", out_file.display())}),
    )
    .await;
    assert_eq!(resp.status, 204);
    assert!(
        eventually(Duration::from_secs(10), || out_file.exists() && std::fs::metadata(&out_file).unwrap().len() > 0)
            .await
    );
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "override per-sandbox\n");
    std::fs::remove_file(&out_file).unwrap();
    server.stop().await;
}

#[tokio::test]
async fn cors_preflight_is_answered_before_the_token_gate() {
    let server = TestServer::start().await;
    assert_eq!(post_json(server.addr, "/init", &[], json!({"accessToken": "tok"})).await.status, 204);
    let preflight = http(
        server.addr,
        "OPTIONS",
        "/process.Process/Start",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type,x-access-token,connect-protocol-version"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(preflight.status, 200);
    assert_eq!(preflight.headers["access-control-allow-origin"], "*");
    assert_eq!(preflight.headers["access-control-max-age"], "7200");
    let allowed = preflight.headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("x-access-token"), "{allowed}");
    let real = http(server.addr, "GET", "/health", &[("origin", "https://app.example")], Bytes::new()).await;
    assert_eq!(real.headers["access-control-allow-origin"], "*");
    assert!(real.headers["access-control-expose-headers"].to_str().unwrap().contains("grpc-status"));
    server.stop().await;
}

/// Deliberately stricter than envd, which accepts these and then fails every process start
/// (Go's exec refuses a NUL in the environment; a name with `=` silently becomes another var):
/// `/init` refuses an env var no process could be given, names it, and changes nothing.
#[tokio::test]
async fn init_refuses_env_vars_no_process_could_get() {
    let server = TestServer::start().await;
    let addr = server.addr;
    assert_eq!(post_json(addr, "/init", &[], json!({"envVars": {"KEEP": "1"}})).await.status, 204);
    let huge = "x".repeat(200 * 1024);
    for (vars, named) in [
        (json!({"OK": "1", "BAD": "a\u{0}b"}), "BAD"),
        (json!({"A=B": "x"}), "A=B"),
        (json!({"": "x"}), "\"\""),
        (json!({"NUL\u{0}NAME": "x"}), "NUL\\0NAME"),
        (json!({"HUGE": huge}), "HUGE"),
    ] {
        let resp = post_json(addr, "/init", &[], json!({"envVars": vars, "defaultUser": "nobody"})).await;
        assert_eq!(resp.status, 400, "{vars:?}");
        let body = String::from_utf8_lossy(&resp.body);
        assert!(body.contains(named), "{body}");
        assert!(!body.contains("xxxx"), "a value is never echoed: {body}");
    }
    assert_eq!(get(addr, "/envs", &[]).await.json(), json!({"E2B_SANDBOX": "true", "KEEP": "1"}), "nothing applied");
    let mut client = server.grpc().await;
    let out = run(&mut client, sh("echo $KEEP $(id -un)")).await;
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "1 root\n");
    server.stop().await;
}

/// A `signature_expiration` that is not an integer is a malformed request (envd's parameter
/// binding answers 400), not a failed authentication.
#[tokio::test]
async fn a_malformed_signature_expiration_is_a_bad_request() {
    let server = TestServer::start().await;
    assert_eq!(post_json(server.addr, "/init", &[], json!({"accessToken": "s3cret"})).await.status, 204);
    let resp = get(server.addr, "/files?path=/etc/hostname&signature=v1_x&signature_expiration=soon", &[]).await;
    assert_eq!(resp.status, 400, "{:?}", resp.body);
    assert_eq!(resp.json(), json!({"code": 400, "message": "invalid signature_expiration: 'soon'"}));
    server.stop().await;
}

/// `cpu_count` is the machine's logical CPUs, as gopsutil's `cpu.Counts(true)` reports for envd
/// (and the CPUs `cpu_used_pct` is computed over): not the CPUs guestd's own affinity or cgroup
/// quota lets it use. Runs the binary pinned to one CPU (`taskset`); meaningful on a host with
/// more than one.
#[tokio::test]
async fn metrics_count_every_cpu_not_only_guestds_own() {
    let online = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.strip_prefix("cpu").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit())))
        .count();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut child = std::process::Command::new("taskset")
        .args([
            "-c",
            "0",
            env!("CARGO_BIN_EXE_guestd"),
            "--listen",
            &addr.to_string(),
            "--start-config",
            "/nonexistent",
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("taskset runs");
    let up = eventually_async(Duration::from_secs(10), || async { tokio::net::TcpStream::connect(addr).await.is_ok() })
        .await;
    let m = if up { Some(get(addr, "/metrics", &[]).await.json()) } else { None };
    let _ = child.kill();
    let _ = child.wait();
    let m = m.expect("guestd came up");
    assert_eq!(m["cpu_count"].as_u64(), Some(online as u64), "{m}");
}
