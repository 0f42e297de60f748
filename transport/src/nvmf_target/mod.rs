//! The NVMe-oF target core: subsystems, controllers, queues, the request state machine.
//!
//! It runs over any [`Transport`](crate::wire::Transport): [`PollGroup`] owns the wire
//! side of a poll group, a data-buffer pool and the queues on it; [`PollGroup::poll`]
//! drives everything (no threads, no allocation per I/O).

mod admin;
mod controller;
mod device_logs;
mod io;
mod queue;
mod reconfig;

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam::channel::{unbounded, Receiver, Sender};
use nvme::EventFd;

pub use controller::{Controller, ControllerStats, IoTotals};
pub use queue::{QueueStats, ReqState};
pub use reconfig::Reconfigured;

use crate::backend::{open_backend, Backend, BackendOpener, Fault, HEALTH_CHECK_PERIOD};
use crate::config::{ListenerConfig, SubsystemConfig, TargetConfig};
use crate::error::{Error, Result};
use crate::fabrics::{validate_cm_request, CmLimits, CmReject, DISCOVERY_NQN};
use crate::pool::BufferPool;
use crate::wire::{Incoming, Qpair, Transport, WirePollGroup};
use queue::{backend_id, Channel, QueueHandler};
use zerocopy::byteorder::little_endian::U16;

/// A namespace of a subsystem.
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// Where its blocks live.
    pub backend: Arc<dyn Backend>,
    /// Namespace globally unique identifier.
    pub nguid: [u8; 16],
    /// Reads and writes issued to it, their bytes, and its failed commands, since it was
    /// added (all hosts, connected or gone).
    pub stats: ControllerStats,
}

/// An NVM subsystem (or the discovery subsystem). Its NQN is fixed; the rest can change
/// while it runs (`nvmf-p2p ctl`, see [`Target::reconfigure`]), so it sits behind a lock
/// that the data path takes only to look a namespace up (a read lock, never contended
/// but by a reconfiguration).
pub struct Subsystem {
    /// Subsystem NQN.
    pub nqn: String,
    /// True for the discovery subsystem.
    pub discovery: bool,
    state: std::sync::RwLock<SubState>,
    /// Counters of its controllers that are gone ([`Controller`]'s drop).
    retired: std::sync::Mutex<IoTotals>,
}

/// What of a subsystem a reconfiguration may change.
#[derive(Clone)]
pub struct SubState {
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Accept any host NQN.
    pub allow_any_host: bool,
    /// Allowed host NQNs.
    pub hosts: Vec<String>,
    /// Namespaces in ascending nsid order.
    pub namespaces: Vec<Arc<Namespace>>,
}

impl Subsystem {
    pub(crate) fn new(nqn: String, discovery: bool, state: SubState) -> Subsystem {
        Subsystem {
            nqn,
            discovery,
            state: std::sync::RwLock::new(state),
            retired: std::sync::Mutex::new(IoTotals::default()),
        }
    }

    pub(crate) fn retire(&self, t: IoTotals) {
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(&t);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SubState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the changeable state at this moment.
    pub fn state(&self) -> SubState {
        self.read().clone()
    }

    pub(crate) fn set_state(&self, state: SubState) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// Serial number.
    pub fn serial(&self) -> String {
        self.read().serial.clone()
    }

    /// Model number.
    pub fn model(&self) -> String {
        self.read().model.clone()
    }

    /// Whether `hostnqn` may connect.
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        let st = self.read();
        st.allow_any_host || st.hosts.iter().any(|h| h == hostnqn)
    }

    /// The namespace with id `nsid`.
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.read()
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .cloned()
    }

    /// Namespaces in ascending nsid order.
    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.read().namespaces.clone()
    }

    /// Highest namespace id (Identify Controller NN).
    pub fn max_nsid(&self) -> u32 {
        self.read()
            .namespaces
            .iter()
            .map(|n| n.nsid)
            .max()
            .unwrap_or(0)
    }
}

pub(crate) fn nguid_for(nqn: &str, nsid: u32) -> [u8; 16] {
    // FNV-1a over the NQN, twice with different seeds, then the nsid: stable across runs.
    let fnv = |seed: u64| {
        nqn.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_be_bytes());
    out[8..12].copy_from_slice(&(fnv(0x84222325cbf29ce4) as u32).to_be_bytes());
    out[12..].copy_from_slice(&nsid.to_be_bytes());
    out
}

/// Counters of one controller at one moment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ControllerSnapshot {
    /// Controller id.
    pub cntlid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// CSTS.RDY.
    pub ready: bool,
    /// Read commands completed.
    pub read_commands: u64,
    /// Write commands completed.
    pub write_commands: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Commands failed.
    pub errors: u64,
}

/// Limits derived from the configuration that every queue applies.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Entries per queue (CAP.MQES + 1).
    pub queue_depth: u16,
    /// I/O queues per controller.
    pub max_io_queues: u16,
    /// In-capsule data bytes per command.
    pub in_capsule_data_size: u32,
    /// Maximum data transfer per command (MDTS) in bytes.
    pub max_io_size: u32,
    /// Time a new queue has to send Connect before it is dropped (zero: never).
    pub connect_timeout: Duration,
}

/// State shared by every poll group of one target.
pub struct TargetShared {
    limits: Limits,
    data_buffers: u32,
    /// The discovery subsystem first; replaced whole by a reconfiguration.
    subsystems: std::sync::RwLock<Vec<Arc<Subsystem>>>,
    listeners: std::sync::RwLock<Vec<ListenerConfig>>,
    /// One reconfiguration at a time ([`Target::reconfigure`]).
    reconfig: Mutex<()>,
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: AtomicU16,
    discovery_genctr: AtomicU64,
    /// Connections dropped because they sent no Connect in time.
    connect_timeouts: AtomicU64,
    direct: std::sync::OnceLock<crate::direct::DirectProvider>,
    /// Every poll group's mailbox (taken on group creation and device resets only).
    groups: Mutex<Vec<GroupHandle>>,
    /// Held for as long as poll groups hold their backend I/O: one reset at a time (a
    /// second one's release would let the groups go on while the first still resets).
    hold_serial: Mutex<()>,
    recovery: std::sync::OnceLock<Arc<RecoveryHook>>,
    /// A recovery thread is running (faults reported meanwhile are dropped).
    recovering: AtomicBool,
    /// When the last recovery ended (the next waits [`RECOVERY_COOLDOWN`]).
    last_recovery: Mutex<Option<Instant>>,
}

/// What resets a device after a poll group found a [`Fault`] on the channel of a backend;
/// run on a thread of its own (it holds every poll group's I/O, see
/// [`Target::hold_backend_io`]). It gets the target rather than holding it (no cycle).
pub type RecoveryHook = dyn Fn(&Target, &Arc<dyn Backend>, Fault) + Send + Sync;

/// Least time between two fault-triggered recoveries (a device that stays fatal after a
/// reset is not reset in a tight loop).
const RECOVERY_COOLDOWN: Duration = Duration::from_secs(5);

impl TargetShared {
    fn controllers(&self) -> MutexGuard<'_, HashMap<u16, Arc<Controller>>> {
        self.controllers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|s| s.nqn == nqn)
            .cloned()
    }

    pub(crate) fn subsystem_list(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn listener_list(&self) -> Vec<ListenerConfig> {
        self.listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn alloc_cntlid(&self) -> Option<u16> {
        let ctrls = self.controllers();
        for _ in 0..0xffef {
            let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            let id = id % 0xffef + 1; // 1..=0xffef (0xfff0.. are reserved)
            if !ctrls.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    fn remove_controller(&self, cntlid: u16) {
        self.controllers().remove(&cntlid);
    }
}

/// The target: subsystems, the discovery subsystem, live controllers.
#[derive(Clone)]
pub struct Target {
    shared: Arc<TargetShared>,
}

impl Target {
    /// Builds a target from its configuration, opening every namespace backend.
    /// `devices` opens `vfio:` and `spdk:` backends (the drivers' glue); without it they
    /// fail.
    pub fn from_config(cfg: &TargetConfig, devices: Option<&BackendOpener>) -> Result<Self> {
        Self::with_backends(cfg, |spec| open_backend(spec, devices))
    }

    /// Builds a target, opening backends through `open`.
    pub fn with_backends(
        cfg: &TargetConfig,
        mut open: impl FnMut(&crate::config::BackendSpec) -> Result<Arc<dyn Backend>>,
    ) -> Result<Self> {
        let mut subsystems = vec![Arc::new(Subsystem::new(
            DISCOVERY_NQN.to_owned(),
            true,
            SubState {
                serial: "NVMFP2PDISCOVERY".to_owned(),
                model: "nvmf-p2p discovery".to_owned(),
                allow_any_host: true,
                hosts: Vec::new(),
                namespaces: Vec::new(),
            },
        ))];
        for sub in &cfg.subsystems {
            subsystems.push(Arc::new(Self::subsystem(sub, &mut open)?));
        }
        let limits = Limits {
            queue_depth: cfg.queue_depth,
            max_io_queues: cfg.max_io_queues,
            in_capsule_data_size: cfg.in_capsule_data_size,
            max_io_size: cfg.max_io_size,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms.into()),
        };
        Ok(Target {
            shared: Arc::new(TargetShared {
                limits,
                data_buffers: cfg.data_buffers,
                subsystems: std::sync::RwLock::new(subsystems),
                listeners: std::sync::RwLock::new(cfg.listeners.clone()),
                reconfig: Mutex::new(()),
                controllers: Mutex::new(HashMap::new()),
                next_cntlid: AtomicU16::new(0),
                discovery_genctr: AtomicU64::new(1),
                connect_timeouts: AtomicU64::new(0),
                direct: std::sync::OnceLock::new(),
                groups: Mutex::new(Vec::new()),
                hold_serial: Mutex::new(()),
                recovery: std::sync::OnceLock::new(),
                recovering: AtomicBool::new(false),
                last_recovery: Mutex::new(None),
            }),
        })
    }

    pub(crate) fn subsystem(
        sub: &SubsystemConfig,
        open: &mut impl FnMut(&crate::config::BackendSpec) -> Result<Arc<dyn Backend>>,
    ) -> Result<Subsystem> {
        let mut namespaces = Vec::new();
        for (nsid, ns) in TargetConfig::nsids(sub) {
            let backend = open(&ns.backend)?;
            namespaces.push(Arc::new(Namespace {
                nsid,
                backend,
                nguid: nguid_for(&sub.nqn, nsid),
                stats: ControllerStats::default(),
            }));
        }
        namespaces.sort_by_key(|n| n.nsid);
        Ok(Subsystem::new(
            sub.nqn.clone(),
            false,
            SubState {
                serial: sub.serial.clone(),
                model: sub.model.clone(),
                allow_any_host: sub.allow_any_host,
                hosts: sub.hosts.clone(),
                namespaces,
            },
        ))
    }

    /// Enables direct mode (the vendor-specific attach/detach admin commands) through
    /// `provider`; without it those commands fail with Invalid Opcode. Set once.
    pub fn set_direct(&self, provider: crate::direct::DirectProvider) {
        let _ = self.shared.direct.set(provider);
    }

    /// Sets what runs when a poll group finds a [`Fault`] on a backend channel (a
    /// command timeout, a fatal controller): typically the same reset as `ctl
    /// reset-device`. Without one, faults are only logged. Set once.
    pub fn set_recovery(&self, hook: Arc<RecoveryHook>) {
        let _ = self.shared.recovery.set(hook);
    }

    /// Holds backend I/O on every poll group, for a device reset: each group stops
    /// starting commands on backends (new ones wait, nothing is failed), waits up to
    /// `drain` for those in its channels to complete, then stops touching its channels
    /// and answers. Returns once every group answered — the request is a message each
    /// group takes on its next pass (a sleeping group is woken), no lock on the data path.
    /// Dropping the returned guard lets the groups go on; commands that were still in the
    /// device complete with the device's status after the reset (NVMe: aborted, retryable).
    /// A second caller waits until the first guard is dropped.
    pub fn hold_backend_io(&self, drain: Duration) -> Result<BackendIoHeld<'_>> {
        let serial = lock(&self.shared.hold_serial);
        let (reply_tx, reply_rx) = unbounded();
        let until = Instant::now() + drain;
        let mut held = BackendIoHeld {
            groups: Vec::new(),
            in_device: 0,
            _serial: serial,
        };
        {
            let mut groups = lock(&self.shared.groups);
            groups.retain(|g| {
                let sent =
                    g.tx.send(GroupMsg::Hold {
                        until,
                        reply: reply_tx.clone(),
                    })
                    .is_ok();
                if sent {
                    g.wake.signal();
                    held.groups.push(g.clone());
                }
                sent // a group that is gone dropped its receiver
            });
        }
        drop(reply_tx);
        let deadline = until + HOLD_ANSWER_SLACK;
        let mut answered = 0;
        while answered < held.groups.len() {
            match reply_rx.recv_deadline(deadline) {
                Ok(n) => {
                    answered += 1;
                    held.in_device += n;
                }
                // Every reply sender is gone: the groups that did not answer were dropped.
                Err(crossbeam::channel::RecvTimeoutError::Disconnected) => break,
                Err(crossbeam::channel::RecvTimeoutError::Timeout) => {
                    return Err(Error::Quiesce {
                        groups: held.groups.len() - answered,
                        waited: drain + HOLD_ANSWER_SLACK,
                    });
                }
            }
        }
        Ok(held)
    }

    /// A poll group found `fault` on the channel of backend `id`: start the recovery hook
    /// on a thread of its own, unless one runs or ran less than [`RECOVERY_COOLDOWN`] ago.
    fn report_fault(&self, id: usize, fault: Fault) {
        let Some(backend) = self
            .subsystems()
            .iter()
            .flat_map(|s| s.namespaces())
            .find(|n| queue::backend_id(&n.backend) == id)
            .map(|n| n.backend.clone())
        else {
            return;
        };
        let Some(hook) = self.shared.recovery.get().cloned() else {
            tracing::error!(backend = %backend.describe(), %fault,
                "backend fault and no recovery configured: its commands may never complete");
            return;
        };
        if lock(&self.shared.last_recovery).is_some_and(|t| t.elapsed() < RECOVERY_COOLDOWN) {
            return;
        }
        if self.shared.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(backend = %backend.describe(), %fault, "backend fault: resetting the device");
        let target = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nvmf-recovery".into())
            .spawn(move || {
                hook(&target, &backend, fault);
                *lock(&target.shared.last_recovery) = Some(Instant::now());
                target.shared.recovering.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the recovery thread");
            self.shared.recovering.store(false, Ordering::Release);
        }
    }

    /// Connections dropped so far because they sent no Connect within
    /// [`Limits::connect_timeout`].
    pub fn connect_timeouts(&self) -> u64 {
        self.shared.connect_timeouts.load(Ordering::Relaxed)
    }

    /// The limits every queue applies.
    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// All subsystems at this moment; the first is the discovery subsystem.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.shared.subsystem_list()
    }

    /// The listeners at this moment (what the discovery log reports).
    pub fn listeners(&self) -> Vec<ListenerConfig> {
        self.shared.listener_list()
    }

    /// Live controllers, by controller id.
    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        let mut v: Vec<_> = self.shared.controllers().values().cloned().collect();
        v.sort_by_key(|c| c.cntlid());
        v
    }

    /// The I/O counters of subsystem `sub` since the target started: its controllers that
    /// are gone and those connected now.
    pub fn subsystem_totals(&self, sub: &Subsystem) -> IoTotals {
        let mut t = *sub.retired.lock().unwrap_or_else(|p| p.into_inner());
        for c in self.controllers() {
            if std::ptr::eq(&**c.subsystem(), sub) {
                t.add(&c.stats.totals());
            }
        }
        t
    }

    /// A snapshot of every live controller's counters (for `nvmf-p2p stats`).
    pub fn controller_stats(&self) -> Vec<ControllerSnapshot> {
        self.controllers()
            .iter()
            .map(|c| {
                let s = &c.stats;
                ControllerSnapshot {
                    cntlid: c.cntlid(),
                    subnqn: c.subsystem().nqn.clone(),
                    hostnqn: c.hostnqn().to_owned(),
                    ready: c.is_ready(),
                    read_commands: s.read_commands.load(Ordering::Relaxed),
                    write_commands: s.write_commands.load(Ordering::Relaxed),
                    bytes_read: s.bytes_read.load(Ordering::Relaxed),
                    bytes_written: s.bytes_written.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Reports that namespace `nsid` of subsystem `nqn` changed: every controller of that
    /// subsystem records it in its Changed Namespace List and, if enabled, raises a
    /// Namespace Attribute Changed asynchronous event.
    pub fn notify_namespace_changed(&self, nqn: &str, nsid: u32) {
        for c in self.shared.controllers().values() {
            if c.subsystem().nqn == nqn {
                c.namespace_changed(nsid);
            }
        }
    }

    /// Flushes every namespace (shutdown).
    pub fn flush_all(&self) {
        for sub in self.subsystems() {
            for ns in sub.namespaces() {
                if let Err(e) = ns.backend.flush() {
                    tracing::warn!(error = %e, nqn = %sub.nqn, nsid = ns.nsid, "flush");
                }
            }
        }
    }

    /// Creates a poll group on `transport` with a buffer pool sized from the configuration.
    ///
    /// When a namespace backend has an asynchronous path ([`Backend::dma_domain`]), the
    /// pool is carved from that backend's DMA memory and the group opens a channel to
    /// every backend of the same domain: their Read/Write data then moves NIC ↔ pool
    /// buffer ↔ device with no copy and many commands in flight. Other backends (and any
    /// failure to set this up, logged) use the synchronous path.
    pub fn create_poll_group<T: Transport>(&self, transport: &mut T) -> Result<PollGroup<T>> {
        let mut wire = transport.create_poll_group()?;
        let (count, chunk) = (
            self.shared.data_buffers,
            self.shared.limits.max_io_size as usize,
        );
        let (pool, channels, dma_domain) = self.async_pool(count, chunk);
        let pool = pool.unwrap_or_else(|| BufferPool::new(count, chunk));
        let (base, len) = pool.region();
        // SAFETY: the pool is owned by the PollGroup next to `wire` and declared after
        // it, so it outlives the registration; the buffers posted are its `DataBuf`s, and
        // the core makes a CPU view of one (`DataBuf::bytes_mut`, unsafe) only while no
        // transfer on it is in flight (request state machine).
        unsafe { wire.register_memory(base, len)? };
        let wake = Arc::new(EventFd::new().map_err(|e| Error::Transport {
            qid: u16::MAX,
            reason: format!("poll group mailbox eventfd: {e}"),
        })?);
        let (tx, control) = unbounded();
        let (incoming_tx, incoming) = unbounded();
        lock(&self.shared.groups).push(GroupHandle {
            tx,
            wake: wake.clone(),
        });
        Ok(PollGroup {
            target: self.clone(),
            queues: Vec::new(),
            next_key: 0,
            mailbox: Mailbox {
                control,
                incoming_tx,
                incoming,
                wake,
            },
            hold: Hold::Live,
            next_health_check: Instant::now(),
            dma_domain,
            dropping: Vec::new(),
            channels,
            wire,
            pool,
        })
    }

    /// A DMA buffer pool and the channels of the backends that can use it, if any
    /// namespace has an asynchronous backend.
    fn async_pool(
        &self,
        count: u32,
        chunk: usize,
    ) -> (Option<BufferPool>, Vec<Channel>, Option<usize>) {
        let backends: Vec<Arc<dyn Backend>> = self
            .subsystems()
            .iter()
            .flat_map(|s| s.namespaces().into_iter().map(|n| n.backend.clone()))
            .collect();
        let Some((domain, provider)) = backends.iter().find_map(|b| b.dma_domain().map(|d| (d, b)))
        else {
            return (None, Vec::new(), None);
        };
        let chunk = chunk.max(1).next_multiple_of(crate::pool::POOL_ALIGN);
        let pool = provider
            .alloc_dma(count as usize * chunk)
            .map_err(|e| e.to_string())
            .and_then(|mem| {
                BufferPool::from_dma(count, chunk, mem)
                    .ok_or_else(|| "DMA memory too small or misaligned".to_string())
            });
        let pool = match pool {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(backend = %provider.describe(), error = %e,
                    "no DMA buffer pool: I/O takes the synchronous path");
                return (None, Vec::new(), None);
            }
        };
        let mut channels: Vec<Channel> = Vec::new();
        for b in &backends {
            open_channel_into(&mut channels, b, Some(domain));
        }
        tracing::info!(
            channels = channels.len(),
            backend = %provider.describe(),
            buffers = count,
            "poll group: buffer pool in the backend's DMA memory (zero-copy asynchronous I/O)"
        );
        (Some(pool), channels, Some(domain))
    }
}

/// Opens the asynchronous channel of `b` into `channels` when it shares the pool's DMA
/// `domain` and has none there yet (group creation, and a namespace added at run time).
fn open_channel_into(channels: &mut Vec<Channel>, b: &Arc<dyn Backend>, domain: Option<usize>) {
    let id = backend_id(b);
    if domain.is_none() || b.dma_domain() != domain || channels.iter().any(|c| c.backend == id) {
        return;
    }
    match b.open_channel() {
        Ok(Some(chan)) => channels.push(Channel {
            backend: id,
            max_transfer: chan.max_transfer(),
            chan,
        }),
        Ok(None) => {}
        Err(e) => tracing::warn!(backend = %b.describe(), error = %e,
            "no asynchronous channel: this namespace takes the synchronous path"),
    }
}

/// What a poll group with nothing to do may wait on for its backend channels
/// ([`PollGroup::arm_backends`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendWait {
    /// No command in any channel.
    Idle,
    /// A completion is already there: poll, do not sleep.
    Ready,
    /// Commands are in the device; sleep on the first `n` fds written (plus the wire's).
    Sleep(usize),
    /// Commands are in a channel without a wake fd: nap briefly and poll.
    Nap,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long [`Target::hold_backend_io`] waits for answers beyond its drain time.
const HOLD_ANSWER_SLACK: Duration = Duration::from_secs(2);

/// A message to a poll group from another thread.
enum GroupMsg {
    /// Start no backend command; once the channels are empty (or at `until`) stop
    /// touching them and answer how many commands were left in the device.
    Hold {
        until: Instant,
        reply: Sender<usize>,
    },
    /// Back to normal after a [`GroupMsg::Hold`].
    Release,
    /// A namespace was added: open its backend's channel if it can use this group's pool.
    AddBackend(Arc<dyn Backend>),
    /// A namespace was removed (new commands to it already fail): once the commands in
    /// the channel of backend `id` completed (or at `until`), drop the channel and answer.
    DropBackend {
        id: usize,
        until: Instant,
        reply: Sender<()>,
    },
}

/// Where the target reaches a poll group.
#[derive(Clone)]
struct GroupHandle {
    tx: Sender<GroupMsg>,
    wake: Arc<EventFd>,
}

/// A poll group's receiving side: control messages and connections handed over by
/// another thread, and the eventfd that wakes the group when it sleeps.
struct Mailbox<I> {
    control: Receiver<GroupMsg>,
    incoming_tx: Sender<I>,
    incoming: Receiver<I>,
    wake: Arc<EventFd>,
}

/// Where a poll group stands on backend I/O.
enum Hold {
    Live,
    /// Starting no backend command, waiting for the channels to empty.
    Draining {
        until: Instant,
        reply: Sender<usize>,
    },
    /// Not touching the backend channels at all (a device reset may be running).
    Held,
}

/// Every poll group's backend I/O held (see [`Target::hold_backend_io`]); dropping it
/// lets them go on.
pub struct BackendIoHeld<'a> {
    groups: Vec<GroupHandle>,
    in_device: usize,
    // Released after the groups were told to go on (Drop runs before the fields drop).
    _serial: MutexGuard<'a, ()>,
}

impl BackendIoHeld<'_> {
    /// Commands the groups left in the device when their drain time ran out (they
    /// complete with the device's status once it is back).
    pub fn left_in_device(&self) -> usize {
        self.in_device
    }

    /// Poll groups holding.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }
}

impl Drop for BackendIoHeld<'_> {
    fn drop(&mut self) {
        for g in &self.groups {
            if g.tx.send(GroupMsg::Release).is_ok() {
                g.wake.signal();
            }
        }
    }
}

/// Hands a poll group connection requests from another thread (the transport's);
/// see [`PollGroup::inbox`].
pub struct GroupInbox<I> {
    tx: Sender<I>,
    wake: Arc<EventFd>,
}

impl<I> GroupInbox<I> {
    /// Queues `incoming` for the group and wakes it; gives it back if the group is gone.
    pub fn send(&self, incoming: I) -> std::result::Result<(), I> {
        self.tx.send(incoming).map_err(|e| e.into_inner())?;
        self.wake.signal();
        Ok(())
    }
}

/// A poll group: the queues one core drives, with their wire state and buffer pool.
///
/// Field order is drop order: queues (their requests) first, then the backend channels
/// (a dropped NVMe queue pair is deleted on the device, ending its DMA), then the wire
/// (its queue pairs, CQ, MR), then the pool the MR covers.
pub struct PollGroup<T: Transport> {
    target: Target,
    queues: Vec<QueueHandler>,
    next_key: u32,
    mailbox: Mailbox<T::Incoming>,
    hold: Hold,
    next_health_check: Instant,
    /// DMA domain of the pool, when it is a backend's DMA memory.
    dma_domain: Option<usize>,
    /// Channels of removed namespaces draining before they are dropped.
    dropping: Vec<(usize, Instant, Sender<()>)>,
    channels: Vec<Channel>,
    wire: T::PollGroup,
    pool: BufferPool,
}

impl<T: Transport> PollGroup<T> {
    /// Decides on a connection request: validates the NVMe-oF CM private data, accepts
    /// (adding the queue to this group) or rejects with the binding's status.
    pub fn accept(&mut self, incoming: T::Incoming) -> Result<()> {
        let lim = self.target.shared.limits;
        let cm_limits = CmLimits {
            max_queue_size: lim.queue_depth,
            max_io_queues: lim.max_io_queues,
        };
        match validate_cm_request(incoming.private_data(), cm_limits) {
            Ok((req, accept)) => {
                let entries = req.hsqsize.get() + 1;
                let qp = self
                    .wire
                    .accept(incoming, &accept, entries, lim.in_capsule_data_size)?;
                let key = self.next_key;
                self.next_key = self.next_key.wrapping_add(1);
                self.queues.push(QueueHandler::new(
                    qp,
                    req.qid.get(),
                    entries,
                    self.target.shared.clone(),
                    key,
                    Some(self.mailbox.wake.clone()),
                ));
                Ok(())
            }
            Err(sts) => {
                incoming.reject(&CmReject {
                    recfmt: U16::new(0),
                    sts: U16::new(sts),
                });
                Err(Error::CmReject { status: sts })
            }
        }
    }

    /// Accepts every pending connection of `transport`; returns how many were handled
    /// (rejections included).
    pub fn accept_pending(&mut self, transport: &mut T) -> usize {
        let mut n = 0;
        while let Some(inc) = transport.poll_incoming() {
            if let Err(e) = self.accept(inc) {
                tracing::info!(error = %e, "connection refused");
            }
            n += 1;
        }
        n
    }

    /// One pass over the wire and every queue at time `now`; returns the work done
    /// (0 = idle, a caller may then sleep on the wire's completion channel and
    /// [`PollGroup::mailbox_fd`]).
    pub fn poll_at(&mut self, now: Instant) -> usize {
        let mut work = self.take_mail(now);
        work += self.wire.poll();
        let queues = &mut self.queues;
        let touch = !matches!(self.hold, Hold::Held);
        if touch {
            for ch in &mut self.channels {
                work += ch.chan.poll(usize::MAX, &mut |tag, status| {
                    let key = (tag >> 16) as u32;
                    match queues.iter_mut().find(|q| q.key() == key) {
                        Some(q) => q.backend_done(tag as u16, status),
                        None => tracing::warn!(tag, "backend completion for a queue that is gone"),
                    }
                });
            }
        }
        let io_held = !matches!(self.hold, Hold::Live);
        let chans: &mut [Channel] = if touch { &mut self.channels } else { &mut [] };
        for q in &mut self.queues {
            let Some(qp) = self.wire.qpair(q.qp()) else {
                continue; // not reached: a queue pair is removed with its queue
            };
            work += q.poll(qp, &mut self.pool, chans, now, io_held);
            qp.flush();
        }
        if touch {
            for ch in &mut self.channels {
                ch.chan.flush();
            }
        }
        if let Hold::Draining { until, .. } = &self.hold {
            let left = self.backend_in_flight();
            if left == 0 || now >= *until {
                if let Hold::Draining { reply, .. } = std::mem::replace(&mut self.hold, Hold::Held)
                {
                    let _ = reply.send(left);
                }
            }
        } else if touch && now >= self.next_health_check {
            self.next_health_check = now + HEALTH_CHECK_PERIOD;
            for ch in self.channels.iter_mut().filter(|c| c.chan.in_flight() > 0) {
                if let Some(fault) = ch.chan.check_health() {
                    self.target.report_fault(ch.backend, fault);
                }
            }
        }
        if !self.dropping.is_empty() && !matches!(self.hold, Hold::Held) {
            work += self.drop_drained_channels(now);
        }
        let before = self.queues.len();
        let wire = &mut self.wire;
        self.queues.retain(|q| {
            if q.is_closed() {
                wire.remove(q.qp());
            }
            !q.is_closed()
        });
        work + (before - self.queues.len())
    }

    /// Drops the channels of removed namespaces whose commands completed (or whose drain
    /// time ran out: what is left completes, if ever, to a queue that finds no request).
    fn drop_drained_channels(&mut self, now: Instant) -> usize {
        let mut done = 0;
        let channels = &mut self.channels;
        self.dropping.retain(|(id, until, reply)| {
            let left: usize = channels
                .iter()
                .filter(|c| c.backend == *id)
                .map(|c| c.chan.in_flight())
                .sum();
            if left > 0 && now < *until {
                return true;
            }
            if left > 0 {
                tracing::warn!(
                    left,
                    "removed namespace: commands still in the device after the drain time"
                );
            }
            channels.retain(|c| c.backend != *id);
            let _ = reply.send(());
            done += 1;
            false
        });
        done
    }

    /// Takes the messages other threads left: connections to accept, hold/release of
    /// backend I/O. No system call (the eventfd is read only after a sleep it ended).
    fn take_mail(&mut self, now: Instant) -> usize {
        let mut work = 0;
        while let Ok(msg) = self.mailbox.control.try_recv() {
            work += 1;
            match msg {
                GroupMsg::Hold { until, reply } => {
                    if matches!(self.hold, Hold::Held) {
                        let _ = reply.send(self.backend_in_flight());
                    } else {
                        self.hold = Hold::Draining { until, reply };
                    }
                }
                GroupMsg::Release => {
                    self.hold = Hold::Live;
                    self.next_health_check = now + HEALTH_CHECK_PERIOD;
                }
                GroupMsg::AddBackend(b) => {
                    open_channel_into(&mut self.channels, &b, self.dma_domain);
                }
                GroupMsg::DropBackend { id, until, reply } => {
                    self.dropping.push((id, until, reply));
                }
            }
        }
        while let Ok(inc) = self.mailbox.incoming.try_recv() {
            work += 1;
            if let Err(e) = self.accept(inc) {
                tracing::info!(error = %e, "connection refused");
            }
        }
        work
    }

    /// Where another thread hands this group connection requests.
    pub fn inbox(&self) -> GroupInbox<T::Incoming> {
        GroupInbox {
            tx: self.mailbox.incoming_tx.clone(),
            wake: self.mailbox.wake.clone(),
        }
    }

    /// An fd readable when a message is waiting (sleep on it next to the wire's; call
    /// [`PollGroup::mailbox_woken`] when it was readable).
    pub fn mailbox_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.mailbox.wake.as_raw_fd()
    }

    /// Whether messages are waiting (check before sleeping: a message sent after this
    /// check makes [`PollGroup::mailbox_fd`] readable).
    pub fn has_mail(&self) -> bool {
        !self.mailbox.control.is_empty() || !self.mailbox.incoming.is_empty()
    }

    /// After a sleep that [`PollGroup::mailbox_fd`] ended: clears its event.
    pub fn mailbox_woken(&self) {
        self.mailbox.wake.clear();
    }

    /// Whether backend I/O is held (a device reset is under way).
    pub fn backend_io_held(&self) -> bool {
        !matches!(self.hold, Hold::Live)
    }

    /// [`PollGroup::poll_at`] with the current time.
    pub fn poll(&mut self) -> usize {
        self.poll_at(Instant::now())
    }

    /// Number of live queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Per-queue counters.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        self.queues.iter().map(|q| q.stats()).collect()
    }

    /// Data buffers currently free in the pool.
    pub fn free_buffers(&self) -> usize {
        self.pool.available()
    }

    /// Whether the buffer pool is device DMA memory (zero-copy asynchronous path).
    pub fn dma_pool(&self) -> bool {
        self.pool.is_dma()
    }

    /// Asynchronous backend channels of this group.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Commands in this group's asynchronous backend channels right now.
    pub fn backend_in_flight(&self) -> usize {
        self.channels.iter().map(|c| c.chan.in_flight()).sum()
    }

    /// Whether commands are in the backend channels and every channel holding some can
    /// wake a sleeper ([`IoChannel::wake_fd`](crate::backend::IoChannel::wake_fd)).
    pub fn backends_wake(&self) -> bool {
        if matches!(self.hold, Hold::Held) {
            return false;
        }
        let mut busy = self
            .channels
            .iter()
            .filter(|c| c.chan.in_flight() > 0)
            .peekable();
        busy.peek().is_some() && busy.all(|c| c.chan.wake_fd().is_some())
    }

    /// Prepares to sleep while commands are in the backend channels: unless a completion
    /// is already there, clears the wake event of every channel with commands in flight,
    /// then checks each for completions (that order: a completion after the clear signals
    /// its fd again), and writes the distinct wake fds to `fds`. Does not allocate.
    pub fn arm_backends(&mut self, fds: &mut [RawFd]) -> BackendWait {
        if matches!(self.hold, Hold::Held) {
            // Commands left in a device being reset: nothing to wait for until release.
            return BackendWait::Idle;
        }
        let mut n = 0;
        let mut busy = false;
        for ch in self.channels.iter().filter(|c| c.chan.in_flight() > 0) {
            busy = true;
            match ch.chan.wake_fd() {
                Some(fd) if fds[..n].contains(&fd) => {}
                Some(fd) if n < fds.len() => {
                    fds[n] = fd;
                    n += 1;
                }
                _ => return BackendWait::Nap,
            }
        }
        if !busy {
            return BackendWait::Idle;
        }
        // A completion already there needs no clear (a system call on an eventfd).
        for ch in self.channels.iter_mut().filter(|c| c.chan.in_flight() > 0) {
            if ch.chan.ready() {
                return BackendWait::Ready;
            }
        }
        for ch in self.channels.iter_mut().filter(|c| c.chan.in_flight() > 0) {
            ch.chan.clear_wake();
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        for ch in self.channels.iter_mut().filter(|c| c.chan.in_flight() > 0) {
            if ch.chan.ready() {
                return BackendWait::Ready;
            }
        }
        BackendWait::Sleep(n)
    }

    /// The wire side of this group.
    pub fn wire(&self) -> &T::PollGroup {
        &self.wire
    }

    /// The target this group serves.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Disconnects every queue (shutdown); poll until [`PollGroup::queue_count`] is 0.
    pub fn disconnect_all(&mut self) {
        for q in &mut self.queues {
            if let Some(qp) = self.wire.qpair(q.qp()) {
                q.begin_teardown(qp, "shutdown");
            }
        }
    }
}

/// Parses an IP address for the discovery log (family, text).
pub(crate) fn addr_family(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => crate::fabrics::ADRFAM_IPV4,
        IpAddr::V6(_) => crate::fabrics::ADRFAM_IPV6,
    }
}
