//! Changing a running target. `nvmf-p2p ctl` and `serve`'s reload on SIGHUP both describe
//! the wanted configuration whole — the running one with the change made — validate it
//! like a configuration file (`TargetConfig::check`), and hand it here with the running
//! one: [`Target::reconfigure`] computes the difference and applies it.
//!
//! Nothing is left half-applied: every check runs and every new backend opens before the
//! first change is made; a failure drops what was opened and changes nothing. Hosts hear
//! of changes the spec way: controllers of a subsystem whose namespaces changed get the
//! nsids in their Changed Namespace List (log 04h) and a Namespace Attribute Changed
//! event; discovery controllers get a Discovery Log Page Change event and the log's
//! generation counter goes up whenever what it lists changes (subsystems, listeners,
//! which hosts see which subsystem).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{unbounded, Receiver};

use super::{lock, nguid_for, GroupMsg, Namespace, SubState, Subsystem, Target};
use crate::backend::Backend;
use crate::config::{BackendSpec, ListenerConfig, SubsystemConfig, TargetConfig};
use crate::error::{Error, Result};

/// How long a removed namespace's commands in the device get to complete.
pub const NAMESPACE_DRAIN: Duration = Duration::from_secs(5);

/// What [`Target::reconfigure`] did.
#[must_use = "removed namespaces drain in the poll groups: wait for it"]
pub struct Reconfigured {
    /// One line per change, for the log and the `ctl` reply.
    pub changes: Vec<String>,
    /// Listeners the transport must start listening on.
    pub listeners_added: Vec<ListenerConfig>,
    /// Listeners the transport must stop listening on.
    pub listeners_removed: Vec<ListenerConfig>,
    drains: Vec<Receiver<()>>,
    removed: Vec<Arc<dyn Backend>>,
}

impl Reconfigured {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Poll groups that have not yet dropped the channels of removed namespaces.
    pub fn pending_drains(&mut self) -> usize {
        self.drains.retain(|rx| {
            !matches!(
                rx.try_recv(),
                Ok(()) | Err(crossbeam::channel::TryRecvError::Disconnected)
            )
        });
        if self.drains.is_empty() {
            self.flush_removed();
        }
        self.drains.len()
    }

    /// Waits until every poll group drained the removed namespaces (their commands in the
    /// device completed), then flushes those backends. False when `timeout` ran out.
    pub fn wait_drained(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.drains.retain(|rx| {
            matches!(
                rx.recv_deadline(deadline),
                Err(crossbeam::channel::RecvTimeoutError::Timeout)
            )
        });
        if self.drains.is_empty() {
            self.flush_removed();
        }
        self.drains.is_empty()
    }

    fn flush_removed(&mut self) {
        for b in self.removed.drain(..) {
            if let Err(e) = b.flush() {
                tracing::warn!(backend = %b.describe(), error = %e, "flush of a removed namespace");
            }
        }
    }
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Config {
        file: "running target".into(),
        line: 0,
        column: 0,
        field: field.into(),
        message: message.into(),
    }
}

/// Settings of the whole target that are fixed while it runs: the poll groups, their
/// pools and every queue were sized from them.
fn restart_only(old: &TargetConfig, new: &TargetConfig) -> Result<()> {
    let fixed: [(&str, bool); 13] = [
        ("queue_depth", old.queue_depth == new.queue_depth),
        ("max_io_queues", old.max_io_queues == new.max_io_queues),
        (
            "in_capsule_data_size",
            old.in_capsule_data_size == new.in_capsule_data_size,
        ),
        ("max_io_size", old.max_io_size == new.max_io_size),
        ("data_buffers", old.data_buffers == new.data_buffers),
        ("cores", old.cores == new.cores),
        (
            "shadow_doorbells",
            old.shadow_doorbells == new.shadow_doorbells,
        ),
        (
            "nvme_interrupts",
            old.nvme_interrupts == new.nvme_interrupts,
        ),
        ("idle_spell_us", old.idle_spell_us == new.idle_spell_us),
        (
            "device_spell_us",
            old.device_spell_us == new.device_spell_us,
        ),
        ("max_sleep_ms", old.max_sleep_ms == new.max_sleep_ms),
        ("control_socket", old.control_socket == new.control_socket),
        (
            "control_socket_group",
            old.control_socket_group == new.control_socket_group,
        ),
    ];
    match fixed.iter().find(|(_, same)| !same) {
        Some((field, _)) => Err(refuse(
            *field,
            "cannot change while serve runs: restart serve for it",
        )),
        None => Ok(()),
    }
}

/// A namespace to add, opened before anything changes.
struct NewNs {
    nsid: u32,
    backend: Arc<dyn Backend>,
}

/// The plan for one subsystem that exists before and after.
struct Kept {
    sub: Arc<Subsystem>,
    state: SubState,
    added: Vec<u32>,
    removed: Vec<Arc<Namespace>>,
    hosts_changed: bool,
}

fn ns_map(sub: &SubsystemConfig) -> Vec<(u32, &BackendSpec)> {
    TargetConfig::nsids(sub)
        .map(|(id, n)| (id, &n.backend))
        .collect()
}

impl Target {
    /// Replaces the running configuration `old` by `new` (already checked with
    /// `TargetConfig::check`): subsystems, namespaces, hosts, attributes and listeners
    /// added, removed or changed; `open` opens the backends of new namespaces. Settings
    /// the poll groups were built from (`queue_depth`, `cores`, ...) are refused, naming
    /// the field. Controllers of a removed subsystem, and of a host no longer allowed,
    /// are torn down; a removed namespace fails new commands at once and drains in the
    /// poll groups (see [`Reconfigured::wait_drained`]). Listener changes are returned
    /// for the transport to apply; the discovery log lists the new ones at once.
    pub fn reconfigure(
        &self,
        old: &TargetConfig,
        new: &TargetConfig,
        mut open: impl FnMut(&BackendSpec) -> Result<Arc<dyn Backend>>,
    ) -> Result<Reconfigured> {
        let _one = lock(&self.shared.reconfig);
        restart_only(old, new)?;
        let current = self.subsystems();
        let find = |nqn: &str| current.iter().find(|s| s.nqn == nqn).cloned();
        let mut changes = Vec::new();

        // 1. Everything that can fail: open the new namespaces' backends.
        let mut created: Vec<Arc<Subsystem>> = Vec::new();
        let mut kept: Vec<Kept> = Vec::new();
        for (i, sub) in new.subsystems.iter().enumerate() {
            let Some(before) = old.subsystems.iter().find(|s| s.nqn == sub.nqn) else {
                let s = Target::subsystem(sub, &mut open)
                    .map_err(|e| refuse(format!("subsystem[{i}].namespace"), e.to_string()))?;
                created.push(Arc::new(s));
                changes.push(format!("subsystem {} added", sub.nqn));
                continue;
            };
            let Some(running) = find(&sub.nqn) else {
                return Err(refuse(
                    format!("subsystem[{i}].nqn"),
                    format!(
                        "{} is in the running configuration but not in the target",
                        sub.nqn
                    ),
                ));
            };
            let (was, now) = (ns_map(before), ns_map(sub));
            let mut opened: Vec<NewNs> = Vec::new();
            for (j, (nsid, spec)) in now.iter().enumerate() {
                if was.iter().any(|(id, s)| id == nsid && s == spec) {
                    continue;
                }
                let backend = open(spec).map_err(|e| {
                    refuse(
                        format!("subsystem[{i}].namespace[{j}].backend"),
                        e.to_string(),
                    )
                })?;
                opened.push(NewNs {
                    nsid: *nsid,
                    backend,
                });
            }
            let old_state = running.state();
            let mut removed = Vec::new();
            let mut namespaces: Vec<Arc<Namespace>> = Vec::new();
            for ns in &old_state.namespaces {
                let stays = now.iter().any(|(id, s)| {
                    *id == ns.nsid && was.iter().any(|(i2, s2)| i2 == id && s2 == s)
                });
                if stays {
                    namespaces.push(ns.clone());
                } else {
                    removed.push(ns.clone());
                }
            }
            let added: Vec<u32> = opened.iter().map(|n| n.nsid).collect();
            for n in opened {
                namespaces.push(Arc::new(Namespace {
                    nsid: n.nsid,
                    backend: n.backend,
                    nguid: nguid_for(&sub.nqn, n.nsid),
                    stats: Default::default(),
                }));
            }
            namespaces.sort_by_key(|n| n.nsid);
            let state = SubState {
                serial: sub.serial.clone(),
                model: sub.model.clone(),
                allow_any_host: sub.allow_any_host,
                hosts: sub.hosts.clone(),
                namespaces,
            };
            let hosts_changed =
                old_state.allow_any_host != state.allow_any_host || old_state.hosts != state.hosts;
            for ns in &removed {
                let replaced = added.contains(&ns.nsid);
                changes.push(format!(
                    "subsystem {}: namespace {} ({}) {}",
                    sub.nqn,
                    ns.nsid,
                    ns.backend.describe(),
                    if replaced { "replaced" } else { "removed" }
                ));
            }
            for nsid in &added {
                if let Some(ns) = state.namespaces.iter().find(|n| n.nsid == *nsid) {
                    changes.push(format!(
                        "subsystem {}: namespace {} ({}) added",
                        sub.nqn,
                        nsid,
                        ns.backend.describe()
                    ));
                }
            }
            for (field, a, b) in [
                ("serial", &old_state.serial, &state.serial),
                ("model", &old_state.model, &state.model),
            ] {
                if a != b {
                    changes.push(format!("subsystem {}: {field} {a:?} -> {b:?}", sub.nqn));
                }
            }
            if old_state.allow_any_host != state.allow_any_host {
                changes.push(format!(
                    "subsystem {}: allow_any_host {} -> {}",
                    sub.nqn, old_state.allow_any_host, state.allow_any_host
                ));
            }
            for h in state.hosts.iter().filter(|h| !old_state.hosts.contains(h)) {
                changes.push(format!("subsystem {}: host {h} allowed", sub.nqn));
            }
            for h in old_state.hosts.iter().filter(|h| !state.hosts.contains(h)) {
                changes.push(format!("subsystem {}: host {h} removed", sub.nqn));
            }
            if before.direct_hosts != sub.direct_hosts {
                changes.push(format!(
                    "subsystem {}: direct_hosts {:?} -> {:?}",
                    sub.nqn, before.direct_hosts, sub.direct_hosts
                ));
            }
            kept.push(Kept {
                sub: running,
                state,
                added,
                removed,
                hosts_changed,
            });
        }
        let gone: Vec<Arc<Subsystem>> = current
            .iter()
            .filter(|s| !s.discovery && !new.subsystems.iter().any(|n| n.nqn == s.nqn))
            .cloned()
            .collect();
        for s in &gone {
            changes.push(format!("subsystem {} removed", s.nqn));
        }
        let listeners_added: Vec<ListenerConfig> = new
            .listeners
            .iter()
            .filter(|l| !old.listeners.contains(l))
            .cloned()
            .collect();
        let listeners_removed: Vec<ListenerConfig> = old
            .listeners
            .iter()
            .filter(|l| !new.listeners.contains(l))
            .cloned()
            .collect();
        for l in &listeners_added {
            changes.push(format!("listener {}:{} added", l.address, l.port));
        }
        for l in &listeners_removed {
            changes.push(format!("listener {}:{} removed", l.address, l.port));
        }

        // 2. Apply: nothing below fails.
        let mut discovery_changed = !created.is_empty()
            || !gone.is_empty()
            || !listeners_added.is_empty()
            || !listeners_removed.is_empty();
        let mut dropped_backends: Vec<Arc<dyn Backend>> = Vec::new();
        let mut added_backends: Vec<Arc<dyn Backend>> = Vec::new();
        for k in &kept {
            for nsid in &k.added {
                if let Some(ns) = k.state.namespaces.iter().find(|n| n.nsid == *nsid) {
                    added_backends.push(ns.backend.clone());
                }
            }
            dropped_backends.extend(k.removed.iter().map(|n| n.backend.clone()));
            k.sub.set_state(k.state.clone());
            discovery_changed |= k.hosts_changed;
        }
        for s in &created {
            added_backends.extend(s.namespaces().into_iter().map(|n| n.backend.clone()));
        }
        for s in &gone {
            dropped_backends.extend(s.namespaces().into_iter().map(|n| n.backend.clone()));
        }
        {
            let mut list = self
                .shared
                .subsystems
                .write()
                .unwrap_or_else(|p| p.into_inner());
            list.retain(|s| s.discovery || !gone.iter().any(|g| Arc::ptr_eq(g, s)));
            list.extend(created.iter().cloned());
        }
        *self
            .shared
            .listeners
            .write()
            .unwrap_or_else(|p| p.into_inner()) = new.listeners.clone();
        // Controllers: removed subsystem or host no longer allowed → torn down (their
        // queues see it on the next pass and disconnect); namespace changes → AEN.
        for c in self.controllers() {
            let sub = c.subsystem();
            if gone.iter().any(|g| Arc::ptr_eq(g, sub)) {
                tracing::info!(cntlid = c.cntlid(), hostnqn = c.hostnqn(), subnqn = %sub.nqn,
                    "controller torn down: subsystem removed");
                c.kill();
                continue;
            }
            if let Some(k) = kept.iter().find(|k| Arc::ptr_eq(&k.sub, sub)) {
                if k.hosts_changed && !sub.host_allowed(c.hostnqn()) {
                    tracing::info!(cntlid = c.cntlid(), hostnqn = c.hostnqn(), subnqn = %sub.nqn,
                        "controller torn down: host no longer allowed");
                    c.kill();
                    continue;
                }
                let mut nsids: Vec<u32> = k.added.clone();
                nsids.extend(k.removed.iter().map(|n| n.nsid));
                nsids.sort_unstable();
                nsids.dedup();
                for nsid in nsids {
                    c.namespace_changed(nsid);
                }
            }
        }
        if discovery_changed {
            self.shared.discovery_genctr.fetch_add(1, Ordering::AcqRel);
            for c in self
                .controllers()
                .iter()
                .filter(|c| c.subsystem().discovery)
            {
                c.discovery_changed();
            }
        }
        // Poll groups: channels for new device namespaces, drains for removed ones.
        let mut drains = Vec::new();
        {
            let until = Instant::now() + NAMESPACE_DRAIN;
            let groups = lock(&self.shared.groups);
            for g in groups.iter() {
                let mut sent = false;
                for b in &added_backends {
                    sent |= g.tx.send(GroupMsg::AddBackend(b.clone())).is_ok();
                }
                for b in &dropped_backends {
                    let (reply, rx) = unbounded();
                    let id = super::queue::backend_id(b);
                    if g.tx
                        .send(GroupMsg::DropBackend { id, until, reply })
                        .is_ok()
                    {
                        drains.push(rx);
                        sent = true;
                    }
                }
                if sent {
                    g.wake.signal();
                }
            }
        }
        for c in &changes {
            tracing::info!("reconfigured: {c}");
        }
        Ok(Reconfigured {
            changes,
            listeners_added,
            listeners_removed,
            drains,
            removed: dropped_backends,
        })
    }
}
