//! guestd as PID 1 (needs root: a new PID namespace via `unshare --pid --fork --mount-proc`):
//! it reaps an orphaned grandchild it never started, and exits cleanly on SIGTERM.

#![allow(clippy::print_stdout, reason = "a skipped check says why on stdout")]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::json;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `script` through guestd's Start over Connect and returns its stdout.
async fn run_script(addr: SocketAddr, script: &str) -> String {
    let req = json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}, "stdin": false});
    let resp = connect_stream(addr, "/process.Process/Start", &[], &[req]).await;
    let (messages, end) = resp.json_stream();
    assert_eq!(end, json!({}), "{messages:?}");
    messages.iter().filter_map(|m| m["event"]["data"]["stdout"].as_str()).flat_map(b64).map(char::from).collect()
}

/// Starts guestd as PID 1 of a new PID namespace, listening on a port derived from this test
/// binary's pid plus `port_offset` (tests run in parallel), and waits until it answers.
async fn start_as_pid1(port_offset: u32) -> (SocketAddr, std::process::Child) {
    let port = 20_000 + ((std::process::id() + port_offset) % 10_000) as u16;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_guestd"), "--listen", &addr.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare runs");
    let up = eventually_async(Duration::from_secs(10), || async { tokio::net::TcpStream::connect(addr).await.is_ok() })
        .await;
    assert!(up, "guestd did not come up as PID 1");
    (addr, unshare)
}

/// guestd's pid (seen from here): `unshare --fork`'s only child.
fn guestd_pid(unshare: u32) -> Option<nix::unistd::Pid> {
    let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok().map(nix::unistd::Pid::from_raw)
}

#[tokio::test]
async fn pid1_reaps_orphans_and_exits_cleanly_on_sigterm() {
    if !is_root() {
        println!("SKIPPED pid1 test: needs root to create a PID namespace");
        return;
    }
    let (addr, mut unshare) = start_as_pid1(0).await;
    assert_eq!(http(addr, "GET", "/health", &[], Bytes::new()).await.status, 204);
    assert_eq!(run_script(addr, "echo $PPID; cat /proc/1/comm").await, "1\nguestd\n");

    // The subshell exits at once; its `sleep` is re-parented to PID 1 (guestd) and must be reaped.
    run_script(addr, "(sleep 0.3 &); exit 0").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let states = run_script(addr, "for f in /proc/[0-9]*/stat; do cut -d' ' -f2,3 $f; done").await;
    assert!(!states.lines().any(|l| l.ends_with(" Z")), "zombie left behind:\n{states}");
    assert!(!states.contains("(sleep)"), "orphan still running:\n{states}");

    // SIGTERM to guestd (unshare's child): it stops its processes and exits 0.
    run_script(addr, "sleep 1000 >/dev/null 2>&1 &").await;
    let guestd = guestd_pid(unshare.id()).expect("guestd is unshare's child");
    nix::sys::signal::kill(guestd, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || unshare.wait()).await.unwrap().unwrap();
    assert!(status.success(), "guestd as PID 1 exited with {status}");
}

/// A hung exec holds up only itself, orphan reaping included: while one spawn waits for its
/// exec, an orphan that ends is still reaped (before, the PID-1 reaper left every unknown child
/// alone while any spawn was in flight, so zombies piled up for as long as the exec hung).
#[tokio::test]
async fn pid1_reaps_orphans_while_an_exec_hangs() {
    if !is_root() {
        println!("SKIPPED pid1 test: needs root to create a PID namespace");
        return;
    }
    let held = match HeldExec::new() {
        Ok(held) => held,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let (addr, mut unshare) = start_as_pid1(1).await;

    // Ends guestd (unshare's child) however the test ends.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(guestd) = guestd_pid(self.0) {
                let _ = nix::sys::signal::kill(guestd, nix::sys::signal::Signal::SIGTERM);
            }
        }
    }
    let stop = Stop(unshare.id());

    let req = json!({"process": {"cmd": held.path.to_str().unwrap()}, "stdin": false});
    let hung = tokio::spawn(async move { connect_stream(addr, "/process.Process/Start", &[], &[req]).await });
    let attempted = tokio::task::spawn_blocking(move || held.held.recv_timeout(Duration::from_secs(10))).await.unwrap();
    if attempted.is_err() {
        let resp = hung.await.unwrap();
        panic!("the exec was never attempted: {:?}", resp.json_stream());
    }

    run_script(addr, "(sleep 0.2 &); exit 0").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let states = run_script(addr, "for f in /proc/[0-9]*/stat; do cut -d' ' -f2,3 $f; done").await;
    let zombie = states.lines().any(|l| l.ends_with(" Z"));

    held.release.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), hung).await;
    drop(stop);
    let status = tokio::task::spawn_blocking(move || unshare.wait()).await.unwrap().unwrap();
    assert!(!zombie, "an orphan stayed a zombie while an exec hung:\n{states}");
    assert!(status.success(), "guestd as PID 1 exited with {status}");
}
