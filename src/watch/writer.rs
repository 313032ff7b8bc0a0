//! Who wrote: the systemd unit of a process, from its cgroup, or its command name.

use serde::{Deserialize, Serialize};

/// Unit types a process can run in (slices hold cgroups, not processes).
const UNIT_SUFFIXES: &[&str] = &[".service", ".scope", ".socket", ".mount", ".swap"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriterKind {
    /// A systemd unit, from the process's cgroup.
    Unit,
    /// The process was in no unit: its command name (`/proc/<pid>/comm`).
    Command,
    /// The process was gone before it could be looked at.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Writer {
    pub kind: WriterKind,
    /// The unit's or the command's name; "unknown" for [`WriterKind::Unknown`].
    pub name: String,
}

impl Writer {
    pub fn unknown() -> Writer {
        Writer {
            kind: WriterKind::Unknown,
            name: "unknown".to_owned(),
        }
    }
}

/// The innermost unit in a cgroup path: its last component that names one. A service that
/// delegates its cgroup (`Delegate=yes`) may have processes in sub-cgroups below it, which
/// still belong to it: `/system.slice/docker.service/x` is `docker.service`.
pub fn unit_of_cgroup(path: &str) -> Option<&str> {
    path.rsplit('/').find(|part| {
        UNIT_SUFFIXES
            .iter()
            .any(|s| part.len() > s.len() && part.ends_with(s))
    })
}

/// The unit of a process from the text of `/proc/<pid>/cgroup`: from the unified (cgroup2)
/// line `0::/...`, or on a legacy or hybrid hierarchy from systemd's own `name=systemd` one.
pub fn unit_of_process(proc_cgroup: &str) -> Option<&str> {
    let line = |prefix: &str| {
        proc_cgroup.lines().find_map(|l| {
            l.split_once(':')
                .and_then(|(_, rest)| rest.strip_prefix(prefix))
        })
    };
    line(":")
        .and_then(unit_of_cgroup)
        .or_else(|| line("name=systemd:").and_then(unit_of_cgroup))
}

/// Who process `pid` is, looked at now.
pub fn writer_of(pid: i32) -> Writer {
    let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Writer::unknown();
    };
    if let Some(unit) = unit_of_process(&cgroup) {
        return Writer {
            kind: WriterKind::Unit,
            name: unit.to_owned(),
        };
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => Writer {
            kind: WriterKind::Command,
            name: comm.trim_end_matches('\n').to_owned(),
        },
        Err(_) => Writer::unknown(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn innermost_unit_of_a_cgroup() {
        assert_eq!(
            unit_of_cgroup("/system.slice/foo.service"),
            Some("foo.service")
        );
        assert_eq!(
            unit_of_cgroup("/system.slice/system-getty.slice/getty@tty1.service"),
            Some("getty@tty1.service")
        );
        assert_eq!(
            unit_of_cgroup("/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.scope"),
            Some("app-x.scope")
        );
        assert_eq!(
            unit_of_cgroup("/system.slice/docker.service/payload"),
            Some("docker.service")
        );
        assert_eq!(unit_of_cgroup("/init.scope"), Some("init.scope"));
        assert_eq!(unit_of_cgroup("/"), None);
        assert_eq!(unit_of_cgroup("/user.slice"), None);
        assert_eq!(unit_of_cgroup("/x/.service"), None);
    }

    #[test]
    fn unified_line_first_then_legacy_systemd() {
        let hybrid =
            "9:name=systemd:/system.slice/old.service\n4:memory:/m\n0::/system.slice/new.service\n";
        assert_eq!(unit_of_process(hybrid), Some("new.service"));
        let legacy = "9:name=systemd:/system.slice/old.service\n4:memory:/m\n";
        assert_eq!(unit_of_process(legacy), Some("old.service"));
        let unified_root = "9:name=systemd:/system.slice/old.service\n0::/\n";
        assert_eq!(unit_of_process(unified_root), Some("old.service"));
        assert_eq!(unit_of_process("0::/\n"), None);
        assert_eq!(unit_of_process(""), None);
    }

    #[test]
    fn this_process_is_someone() {
        let me = writer_of(std::process::id() as i32);
        assert_ne!(me.kind, WriterKind::Unknown);
        assert!(!me.name.is_empty());
    }
}
