use anyhow::{bail, Result};

pub fn run(_args: &[String]) -> Result<()> {
    bail!("the rollback benchmark is not written yet")
}
