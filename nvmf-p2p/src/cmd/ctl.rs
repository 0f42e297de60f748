//! `nvmf-p2p ctl COMMAND [--json]` — changes a running `nvmf-p2p serve` through its
//! control socket: subsystems, namespaces, listeners, hosts and subsystem attributes
//! (applied at once, checked like the configuration file, refused whole when a part
//! fails), `save-config` (the running configuration as TOML for `serve --config`), and
//! `reset-device`.
use std::path::PathBuf;

use super::stats::print_text;
use super::{print_json, CliError, CliResult};
use crate::control::{self, Request};

#[derive(clap::Args)]
pub struct CtlArgs {
    /// Control socket of the target (the `control_socket` of its config).
    #[arg(long, default_value = transport::config::DEFAULT_CONTROL_SOCKET, global = true)]
    pub socket: PathBuf,
    /// Print the reply as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: CtlCommand,
}

#[derive(clap::Subcommand)]
pub enum CtlCommand {
    /// Device-level reset (FLR) of the VFIO controllers; I/O resumes afterwards.
    ResetDevice,
    /// Print the running configuration as TOML that `serve --config` accepts.
    SaveConfig {
        /// Write it to FILE instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Add a subsystem (namespaces follow with add-namespace).
    AddSubsystem {
        /// Subsystem NQN.
        nqn: String,
        /// Serial number (≤ 20 ASCII characters).
        #[arg(long)]
        serial: Option<String>,
        /// Model number (≤ 40 ASCII characters).
        #[arg(long)]
        model: Option<String>,
        /// Accept any host NQN.
        #[arg(long)]
        allow_any_host: bool,
        /// An allowed host NQN (repeat for more).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Remove a subsystem; its hosts' controllers are torn down.
    RemoveSubsystem {
        /// Subsystem NQN.
        nqn: String,
    },
    /// Change a subsystem's serial, model or allow_any_host.
    SetSubsystem {
        /// Subsystem NQN.
        nqn: String,
        #[arg(long)]
        serial: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        allow_any_host: Option<bool>,
    },
    /// Add a namespace: `vfio:BDF[:nsid]`, `spdk:BDF[:nsid]`, `file:PATH` or `ram:SIZE`.
    AddNamespace {
        /// Subsystem NQN.
        nqn: String,
        /// Backend specification.
        backend: String,
        /// Namespace id (default: the lowest free one).
        #[arg(long)]
        nsid: Option<u32>,
    },
    /// Remove a namespace; its commands in the device complete first.
    RemoveNamespace {
        /// Subsystem NQN.
        nqn: String,
        /// Namespace id.
        nsid: u32,
    },
    /// Listen on another RDMA address (the RDMA device of the others).
    AddListener {
        /// IP address.
        address: String,
        /// Port (default 4420).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Stop listening on an address (connections made through it stay).
    RemoveListener {
        /// IP address.
        address: String,
        /// Port (default 4420).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Allow a host NQN to connect (`--direct`: to attach direct-mode queues).
    AddHost {
        /// Subsystem NQN.
        nqn: String,
        /// Host NQN.
        host: String,
        /// The subsystem's direct_hosts instead of hosts.
        #[arg(long)]
        direct: bool,
    },
    /// Disallow a host NQN; its controllers (`--direct`: direct queues) are torn down.
    RemoveHost {
        /// Subsystem NQN.
        nqn: String,
        /// Host NQN.
        host: String,
        /// The subsystem's direct_hosts instead of hosts.
        #[arg(long)]
        direct: bool,
    },
}

impl CtlCommand {
    /// The control socket request of this command.
    fn request(&self) -> Request {
        match self {
            CtlCommand::ResetDevice => Request::ResetDevice,
            CtlCommand::SaveConfig { .. } => Request::SaveConfig,
            CtlCommand::AddSubsystem {
                nqn,
                serial,
                model,
                allow_any_host,
                hosts,
            } => Request::AddSubsystem {
                nqn: nqn.clone(),
                serial: serial.clone(),
                model: model.clone(),
                allow_any_host: *allow_any_host,
                hosts: hosts.clone(),
            },
            CtlCommand::RemoveSubsystem { nqn } => Request::RemoveSubsystem { nqn: nqn.clone() },
            CtlCommand::SetSubsystem {
                nqn,
                serial,
                model,
                allow_any_host,
            } => Request::SetSubsystem {
                nqn: nqn.clone(),
                serial: serial.clone(),
                model: model.clone(),
                allow_any_host: *allow_any_host,
            },
            CtlCommand::AddNamespace { nqn, backend, nsid } => Request::AddNamespace {
                nqn: nqn.clone(),
                backend: backend.clone(),
                nsid: *nsid,
            },
            CtlCommand::RemoveNamespace { nqn, nsid } => Request::RemoveNamespace {
                nqn: nqn.clone(),
                nsid: *nsid,
            },
            CtlCommand::AddListener { address, port } => Request::AddListener {
                address: address.clone(),
                port: *port,
            },
            CtlCommand::RemoveListener { address, port } => Request::RemoveListener {
                address: address.clone(),
                port: *port,
            },
            CtlCommand::AddHost { nqn, host, direct } => Request::AddHost {
                nqn: nqn.clone(),
                host: host.clone(),
                direct: *direct,
            },
            CtlCommand::RemoveHost { nqn, host, direct } => Request::RemoveHost {
                nqn: nqn.clone(),
                host: host.clone(),
                direct: *direct,
            },
        }
    }
}

pub fn run(a: CtlArgs) -> CliResult {
    let v = control::request(&a.socket, &a.cmd.request()).map_err(CliError)?;
    if let CtlCommand::SaveConfig { output } = &a.cmd {
        let text = v["config"].as_str().unwrap_or_default();
        if let Some(path) = output {
            std::fs::write(path, text)
                .map_err(|e| CliError::new(format!("cannot write {}: {e}", path.display())))?;
            if a.json {
                return print_json(&serde_json::json!({ "written": path }));
            }
            return Ok(());
        }
        if a.json {
            return print_json(&v);
        }
        print!("{text}");
        return Ok(());
    }
    if a.json {
        return print_json(&v);
    }
    print_text(&v, 0);
    Ok(())
}
