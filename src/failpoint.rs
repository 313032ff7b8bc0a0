//! Crash injection for the crash-safety tests, compiled in only with `--features failpoints`.
//!
//! `RASA_FAILPOINT=<step>` (or `rasa.failpoint=<step>` on the kernel command line, for the VM
//! harness) stops rasa right after that step. `RASA_FAILPOINT_ACTION=pause` (or
//! `rasa.failpoint_action=pause`) prints a marker and waits to be killed, so the VM harness can
//! cut the power exactly there; `stop` prints the marker and stops the process with SIGSTOP,
//! so a test can look at (or change) the disk at that step and then let it go on with SIGCONT
//! (the step is hit again each time it is reached); `wait` prints the marker and goes on once
//! stdin is closed (to hold a run at a step while another one starts, for the lock test); the
//! default is to abort the process on the spot.

#[cfg(feature = "failpoints")]
pub fn hit(step: &str) {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let from_cmdline = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|arg| arg.strip_prefix(key).map(str::to_owned))
    };
    let wanted = std::env::var("RASA_FAILPOINT")
        .ok()
        .or_else(|| from_cmdline("rasa.failpoint="));
    if wanted.as_deref() != Some(step) {
        return;
    }
    let action = std::env::var("RASA_FAILPOINT_ACTION")
        .ok()
        .or_else(|| from_cmdline("rasa.failpoint_action="));
    eprintln!("RASA-FAILPOINT-REACHED {step}");
    if action.as_deref() == Some("stop") {
        // The test waits for the stop (waitpid WUNTRACED), so the marker cannot race it.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        return;
    }
    if action.as_deref() == Some("wait") {
        use std::io::Read;
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        return;
    }
    if action.as_deref() == Some("pause") {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    std::process::abort();
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_step: &str) {}
