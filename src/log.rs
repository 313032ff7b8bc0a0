//! Plain log lines on stderr that read well both in a terminal and in `journalctl -b`.
//!
//! Under systemd (JOURNAL_STREAM is set and points at our stderr) each line carries a `<N>`
//! syslog priority prefix, which journald strips and turns into the entry's priority, so errors
//! show up as errors in `journalctl -p err`. The program name is left out there because journald
//! already prints `rasa[pid]:`. In a terminal the lines start with `rasa:` and errors are red
//! unless NO_COLOR is set.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    Journal,
    Terminal { colour: bool },
    Plain,
}

fn sink() -> Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    *SINK.get_or_init(|| {
        if stderr_is_journal() {
            Sink::Journal
        } else if std::io::stderr().is_terminal() {
            Sink::Terminal {
                colour: colour_allowed(),
            }
        } else {
            Sink::Plain
        }
    })
}

/// NO_COLOR (https://no-color.org): any non-empty value turns colour off.
pub fn colour_allowed() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}

/// Whether stdout may carry ANSI colour (for reports such as `check`).
pub fn stdout_colour() -> bool {
    std::io::stdout().is_terminal() && colour_allowed()
}

/// systemd sets JOURNAL_STREAM=<dev>:<ino> for the stream it connected; a child that inherited
/// the variable but redirected stderr elsewhere must not emit priority prefixes.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

fn emit(priority: u8, label: &str, message: &str) {
    let mut stderr = std::io::stderr().lock();
    for (i, line) in message.lines().enumerate() {
        // The label goes on the first line only; continuation lines are indented under it.
        let indent = " ".repeat(label.len());
        let label = if i == 0 { label } else { indent.as_str() };
        let _ = match sink() {
            Sink::Journal => writeln!(stderr, "<{priority}>{label}{line}"),
            Sink::Terminal { colour: true } if priority <= 3 => {
                writeln!(stderr, "rasa: \x1b[1;31m{label}\x1b[0m{line}")
            }
            Sink::Terminal { colour: true } if priority == 4 => {
                writeln!(stderr, "rasa: \x1b[1;33m{label}\x1b[0m{line}")
            }
            _ => writeln!(stderr, "rasa: {label}{line}"),
        };
    }
}

/// A step of the work, as it happens.
pub fn info(message: impl AsRef<str>) {
    emit(6, "", message.as_ref());
}

pub fn warn(message: impl AsRef<str>) {
    emit(4, "warning: ", message.as_ref());
}

pub fn error(message: impl AsRef<str>) {
    emit(3, "error: ", message.as_ref());
}

/// Print on stdout; a reader that went away (`rasa ... | head`) is not an error.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// The progress bar of a long copy (migrate, restore), drawn only when stderr is a terminal.
pub fn copy_progress(total_bytes: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total_bytes)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}
