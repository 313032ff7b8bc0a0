use anyhow::{bail, Result};

pub fn run(_args: &[String]) -> Result<()> {
    bail!("the diff benchmark is not written yet")
}
