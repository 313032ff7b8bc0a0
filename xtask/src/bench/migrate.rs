use anyhow::{bail, Result};

pub fn run(_args: &[String]) -> Result<()> {
    bail!("the migrate benchmark is not written yet")
}
