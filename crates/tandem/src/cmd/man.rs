//! `tandem man --out DIR` (hidden): the manual pages, generated from the
//! command line's own definition (clap_mangen): `tandem.1`, and one page
//! per subcommand (`tandem-agent.1`, `tandem-certs-create.1`, ...).
//! scripts/package gzips them into the Debian package.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes every page of `cmd` (the `tandem` command) into `out`; the
/// files written.
pub fn run(cmd: clap::Command, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let mut written = Vec::new();
    let mut cmd = cmd;
    cmd.build();
    pages(&cmd, "tandem", out, &mut written)?;
    for f in &written {
        println!("{}", f.display());
    }
    Ok(written)
}

fn pages(cmd: &clap::Command, name: &str, out: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .with_context(|| format!("render the page of {name}"))?;
    let path = out.join(format!("{name}.1"));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        pages(sub, &format!("{name}-{}", sub.get_name()), out, written)?;
    }
    Ok(())
}
