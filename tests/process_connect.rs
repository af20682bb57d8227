//! process.Process over the Connect protocol (what the E2B SDKs speak) against a real guestd:
//! JSON and proto codecs, unary and streams, error mapping, and bad input that must not hurt.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use guestd::proto::process::*;
use prost::Message;
use serde_json::json;

const START: &str = "/process.Process/Start";

#[tokio::test]
async fn start_over_connect_json_matches_what_the_sdk_parses() {
    let server = TestServer::start().await;
    let req = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "printf hi; exit 2"]}, "stdin": false});
    let resp = connect_stream(server.addr, START, &[("connect-timeout-ms", "10000")], &[req]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.headers["content-type"], "application/connect+json");
    let (messages, end) = resp.json_stream();
    assert_eq!(end, json!({}));
    let pid = messages[0]["event"]["start"]["pid"].as_u64().expect("start first");
    assert!(pid > 0);
    let stdout: Vec<u8> = messages.iter().filter_map(|m| m["event"]["data"]["stdout"].as_str()).flat_map(b64).collect();
    assert_eq!(stdout, b"hi");
    let last = messages.last().unwrap();
    assert_eq!(
        last["event"]["end"],
        json!({"exitCode": 2, "exited": true, "status": "exit status 2", "error": "exit status 2"})
    );
    server.stop().await;
}

#[tokio::test]
async fn start_over_connect_proto() {
    let server = TestServer::start().await;
    let req = sh("printf proto").encode_to_vec();
    let resp = http(
        server.addr,
        "POST",
        START,
        &[("content-type", "application/connect+proto")],
        Bytes::from(envelope(0, &req)),
    )
    .await;
    assert_eq!(resp.status, 200);
    let mut out = Outcome::default();
    let frames = resp.envelopes();
    let (last_flags, _) = frames.last().unwrap();
    assert_eq!(last_flags & 0x02, 0x02);
    for (flags, payload) in &frames[..frames.len() - 1] {
        assert_eq!(*flags, 0);
        out.add(StartResponse::decode(payload.clone()).unwrap().event.unwrap());
    }
    assert_eq!(out.stdout, b"proto");
    assert_eq!(out.exit_code(), 0);
    server.stop().await;
}

#[tokio::test]
async fn unary_calls_and_error_mapping() {
    let server = TestServer::start().await;
    let list = connect_unary(server.addr, "/process.Process/List", json!({})).await;
    assert_eq!(list.status, 200);
    assert!(list.headers["content-type"].to_str().unwrap().starts_with("application/json"));

    let missing = connect_unary(
        server.addr,
        "/process.Process/SendInput",
        json!({"process": {"pid": 999999999}, "input": {"stdin": "aGk="}}),
    )
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], "not_found");
    assert!(missing.json()["message"].as_str().unwrap().contains("999999999"));

    let signal = connect_unary(
        server.addr,
        "/process.Process/SendSignal",
        json!({"process": {"pid": 1}, "signal": "SIGNAL_UNSPECIFIED"}),
    )
    .await;
    assert_eq!(signal.status, 501);
    assert_eq!(signal.json()["code"], "unimplemented");

    // Unknown Basic-auth user on a stream: HTTP 200 with an end-stream error.
    let resp = connect_stream(
        server.addr,
        START,
        &[("authorization", "Basic bm9ib2R5LWF0LWFsbDo=")],
        &[json!({"process": {"cmd": "/bin/true"}})],
    )
    .await;
    assert_eq!(resp.status, 200);
    let (messages, end) = resp.json_stream();
    assert!(messages.is_empty());
    assert_eq!(end["error"]["code"], "unauthenticated");
    server.stop().await;
}

#[tokio::test]
async fn connect_timeout_is_the_process_lifetime() {
    let server = TestServer::start().await;
    let req = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "echo $$; exec sleep 30"]}});
    let started = tokio::time::Instant::now();
    let resp = connect_stream(server.addr, START, &[("connect-timeout-ms", "1000")], &[req]).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let (messages, end) = resp.json_stream();
    let pid = messages[0]["event"]["start"]["pid"].as_u64().unwrap() as u32;
    let ended_by_kill = messages.iter().any(|m| m["event"]["end"]["status"] == "signal: killed");
    assert!(ended_by_kill || end["error"]["code"] == "deadline_exceeded", "{messages:?} {end}");
    assert!(eventually(Duration::from_secs(5), || !pid_exists(pid)).await, "process {pid} outlived its timeout");
    server.stop().await;
}

/// Go quirk #8 (`rpc.md` §7): envd answers `Connect-Timeout-Ms: 0` with `deadline_exceeded`
/// but starts the process anyway, and with no time limit. guestd treats the deadline as passed
/// before the call began: the same error, and nothing runs.
#[tokio::test]
async fn a_zero_connect_timeout_has_passed_and_nothing_starts() {
    let server = TestServer::start().await;
    let marker = tempfile::tempdir().unwrap();
    let file = marker.path().join("ran");
    let script = format!("touch {}", file.display());
    let req = json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}});
    let resp = connect_stream(server.addr, START, &[("connect-timeout-ms", "0")], &[req]).await;
    let (messages, end) = resp.json_stream();
    assert!(messages.is_empty(), "{messages:?}");
    assert_eq!(end["error"]["code"], "deadline_exceeded");

    let unary = http(
        server.addr,
        "POST",
        "/process.Process/List",
        &[("content-type", "application/json"), ("connect-timeout-ms", "0")],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(unary.status, 504);
    assert_eq!(unary.json()["code"], "deadline_exceeded");

    let list = connect_unary(server.addr, "/process.Process/List", json!({})).await;
    assert_eq!(list.json(), json!({}), "no process was started");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!file.exists(), "the command ran");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_protocol_errors_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let stream_ct = [("content-type", "application/connect+json")];
    let cases: Vec<(&str, HttpResponse)> = vec![
        ("truncated envelope", http(addr, "POST", START, &stream_ct, Bytes::from_static(&[0, 0, 0])).await),
        (
            "4 GiB length prefix",
            http(addr, "POST", START, &stream_ct, Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff, b'{'])).await,
        ),
        ("invalid JSON in envelope", http(addr, "POST", START, &stream_ct, Bytes::from(envelope(0, b"{nope"))).await),
        (
            "wrong content type",
            http(addr, "POST", "/process.Process/List", &[("content-type", "text/plain")], Bytes::from_static(b"{}"))
                .await,
        ),
        ("unknown method", connect_unary(addr, "/process.Process/Nope", json!({})).await),
        (
            "invalid JSON unary",
            http(
                addr,
                "POST",
                "/process.Process/List",
                &[("content-type", "application/json")],
                Bytes::from_static(b"{\"a\":"),
            )
            .await,
        ),
    ];
    for (name, resp) in cases {
        assert!(
            resp.status >= 400 || resp.envelopes().last().is_some_and(|(flags, _)| flags & 0x02 != 0),
            "{name}: status {} body {:?}",
            resp.status,
            resp.body
        );
        if resp.status == 200 {
            let (_, end) = resp.json_stream();
            assert!(end["error"]["code"].is_string(), "{name}: {end}");
        }
        let health = http(addr, "GET", "/health", &[], Bytes::new()).await;
        assert_eq!(health.status, 204, "server stopped serving after {name}");
    }
    server.stop().await;
}
