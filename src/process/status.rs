//! Exit statuses rendered exactly like Go's `os.ProcessState.String()`, because the E2B SDKs
//! show envd's text to users (and some match on it).

use super::ExitStatus;
use super::reaper::Outcome;
use crate::sys::wait::WaitStatus;

impl ExitStatus {
    pub(crate) fn from_outcome(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Ended(WaitStatus::Exited(code)) => {
                let status = format!("exit status {code}");
                ExitStatus { exit_code: code, exited: true, error: (code != 0).then(|| status.clone()), status }
            }
            Outcome::Ended(WaitStatus::Signaled { signal, core_dumped }) => {
                let mut status = format!("signal: {}", go_signal_name(signal));
                if core_dumped {
                    status.push_str(" (core dumped)");
                }
                ExitStatus { exit_code: -1, exited: false, error: Some(status.clone()), status }
            }
            Outcome::Lost => {
                let status = "wait: no child processes".to_owned();
                ExitStatus { exit_code: -1, exited: false, error: Some(status.clone()), status }
            }
        }
    }
}

/// Go's `syscall.Signal.String()` on linux (`zerrors_linux_*.go` signal table); unknown numbers
/// (real-time signals) print as `signal N`.
fn go_signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signaled(signal: i32, core_dumped: bool) -> ExitStatus {
        ExitStatus::from_outcome(Outcome::Ended(WaitStatus::Signaled { signal, core_dumped }))
    }

    #[test]
    fn exit_zero_has_no_error() {
        let s = ExitStatus::from_outcome(Outcome::Ended(WaitStatus::Exited(0)));
        assert_eq!(s, ExitStatus { exit_code: 0, exited: true, status: "exit status 0".into(), error: None });
    }

    #[test]
    fn nonzero_exit_is_an_error_with_the_same_text() {
        let s = ExitStatus::from_outcome(Outcome::Ended(WaitStatus::Exited(3)));
        assert_eq!(s.exit_code, 3);
        assert_eq!(s.error.as_deref(), Some("exit status 3"));
    }

    #[test]
    fn signal_names_match_go() {
        for (sig, text) in [
            (9, "signal: killed"),
            (15, "signal: terminated"),
            (2, "signal: interrupt"),
            (1, "signal: hangup"),
            (6, "signal: aborted"),
            (11, "signal: segmentation fault"),
            (13, "signal: broken pipe"),
            (34, "signal: signal 34"),
        ] {
            let s = signaled(sig, false);
            assert_eq!(s.status, text);
            assert_eq!(s.exit_code, -1);
            assert!(!s.exited);
            assert_eq!(s.error.as_deref(), Some(text));
        }
        assert_eq!(signaled(6, true).status, "signal: aborted (core dumped)");
    }
}
