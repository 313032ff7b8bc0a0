//! `rasa diff`: not built yet (see its issue).

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<u8> {
    anyhow::bail!("rasa diff is not implemented yet")
}
