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
enum TestAction {
    /// Open a writable view of the group's volumes at a recovery point, on
    /// this replica, as NBD sockets (printed); prints the test's id
    Start {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// The site to test on (this one; other sites: not available yet)
        #[arg(long)]
        site: Option<String>,
        /// The newest point at or before TIME: RFC 3339
        /// (2026-12-05T10:15:00Z), back from now (-15m, -2h, -30s), or latest
        #[arg(long, value_name = "TIME", default_value = "latest")]
        at: String,
        /// Boot a copy of the group's VM on the view, its network detached
        #[arg(long)]
        boot: bool,
        /// Print the agent's answer as JSON
        #[arg(long)]
        json: bool,
    },
    /// Discard the group's test views (or one, --id): sockets, scratch and
    /// the view go; replication is not touched
    Stop {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// The site the test runs on (this one; other sites: not available yet)
        #[arg(long)]
        site: Option<String>,
        /// Only this test (as `test start` printed it)
        #[arg(long)]
        id: Option<u64>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run this site's agent: serve the volumes of the groups it is primary for
    #[command(
        after_long_help = "Signals: SIGHUP reloads the configuration file (peers, groups, \
        bandwidth, schedules and hook commands change in place; other changes are refused, \
        each logged, and the running configuration is kept). SIGTERM or SIGINT stop cleanly: \
        clients finish their requests, images are flushed, exit 0."
    )]
    Agent {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check a configuration file without starting anything: the file, the
    /// data directory, TLS files and listen addresses; prints "ok" or each
    /// problem with file, line and key (exit 0 / 1)
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write the manual pages (one per command) into DIR
    #[command(hide = true)]
    Man {
        /// Directory to write tandem.1, tandem-agent.1, ... into
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
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
    /// Show every group of the cluster: owner, epoch, each replica's state,
    /// lag, RPO and since when, gathered from every site (sites that do not
    /// answer within 2 s are marked unreachable)
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the JSON document (SPEC §4.4) instead of a table
        #[arg(long)]
        json: bool,
        /// Only this site's own view of its groups (no other site is asked)
        #[arg(long)]
        local: bool,
        /// A live view, refreshed every second until Ctrl-C (with resync
        /// rates and times left)
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
    /// The recovery points a replica keeps of a group: oldest and newest,
    /// their times, count, bytes held
    Points {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// The site whose points to list (default: this site, if it keeps
        /// them); asked through the local agent
        #[arg(long)]
        site: Option<String>,
        /// Print {"group", "site", "points": [{"time", "seq"}, ...]}, oldest first
        #[arg(long)]
        json: bool,
    },
    /// Test failover without failing over: a replica's volumes at a
    /// recovery point, served writable over NBD while replication goes on
    Test {
        #[command(subcommand)]
        action: TestAction,
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
    /// Move a group to one of its replicas now: unplanned, for a lost or
    /// misbehaving owner (refused while the owner is healthy unless --force)
    ///
    /// The group always goes to a site other than its current owner:
    /// --to SITE, or else the first eligible replica in its failover order
    /// (priority 1 first; eligible: its agent reports, its images are a
    /// consistent prefix, it is fit and within max_lag_on_failover).
    /// --to naming the current owner is refused and nothing changes.
    ///
    /// The group's VM, if it has one (vm = "libvirt:..."), is destroyed on
    /// the old owner (its QEMU killed, no clean shutdown) if it still runs
    /// there (an old owner whose agent is down does it when the agent
    /// returns), and started cold (a fresh boot from the replicated disks
    /// and definition) on the new owner after its promotion. No memory
    /// state moves. In async mode, writes the old owner acknowledged but
    /// had not yet replicated to the new owner are lost to the group (the
    /// old owner keeps them under <data_dir>/rollback/: `tandem rollback`).
    /// In sync mode, a failover without --to (the freshest replica goes
    /// first) loses no acknowledged write.
    #[command(verbatim_doc_comment)]
    Failover {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// The site to promote (never the current owner) [default: the
        /// first eligible replica in the failover order]
        #[arg(long, value_name = "SITE")]
        to: Option<String>,
        /// Take the group from a live owner: its owner key is deleted, its
        /// writes are fenced and its VM destroyed; data not yet replicated
        /// to the new owner may be lost
        #[arg(long)]
        force: bool,
    },
    /// Planned switchover of a group to another site, with zero data loss
    ///
    /// The owner holds new writes, drains every write to SITE, then hands
    /// the group over; SITE continues from exactly that point (nothing is
    /// lost, no resync). If SITE already owns the group, this says so and
    /// changes nothing.
    ///
    /// The group's VM, if it has one, moves cold: the guest is shut down
    /// cleanly on the old owner (destroyed if it has not stopped within the
    /// group's vm_shutdown_timeout, default 60 s), then booted on SITE after
    /// the handover. Live migration of a running guest is not available.
    #[command(verbatim_doc_comment)]
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// The site to move the group to
        #[arg(long, value_name = "SITE")]
        to: String,
    },
    /// Fail a group over to a replica site at a point in time (before a
    /// ransomware attack, a bad upgrade, a mistaken rm -rf)
    ///
    /// The site (this one, or --site) must be a replica that keeps the
    /// group's history (retention). It is promoted with the volumes as
    /// they were at the newest recovery point at or before TIME (`tandem
    /// points` lists them); the owner is fenced as by `failover --force`
    /// and its VM destroyed, then the group's VM boots cold on the site.
    /// Everything written after that point is kept aside, not lost: the
    /// promoted site saves what its images held since as rollback data
    /// (`tandem rollback list`), and the old owner saves its own
    /// unreplicated writes when it returns. Every other replica follows
    /// the new history (one that holds the point as a recovery point rolls
    /// back to it; others compare and receive only what differs).
    ///
    /// TIME is RFC 3339 (2026-12-05T10:15:00Z) or relative (-15m, -2h).
    #[command(verbatim_doc_comment)]
    Recover {
        #[command(flatten)]
        config: ConfigArg,
        /// Group name
        group: String,
        /// The point in time: RFC 3339, or relative to now (-15m)
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        at: String,
        /// The replica site to recover on [default: this site]
        #[arg(long, value_name = "SITE")]
        site: Option<String>,
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
    /// The writes a demoted primary saved before they were rolled back
    /// (<data_dir>/rollback/, docs/ROLLBACK.md): list, show, export, discard
    Rollback {
        #[command(subcommand)]
        action: RollbackAction,
    },
}

#[derive(Subcommand)]
enum RollbackAction {
    /// List this site's rollback data: group, epoch, seq, created, ranges, bytes, path
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show the ranges (volume, offset, length) one rollback holds
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The rollback's ID (e.g. web01-e3-s1234, as `list` shows)
        id: String,
    },
    /// One volume's saved ranges as a raw image of the volume's size: the
    /// saved bytes at their original offsets, holes (zeros) elsewhere;
    /// written to a sparse file (--out) or served read-only over NBD
    /// (--nbd) until Ctrl-C
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// The rollback's ID
        id: String,
        /// The volume to export
        #[arg(long, value_name = "VOL")]
        volume: String,
        /// The raw file to create (must not exist)
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "nbd",
            conflicts_with = "nbd"
        )]
        out: Option<PathBuf>,
        /// Serve the view read-only on this Unix socket (export name = VOL)
        #[arg(long, value_name = "SOCKET")]
        nbd: Option<PathBuf>,
    },
    /// Remove a rollback's files for good
    Discard {
        #[command(flatten)]
        config: ConfigArg,
        /// The rollback's ID
        id: String,
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
        Command::Check { config } => {
            return if cmd::check::run(&config.path()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        Command::Man { out } => {
            cmd::man::run(<Cli as clap::CommandFactory>::command(), &out).map(|_| ())
        }
        Command::Witness {
            listen,
            data_dir,
            tls,
        } => cmd::witness::run(&listen, &data_dir, &tls),
        Command::Demo { keep, vm } => cmd::demo::run(keep, vm),
        Command::Dirty { config, volume } => cmd::dirty::run(&config.path(), &volume),
        Command::Rollback { action } => match action {
            RollbackAction::List { config, json } => cmd::rollback::list(&config.path(), json),
            RollbackAction::Show { config, id } => cmd::rollback::show(&config.path(), &id),
            RollbackAction::Export {
                config,
                id,
                volume,
                out,
                nbd,
            } => cmd::rollback::export(&config.path(), &id, &volume, out, nbd),
            RollbackAction::Discard { config, id } => cmd::rollback::discard(&config.path(), &id),
        },
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
            local,
            watch,
        } => cmd::status::run(&config.path(), json, local, watch),
        Command::Verify { config, group } => match cmd::verify::run(&config.path(), &group) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Points {
            config,
            group,
            site,
            json,
        } => cmd::points::run(&config.path(), &group, site.as_deref(), json),
        Command::Test {
            action:
                TestAction::Start {
                    config,
                    group,
                    site,
                    at,
                    boot,
                    json,
                },
        } => cmd::test::start(&config.path(), &group, site.as_deref(), &at, boot, json),
        Command::Test {
            action:
                TestAction::Stop {
                    config,
                    group,
                    site,
                    id,
                },
        } => cmd::test::stop(&config.path(), &group, site.as_deref(), id),
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
        Command::Recover {
            config,
            group,
            at,
            site,
        } => cmd::recover::run(&config.path(), &group, &at, site.as_deref()),
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
