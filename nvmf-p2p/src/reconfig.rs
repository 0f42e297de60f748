//! Reconfiguring a running `serve`: a `ctl` request, or the configuration file reloaded on
//! SIGHUP, becomes the whole new configuration ([`edit`] for a request), is validated
//! with the configuration file's own checks (`TargetConfig::check`) and applied by
//! `Target::reconfigure` (the difference: subsystems, namespaces, hosts, attributes,
//! listeners); listener binds go to the serve loop, `direct_hosts` to the direct-mode
//! service. One path for both, one change at a time, nothing half-applied.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use transport::backend::Backend;
use transport::config::{
    BackendSpec, ListenerConfig, NamespaceConfig, SubsystemConfig, TargetConfig, TrType,
};
use transport::direct::target::DirectService;
use transport::nvmf_rdma::ListenerControl;
use transport::nvmf_target::Target;

use crate::control::Request;
use crate::devices::Devices;

/// Opens a namespace backend (the same opener `serve` used at startup).
pub type Opener = dyn Fn(&BackendSpec) -> transport::Result<Arc<dyn Backend>> + Send + Sync;

/// How long a change waits for removed namespaces to drain in the poll groups.
const DRAIN_WAIT: Duration = Duration::from_secs(8);

fn subsystem_index(cfg: &TargetConfig, nqn: &str) -> Result<usize, String> {
    cfg.subsystems
        .iter()
        .position(|s| s.nqn == nqn)
        .ok_or_else(|| format!("field `nqn`: subsystem {nqn} not found on this target"))
}

fn listener(address: &str, port: Option<u16>) -> Result<ListenerConfig, String> {
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("field `address`: `{address}` is not an IP address"))?;
    Ok(ListenerConfig {
        trtype: TrType::Rdma,
        address,
        port: port.unwrap_or(transport::config::DEFAULT_PORT),
    })
}

/// The configuration `cfg` with `req` applied; refuses what does not fit (unknown NQN,
/// no such namespace, ...). The result still goes through `TargetConfig::check`, where
/// the configuration file's rules (NQN shape, duplicate nsid, serial length, ...) apply.
pub fn edit(cfg: &TargetConfig, req: &Request) -> Result<TargetConfig, String> {
    let mut new = cfg.clone();
    match req {
        Request::Stats | Request::ResetDevice | Request::SaveConfig => {
            return Err("not a configuration change".into())
        }
        Request::AddSubsystem {
            nqn,
            serial,
            model,
            allow_any_host,
            hosts,
        } => {
            if cfg.subsystems.iter().any(|s| &s.nqn == nqn) {
                return Err(format!("field `nqn`: subsystem {nqn} exists already"));
            }
            // The file's defaults for what is left out (serial, model).
            let mut sub: SubsystemConfig = serde_json::from_value(json!({ "nqn": nqn }))
                .map_err(|e| format!("field `nqn`: {e}"))?;
            if let Some(s) = serial {
                sub.serial = s.clone();
            }
            if let Some(m) = model {
                sub.model = m.clone();
            }
            sub.allow_any_host = *allow_any_host;
            sub.hosts = hosts.clone();
            new.subsystems.push(sub);
        }
        Request::RemoveSubsystem { nqn } => {
            let i = subsystem_index(cfg, nqn)?;
            new.subsystems.remove(i);
        }
        Request::SetSubsystem {
            nqn,
            serial,
            model,
            allow_any_host,
        } => {
            let i = subsystem_index(cfg, nqn)?;
            if serial.is_none() && model.is_none() && allow_any_host.is_none() {
                return Err("nothing to set: give serial, model or allow_any_host".into());
            }
            let s = &mut new.subsystems[i];
            if let Some(v) = serial {
                s.serial = v.clone();
            }
            if let Some(v) = model {
                s.model = v.clone();
            }
            if let Some(v) = allow_any_host {
                s.allow_any_host = *v;
            }
        }
        Request::AddNamespace { nqn, backend, nsid } => {
            let i = subsystem_index(cfg, nqn)?;
            let spec: BackendSpec = backend
                .parse()
                .map_err(|e| format!("field `backend`: {e}"))?;
            let s = &mut new.subsystems[i];
            // Every namespace gets its nsid written out, so positions never shift ids.
            let used: Vec<u32> = TargetConfig::nsids(s).map(|(id, _)| id).collect();
            for (j, n) in s.namespaces.iter_mut().enumerate() {
                n.nsid.get_or_insert(j as u32 + 1);
            }
            let nsid = match nsid {
                Some(n) => *n,
                None => (1..u32::MAX)
                    .find(|n| !used.contains(n))
                    .ok_or("field `nsid`: no free namespace id")?,
            };
            if used.contains(&nsid) {
                return Err(format!(
                    "field `nsid`: subsystem {nqn} has a namespace {nsid} already"
                ));
            }
            s.namespaces.push(NamespaceConfig {
                nsid: Some(nsid),
                backend: spec,
            });
        }
        Request::RemoveNamespace { nqn, nsid } => {
            let i = subsystem_index(cfg, nqn)?;
            let s = &mut new.subsystems[i];
            for (j, n) in s.namespaces.iter_mut().enumerate() {
                n.nsid.get_or_insert(j as u32 + 1);
            }
            let before = s.namespaces.len();
            s.namespaces.retain(|n| n.nsid != Some(*nsid));
            if s.namespaces.len() == before {
                return Err(format!(
                    "field `nsid`: subsystem {nqn} has no namespace {nsid}"
                ));
            }
        }
        Request::AddListener { address, port } => {
            let l = listener(address, *port)?;
            if cfg.listeners.contains(&l) {
                return Err(format!(
                    "field `address`: already listening on {}:{}",
                    l.address, l.port
                ));
            }
            new.listeners.push(l);
        }
        Request::RemoveListener { address, port } => {
            let l = listener(address, *port)?;
            let before = new.listeners.len();
            new.listeners.retain(|x| x != &l);
            if new.listeners.len() == before {
                return Err(format!(
                    "field `address`: not listening on {}:{}",
                    l.address, l.port
                ));
            }
        }
        Request::AddHost { nqn, host, direct } => {
            let i = subsystem_index(cfg, nqn)?;
            let s = &mut new.subsystems[i];
            let (list, name) = if *direct {
                (&mut s.direct_hosts, "direct_hosts")
            } else {
                (&mut s.hosts, "hosts")
            };
            if list.contains(host) {
                return Err(format!(
                    "field `host`: {host} is on {name} of {nqn} already"
                ));
            }
            list.push(host.clone());
        }
        Request::RemoveHost { nqn, host, direct } => {
            let i = subsystem_index(cfg, nqn)?;
            let s = &mut new.subsystems[i];
            let (list, name) = if *direct {
                (&mut s.direct_hosts, "direct_hosts")
            } else {
                (&mut s.hosts, "hosts")
            };
            let before = list.len();
            list.retain(|h| h != host);
            if list.len() == before {
                return Err(format!("field `host`: {host} is not on {name} of {nqn}"));
            }
        }
    }
    Ok(new)
}

/// The running configuration and what applies a change to it.
pub struct Running {
    cfg: Mutex<TargetConfig>,
    target: Arc<Target>,
    open: Arc<Opener>,
    /// The serve loop's listener control, once it runs.
    pub listeners: OnceLock<ListenerControl>,
    direct: Option<Arc<DirectService>>,
    devices: Arc<Devices>,
    /// Command-line overrides of `serve` applied to a reloaded file as at startup.
    overrides: Box<Overrides>,
}

/// `serve`'s command-line overrides, applied to a reloaded file as at startup.
pub type Overrides = dyn Fn(&mut TargetConfig) + Send + Sync;

fn addr(l: &ListenerConfig) -> SocketAddr {
    SocketAddr::new(l.address, l.port)
}

impl Running {
    pub fn new(
        cfg: TargetConfig,
        target: Arc<Target>,
        open: Arc<Opener>,
        direct: Option<Arc<DirectService>>,
        devices: Arc<Devices>,
        overrides: Box<Overrides>,
    ) -> Running {
        Running {
            cfg: Mutex::new(cfg),
            target,
            open,
            listeners: OnceLock::new(),
            direct,
            devices,
            overrides,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TargetConfig> {
        self.cfg.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running configuration.
    pub fn config(&self) -> TargetConfig {
        self.lock().clone()
    }

    /// Applies a `ctl` request.
    pub fn request(&self, req: &Request) -> Result<Value, String> {
        self.change("ctl request", |cur| edit(cur, req))
    }

    /// A reloaded configuration file (SIGHUP; `origin` names it) replaces the running
    /// configuration; serve's command-line overrides apply to it as at startup.
    pub fn reload(&self, mut new: TargetConfig, origin: &str) -> Result<Value, String> {
        (self.overrides)(&mut new);
        self.change(origin, |_| Ok(new))
    }

    /// Computes the new configuration from the running one with `f`, checks and applies
    /// it; the reply lists the changes.
    fn change(
        &self,
        origin: &str,
        f: impl FnOnce(&TargetConfig) -> Result<TargetConfig, String>,
    ) -> Result<Value, String> {
        let mut cur = self.lock();
        let new = f(&cur)?;
        new.check(origin).map_err(|e| match e {
            transport::Error::Config { field, message, .. } => {
                format!("field `{field}`: {message}")
            }
            e => e.to_string(),
        })?;
        if new.listeners.is_empty() {
            return Err("field `listener`: the last listener cannot be removed".into());
        }
        let direct_changed: Vec<&SubsystemConfig> = new
            .subsystems
            .iter()
            .filter(|s| {
                let was = cur.subsystems.iter().find(|o| o.nqn == s.nqn);
                was.map_or(!s.direct_hosts.is_empty(), |o| {
                    o.direct_hosts != s.direct_hosts
                })
            })
            .collect();
        if !direct_changed.is_empty() && self.direct.is_none() {
            return Err(format!(
                "field `direct_hosts` of {}: direct mode was off when serve started (no subsystem had direct_hosts): restart serve with direct_hosts in the configuration",
                direct_changed[0].nqn
            ));
        }
        // Listeners to bind come first: a bind that fails refuses the whole change.
        let added: Vec<ListenerConfig> = new
            .listeners
            .iter()
            .filter(|l| !cur.listeners.contains(l))
            .cloned()
            .collect();
        let ctl = self.listeners.get();
        let mut bound = Vec::new();
        for l in &added {
            let r = match ctl {
                Some(c) => c.add(addr(l)).map_err(|e| e.to_string()),
                None => Err("the serve loop is not running yet".into()),
            };
            if let Err(e) = r {
                for b in &bound {
                    if let Some(c) = ctl {
                        let _ = c.remove(*b);
                    }
                }
                return Err(format!(
                    "field `address`: cannot listen on {}:{}: {e}",
                    l.address, l.port
                ));
            }
            bound.push(addr(l));
        }
        let open = self.open.clone();
        let mut done = match self.target.reconfigure(&cur, &new, |spec| open(spec)) {
            Ok(d) => d,
            Err(e) => {
                for b in &bound {
                    if let Some(c) = ctl {
                        let _ = c.remove(*b);
                    }
                }
                return Err(match e {
                    transport::Error::Config { field, message, .. } => {
                        format!("field `{field}`: {message}")
                    }
                    e => e.to_string(),
                });
            }
        };
        for l in &done.listeners_removed {
            if let Some(c) = ctl {
                if let Err(e) = c.remove(addr(l)) {
                    tracing::warn!(error = %e, "stop listening");
                }
            }
        }
        let mut revoked = 0;
        if let Some(svc) = &self.direct {
            for s in &direct_changed {
                let settings = (!s.direct_hosts.is_empty())
                    .then(|| crate::cmd::direct::direct_subsystem(s, &self.devices));
                revoked += svc.set_subsystem(&s.nqn, settings);
            }
            for gone in cur
                .subsystems
                .iter()
                .filter(|o| !o.direct_hosts.is_empty())
                .filter(|o| !new.subsystems.iter().any(|s| s.nqn == o.nqn))
            {
                revoked += svc.set_subsystem(&gone.nqn, None);
            }
        }
        let drained = done.wait_drained(DRAIN_WAIT);
        if !drained {
            tracing::warn!("removed namespaces still draining after {DRAIN_WAIT:?}");
        }
        *cur = new;
        Ok(json!({
            "changes": done.changes,
            "drained": drained,
            "direct_queues_detached": revoked,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const SUB: &str = "nqn.2026-11.io.example:disk0";
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:1";

    fn base() -> TargetConfig {
        TargetConfig::parse(
            &format!(
                "[[listener]]\ntrtype = \"rdma\"\naddress = \"10.0.0.1\"\n[[subsystem]]\nnqn = \"{SUB}\"\nhosts = [\"{HOST}\"]\n[[subsystem.namespace]]\nbackend = \"ram:1MiB\"\n"
            ),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    fn checked(cfg: &TargetConfig, req: Request) -> Result<TargetConfig, String> {
        let new = edit(cfg, &req)?;
        new.check("ctl request").map_err(|e| e.to_string())?;
        Ok(new)
    }

    #[test]
    fn namespace_requests() {
        let cfg = base();
        let add = |nsid| Request::AddNamespace {
            nqn: SUB.into(),
            backend: "ram:2MiB".into(),
            nsid,
        };
        let new = checked(&cfg, add(None)).unwrap();
        let ids: Vec<u32> = TargetConfig::nsids(&new.subsystems[0])
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ids, [1, 2]);
        let e = checked(&cfg, add(Some(1))).unwrap_err();
        assert!(
            e.contains("field `nsid`") && e.contains("namespace 1 already"),
            "{e}"
        );
        let e = checked(&cfg, add(Some(0))).unwrap_err();
        assert!(
            e.contains("namespace[1].nsid") && e.contains("between 1"),
            "{e}"
        );
        let e = edit(
            &cfg,
            &Request::AddNamespace {
                nqn: SUB.into(),
                backend: "ram:lots".into(),
                nsid: None,
            },
        )
        .unwrap_err();
        assert!(
            e.contains("field `backend`") && e.contains("ram:lots"),
            "{e}"
        );
        let e = edit(
            &cfg,
            &Request::AddNamespace {
                nqn: "nqn.2026-11.io.example:nope".into(),
                backend: "ram:1MiB".into(),
                nsid: None,
            },
        )
        .unwrap_err();
        assert!(e.contains("not found on this target"), "{e}");
        // remove: the remaining ids do not shift
        let two = checked(&cfg, add(None)).unwrap();
        let one = checked(
            &two,
            Request::RemoveNamespace {
                nqn: SUB.into(),
                nsid: 1,
            },
        )
        .unwrap();
        let ids: Vec<u32> = TargetConfig::nsids(&one.subsystems[0])
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ids, [2]);
        let e = edit(
            &one,
            &Request::RemoveNamespace {
                nqn: SUB.into(),
                nsid: 1,
            },
        )
        .unwrap_err();
        assert!(e.contains("no namespace 1"), "{e}");
    }

    #[test]
    fn subsystem_host_and_listener_requests() {
        let cfg = base();
        let e = checked(
            &cfg,
            Request::AddSubsystem {
                nqn: "bogus".into(),
                serial: None,
                model: None,
                allow_any_host: true,
                hosts: vec![],
            },
        )
        .unwrap_err();
        assert!(
            e.contains("subsystem[1].nqn") && e.contains("nqn.yyyy-mm"),
            "{e}"
        );
        let e = checked(
            &cfg,
            Request::AddSubsystem {
                nqn: "nqn.2026-11.io.example:b".into(),
                serial: None,
                model: None,
                allow_any_host: false,
                hosts: vec![],
            },
        )
        .unwrap_err();
        assert!(e.contains("subsystem[1].hosts"), "{e}");
        let e = edit(
            &cfg,
            &Request::AddSubsystem {
                nqn: SUB.into(),
                serial: None,
                model: None,
                allow_any_host: true,
                hosts: vec![],
            },
        )
        .unwrap_err();
        assert!(e.contains("exists already"), "{e}");
        let e = checked(
            &cfg,
            Request::SetSubsystem {
                nqn: SUB.into(),
                serial: Some("X".repeat(21)),
                model: None,
                allow_any_host: None,
            },
        )
        .unwrap_err();
        assert!(e.contains("subsystem[0].serial") && e.contains("20"), "{e}");
        // the last host cannot go while allow_any_host is off
        let e = checked(
            &cfg,
            Request::RemoveHost {
                nqn: SUB.into(),
                host: HOST.into(),
                direct: false,
            },
        )
        .unwrap_err();
        assert!(e.contains("no host may connect"), "{e}");
        let new = checked(
            &cfg,
            Request::AddHost {
                nqn: SUB.into(),
                host: HOST.into(),
                direct: true,
            },
        )
        .unwrap();
        assert_eq!(new.subsystems[0].direct_hosts, [HOST]);
        let e = edit(
            &cfg,
            &Request::AddHost {
                nqn: SUB.into(),
                host: HOST.into(),
                direct: false,
            },
        )
        .unwrap_err();
        assert!(e.contains("on hosts of") && e.contains("already"), "{e}");
        let e = edit(
            &cfg,
            &Request::AddListener {
                address: "10.0.0.1".into(),
                port: None,
            },
        )
        .unwrap_err();
        assert!(e.contains("already listening on 10.0.0.1:4420"), "{e}");
        let e = edit(
            &cfg,
            &Request::AddListener {
                address: "ten".into(),
                port: None,
            },
        )
        .unwrap_err();
        assert!(e.contains("field `address`"), "{e}");
        let new = checked(
            &cfg,
            Request::AddListener {
                address: "10.0.0.2".into(),
                port: Some(4421),
            },
        )
        .unwrap();
        assert_eq!(new.listeners.len(), 2);
    }

    fn running(cfg: &TargetConfig) -> Running {
        let target = Arc::new(Target::from_config(cfg, None).unwrap());
        let open: Arc<Opener> = Arc::new(|spec| transport::backend::open_backend(spec, None));
        Running::new(
            cfg.clone(),
            target,
            open,
            None,
            Arc::new(Devices::none()),
            Box::new(|c: &mut TargetConfig| c.shadow_doorbells = false),
        )
    }

    #[test]
    fn requests_apply_and_save_config_round_trips() {
        let mut cfg = base();
        cfg.shadow_doorbells = false;
        let run = running(&cfg);
        let reply = run
            .request(&Request::AddNamespace {
                nqn: SUB.into(),
                backend: "ram:2MiB".into(),
                nsid: Some(7),
            })
            .unwrap();
        assert!(
            reply["changes"][0]
                .as_str()
                .unwrap()
                .contains("namespace 7"),
            "{reply}"
        );
        run.request(&Request::AddSubsystem {
            nqn: "nqn.2026-11.io.example:b".into(),
            serial: Some("SB".into()),
            model: None,
            allow_any_host: true,
            hosts: vec![],
        })
        .unwrap();
        run.request(&Request::AddNamespace {
            nqn: "nqn.2026-11.io.example:b".into(),
            backend: "ram:1MiB".into(),
            nsid: None,
        })
        .unwrap();
        run.request(&Request::SetSubsystem {
            nqn: SUB.into(),
            serial: None,
            model: Some("m2".into()),
            allow_any_host: None,
        })
        .unwrap();
        // A refused request changes nothing, the target included.
        let before = run.config();
        let e = run
            .request(&Request::AddNamespace {
                nqn: SUB.into(),
                backend: "file:/nonexistent/x".into(),
                nsid: None,
            })
            .unwrap_err();
        assert!(e.contains("namespace[2].backend"), "{e}");
        assert_eq!(run.config(), before);
        let subs = run.target.subsystems();
        assert_eq!(subs.len(), 3);
        assert_eq!(subs[1].namespaces().len(), 2);
        assert_eq!(subs[1].model(), "m2");
        assert_eq!(subs[2].serial(), "SB");
        // save-config: TOML that `serve --config` accepts, describing the same target.
        let text = run.config().to_toml();
        let again = TargetConfig::parse(&text, Path::new("saved.toml")).unwrap();
        assert_eq!(again, run.config());
        let fresh = Target::from_config(&again, None).unwrap();
        let ids = |t: &Target| -> Vec<(String, Vec<u32>)> {
            t.subsystems()
                .iter()
                .map(|s| {
                    (
                        s.nqn.clone(),
                        s.namespaces().iter().map(|n| n.nsid).collect(),
                    )
                })
                .collect()
        };
        assert_eq!(ids(&fresh), ids(&run.target));
    }

    #[test]
    fn reload_applies_the_file_and_refuses_what_needs_a_restart() {
        let mut cfg = base();
        cfg.shadow_doorbells = false;
        let run = running(&cfg);
        let dir = std::env::temp_dir().join(format!("nvmf-p2p-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("target.toml");
        let mut edited = cfg.clone();
        edited.subsystems[0].serial = "NEWSERIAL".into();
        edited.subsystems[0].namespaces[0].backend = "ram:2MiB".parse().unwrap();
        // The command-line override (shadow_doorbells off) applies to the file too.
        edited.shadow_doorbells = true;
        std::fs::write(&file, edited.to_toml()).unwrap();
        let load = |f: &Path| TargetConfig::load(f).map_err(|e| e.to_string());
        let reply = run.reload(load(&file).unwrap(), "target.toml").unwrap();
        let changes: Vec<&str> = reply["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            changes.iter().any(|c| c.contains("replaced")),
            "{changes:?}"
        );
        assert!(
            changes.iter().any(|c| c.contains("NEWSERIAL")),
            "{changes:?}"
        );
        assert_eq!(
            run.target.subsystems()[1].namespaces()[0]
                .backend
                .block_count()
                * 512,
            2 << 20
        );
        // A file that changes queue_depth is refused whole.
        let mut bad = edited.clone();
        bad.queue_depth = 64;
        bad.subsystems[0].serial = "OTHER".into();
        std::fs::write(&file, bad.to_toml()).unwrap();
        let e = run.reload(load(&file).unwrap(), "target.toml").unwrap_err();
        assert!(e.contains("queue_depth") && e.contains("restart"), "{e}");
        assert_eq!(run.target.subsystems()[1].serial(), "NEWSERIAL");
        // The last listener cannot go.
        let mut none = edited.clone();
        none.listeners.clear();
        let e = run.reload(none, "target.toml").unwrap_err();
        assert!(e.contains("listener"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
