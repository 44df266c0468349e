//! `tandem`: the site agent and its command-line tools.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod cmd;
mod logging;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Continuous replication and failover of virtual machine disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to stderr [default: $TANDEM_LOG_FORMAT, then text]
    #[arg(long, global = true, value_name = "FORMAT", value_enum)]
    log_format: Option<logging::LogFormat>,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Site configuration file [default: $TANDEM_CONFIG, then /etc/tandem/tandem.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| std::env::var_os("TANDEM_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/etc/tandem/tandem.toml"))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run this site's agent: serve the volumes of the groups it is primary for
    Agent {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run the witness: the small durable process that decides which site owns each group
    Witness {
        /// Address to listen on (host:port)
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Directory for the witness's state
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        tls: cmd::witness::TlsArgs,
    },
    /// Run the local multi-site demonstration: a witness and three sites on
    /// loopback, failover after SIGKILL, resync, migration home, summary
    Demo {
        /// Leave everything running at the end and print how to reach it
        #[arg(long)]
        keep: bool,
        /// With a real VM: a libvirt daemon per site, a guest protected with
        /// `tandem protect`, the loss of its host, the VM up at chicago with
        /// its data checked (needs root, qemu-system-x86 and libvirt)
        #[arg(long)]
        vm: bool,
    },
    /// Show this site's groups and how each replica is doing
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the JSON document (SPEC §4.4) instead of a table
        #[arg(long)]
        json: bool,
        /// Follow running resyncs with a progress bar until they finish
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Compare every replica of a group with this primary (exit 1 if any differs)
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
    },
    /// Change the bandwidth limit towards a peer site now (until restart)
    Bandwidth {
        #[command(flatten)]
        config: ConfigArg,
        /// Peer site name
        site: String,
        /// A rate (e.g. 50Mbit, 10MB), unlimited, paused, or auto (back to the configuration)
        value: String,
    },
    /// Certificates for mutual TLS between sites
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Promote a replica of a group now (refused while the owner is healthy unless --force)
    Failover {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// The site to promote [default: the next in the failover order]
        #[arg(long, value_name = "SITE")]
        to: Option<String>,
        /// Take the group from a live owner (its owner key is deleted first)
        #[arg(long)]
        force: bool,
    },
    /// Planned switchover of a group to another site, with zero data loss
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// The site to move the group to
        #[arg(long, value_name = "SITE")]
        to: String,
    },
    /// This host's libvirt domains, their disks and state, and the groups protecting them
    Vms {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the JSON document instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Protect a libvirt domain of this host: move its disks onto new volumes
    /// (live when it runs) and replicate it to the given sites
    Protect {
        #[command(flatten)]
        config: ConfigArg,
        /// The libvirt domain
        domain: String,
        /// A site to replicate to, with its failover priority (lower first;
        /// default: the order given)
        #[arg(long = "replica", value_name = "SITE[:PRIORITY]", required = true,
              value_parser = cmd::protect::parse_replica)]
        replicas: Vec<tandem_agent::onboard::ReplicaRequest>,
        /// Replication mode [default: async]
        #[arg(long, value_parser = ["async", "sync"])]
        mode: Option<String>,
        /// The group's name [default: the domain's]
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
    },
    /// Stop protecting a group's VM: it keeps running on plain local raw
    /// files, and the group is removed from every site
    Unprotect {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// Directory for the VM's raw files [default: /var/lib/libvirt/images]
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
    /// Show the regions of a volume that may differ from its replicas
    Dirty {
        #[command(flatten)]
        config: ConfigArg,
        /// Volume name
        volume: String,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Create a CA and one certificate per site
    Create {
        /// Directory to write ca.pem, ca.key, SITE.pem and SITE.key into
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Site names (as in [[peer]] name)
        #[arg(required = true)]
        sites: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Before anything else (it changes the environment): a process the
    // demo started dies with the demo.
    match tandem_demo::bind_to_demo() {
        Ok(true) => {}
        Ok(false) => return ExitCode::from(1),
        Err(e) => {
            eprintln!("error: cannot arrange to end with the demo that started this process: {e}");
            return ExitCode::from(1);
        }
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let _logging = match logging::LogFormat::choose(cli.log_format) {
        Ok(format) => logging::init(format),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result: Result<()> = match cli.command {
        Command::Agent { config } => cmd::agent::run(&config.path()),
        Command::Witness {
            listen,
            data_dir,
            tls,
        } => cmd::witness::run(&listen, &data_dir, &tls),
        Command::Demo { keep, vm } => cmd::demo::run(keep, vm),
        Command::Dirty { config, volume } => cmd::dirty::run(&config.path(), &volume),
        Command::Vms { config, json } => cmd::vms::run(&config.path(), json),
        Command::Unprotect { config, group, to } => cmd::unprotect::run(&config.path(), &group, to),
        Command::Protect {
            config,
            domain,
            replicas,
            mode,
            group,
        } => cmd::protect::run(&config.path(), &domain, replicas, mode, group),
        Command::Status {
            config,
            json,
            watch,
        } => cmd::status::run(&config.path(), json, watch),
        Command::Verify { config, group } => match cmd::verify::run(&config.path(), &group) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Bandwidth {
            config,
            site,
            value,
        } => cmd::bandwidth::run(&config.path(), &site, &value),
        Command::Certs {
            action: CertsAction::Create { out, sites },
        } => cmd::certs::run(&out, &sites),
        Command::Failover {
            config,
            group,
            to,
            force,
        } => cmd::failover::run(&config.path(), &group, to.as_deref(), force, false),
        Command::Migrate { config, group, to } => {
            cmd::failover::run(&config.path(), &group, Some(&to), false, true)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_config(path: &std::path::Path) -> Result<tandem_config::Config> {
    tandem_config::load(path).with_context(|| "cannot start with this configuration".to_string())
}
