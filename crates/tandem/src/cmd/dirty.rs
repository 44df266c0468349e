//! `tandem dirty --config FILE VOLUME`: the persistent dirty-region map.

use std::path::Path;

use anyhow::{bail, Result};
use tandem_agent::Layout;

pub fn run(config_path: &Path, volume: &str) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let Some((group, spec)) = config.volume(volume) else {
        bail!("no volume named {volume:?} in {}", config_path.display());
    };
    let layout = Layout::new(&config.site.data_dir);
    let path = layout.dirty_map(&group.name, volume);
    let ranges = tandem_capture::dirty::read_ranges(&path, spec.size)?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    println!(
        "volume {volume} (group {}): {} bytes in {} range(s) may differ from a replica",
        group.name,
        total,
        ranges.len()
    );
    for (offset, len) in ranges {
        println!("{offset}\t{len}");
    }
    Ok(())
}
