//! The scenarios: each boots the VM one or more times and judges the serial console.
//! Every check prints the console lines it relied on, so a FAIL can be read without a rerun.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::artefacts::{Artefacts, Initrd, PASSPHRASE};
use super::qemu::{self, Ending, Transcript};

pub const ALL: &[&str] = &[
    "two-boot",
    "bad-config",
    "retention",
    "power-cut",
    "hibernation",
    "boot-old-root",
    "watch",
];

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// systemd shortens status lines on the console, even the unit's name: "rollback.s…".
const UNIT: &str = "rollback";
/// How long rasa stays paused at a failpoint before the power is cut. A snapshot commits its
/// transaction at once, but a rename only joins the running one, which btrfs commits every
/// 30 s (SysRq-S does not help: its sync_fs(wait=0) does not commit on btrfs). Waiting past
/// that puts the step on disk, so the cut really leaves the disk between two steps.
const CUT_AFTER: Duration = Duration::from_secs(40);
const STEPS: &[&str] = &["created-new-root", "moved-old-root", "installed-new-root"];

pub fn run(a: &Artefacts, name: &str) -> Result<Report> {
    let mut report = match name {
        "two-boot" => two_boot(a, false),
        "bad-config" => bad_config(a),
        "retention" => retention(a),
        "power-cut" => power_cut(a),
        "hibernation" => hibernation(a),
        "watch" => watch(a),
        "boot-old-root" => boot_old_root(a),
        _ => bail!("unknown scenario {name:?}"),
    }?;
    report.took = report.started.elapsed();
    Ok(report)
}

pub struct Report {
    name: String,
    checks: Vec<(bool, String, Vec<String>)>,
    started: Instant,
    took: Duration,
}

impl Report {
    fn new(name: &str) -> Report {
        println!("vm {name}: running");
        Report {
            name: name.into(),
            checks: Vec::new(),
            started: Instant::now(),
            took: Duration::ZERO,
        }
    }

    fn check(&mut self, ok: bool, what: impl Into<String>, evidence: Vec<String>) {
        self.checks.push((ok, what.into(), evidence));
    }

    /// Check that `t` has a console line containing `needle`; that line is the evidence.
    fn line(&mut self, t: &Transcript, needle: &str, what: &str) {
        let found = t.find(needle).map(str::to_owned);
        let evidence = match &found {
            Some(l) => vec![format!("{}: {l}", t.label)],
            None => vec![format!("{}: no console line contains {needle:?}", t.label)],
        };
        self.check(found.is_some(), what, evidence);
    }

    /// Check a `RASA-VM: <key> <value>` report line from stage 2.
    fn vm_is(&mut self, t: &Transcript, key: &str, want: &str, what: &str) {
        let got = t.vm(key);
        let ok = got.as_deref() == Some(want);
        let evidence = vec![match got {
            Some(v) => format!("{}: RASA-VM: {key} {v}", t.label),
            None => format!("{}: no RASA-VM: {key} line", t.label),
        }];
        self.check(ok, what, evidence);
    }

    fn completed(&mut self, t: &Transcript) {
        let ok = t.ending == Ending::Completed;
        self.check(
            ok,
            format!("{} reached stage 2 and powered off", t.label),
            vec![format!(
                "{}: {:?} after {:.1} s (console log {})",
                t.label,
                t.ending,
                t.elapsed.as_secs_f64(),
                t.log.display()
            )],
        );
    }

    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(ok, _, _)| *ok)
    }

    pub fn print(&self) {
        for (ok, what, evidence) in &self.checks {
            println!("  {} {what}", if *ok { "ok  " } else { "FAIL" });
            for e in evidence {
                println!("         | {e}");
            }
        }
        let failed = self.checks.iter().filter(|(ok, _, _)| !ok).count();
        println!(
            "vm {}: {} ({} checks, {} failed, {:.0} s)",
            self.name,
            if self.passed() { "PASS" } else { "FAIL" },
            self.checks.len(),
            failed,
            if self.took.is_zero() {
                self.started.elapsed()
            } else {
                self.took
            }
            .as_secs_f64()
        );
    }
}

struct BootArgs<'a> {
    label: &'a str,
    initrd: Initrd,
    disk: &'a Path,
    typed: bool,
    extra: &'a str,
    cut_at: Option<(String, Duration)>,
    second_disk: Option<&'a Path>,
}

fn boot(a: &Artefacts, args: BootArgs) -> Result<Transcript> {
    let initrd = a.initrd(args.initrd)?;
    eprintln!(
        "vm: boot {} ({} initrd{}{})",
        args.label,
        match args.initrd {
            Initrd::Rollback => "rollback",
            Initrd::BadConfig => "bad-config",
            Initrd::Failpoints => "failpoints",
            Initrd::NoRollback => "no-rollback",
        },
        if args.typed {
            ", passphrase typed"
        } else {
            ", key file"
        },
        if args.extra.is_empty() {
            String::new()
        } else {
            format!(", {}", args.extra)
        }
    );
    let t = qemu::boot(&qemu::Boot {
        label: args.label.into(),
        kernel: &a.kernel,
        initrd: &initrd,
        disk: args.disk,
        append: a.append(!args.typed, args.extra),
        passphrase: args.typed.then_some(PASSPHRASE),
        cut_at: args.cut_at,
        done_marker: "RASA-VM: POWEROFF",
        timeout: BOOT_TIMEOUT,
        log: a.log(args.label),
        second_disk: args.second_disk,
    })?;
    eprintln!(
        "vm: boot {}: {:?} in {:.1} s",
        args.label,
        t.ending,
        t.elapsed.as_secs_f64()
    );
    Ok(t)
}

fn simple_boot(
    a: &Artefacts,
    label: &str,
    initrd: Initrd,
    disk: &Path,
    extra: &str,
) -> Result<Transcript> {
    boot(
        a,
        BootArgs {
            label,
            initrd,
            disk,
            typed: false,
            extra,
            cut_at: None,
            second_disk: None,
        },
    )
}

/// The disk after one ordinary boot (flag, nested subvolume and a /persist note written), kept
/// so the other scenarios start from it instead of booting once more each.
fn booted_once_path(a: &Artefacts) -> PathBuf {
    a.dir.join("booted-once.qcow2")
}

fn booted_once_key(a: &Artefacts) -> String {
    let initrd_key =
        std::fs::read_to_string(a.dir.join("initrd-rollback.img.key")).unwrap_or_default();
    format!("{}-{initrd_key}", a.base_key())
}

fn save_booted_once(a: &Artefacts, disk: &Path, t: &Transcript) -> Result<()> {
    if t.ending != Ending::Completed || t.vm("BOOT").as_deref() != Some("1") {
        return Ok(());
    }
    let path = booted_once_path(a);
    std::fs::copy(disk, &path)?;
    std::fs::write(
        a.dir.join("booted-once.roots"),
        t.vm("OLD_ROOTS after-prune").unwrap_or_default(),
    )?;
    std::fs::write(a.dir.join("booted-once.qcow2.key"), booted_once_key(a))?;
    Ok(())
}

fn booted_once_fresh(a: &Artefacts) -> bool {
    booted_once_path(a).exists()
        && std::fs::read_to_string(a.dir.join("booted-once.qcow2.key"))
            .is_ok_and(|k| k == booted_once_key(a))
}

/// Make sure the booted-once disk matches the current base disk and initrd (one boot if not).
pub fn ensure_booted_once(a: &Artefacts) -> Result<()> {
    if !booted_once_fresh(a) {
        let disk = a.overlay(&a.base_path(), "booted-once-work")?;
        let t = simple_boot(a, "booted-once", Initrd::Rollback, &disk, "")?;
        if t.ending != Ending::Completed {
            bail!(
                "the first boot failed: {:?} (console log {})",
                t.ending,
                t.log.display()
            );
        }
        save_booted_once(a, &disk, &t)?;
    }
    Ok(())
}

/// A scenario's own disk, a copy of the booted-once state (a small qcow2 over the base disk).
fn scenario_disk(a: &Artefacts, name: &str) -> Result<PathBuf> {
    if !booted_once_fresh(a) {
        bail!("the booted-once disk is missing or stale (ensure_booted_once was not run)");
    }
    let disk = a.dir.join(format!("{name}.qcow2"));
    std::fs::copy(booted_once_path(a), &disk)?;
    Ok(disk)
}

fn names_of(old_roots_line: &str) -> Vec<String> {
    old_roots_line
        .split_once("names=")
        .map(|(_, n)| n.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn count_of(old_roots_line: &str) -> Option<usize> {
    old_roots_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("count="))
        .and_then(|n| n.parse().ok())
}

/// rasa's own measure of the critical path, from "new root in place in N ms".
fn rollback_ms(t: &Transcript) -> Option<f64> {
    let line = t.find("new root in place in ")?;
    let rest = line.split("new root in place in ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

pub fn two_boot(a: &Artefacts, narrate: bool) -> Result<Report> {
    let mut r = Report::new("two-boot");
    let disk = a.overlay(&a.base_path(), "two-boot")?;
    let boot_typed = |a: &Artefacts, label: &str| {
        boot(
            a,
            BootArgs {
                label,
                initrd: Initrd::Rollback,
                disk: &disk,
                typed: true,
                extra: "",
                cut_at: None,
                second_disk: None,
            },
        )
    };
    let b1 = boot_typed(a, "two-boot-1")?;
    if !booted_once_fresh(a) {
        // Other scenarios may be copying it right now; only fill it in when it is missing.
        save_booted_once(a, &disk, &b1)?;
    }
    if narrate {
        narrate_boot(&b1, 1);
        println!("\n  ... powering off and booting again ...");
    }
    let b2 = boot_typed(a, "two-boot-2")?;
    if narrate {
        narrate_boot(&b2, 2);
        narrate_rollback(&b2);
    }

    r.completed(&b1);
    r.completed(&b2);
    for t in [&b1, &b2] {
        r.line(
            t,
            "assphrase",
            &format!(
                "{}: the passphrase prompt appeared and was answered",
                t.label
            ),
        );
        r.line(
            t,
            &format!("Finished {UNIT}"),
            &format!("{}: the rollback unit finished", t.label),
        );
    }
    r.vm_is(&b1, "BOOT", "1", "boot 1 is the disk's first boot");
    let end = b1.vm("LS_ROOT end").unwrap_or_default();
    r.check(
        end.contains("test_flag"),
        "boot 1 wrote /test_flag and /var/lib/machines",
        vec![format!("{}: RASA-VM: LS_ROOT end {end}", b1.label)],
    );
    r.vm_is(&b2, "FLAG", "ABSENT", "boot 2: /test_flag is gone");
    r.vm_is(
        &b2,
        "NESTED",
        "ABSENT",
        "boot 2: the nested subvolume /var/lib/machines is gone",
    );
    let notes = b2.vm_all("PERSIST_NOTE");
    r.check(
        notes.iter().any(|n| n == "note-1 written in boot 1"),
        "boot 2: /persist/note-1 from boot 1 is intact",
        notes
            .iter()
            .map(|n| format!("{}: PERSIST_NOTE {n}", b2.label))
            .collect(),
    );
    let roots = b2.vm("OLD_ROOTS before-prune").unwrap_or_default();
    r.check(
        count_of(&roots) == Some(2),
        "boot 2: two old roots kept (provisioning's and boot 1's; retention keeps 5)",
        vec![format!("{}: OLD_ROOTS before-prune {roots}", b2.label)],
    );
    let kept = b2.vm_all("OLD_ROOT before-prune");
    r.check(
        kept.iter().any(|k| k.ends_with("flag=written in boot 1")),
        "boot 2: boot 1's root, flag included, is kept under old_roots",
        kept.iter()
            .map(|k| format!("{}: OLD_ROOT {k}", b2.label))
            .collect(),
    );
    r.line(
        &b2,
        "kept the previous root as old_roots/",
        "boot 2: rasa logged the kept root",
    );
    r.line(
        &b2,
        "installed the new root",
        "boot 2: rasa logged the new root",
    );
    r.line(
        &b2,
        "new root in place in",
        "boot 2: rasa logged its duration",
    );
    Ok(r)
}

fn narrate_boot(t: &Transcript, n: u32) {
    let get = |k: &str| t.vm(k).unwrap_or_else(|| "?".into());
    println!(
        "\n== Boot {n} ({:.0} s under QEMU TCG; console log {})",
        t.elapsed.as_secs_f64(),
        t.log.display()
    );
    if let Some(prompt) = t.find("assphrase") {
        println!("  The initrd asked: {}", prompt.trim());
        println!("  The harness typed the passphrase on the serial console.");
    }
    println!("  rasa, in the initrd before / is mounted:");
    for (_, l) in t.lines.iter().filter(|(_, l)| l.contains("rasa[")) {
        println!("    {}", l.trim());
    }
    println!("  When the system came up:");
    println!("    /        : {}", get("LS_ROOT start"));
    println!("    /persist : {}", get("LS_PERSIST start"));
    println!(
        "    /test_flag: {}   /var/lib/machines: {}",
        get("FLAG"),
        get("NESTED")
    );
    println!("    old roots: {}", get("OLD_ROOTS before-prune"));
    println!("  The system then wrote /test_flag, a nested subvolume /var/lib/machines, /persist/note-{n}:");
    println!("    /        : {}", get("LS_ROOT end"));
    println!("    /persist : {}", get("LS_PERSIST end"));
}

fn narrate_rollback(t: &Transcript) {
    println!("\n== What the reboot did");
    match (t.vm("FLAG").as_deref(), t.vm("NESTED").as_deref()) {
        (Some("ABSENT"), Some("ABSENT")) => {
            println!("  / started blank again: /test_flag and /var/lib/machines are gone.")
        }
        _ => println!("  / was NOT wiped (see the checks below)."),
    }
    for note in t.vm_all("PERSIST_NOTE") {
        println!("  /persist kept: {note}");
    }
    for root in t.vm_all("OLD_ROOT before-prune") {
        println!("  kept for recovery: {root}");
    }
    if let Some(ms) = rollback_ms(t) {
        println!("  rasa's rollback took {ms} ms (its own measure, inside the initrd).");
    }
    if let Some(d) = unit_duration(t) {
        println!("  The rollback unit ran {:.2} s from start to finish on the console clock (TCG, process start included).", d.as_secs_f64());
    }
}

fn unit_duration(t: &Transcript) -> Option<Duration> {
    let (start, _) = t.find_timed(&format!("Starting {UNIT}"))?;
    let (end, _) = t.find_timed(&format!("Finished {UNIT}"))?;
    end.checked_sub(start)
}

fn bad_config(a: &Artefacts) -> Result<Report> {
    let mut r = Report::new("bad-config");
    let disk = scenario_disk(a, "bad-config")?;
    let b = simple_boot(a, "bad-config", Initrd::BadConfig, &disk, "")?;
    r.completed(&b);
    let refusal = b
        .lines
        .iter()
        .map(|(_, l)| l)
        .find(|l| l.contains("\"wrong\"") && l.contains("does not exist"));
    r.check(
        refusal.is_some(),
        "rasa's refusal names the wrong subvolume",
        vec![format!(
            "{}: {}",
            b.label,
            refusal.map_or("(no such line)", |l| l.as_str())
        )],
    );
    let fix = b.find("pass the name of the root subvolume with --root");
    r.check(
        fix.is_some(),
        "rasa's refusal names the fix",
        vec![format!("{}: {}", b.label, fix.unwrap_or("(no such line)"))],
    );
    let failed = b
        .lines
        .iter()
        .map(|(_, l)| l)
        .find(|l| l.contains("[FAILED]") && l.contains(&format!("Failed to start {UNIT}")));
    r.check(
        failed.is_some(),
        "the failure is visible: systemd shows [FAILED] for the unit",
        vec![format!(
            "{}: {}",
            b.label,
            failed.map_or("(no such line)", |l| l.as_str())
        )],
    );
    r.check(
        b.find("new root in place").is_none(),
        "rasa changed nothing (no new root)",
        vec![format!("{}: no \"new root in place\" line", b.label)],
    );
    r.vm_is(
        &b,
        "FLAG",
        "EXISTS written in boot 1",
        "the boot went on with the un-wiped root: /test_flag is still there",
    );
    r.vm_is(
        &b,
        "NESTED",
        "SUBVOLUME",
        "the nested subvolume is untouched",
    );
    let roots = b.vm("OLD_ROOTS before-prune").unwrap_or_default();
    r.check(
        count_of(&roots) == Some(1),
        "no old root was added or removed",
        vec![format!("{}: OLD_ROOTS before-prune {roots}", b.label)],
    );
    let notes = b.vm_all("PERSIST_NOTE");
    r.check(
        notes.iter().any(|n| n == "note-1 written in boot 1"),
        "/persist is intact",
        notes
            .iter()
            .map(|n| format!("{}: PERSIST_NOTE {n}", b.label))
            .collect(),
    );
    Ok(r)
}

fn retention(a: &Artefacts) -> Result<Report> {
    const KEEP: usize = 2;
    let mut r = Report::new("retention");
    let disk = scenario_disk(a, "retention")?;
    let extra = format!("rasa_vm.keep={KEEP} rasa_vm.keep_days=0");
    let mut pruned_somewhere = false;
    let mut last_after = String::new();
    for i in 2..=3 {
        let b = simple_boot(
            a,
            &format!("retention-{i}"),
            Initrd::Rollback,
            &disk,
            &extra,
        )?;
        r.completed(&b);
        let before = b.vm("OLD_ROOTS before-prune").unwrap_or_default();
        let after = b.vm("OLD_ROOTS after-prune").unwrap_or_default();
        let (nb, na) = (names_of(&before), names_of(&after));
        let newest: Vec<String> = {
            let mut sorted = nb.clone();
            sorted.sort();
            sorted[sorted.len().saturating_sub(KEEP)..].to_vec()
        };
        let mut kept_sorted = na.clone();
        kept_sorted.sort();
        r.check(
            count_of(&after) == Some(nb.len().min(KEEP)) && kept_sorted == newest,
            format!(
                "{}: stage-2 `rasa prune --keep {KEEP} --keep-days 0` kept the newest {KEEP}",
                b.label
            ),
            vec![
                format!("{}: OLD_ROOTS before-prune {before}", b.label),
                format!("{}: OLD_ROOTS after-prune {after}", b.label),
            ],
        );
        if nb.len() > KEEP {
            pruned_somewhere = true;
            r.line(
                &b,
                "pruned old_roots/",
                &format!("{}: rasa prune logged what it deleted", b.label),
            );
        }
        last_after = after;
    }
    r.check(
        pruned_somewhere,
        "pruning really happened in at least one boot",
        vec![],
    );
    r.check(
        count_of(&last_after) == Some(KEEP),
        format!("after several boots exactly {KEEP} old roots remain"),
        vec![format!("last boot: OLD_ROOTS after-prune {last_after}")],
    );
    Ok(r)
}

fn power_cut(a: &Artefacts) -> Result<Report> {
    let mut r = Report::new("power-cut");
    let disk = scenario_disk(a, "power-cut")?;
    let mut kept: Vec<String> =
        names_of(&std::fs::read_to_string(a.dir.join("booted-once.roots")).unwrap_or_default());
    let mut last_boot: u32 = 1;
    for step in STEPS {
        let marker = format!("RASA-FAILPOINT-REACHED {step}");
        let cut = boot(
            a,
            BootArgs {
                label: &format!("power-cut-{step}"),
                initrd: Initrd::Failpoints,
                disk: &disk,
                typed: false,
                extra: &format!("rasa.failpoint={step} rasa.failpoint_action=pause"),
                cut_at: Some((marker.clone(), CUT_AFTER)),
                second_disk: None,
            },
        )?;
        r.check(
            cut.ending == Ending::Cut && cut.find(&marker).is_some(),
            format!(
                "power cut {} s after rasa paused after step {step}",
                CUT_AFTER.as_secs()
            ),
            vec![
                format!("{}: {:?}", cut.label, cut.ending),
                format!(
                    "{}: {}",
                    cut.label,
                    cut.find(&marker).unwrap_or("(marker never appeared)")
                ),
            ],
        );
        let b = simple_boot(
            a,
            &format!("power-cut-{step}-next"),
            Initrd::Rollback,
            &disk,
            "",
        )?;
        r.completed(&b);
        r.vm_is(
            &b,
            "FLAG",
            "ABSENT",
            &format!("{}: /test_flag is gone", b.label),
        );
        r.vm_is(
            &b,
            "NESTED",
            "ABSENT",
            &format!("{}: the nested subvolume is gone", b.label),
        );
        let notes = b.vm_all("PERSIST_NOTE");
        let all_notes =
            (1..=last_boot).all(|n| notes.contains(&format!("note-{n} written in boot {n}")));
        r.check(
            all_notes,
            format!(
                "{}: every /persist note (1..{last_boot}) is intact",
                b.label
            ),
            notes
                .iter()
                .map(|n| format!("{}: PERSIST_NOTE {n}", b.label))
                .collect(),
        );
        let before = b.vm("OLD_ROOTS before-prune").unwrap_or_default();
        let names = names_of(&before);
        let lost: Vec<&String> = kept.iter().filter(|k| !names.contains(k)).collect();
        r.check(
            lost.is_empty(),
            format!("{}: no kept root lost", b.label),
            vec![
                format!("before the cut: {}", kept.join(" ")),
                format!("{}: OLD_ROOTS before-prune {before}", b.label),
            ],
        );
        let flag = format!("flag=written in boot {last_boot}");
        let roots = b.vm_all("OLD_ROOT before-prune");
        r.check(
            roots.iter().any(|k| k.ends_with(&flag)),
            format!(
                "{}: the interrupted boot's root (with its flag) is kept",
                b.label
            ),
            roots
                .iter()
                .map(|k| format!("{}: OLD_ROOT {k}", b.label))
                .collect(),
        );
        let top = b.vm("TOP_LEVEL before-prune").unwrap_or_default();
        r.check(
            !top.contains("rasa-new"),
            format!("{}: no half-made root left at the top level", b.label),
            vec![format!("{}: TOP_LEVEL {top}", b.label)],
        );
        // What the cut left on disk decides how the next rollback goes; check it saw that.
        match *step {
            "created-new-root" => r.line(
                &b,
                "discarding root.rasa-new",
                &format!("{}: rasa discarded the unused new root", b.label),
            ),
            "moved-old-root" => r.line(
                &b,
                "resuming an interrupted rollback",
                &format!("{}: rasa resumed the interrupted rollback", b.label),
            ),
            _ => r.check(
                names.len() == kept.len() + 2,
                format!(
                    "{}: the installed but never booted root was kept too (one extra old root)",
                    b.label
                ),
                vec![format!(
                    "{}: {} old roots before the cut, {} now",
                    b.label,
                    kept.len(),
                    names.len()
                )],
            ),
        }
        kept = names_of(&b.vm("OLD_ROOTS after-prune").unwrap_or_default());
        last_boot = b
            .vm("BOOT")
            .and_then(|n| n.parse().ok())
            .unwrap_or(last_boot + 1);
    }
    Ok(r)
}

/// From the kernel starting the initrd's init to systemd starting the switch to the real root,
/// on the harness's clock (systemd's status lines carry no guest timestamp).
fn initrd_span(t: &Transcript) -> Option<f64> {
    let (start, _) = t.find_timed("Run /init as init process")?;
    let (end, _) = t.find_timed("Starting initrd-switch-root.service")?;
    Some((end.checked_sub(start)?).as_secs_f64())
}

fn span_between(t: &Transcript, from: &str, to: &str) -> Option<f64> {
    let (a, _) = t.find_timed(from)?;
    let (b, _) = t.find_timed(to)?;
    Some(b.checked_sub(a)?.as_secs_f64())
}

/// `cargo xtask vm bench-boot [N]`: N boots with and N without the rollback unit, alternating.
pub fn bench_boot(a: &Artefacts, rounds: usize) -> Result<()> {
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut rasa_ms = Vec::new();
    let mut unit_s = Vec::new();
    let (mut mount_with, mut mount_without) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        for initrd in [Initrd::Rollback, Initrd::NoRollback] {
            let name = if initrd == Initrd::Rollback {
                "with"
            } else {
                "without"
            };
            let disk = scenario_disk(a, "bench-boot")?;
            let t = simple_boot(a, &format!("bench-{name}-{i}"), initrd, &disk, "")?;
            if t.ending != Ending::Completed {
                bail!("bench boot failed: {:?} ({})", t.ending, t.log.display());
            }
            let span = initrd_span(&t).ok_or_else(|| {
                anyhow::anyhow!("no initrd start/switch-root lines in {}", t.log.display())
            })?;
            let mount = span_between(&t, "Mounting sysroot.mount", "Mounted sysroot.mount");
            println!(
                "bench {name:<7} round {i}: initrd start -> switch-root {span:.2} s, sysroot.mount {:.2} s, rasa {} ms",
                mount.unwrap_or(f64::NAN),
                rollback_ms(&t).map_or("-".into(), |m| m.to_string())
            );
            if initrd == Initrd::Rollback {
                mount_with.extend(mount);
            } else {
                mount_without.extend(mount);
            }
            if initrd == Initrd::Rollback {
                with.push(span);
                rasa_ms.extend(rollback_ms(&t));
                unit_s.extend(unit_duration(&t).map(|d| d.as_secs_f64()));
            } else {
                without.push(span);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (mw, mo) = (median(&mut with), median(&mut without));
    let mr = median(&mut rasa_ms);
    let mu = median(&mut unit_s);
    println!("\nboot, initrd start -> switch-root (median of {rounds}):");
    println!("  with the rollback unit    {mw:.2} s   (all: {with:.2?})");
    println!("  without the rollback unit {mo:.2} s   (all: {without:.2?})");
    println!("  rasa's own rollback       {mr:.1} ms (all: {rasa_ms:?})");
    println!("  rollback unit, console    {mu:.2} s  (all: {unit_s:.2?})");
    println!(
        "  sysroot.mount             {:.2} s with, {:.2} s without (the first btrfs mount of the boot pays for reading the trees)",
        median(&mut mount_with),
        median(&mut mount_without)
    );
    println!(
        "  rasa's rollback / initrd time = {:.3} %",
        mr / 1e3 / mw * 100.0
    );
    Ok(())
}

/// A swap area as mkswap leaves it (`SWAPSPACE2` at the end of the header page), or as the
/// kernel leaves it after hibernating into it (`S1SUSPEND` there instead).
fn swap_area(a: &Artefacts, name: &str, signature: &[u8]) -> Result<PathBuf> {
    use std::os::unix::fs::FileExt;
    let path = a.dir.join(format!("{name}.raw"));
    let file = std::fs::File::create(&path)?;
    file.set_len(1 << 20)?;
    file.write_all_at(signature, 4096 - 10)?;
    Ok(path)
}

/// A resume that did not happen must not be followed by a wipe: the hibernated system's root is
/// what its memory image refers to. This initrd has no resume machinery (dracut's resume module
/// is left out), which is exactly a skipped resume: the image stays on /dev/vdb, and rasa must
/// find it and keep the root. `noresume` then says the image is being thrown away, and the next
/// boot wipes as usual.
fn hibernation(a: &Artefacts) -> Result<Report> {
    let mut r = Report::new("hibernation");
    let disk = scenario_disk(a, "hibernation")?;
    let image = swap_area(a, "hibernated-swap", b"S1SUSPEND\0")?;
    let with_image = |label: &str, extra: &str| {
        boot(
            a,
            BootArgs {
                label,
                initrd: Initrd::Rollback,
                disk: &disk,
                typed: false,
                extra,
                cut_at: None,
                second_disk: Some(&image),
            },
        )
    };
    let kept = with_image("hibernation-pending", "resume=/dev/vdb")?;
    r.completed(&kept);
    r.line(
        &kept,
        "hibernation image",
        "rasa names the pending hibernation image in the journal",
    );
    r.check(
        kept.find("new root in place").is_none(),
        "rasa did not reset the root",
        vec![format!("{}: no \"new root in place\" line", kept.label)],
    );
    r.vm_is(
        &kept,
        "FLAG",
        "EXISTS written in boot 1",
        "the hibernated system's root is intact: /test_flag is still there",
    );
    r.vm_is(&kept, "NESTED", "SUBVOLUME", "its nested subvolume too");
    let discarded = with_image("hibernation-noresume", "resume=/dev/vdb noresume")?;
    r.completed(&discarded);
    r.line(
        &discarded,
        "new root in place in",
        "with noresume (the image thrown away) the next boot resets the root",
    );
    r.vm_is(
        &discarded,
        "FLAG",
        "ABSENT",
        "with noresume, /test_flag is gone",
    );
    Ok(r)
}

/// The boot-menu entry's kernel parameter: after a normal boot wiped boot 1's root, a boot with
/// `rasa.boot-old-root` gets a writable snapshot of it back (its /test_flag), the old root used
/// stays under old_roots, boot 2's root is kept too, and the next normal boot resets again.
fn boot_old_root(a: &Artefacts) -> Result<Report> {
    let mut r = Report::new("boot-old-root");
    let disk = scenario_disk(a, "boot-old-root")?;
    let wiped = simple_boot(a, "boot-old-root-2", Initrd::Rollback, &disk, "")?;
    r.completed(&wiped);
    r.vm_is(
        &wiped,
        "FLAG",
        "ABSENT",
        "boot 2 (normal): /test_flag is gone",
    );
    let boot1_root = |t: &Transcript| -> Vec<String> {
        t.vm_all("OLD_ROOT before-prune")
            .into_iter()
            .filter(|k| k.ends_with("flag=written in boot 1"))
            .filter_map(|k| k.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    let used = boot1_root(&wiped);
    r.check(
        used.len() == 1,
        "boot 2: boot 1's root is the newest old root",
        wiped
            .vm_all("OLD_ROOT before-prune")
            .iter()
            .map(|k| format!("{}: OLD_ROOT before-prune {k}", wiped.label))
            .collect(),
    );

    let back = simple_boot(
        a,
        "boot-old-root-3",
        Initrd::Rollback,
        &disk,
        "rasa.boot-old-root",
    )?;
    r.completed(&back);
    r.line(
        &back,
        "as a writable snapshot of the old root old_roots/",
        "boot 3 (rasa.boot-old-root): rasa put a snapshot of the newest old root in place",
    );
    r.vm_is(
        &back,
        "FLAG",
        "EXISTS written in boot 1",
        "boot 3: boot 1's /test_flag is back",
    );
    let still = boot1_root(&back);
    r.check(
        !used.is_empty() && still == used,
        "boot 3: the old root used is still listed under old_roots, as it was",
        back.vm_all("OLD_ROOT before-prune")
            .iter()
            .map(|k| format!("{}: OLD_ROOT before-prune {k}", back.label))
            .collect(),
    );
    r.check(
        back.vm_all("OLD_ROOT before-prune")
            .iter()
            .any(|k| k.ends_with("flag=written in boot 2")),
        "boot 3: boot 2's root is kept as an old root",
        vec![format!(
            "{}: OLD_ROOTS before-prune {}",
            back.label,
            back.vm("OLD_ROOTS before-prune").unwrap_or_default()
        )],
    );

    let again = simple_boot(a, "boot-old-root-4", Initrd::Rollback, &disk, "")?;
    r.completed(&again);
    r.line(
        &again,
        "created root.rasa-new as a writable snapshot of root-blank",
        "boot 4 (normal): the reset starts from the blank again",
    );
    r.vm_is(&again, "FLAG", "ABSENT", "boot 4: /test_flag is gone again");
    r.check(
        !used.is_empty() && boot1_root(&again) == used,
        "boot 4: boot 1's root is still kept",
        again
            .vm_all("OLD_ROOT before-prune")
            .iter()
            .map(|k| format!("{}: OLD_ROOT before-prune {k}", again.label))
            .collect(),
    );
    Ok(r)
}

/// `rasa watch` at boot: a writer in a cgroup named like a systemd unit (stage 2 is not systemd,
/// so the cgroup is made by hand, as systemd makes one per unit) writes state on the root; the
/// record names that unit for the path, and `rasa diff --long` shows it beside the path.
fn watch(a: &Artefacts) -> Result<Report> {
    let mut r = Report::new("watch");
    let disk = scenario_disk(a, "watch")?;
    let b = simple_boot(a, "watch", Initrd::Rollback, &disk, "rasa_vm.watch=1")?;
    r.completed(&b);
    r.vm_is(
        &b,
        "WATCH_EXIT",
        "0",
        "rasa watch wrote its record and stopped cleanly on SIGTERM",
    );
    let state = b.vm("WATCH_STATE").unwrap_or_default();
    r.check(
        state.contains("\"vm-writer.service\""),
        "the record names vm-writer.service as the writer of /var/lib/vm-writer/state",
        vec![format!("{}: RASA-VM: WATCH_STATE {state}", b.label)],
    );
    let diff = b.vm("WATCH_DIFF").unwrap_or_default();
    r.check(
        diff.contains("vm-writer.service"),
        "rasa diff --long shows the unit beside the path",
        vec![format!("{}: RASA-VM: WATCH_DIFF {diff}", b.label)],
    );
    Ok(r)
}
