//! rasa: a blank root on every boot, with the state you opted in kept under /persist.

// `unsafe` only in `src/btrfs/` (the ioctls, which `#![allow]` it there) and in one function of
// `src/watch/fanotify.rs` (`open_by_handle_at(2)`, a system call nix does not wrap); everything
// else goes through nix's safe wrappers and the descriptor layer `src/fs/`.
#![deny(unsafe_code)]

mod btrfs;
mod check;
mod copy;
mod diff;
mod error;
mod failpoint;
mod fs;
mod hibernation;
mod layout;
mod log;
mod manifest;
mod migrate;
mod old_roots;
mod restore;
mod rollback;
mod rules;
mod setup;
mod toplevel;
mod watch;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "rasa",
    version,
    about = "A blank btrfs root on every boot; the state you opted in kept under /persist",
    after_help = "\
Examples:
  rasa setup --apply                                # create persist, the blank, old_roots
  rasa rollback --device /dev/mapper/cryptroot      # in the initrd: reset / to the blank
  rasa diff                                         # what the next boot will erase
  rasa migrate                                      # plan copying state into /persist
  rasa migrate --apply                              # ... and do it
  rasa check system                                 # is this machine set up right?
  rasa old-roots list                               # previous roots kept for recovery
  rasa restore /etc/nixos/configuration.nix --apply # get a file back from the newest old root
  rasa watch                                        # record which unit writes what

Exit codes:
  0  success
  1  an operation failed part-way; the message says what (the next run completes the job)
  2  the command line is wrong
  3  refused: bad input, configuration or disk layout; nothing was changed
  4  the command found problems (check: a failed item; migrate: conflicts; diff --exit-code;
     restore: a path not found, a problem, or a conflict left alone)

Environment:
  NO_COLOR       turn colour off
  RASA_DEVICE    default for --device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reset the root subvolume to the blank (run in the initrd, before / is mounted).
    Rollback(rollback::RollbackArgs),
    /// Delete old roots past retention (run after boot).
    Prune(old_roots::PruneArgs),
    /// Inspect the previous roots kept for recovery.
    #[command(subcommand)]
    OldRoots(old_roots::OldRootsCommand),
    /// Copy paths back from an old root (dry run unless --apply).
    Restore(restore::Args),
    /// Copy existing state into the storage root before the first wiping boot.
    Migrate(migrate::Args),
    /// Show what state on / is not persisted and will be erased.
    Diff(diff::Args),
    /// Validate a manifest, or this machine's layout.
    Check(check::Args),
    /// Prepare an existing btrfs root for rasa: create what is missing, touch nothing else.
    Setup(setup::SetupArgs),
    /// Record who (which systemd unit) writes each path that the next boot erases.
    Watch(watch::Args),
    /// Print the man page (roff) on stdout.
    #[command(hide = true)]
    Man,
    /// Print shell completions on stdout.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                error::exit::USAGE
            } else {
                error::exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Rollback(args) => rollback::run(args),
        Command::Prune(args) => old_roots::run_prune(args),
        Command::OldRoots(command) => old_roots::run_old_roots(command),
        Command::Restore(args) => restore::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Diff(args) => diff::run(args),
        Command::Check(args) => check::run(args),
        Command::Setup(args) => setup::run(args),
        Command::Watch(args) => watch::run(args),
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map(|()| 0)
            .map_err(Into::into),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "rasa", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            log::error(format!("{e:#}"));
            ExitCode::from(error::exit_code_for(&e))
        }
    }
}

/// A closed stdout (`rasa old-roots list | head -1`) must end rasa quietly, the way it ends
/// every Unix tool, not with a panic: Rust ignores SIGPIPE, so `println!` panics on EPIPE.
/// Resetting SIGPIPE would need `unsafe` outside `btrfs/`; instead this one hook turns exactly
/// that panic into the exit status a shell reports for SIGPIPE (128 + 13). Log lines on stderr
/// never panic (log.rs ignores write errors). Commands that change the disk are crash-safe at
/// every step, and print only after their work, so stopping here loses nothing.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        let epipe = format!("(os error {})", nix::libc::EPIPE);
        if message.starts_with("failed printing to stdout") && message.contains(&epipe) {
            std::process::exit(128 + nix::libc::SIGPIPE);
        }
        default(info);
    }));
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
