//! `tandem certs create --out DIR SITE...`: a CA and one certificate per site.

use std::path::Path;

use anyhow::Result;

/// Creates `DIR/ca.pem`, `DIR/ca.key`, `DIR/<site>.pem`, `DIR/<site>.key`
/// for each site and the witness's `DIR/witness.pem`, `DIR/witness.key`
/// (never overwriting a file), then says what to copy where.
pub fn run(out: &Path, sites: &[String]) -> Result<()> {
    // The error names the file or site at fault.
    let written = tandem_tls::certs::create(out, sites)?;
    for path in &written {
        println!("wrote {}", path.display());
    }
    let dir = out.display();
    println!();
    println!("Copy to each site ca.pem and its own <site>.pem and <site>.key (mode 0600),");
    println!("for example into /etc/tandem/tls/, and point its [tls] section at them:");
    if let Some(site) = sites.first() {
        println!();
        println!("  [tls]");
        println!("  ca = \"/etc/tandem/tls/ca.pem\"");
        println!("  cert = \"/etc/tandem/tls/{site}.pem\"");
        println!("  key = \"/etc/tandem/tls/{site}.key\"");
    }
    println!();
    println!("Copy to the witness ca.pem, witness.pem and witness.key (mode 0600), for");
    println!("example into its --data-dir, where `tandem witness` looks for them.");
    println!();
    println!(
        "Keep {dir}/ca.key offline: it is only needed to issue certificates, \
         and anyone holding it can impersonate any site."
    );
    Ok(())
}
