//! Exit codes and the one error kind that callers must tell apart: a refusal.
//!
//! A refusal means rasa looked at its input or at the disk, found something it will not act on,
//! and changed nothing. It carries the fix, because the person reading it (often in
//! `journalctl -b` after a boot) needs to know what to change, not only what went wrong.

use std::fmt;

/// Documented in README.md ("Exit codes"); keep the two in step.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// An operation failed part-way (I/O error, kernel refused an ioctl). The state is still one
    /// that the next run completes; the message says what failed.
    pub const FAILED: u8 = 1;
    /// The command line was wrong (clap's own exit code).
    pub const USAGE: u8 = 2;
    /// Refused: the input, the configuration or the disk layout is not acceptable. Nothing was
    /// changed.
    pub const REFUSED: u8 = 3;
    /// The command ran and found problems: `check` found a ✗, `migrate` found conflicts, `diff
    /// --exit-code` found unpersisted state.
    pub const PROBLEMS: u8 = 4;
}

#[derive(Debug)]
pub struct Refusal {
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n  fix: {}\n  nothing was changed",
            self.problem, self.fix
        )
    }
}

impl std::error::Error for Refusal {}

/// Build an `anyhow::Error` that exits with [`exit::REFUSED`].
pub fn refuse(problem: impl Into<String>, fix: impl Into<String>) -> anyhow::Error {
    Refusal {
        problem: problem.into(),
        fix: fix.into(),
    }
    .into()
}

/// The exit code an error maps to.
pub fn exit_code_for(error: &anyhow::Error) -> u8 {
    if error
        .chain()
        .any(|cause| cause.downcast_ref::<Refusal>().is_some())
    {
        exit::REFUSED
    } else {
        exit::FAILED
    }
}
