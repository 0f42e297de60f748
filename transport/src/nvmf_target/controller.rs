//! A fabrics controller: register model, features, keep-alive, events, logs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nvme::spec::{reg, Cap, Cc, Csts, ErrorLogEntry, Status, Vs, U16, U32, U64};

use super::{Limits, Subsystem};

/// NVMe version the target reports (VS and Identify VER): 1.3.0.
pub const VERSION: Vs = Vs::new(1, 3, 0);
/// Error log entries kept per controller (ELPE + 1).
pub const ERROR_LOG_ENTRIES: usize = 64;
/// Outstanding Asynchronous Event Requests allowed (AERL + 1).
pub const AER_LIMIT: usize = 4;

/// Asynchronous event configuration bit: namespace attribute notices.
pub const AEC_NS_ATTR: u32 = 1 << 8;
/// Asynchronous event configuration bit: discovery log page change notices.
pub const AEC_DISCOVERY_CHANGE: u32 = 1 << 31;

/// Default over temperature threshold of the composite temperature, kelvin: the
/// Warning Composite Temperature Threshold (Identify WCTEMP) we report, 70 °C.
pub const WCTEMP_KELVIN: u16 = 343;
/// Critical Composite Temperature Threshold (Identify CCTEMP), 85 °C.
pub const CCTEMP_KELVIN: u16 = 358;
/// Composite temperature reported in the SMART log (no sensor behind our namespaces).
pub const COMPOSITE_TEMP_KELVIN: u16 = 300;

/// Counters reported in the SMART / health log and by `stats`.
#[derive(Debug, Default)]
pub struct ControllerStats {
    /// Read commands completed.
    pub read_commands: AtomicU64,
    /// Write commands completed.
    pub write_commands: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Commands that failed.
    pub errors: AtomicU64,
}

/// A snapshot of I/O counters, or a sum of them: a controller's ([`ControllerStats`]), a
/// subsystem's since the target started (its controllers', live and gone), a
/// namespace's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoTotals {
    /// Read commands.
    pub read_commands: u64,
    /// Write commands.
    pub write_commands: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Commands completed with an error status (including those a device reset aborted,
    /// which hosts retry).
    pub errors: u64,
}

impl IoTotals {
    /// Adds `o` to these.
    pub fn add(&mut self, o: &IoTotals) {
        self.read_commands += o.read_commands;
        self.write_commands += o.write_commands;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.errors += o.errors;
    }
}

impl ControllerStats {
    /// The counters now.
    pub fn totals(&self) -> IoTotals {
        IoTotals {
            read_commands: self.read_commands.load(Ordering::Relaxed),
            write_commands: self.write_commands.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    /// Counts one read or write of `len` bytes (other opcodes are not counted).
    pub(crate) fn count(&self, opcode: u8, len: u64) {
        match opcode {
            nvme::spec::io_opc::READ => {
                self.read_commands.fetch_add(1, Ordering::Relaxed);
                self.bytes_read.fetch_add(len, Ordering::Relaxed);
            }
            nvme::spec::io_opc::WRITE => {
                self.write_commands.fetch_add(1, Ordering::Relaxed);
                self.bytes_written.fetch_add(len, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl Drop for Controller {
    /// A controller that goes (disconnect, keep-alive expiry) leaves its counters to its
    /// subsystem's totals, so `stats` keeps them.
    fn drop(&mut self) {
        self.subsys.retire(self.stats.totals());
    }
}

/// Mutable controller state (behind one lock; only admin-path code takes it).
pub(crate) struct CtrlState {
    pub cc: Cc,
    pub csts: Csts,
    pub kato: Duration,
    pub last_keep_alive: Instant,
    pub aec: u32,
    /// Keep Alive Timeout given in Connect (the feature's default value).
    pub kato_connect: Duration,
    /// Temperature Threshold feature, composite sensor: over and under thresholds (K).
    pub temp_over: u16,
    pub temp_under: u16,
    /// Volatile Write Cache feature (WCE); mirrored in [`Controller::write_through`].
    pub vwc_enabled: bool,
    pub nsq_granted: u16,
    pub io_queues: Vec<bool>,
    pub events: VecDeque<u32>,
    pub changed_ns: Vec<u32>,
    pub error_log: VecDeque<ErrorLogEntry>,
    pub error_count: u64,
}

/// One controller: created by an admin-queue Connect, torn down when its admin queue
/// goes away or its keep-alive timer expires.
pub struct Controller {
    cntlid: u16,
    subsys: Arc<Subsystem>,
    hostnqn: String,
    hostid: [u8; 16],
    limits: Limits,
    alive: AtomicBool,
    /// Mirror of CSTS.RDY, read on every command without taking the lock.
    ready: AtomicBool,
    /// The volatile write cache is disabled (Set Features VWC, WCE = 0) while a
    /// namespace has one: every write is flushed before it completes. Read per I/O
    /// without the lock.
    write_through: AtomicBool,
    state: Mutex<CtrlState>,
    /// Counters.
    pub stats: ControllerStats,
}

impl Controller {
    pub(crate) fn new(
        cntlid: u16,
        subsys: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        limits: Limits,
        now: Instant,
    ) -> Self {
        Controller {
            cntlid,
            hostnqn,
            hostid,
            limits,
            alive: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            write_through: AtomicBool::new(false),
            state: Mutex::new(CtrlState {
                cc: Cc(0),
                csts: Csts(0),
                kato: Duration::from_millis(u64::from(kato_ms)),
                kato_connect: Duration::from_millis(u64::from(kato_ms)),
                last_keep_alive: now,
                aec: 0,
                temp_over: WCTEMP_KELVIN,
                temp_under: 0,
                vwc_enabled: subsys
                    .namespaces()
                    .iter()
                    .any(|n| n.backend.volatile_write_cache()),
                nsq_granted: limits.max_io_queues,
                io_queues: vec![false; usize::from(limits.max_io_queues) + 1],
                events: VecDeque::new(),
                changed_ns: Vec::new(),
                error_log: VecDeque::with_capacity(ERROR_LOG_ENTRIES),
                error_count: 0,
            }),
            subsys,
            stats: ControllerStats::default(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, CtrlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Controller id.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// The subsystem.
    pub fn subsystem(&self) -> &Arc<Subsystem> {
        &self.subsys
    }

    /// Host NQN of the host that created it.
    pub fn hostnqn(&self) -> &str {
        &self.hostnqn
    }

    /// Host identifier from Connect.
    pub fn hostid(&self) -> [u8; 16] {
        self.hostid
    }

    /// False once torn down; its queues then disconnect.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    pub(crate) fn kill(&self) {
        self.alive.store(false, Ordering::Release);
    }

    /// Marks the controller fatally failed (CSTS.CFS), e.g. on keep-alive expiry.
    pub(crate) fn fail(&self) {
        let mut st = self.lock();
        st.csts.0 |= Csts::CFS;
        st.csts.0 &= !Csts::RDY;
        self.ready.store(false, Ordering::Release);
    }

    /// Whether CSTS.RDY is set (I/O and most admin commands are allowed).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether writes must be flushed before they complete (the host disabled the
    /// volatile write cache it was told about).
    pub(crate) fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Relaxed)
    }

    /// Whether some namespace has a volatile write cache (Identify VWC bit 0).
    pub(crate) fn has_volatile_cache(&self) -> bool {
        self.subsys
            .namespaces()
            .iter()
            .any(|n| n.backend.volatile_write_cache())
    }

    /// Set Features Volatile Write Cache (WCE).
    pub(crate) fn set_write_cache(&self, st: &mut CtrlState, enabled: bool) {
        st.vwc_enabled = enabled;
        self.write_through.store(!enabled, Ordering::Relaxed);
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// CAP as reported to the host.
    pub fn cap(&self) -> Cap {
        let mqes = u64::from(self.limits.queue_depth.saturating_sub(1));
        let css_nvm = 1u64 << 37;
        let cqr = 1u64 << 16;
        let to = 15u64 << 24; // 7.5 s
        Cap(mqes | cqr | to | css_nvm)
    }

    /// Property Get: value of the register at `offset`, `None` if invalid for `size`.
    pub fn property_get(&self, offset: u32, size8: bool) -> Option<u64> {
        let st = self.lock();
        match (offset as usize, size8) {
            (reg::CAP, true) => Some(self.cap().0),
            (reg::VS, false) => Some(u64::from(VERSION.0)),
            (reg::CC, false) => Some(u64::from(st.cc.0)),
            (reg::CSTS, false) => Some(u64::from(st.csts.0)),
            _ => None,
        }
    }

    /// Property Set: writes CC (the only writable property). Returns false for an
    /// invalid offset/size.
    pub fn property_set(&self, offset: u32, size8: bool, value: u64) -> bool {
        if offset as usize != reg::CC || size8 {
            return false;
        }
        let new = Cc(value as u32);
        let mut st = self.lock();
        let old = st.cc;
        st.cc = new;
        if new.en() == 1 && old.en() == 0 {
            // Enable: check what we support (NVM command set, 4 KiB pages, 64/16-byte entries).
            let valid = new.css() == 0 && new.mps() == 0 && new.iosqes() == 6 && new.iocqes() == 4;
            st.csts = if valid {
                Csts(Csts::RDY)
            } else {
                Csts(Csts::CFS)
            };
        } else if new.en() == 0 && old.en() == 1 {
            // Reset: back to the disabled state; I/O queues stay connected (fabrics).
            st.csts = Csts(0);
        }
        self.ready.store(st.csts.rdy() == 1, Ordering::Release);
        if new.shn() != 0 && old.shn() == 0 {
            drop(st);
            for ns in self.subsys.namespaces() {
                if let Err(e) = ns.backend.flush() {
                    tracing::warn!(error = %e, "flush at shutdown notification");
                }
            }
            let mut st = self.lock();
            st.csts = Csts((st.csts.0 & !(3 << 2)) | (2 << 2)); // SHST = complete
        } else if new.shn() == 0 && old.shn() != 0 {
            st.csts = Csts(st.csts.0 & !(3 << 2));
        }
        true
    }

    /// Restarts the keep-alive timer.
    pub(crate) fn keep_alive(&self, now: Instant) {
        self.lock().last_keep_alive = now;
    }

    /// True when the keep-alive timer is enabled and has expired at `now`.
    pub(crate) fn keep_alive_expired(&self, now: Instant) -> bool {
        let st = self.lock();
        !st.kato.is_zero() && now.saturating_duration_since(st.last_keep_alive) > st.kato
    }

    /// Records a failed command in the error log.
    pub(crate) fn log_error(
        &self,
        sqid: u16,
        cid: u16,
        status: Status,
        loc: u16,
        lba: u64,
        nsid: u32,
    ) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(ns) = self.subsys.namespace(nsid) {
            ns.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut st = self.lock();
        st.error_count += 1;
        let e = ErrorLogEntry {
            error_count: U64::new(st.error_count),
            sqid: U16::new(sqid),
            cid: U16::new(cid),
            status: U16::new(status.to_field_with_phase(false)),
            parameter_error_location: U16::new(loc),
            lba: U64::new(lba),
            nsid: U32::new(nsid),
            trtype: crate::fabrics::TRTYPE_RDMA,
            ..Default::default()
        };
        if st.error_log.len() == ERROR_LOG_ENTRIES {
            st.error_log.pop_back();
        }
        st.error_log.push_front(e);
    }

    /// Records a namespace change and queues the asynchronous event if enabled.
    pub(crate) fn namespace_changed(&self, nsid: u32) {
        let mut st = self.lock();
        if !st.changed_ns.contains(&nsid) {
            if st.changed_ns.len() < 1024 {
                st.changed_ns.push(nsid);
            } else {
                st.changed_ns = vec![u32::MAX]; // list overflow marker
            }
        }
        if st.aec & AEC_NS_ATTR != 0 {
            // Type 2 (notice), info 0 (namespace attribute changed), log page 0x04.
            st.events
                .push_back(2 | (u32::from(nvme::spec::log::CHANGED_NS_LIST) << 16));
        }
    }

    /// The discovery log changed (a discovery controller): queues the Discovery Log Page
    /// Change notice if the host enabled it (AEC bit 31).
    pub(crate) fn discovery_changed(&self) {
        let mut st = self.lock();
        if st.aec & AEC_DISCOVERY_CHANGE != 0 {
            // Type 2 (notice), info F0h (discovery log page change), log page 70h.
            st.events
                .push_back(2 | (0xf0 << 8) | (u32::from(nvme::spec::log::DISCOVERY) << 16));
        }
    }

    /// Takes the next pending asynchronous event (CQE DW0 encoding).
    pub(crate) fn take_event(&self) -> Option<u32> {
        self.lock().events.pop_front()
    }

    pub(crate) fn claim_io_queue(&self, qid: u16) -> Result<(), ()> {
        let mut st = self.lock();
        match st.io_queues.get_mut(usize::from(qid)) {
            Some(slot) if !*slot => {
                *slot = true;
                Ok(())
            }
            _ => Err(()),
        }
    }

    pub(crate) fn release_io_queue(&self, qid: u16) {
        if let Some(slot) = self.lock().io_queues.get_mut(usize::from(qid)) {
            *slot = false;
        }
    }
}
