//! Micro-VM tier: guestd as PID 1 of a real guest, reached only through a Firecracker-style
//! hybrid-vsock Unix socket — the way a VMM host drives it.
//!
//! `scripts/test-microvm.sh` prepares the artefacts (Debian cloud kernel as a direct-boot
//! vmlinux, an initramfs with static busybox + static guestd + the vsock modules, and
//! vhost-device-vsock) and runs this test with `--ignored`. The test boots QEMU (TCG `microvm`,
//! 1 vCPU, 256 MiB, guest RAM in a shared memfd for the vhost-user backend), then, through
//! `unix://…/vm.vsock:49983` only: runs commands, checks exit codes (library and `guestctl`),
//! reads the start command given on the kernel command line back by its tag, injects env
//! vars with `/init`, moves files both ways with equal sha256 (one transfer at a time:
//! vhost-device-vsock 0.3 can stall under concurrent bulk traffic), and powers the guest off by
//! sending guestd SIGTERM (`kill -TERM 1` run through guestd itself): guestd stops serving,
//! ends its children and powers the machine off, and QEMU exits on its own.
//!
//! Boot timing, measured in one run, on one clock (the guest's: seconds since the kernel started,
//! `/proc/uptime`; with `tsc_early_khz` the TCG guest clock runs at host speed):
//! - `init_start`: the first line of `/init` — the time the kernel needs to reach init;
//! - `guestd_exec`: just before `/init` execs guestd, which then loads the vsock modules itself
//!   (`--kernel-module`; a Firecracker guest kernel has them built in);
//! - `first_command`: `/proc/uptime` read by the first command the host runs, which the host
//!   starts the moment its connection attempts (every ≤ 20 ms) get through.
//!
//! `first_command − guestd_exec` is what guestd adds (module loading, start-up, vsock listen,
//! HTTP/2 set-up, spawning `cat`) plus at most one host poll interval; `first_command −
//! init_start` adds `/init`'s two mounts. The host wall clock from QEMU's spawn is reported
//! beside them.

#![allow(clippy::print_stdout, reason = "the tier's report (boot timings, throughput) is its output")]

#[path = "../common/mod.rs"]
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sha256_file;
use guestd::client::{
    Client, ClientOptions, Command, ConnectOptions, GuestAddr, InitRequest, NoProgress, RunEvent, Selector, Signal,
};

/// The guest port guestd listens on (`/init` passes `--listen vsock://-1:49983`).
const GUEST_PORT: u32 = 49983;
/// Guest CID given to vhost-device-vsock.
const GUEST_CID: u32 = 3;
/// Printed by the start command set on the kernel command line.
const START_MARK: &str = "hello-from-the-kernel-command-line";
/// Size of the bulk transfer: big enough to measure throughput, small enough for a TCG guest.
const PAYLOAD: usize = 16 * 1024 * 1024;
/// Budget for the whole run (boot is ~2 s, the rest a few seconds; generous for a loaded host).
const TIER_BUDGET: Duration = Duration::from_secs(240);

struct Artefacts {
    kernel: PathBuf,
    initramfs: PathBuf,
    vhost: PathBuf,
}

impl Artefacts {
    fn from_env() -> Artefacts {
        let var = |name: &str| {
            let path =
                PathBuf::from(std::env::var_os(name).unwrap_or_else(|| {
                    panic!("{name} is not set: run the micro-VM tier through scripts/test-microvm.sh")
                }));
            assert!(path.exists(), "{name}={} does not exist: rerun scripts/test-microvm.sh", path.display());
            path
        };
        Artefacts {
            kernel: var("GUESTD_MICROVM_KERNEL"),
            initramfs: var("GUESTD_MICROVM_INITRAMFS"),
            vhost: var("GUESTD_MICROVM_VHOST"),
        }
    }
}

/// A child process (QEMU, vhost-device-vsock) killed on drop unless it has exited.
struct Guard {
    name: &'static str,
    child: Child,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("stopping {} (pid {})", self.name, self.child.id());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One booted micro-VM and its host-side vsock backend.
struct Vm {
    dir: tempfile::TempDir,
    qemu: Guard,
    _vhost: Guard,
    /// When QEMU was spawned.
    spawned: Instant,
}

impl Vm {
    fn boot(artefacts: &Artefacts) -> Vm {
        let dir = tempfile::Builder::new().prefix("guestd-microvm-").tempdir().unwrap();
        let vhost_sock = dir.path().join("vhost.sock");
        let vhost = std::process::Command::new(&artefacts.vhost)
            .arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                vhost_sock.display(),
                dir.path().join("vm.vsock").display()
            ))
            .stdin(Stdio::null())
            .stdout(log_file(dir.path(), "vhost.log"))
            .stderr(log_file(dir.path(), "vhost.log"))
            .spawn()
            .expect("vhost-device-vsock starts");
        let vhost = Guard { name: "vhost-device-vsock", child: vhost };
        // QEMU is the vhost-user client: the backend's socket must exist first.
        let waited = Instant::now();
        while !vhost_sock.exists() {
            assert!(waited.elapsed() < Duration::from_secs(10), "vhost-device-vsock never created its socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 tsc_early_khz={} guestd.start_cmd=\"echo {START_MARK}; exec sleep 600\"",
            host_tsc_khz()
        );
        // Extra kernel parameters for a diagnostic run, e.g. `RUST_LOG=guestd=debug` (the
        // kernel hands `KEY=VALUE` parameters without a dot to init as environment).
        if let Some(extra) = std::env::var_os("GUESTD_MICROVM_APPEND") {
            cmdline.push(' ');
            cmdline.push_str(&extra.to_string_lossy());
        }
        let spawned = Instant::now();
        let qemu = std::process::Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "microvm,x-option-roms=off,isa-serial=on,memory-backend=mem"])
            .args(["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", dir.path().join("console.log").display()))
            .arg("-kernel")
            .arg(&artefacts.kernel)
            .arg("-initrd")
            .arg(&artefacts.initramfs)
            .args(["-append", &cmdline])
            // vhost-user maps guest RAM: it must be a shared memfd of exactly `-m`.
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .arg("-chardev")
            .arg(format!("socket,id=vsc,path={}", vhost_sock.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vsc"])
            .stdin(Stdio::null())
            .stdout(log_file(dir.path(), "qemu.log"))
            .stderr(log_file(dir.path(), "qemu.log"))
            .spawn()
            .expect("qemu-system-x86_64 starts");
        Vm { dir, qemu: Guard { name: "qemu", child: qemu }, _vhost: vhost, spawned }
    }

    fn addr(&self) -> GuestAddr {
        GuestAddr::HybridVsock { path: self.dir.path().join("vm.vsock"), port: GUEST_PORT }
    }

    fn log(&self, name: &str) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join(name)) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits up to `limit` for QEMU to exit by itself.
    async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.qemu.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::env::var_os("GUESTD_MICROVM_KEEP").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("GUESTD_MICROVM_KEEP: logs kept in {}", kept.display());
        }
        if std::thread::panicking() {
            for name in ["console.log", "qemu.log", "vhost.log"] {
                let text = self.log(name);
                let tail: Vec<_> = text.lines().rev().take(40).collect();
                eprintln!("---- {name} (last {} lines) ----", tail.len());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name)).unwrap()
}

/// The host TSC in kHz: under TCG the guest TSC is the host's, and the microvm guest cannot
/// calibrate it (no PIT) — without this it hangs in early boot.
fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz").and_then(|r| r.split(':').nth(1)))
        .and_then(|v| v.trim().parse().ok())
        .expect("a 'cpu MHz' line in /proc/cpuinfo");
    (mhz * 1000.0).round() as u64
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut data = vec![0u8; len];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    std::fs::write(path, data).unwrap();
}

/// Runs guestctl against the VM; returns (exit code, stdout, stderr).
async fn guestctl(vm_addr: &GuestAddr, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--addr".to_owned(), vm_addr.to_string(), "--wait".to_owned(), "30s".to_owned()];
    all.extend(args.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_guestctl")).args(&all).output().expect("guestctl runs")
    })
    .await
    .unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

/// Runs a shell command in the guest; returns stdout after asserting it exited 0.
async fn sh(client: &Client, script: &str) -> String {
    let out = client.output(&Command::shell(script)).await.unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(out.status.success(), "{script}: {:?}, stderr {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A second guestd, started the way systemd starts a service with `Delegate=yes` and
/// `DelegateSubgroup=guestd-agent`: not PID 1, in `guestd-agent` below the service's cgroup
/// (`/svc`, whose `pids.max` stands in for `TasksMax`). Its commands, in `guestd-commands`
/// beside it, get limits taken from the service's own.
async fn delegated_guestd(vm: &Vm, client: &Client, options: &ClientOptions) {
    const PORT: u32 = GUEST_PORT + 1;
    // The inner shell moves itself into /svc/guestd-agent, then becomes guestd.
    sh(
        client,
        &format!(
            "mkdir -p /sys/fs/cgroup/svc/guestd-agent && echo 300 > /sys/fs/cgroup/svc/pids.max && \
             sh -c 'echo $$ > /sys/fs/cgroup/svc/guestd-agent/cgroup.procs && exec /sbin/guestd --listen vsock://-1:{PORT}' \
             </dev/null >/tmp/svc.log 2>&1 &"
        ),
    )
    .await;
    let addr = GuestAddr::HybridVsock { path: vm.dir.path().join("vm.vsock"), port: PORT };
    let Ok(svc) = Client::connect(addr, options.clone()).await else {
        panic!("the delegated guestd answers; its log:\n{}", sh(client, "cat /tmp/svc.log").await);
    };
    let cgroup = sh(&svc, "grep ^0:: /proc/self/cgroup").await;
    assert!(cgroup.starts_with("0::/svc/guestd-commands/guestd-"), "{cgroup}");
    let limits = sh(
        &svc,
        "cd /sys/fs/cgroup/svc/guestd-commands; for i in $(seq 50); do [ -e pids.max ] && [ \"$(cat pids.max)\" != max ] && break; sleep 0.1; done; \
         cat pids.max cpu.weight; cat ../cgroup.procs | wc -l; cat /proc/$(cat ../guestd-agent/cgroup.procs)/comm",
    )
    .await;
    let log = sh(client, "cat /tmp/svc.log").await;
    assert_eq!(
        limits.split_whitespace().collect::<Vec<_>>(),
        // 300 less the 64 task slots kept for the agent; no process in /svc itself.
        ["236", "50", "0", "guestd"],
        "pids.max, cpu.weight, processes in /svc, guestd-agent's process; its log:\n{log}"
    );
    sh(client, "kill -TERM $(cat /sys/fs/cgroup/svc/guestd-agent/cgroup.procs)").await;
}

/// The guest-clock time of the last guestd log line `is_line` picks (see the call sites).
fn logged_uptime(console: &str, clocks: &str, is_line: impl Fn(&str) -> bool) -> Option<f64> {
    let uptime: f64 = clocks.split_whitespace().next()?.parse().ok()?;
    let field = |name: &str| -> Option<f64> {
        clocks.lines().find_map(|l| l.trim().strip_prefix(name)).and_then(|v| v.trim().parse().ok())
    };
    let wall = field("time.tv_sec:")? + field("time.tv_usec:")? / 1e6;
    let console = strip_ansi(console);
    let line = console.lines().filter(|l| is_line(l)).last()?;
    let stamp = line.split_whitespace().next()?;
    let stamp = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    let logged = stamp.unix_timestamp_nanos() as f64 / 1e9;
    Some(logged - (wall - uptime))
}

/// guestd's text logs colour their fields; drop the escape sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "micro-VM tier: needs QEMU, a guest kernel and an initramfs; run scripts/test-microvm.sh"]
async fn guestd_as_pid1_of_a_microvm_over_hybrid_vsock() {
    let artefacts = Artefacts::from_env();
    // TCG timings scale with the host's spare CPU: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nhost load average before boot: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    let mut vm = Vm::boot(&artefacts);
    match tokio::time::timeout(TIER_BUDGET, drive(&mut vm)).await {
        Ok(()) => {}
        Err(_) => panic!("the micro-VM tier did not finish within {TIER_BUDGET:?}"),
    }
}

async fn drive(vm: &mut Vm) {
    let addr = vm.addr();
    let work = tempfile::tempdir().unwrap();

    // ---- boot to first command ----
    let options = ClientOptions {
        // Generous deadline for a loaded host; a short poll interval so the host's lag stays a
        // small, bounded part of the boot figure.
        connect: ConnectOptions {
            deadline: Duration::from_secs(90),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        },
        ..ClientOptions::default()
    };
    let client = Client::connect(addr.clone(), options.clone()).await.expect("guestd answers over hybrid vsock");
    let connected = vm.spawned.elapsed();
    // `cat` itself (no shell in between) reads the guest clock, as early as a command can.
    let first_cmd = Command::new("cat").args(["/proc/uptime", "/boot-times"]);
    let first = client.output(&first_cmd).await.expect("the first command runs");
    let answered = vm.spawned.elapsed();
    assert!(first.status.success(), "{first:?}");
    let text = String::from_utf8(first.stdout).unwrap();
    let first_command: f64 = text.split_whitespace().next().and_then(|v| v.parse().ok()).expect("uptime");
    let stamp = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in /boot-times: {text}"))
    };
    let (init_start, guestd_exec) = (stamp("init_start"), stamp("guestd_exec"));

    // ---- guestd is PID 1 of a real kernel ----
    assert_eq!(sh(&client, "cat /proc/1/comm").await.trim(), "guestd");
    assert_eq!(
        sh(&client, "cat /proc/sys/kernel/pid_max").await.trim(),
        "4194304",
        "guestd raises pid_max as systemd does"
    );

    // ---- a cgroup per command (guestd mounted cgroup2): a kill reaches what called setsid ----
    let cgroup = sh(&client, "grep ^0:: /proc/self/cgroup").await;
    assert!(
        cgroup.starts_with("0::/guestd-commands/guestd-1-cmd-"),
        "each command starts in a cgroup of its own, inside the commands' shared one: {cgroup}"
    );
    // Set once guestd serves, off the spawn path: wait for them.
    let limits = sh(
        &client,
        "cd /sys/fs/cgroup/guestd-commands; for i in $(seq 50); do [ -e pids.max ] && [ \"$(cat pids.max)\" != max ] && break; sleep 0.1; done; \
         cat memory.max cpu.weight pids.max",
    )
    .await;
    let limits: Vec<u64> = limits.split_whitespace().map(|v| v.parse().unwrap()).collect();
    let mem_total: u64 =
        sh(&client, "grep MemTotal /proc/meminfo").await.split_whitespace().nth(1).unwrap().parse().unwrap();
    // 7/8 of the memory (the kernel rounds it down to a page).
    let seven_eighths = mem_total * 1024 / 8 * 7;
    assert!((seven_eighths - 4096..=seven_eighths).contains(&limits[0]), "memory.max {limits:?} of {mem_total} kB");
    assert_eq!(limits[1], 50, "cpu.weight");
    // A command that allocates without bound is OOM-killed inside the commands' cgroup, and
    // guestd goes on answering (`tail` keeps the whole never-ending line of /dev/zero).
    let hog = client.output(&Command::shell("tail /dev/zero")).await.unwrap();
    assert_eq!(hog.status.status, "signal: killed", "{hog:?}");
    let events = sh(&client, "grep oom_kill /sys/fs/cgroup/guestd-commands/memory.events").await;
    assert_ne!(events.trim(), "oom_kill 0", "the commands' own OOM killer took the hog: {events}");
    let mut daemonizing = client.run(&Command::shell("setsid sleep 1000 & echo $!; wait")).await.unwrap();
    let escaped = match daemonizing.next().await {
        Some(Ok(RunEvent::Stdout(pid))) => String::from_utf8(pid.to_vec()).unwrap().trim().to_owned(),
        other => panic!("the escaped sleep's pid: {other:?}"),
    };
    client.signal(&Selector::Pid(daemonizing.pid), Signal::Kill).await.unwrap();
    assert_eq!(daemonizing.wait().await.unwrap().status.status, "signal: killed");
    let wait_gone =
        format!("for i in $(seq 50); do test -e /proc/{escaped} || {{ echo gone; exit; }}; sleep 0.1; done");
    assert_eq!(sh(&client, &wait_gone).await, "gone\n", "the kill reached sleep {escaped}, which called setsid");

    delegated_guestd(vm, &client, &options).await;

    let kernel = sh(&client, "uname -r").await.trim().to_owned();
    let clocksource = sh(&client, "cat /sys/devices/system/clocksource/clocksource0/current_clocksource").await;
    // When guestd started listening, on the guest clock: its log line's wall-clock time minus
    // (wall clock − uptime), both read now, one exec apart.
    let clocks = sh(&client, "cat /proc/uptime; adjtimex").await;
    let console = vm.log("console.log");
    let modules_loaded = logged_uptime(&console, &clocks, |l| l.contains("kernel module") && l.contains("loaded=Now"));
    let listening = logged_uptime(&console, &clocks, |l| l.contains("guestd::server") && l.contains("listening"));
    // guestd itself loaded the vsock transport (tests/microvm/init passes --kernel-module).
    let module_lines: Vec<String> = strip_ansi(&console)
        .lines()
        .filter(|l| l.contains("kernel module") && l.contains("loaded=Now"))
        .map(|l| l.split_once("module=").map_or(l, |(_, rest)| rest).to_owned())
        .collect();
    assert_eq!(module_lines.len(), 6, "guestd logs one loaded module per --kernel-module:\n{console}");

    // ---- the start command from the kernel command line, replayed to a late Connect by tag ----
    let mut start = client.attach(&Selector::Tag("start_cmd".into())).await.expect("start_cmd is running");
    let mut replayed = Vec::new();
    while !String::from_utf8_lossy(&replayed).contains(START_MARK) {
        match tokio::time::timeout(Duration::from_secs(10), start.next()).await.expect("start_cmd output") {
            Some(Ok(RunEvent::Stdout(b))) => replayed.extend_from_slice(&b),
            other => panic!("start_cmd: {other:?}"),
        }
    }
    drop(start);
    let ready = client.ready().await.unwrap();
    assert!(ready.ready, "GET /ready: {:?}", ready.detail);

    // ---- commands and exit codes: library and guestctl ----
    let out = client.output(&Command::shell("echo out; echo err >&2; exit 3")).await.unwrap();
    assert_eq!((out.stdout.as_slice(), out.stderr.as_slice(), out.status.code), (&b"out\n"[..], &b"err\n"[..], 3));
    let (code, stdout, stderr) = guestctl(&addr, &["run", "--", "sh", "-c", "echo via guestctl; exit 5"]).await;
    assert_eq!((code, stdout.as_str()), (5, "via guestctl\n"), "{stderr}");

    // ---- env vars through /init (library, then guestctl; each /init replaces the set) ----
    let init = InitRequest {
        env_vars: Some([("GUESTD_TIER".to_owned(), "microvm".to_owned())].into()),
        ..InitRequest::default()
    };
    client.init(&init).await.unwrap();
    assert_eq!(sh(&client, "echo $GUESTD_TIER").await, "microvm\n");
    let (code, _, stderr) =
        guestctl(&addr, &["init", "--env", "GUESTD_TIER=microvm", "--env", "FROM_GUESTCTL=yes"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (_, stdout, _) = guestctl(&addr, &["run", "--", "sh", "-c", "echo $GUESTD_TIER $FROM_GUESTCTL"]).await;
    assert_eq!(stdout, "microvm yes\n");

    // ---- files, one transfer at a time ----
    let local = work.path().join("payload.bin");
    random_file(&local, PAYLOAD, 6);
    let digest = sha256_file(&local);
    let t = Instant::now();
    client.upload_file(&local, "/root/payload.bin", Arc::new(NoProgress)).await.expect("upload");
    let upload = t.elapsed();
    let in_guest = sh(&client, "sha256sum /root/payload.bin").await;
    assert_eq!(in_guest.split_whitespace().next(), Some(digest.as_str()), "the guest holds the same bytes");
    let back = work.path().join("back.bin");
    let t = Instant::now();
    client.download_file("/root/payload.bin", &back, Arc::new(NoProgress)).await.expect("download");
    let download = t.elapsed();
    assert_eq!(sha256_file(&back), digest, "downloaded bytes equal the uploaded ones");

    let small = work.path().join("small.bin");
    random_file(&small, 1024 * 1024 + 7, 7);
    let (code, _, stderr) = guestctl(&addr, &["cp", "-q", small.to_str().unwrap(), "guest:/tmp/small.bin"]).await;
    assert_eq!(code, 0, "{stderr}");
    let small_back = work.path().join("small-back.bin");
    let (code, _, stderr) = guestctl(&addr, &["cp", "-q", "guest:/tmp/small.bin", small_back.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(sha256_file(&small_back), sha256_file(&small));
    let (code, stdout, _) = guestctl(&addr, &["ls", "/tmp"]).await;
    assert!(code == 0 && stdout.contains("/tmp/small.bin"), "{stdout}");

    // ---- power off: SIGTERM to guestd (PID 1), through guestd ----
    let t = Instant::now();
    drop(client);
    // The documented way (guestctl --help). As PID 1, guestd SIGTERMs every process at once on
    // shutdown, `kill` itself included, and may close the stream before `kill` reports its exit:
    // 0, 143 (SIGTERM) or guestctl's own 255 are all fine; what counts is QEMU exiting by itself.
    let (code, _, stderr) = guestctl(&addr, &["run", "--", "kill", "-TERM", "1"]).await;
    assert!(matches!(code, 0 | 143 | 255), "kill -TERM 1: {code} {stderr}");
    let status = vm.wait_exit(Duration::from_secs(30)).await.expect("QEMU exits once guestd powers the guest off");
    let poweroff = t.elapsed();
    let console = vm.log("console.log");
    assert!(status.success(), "qemu exit status {status}");
    assert!(console.contains("reboot: Power down"), "the kernel powered off (not a panic or reboot)");
    assert!(!console.contains("Kernel panic"), "no kernel panic");

    // ---- report ----
    let guestd_share = first_command - guestd_exec;
    let after_init = first_command - init_start;
    println!();
    println!("micro-VM tier: QEMU TCG microvm, 1 vCPU, 256 MiB, kernel {kernel}, hybrid vsock via vhost-device-vsock");
    println!("  guest clock (s since the kernel started; clocksource {}):", clocksource.trim());
    println!("    kernel reached /init                     {init_start:6.2} s   <- kernel-to-init");
    println!("    /init execs guestd                         {guestd_exec:6.2} s   (+{:.2})", guestd_exec - init_start);
    match modules_loaded {
        Some(at) => println!("    guestd loaded the 6 vsock modules (log)    {at:6.2} s   (+{:.2})", at - guestd_exec),
        None => println!("    guestd loaded the 6 vsock modules (log)       ?     (no log line found)"),
    }
    for line in &module_lines {
        println!("      {line}");
    }
    match listening {
        Some(at) => println!(
            "    guestd listening on vsock (its log)        {at:6.2} s   (+{:.2})",
            at - modules_loaded.unwrap_or(guestd_exec)
        ),
        None => println!("    guestd listening on vsock (its log)           ?     (no log line found)"),
    }
    println!(
        "    first host command ran                    {first_command:6.2} s   (+{guestd_share:.2} after exec) <- boot-to-first-command"
    );
    println!(
        "  boot-to-first-command − kernel-to-init: {after_init:.2} s (target ≤ 0.30 s: {}); guestd's share (exec → first command, incl. ≤ 20 ms host poll): {guestd_share:.2} s",
        if after_init <= 0.30 { "met" } else { "missed" }
    );
    println!(
        "  host wall clock from QEMU spawn: connected {:.2} s, first command answered {:.2} s",
        connected.as_secs_f64(),
        answered.as_secs_f64()
    );
    println!(
        "  upload {} MiB {:.2} s ({:.0} MB/s), download {:.2} s ({:.0} MB/s), sha256 equal: {}",
        PAYLOAD >> 20,
        upload.as_secs_f64(),
        mb_per_s(PAYLOAD, upload),
        download.as_secs_f64(),
        mb_per_s(PAYLOAD, download),
        &digest[..16]
    );
    println!(
        "  power off: guestctl run -- kill -TERM 1 → QEMU exited by itself in {:.2} s ({status})",
        poweroff.as_secs_f64()
    );
    assert!(guestd_share < 2.0, "guestd took {guestd_share:.2} s from exec to running the first command");
}
