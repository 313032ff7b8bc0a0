//! One QEMU boot, watched over its serial console: type the passphrase when asked, cut the
//! power at a marker if told to, and kill the VM on any sign of a hang so CI never waits on it.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Lines after which the boot can only hang or loop; waiting for the timeout would waste minutes.
const HOPELESS: &[&str] = &[
    "Entering emergency mode",
    "You are in emergency mode",
    "Press Enter for maintenance",
    "Kernel panic",
    "Cannot open access to console",
    "RASA-VM-PROVISION-FAILED",
];

pub struct Boot<'a> {
    /// Names the log file and the report lines.
    pub label: String,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub disk: &'a Path,
    pub append: String,
    /// Answer "Please enter passphrase" on the console, as a person (or a nixosTest) would.
    pub passphrase: Option<&'a str>,
    /// Kill QEMU, like a power cut, this long after a line containing this marker appears.
    pub cut_at: Option<(String, Duration)>,
    /// The line that means the boot did what it came for and powers off.
    pub done_marker: &'a str,
    pub timeout: Duration,
    pub log: PathBuf,
    /// A second disk (raw), seen by the guest as /dev/vdb: a swap area for the hibernation
    /// scenario.
    pub second_disk: Option<&'a Path>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The done marker appeared and QEMU exited.
    Completed,
    /// The power was cut at the requested marker.
    Cut,
    /// The watchdog stopped the boot (with the reason).
    Failed(String),
}

pub struct Transcript {
    pub label: String,
    /// Console lines, ANSI sequences removed, each with the time since QEMU started.
    pub lines: Vec<(Duration, String)>,
    pub ending: Ending,
    pub elapsed: Duration,
    pub log: PathBuf,
}

enum Event {
    Line(Instant, String),
    /// Text without a newline yet; prompts end that way.
    Partial(String),
    Closed,
}

pub fn boot(spec: &Boot) -> Result<Transcript> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .args([
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "mon:stdio",
        ])
        .arg("-kernel")
        .arg(spec.kernel)
        .arg("-initrd")
        .arg(spec.initrd)
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2,cache={}",
            spec.disk.display(),
            // cache=unsafe ignores the guest's flushes, and qcow2 keeps its cluster mapping in
            // QEMU's memory until a flush: a kill would then lose writes the guest had synced.
            // A boot that ends in a power cut must honour flushes, as a real disk does.
            if spec.cut_at.is_some() {
                "writeback"
            } else {
                "unsafe"
            }
        ))
        .args(spec.second_disk.iter().flat_map(|disk| {
            [
                "-drive".to_owned(),
                format!("file={},if=virtio,format=raw,cache=unsafe", disk.display()),
            ]
        }))
        .args(["-append", &spec.append])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();

    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let now = Instant::now();
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=pos).collect();
                        let _ = tx.send(Event::Line(now, clean(&line)));
                    }
                    if !pending.is_empty() {
                        let _ = tx.send(Event::Partial(clean(&pending)));
                    }
                }
            }
        }
        if !pending.is_empty() {
            let _ = tx.send(Event::Line(Instant::now(), clean(&pending)));
        }
        let _ = tx.send(Event::Closed);
    });
    let qemu_errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let mut log = BufWriter::new(
        std::fs::File::create(&spec.log)
            .with_context(|| format!("creating {}", spec.log.display()))?,
    );
    let mut lines: Vec<(Duration, String)> = Vec::new();
    let mut typed = false;
    let mut done = false;
    let mut cut_deadline: Option<Instant> = None;
    let mut ending: Option<Ending> = None;
    let deadline = started + spec.timeout;

    loop {
        let wake = cut_deadline.map_or(deadline, |c| c.min(deadline));
        let event = rx.recv_timeout(wake.saturating_duration_since(Instant::now()));
        let text = match event {
            Ok(Event::Line(at, line)) => {
                let t = at - started;
                writeln!(log, "[{:8.3}] {line}", t.as_secs_f64())?;
                lines.push((t, line.clone()));
                line
            }
            Ok(Event::Partial(text)) => text,
            Ok(Event::Closed) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if cut_deadline.is_some_and(|c| Instant::now() >= c) {
                    ending = Some(Ending::Cut);
                } else {
                    ending = Some(Ending::Failed(format!(
                        "watchdog: no power-off within {} s",
                        spec.timeout.as_secs()
                    )));
                }
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Some(pass) = spec.passphrase {
            if !typed && text.contains("assphrase") {
                // The prompt is printed before the agent reads; a short pause avoids racing it.
                std::thread::sleep(Duration::from_millis(500));
                stdin.write_all(format!("{pass}\n").as_bytes())?;
                stdin.flush()?;
                typed = true;
                writeln!(
                    log,
                    "[{:8.3}] <harness typed the passphrase>",
                    started.elapsed().as_secs_f64()
                )?;
            }
        }
        if let Some((marker, delay)) = &spec.cut_at {
            if cut_deadline.is_none() && text.contains(marker.as_str()) {
                cut_deadline = Some(Instant::now() + *delay);
            }
        }
        if text.contains(spec.done_marker) {
            done = true;
        }
        if let Some(bad) = HOPELESS.iter().find(|p| text.contains(*p)) {
            // Keep a little of what follows: it usually says why.
            std::thread::sleep(Duration::from_secs(2));
            while let Ok(Event::Line(at, line)) = rx.try_recv() {
                writeln!(log, "[{:8.3}] {line}", (at - started).as_secs_f64())?;
                lines.push((at - started, line));
            }
            ending = Some(Ending::Failed(format!("watchdog: console showed {bad:?}")));
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait()?;
    let _ = reader.join();
    let qemu_stderr = qemu_errors.join().unwrap_or_default();
    if !qemu_stderr.trim().is_empty() {
        writeln!(log, "qemu stderr: {}", qemu_stderr.trim())?;
    }
    let ending = ending.unwrap_or(if done {
        Ending::Completed
    } else {
        Ending::Failed(format!(
            "QEMU exited ({status}) before {:?}{}",
            spec.done_marker,
            if qemu_stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", qemu_stderr.trim())
            }
        ))
    });
    log.flush()?;
    Ok(Transcript {
        label: spec.label.clone(),
        lines,
        ending,
        elapsed: started.elapsed(),
        log: spec.log.clone(),
    })
}

/// Console bytes to text: drop carriage returns and ANSI escape sequences (systemd colours
/// its status words), keep the rest.
fn clean(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' | '\n' => {}
            _ => out.push(c),
        }
    }
    out
}

impl Transcript {
    /// The first console line containing `needle`.
    pub fn find(&self, needle: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .find(|l| l.contains(needle))
    }

    pub fn find_timed(&self, needle: &str) -> Option<(Duration, &str)> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, l)| (*t, l.as_str()))
    }

    /// Everything after `RASA-VM: <key> ` on the first such line from the stage-2 init.
    pub fn vm(&self, key: &str) -> Option<String> {
        let tag = format!("RASA-VM: {key}");
        self.lines.iter().find_map(|(_, l)| {
            let at = l.find(&tag)?;
            let rest = &l[at + tag.len()..];
            if rest.is_empty() || rest.starts_with(' ') {
                Some(rest.trim().to_owned())
            } else {
                None
            }
        })
    }

    /// All `RASA-VM: <key> ...` values.
    pub fn vm_all(&self, key: &str) -> Vec<String> {
        let tag = format!("RASA-VM: {key} ");
        self.lines
            .iter()
            .filter_map(|(_, l)| l.find(&tag).map(|at| l[at + tag.len()..].trim().to_owned()))
            .collect()
    }
}
