//! Controller bring-up, the admin queue, I/O queue creation, reset and recovery. One code
//! path for VFIO and the simulator, over the [`Platform`] trait.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zerocopy::FromBytes;

use crate::dma::{DmaBuffer, DmaRegion, Mmio, Platform};
use crate::doorbell::{DoorbellPair, ShadowPages};
use crate::error::{Error, Result};
use crate::irq::EventFd;
use crate::queue::{Completion, IoQueuePair, QueueParts};
use crate::raw_queue::QueueOwner;
pub use crate::raw_queue::RawQueuePair;
use crate::spec::{
    self, cns, reg, Aqa, Cap, Cc, CmbLoc, CmbMsc, CmbSts, CmbSz, Cqe, Csts, IdentifyController,
    IdentifyNamespace, NamespaceList, Sqe, Vs, PAGE_SIZE,
};

/// Largest transfer the driver issues per command (one 4 KiB PRP list page per command).
pub const DRIVER_MAX_TRANSFER: usize = 2 << 20;

/// Options for bringing up a controller.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Admin queue entries (2..=4096).
    pub admin_depth: u16,
    /// I/O queue pairs to ask for with Set Features (Number of Queues).
    pub io_queues: u16,
    /// Use Doorbell Buffer Config (shadow doorbells + EventIdx) when OACS offers it.
    pub shadow_doorbells: bool,
    /// Enable and map the controller memory buffer when present.
    pub use_cmb: bool,
    /// Timeout for admin commands.
    pub admin_timeout: Duration,
    /// How long [`Controller::recover`] waits for an aborted command's completion.
    pub abort_grace: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            admin_depth: 32,
            io_queues: 8,
            shadow_doorbells: true,
            use_cmb: true,
            admin_timeout: Duration::from_secs(5),
            abort_grace: Duration::from_millis(500),
        }
    }
}

/// Options for one I/O queue pair.
#[derive(Clone, Copy, Debug)]
pub struct QueueOptions {
    /// Entries per queue (capped by CAP.MQES + 1); at most depth - 1 commands in flight.
    pub depth: u16,
    /// Place the submission queue in the controller memory buffer (needs CMBSZ.SQS).
    pub sq_in_cmb: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            depth: 256,
            sq_in_cmb: false,
        }
    }
}

/// One active namespace.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NamespaceInfo {
    pub nsid: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// Formatted block size in bytes.
    pub block_size: u32,
    /// Index of the formatted LBA format.
    pub lba_format_index: usize,
    /// Offered LBA formats: (data size in bytes, metadata bytes, relative performance).
    pub lba_formats: Vec<LbaFormatInfo>,
}

/// One LBA format as reported by Identify Namespace.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LbaFormatInfo {
    pub data_size: u32,
    pub metadata_size: u16,
    pub relative_performance: u8,
}

/// The controller memory buffer as found and enabled.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CmbInfo {
    pub size: u64,
    pub bar: u8,
    pub offset: u64,
    pub bus_addr: u64,
    pub cmbloc: u32,
    pub cmbsz: u32,
    pub sqs: bool,
    pub cqs: bool,
    pub lists: bool,
    pub rds: bool,
    pub wds: bool,
}

/// What the controller reported at bring-up.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ControllerInfo {
    pub name: String,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    pub version: String,
    pub vid: u16,
    pub cntlid: u16,
    /// MDTS in bytes, None when the controller sets no limit.
    pub mdts_bytes: Option<usize>,
    /// Largest transfer the driver will issue (min of MDTS and the driver's own limit).
    pub max_transfer: usize,
    /// CAP.MQES + 1.
    pub max_queue_entries: u32,
    pub doorbell_stride: usize,
    pub timeout_ms: u64,
    pub oacs: u16,
    pub oncs: u16,
    pub nn: u32,
    pub io_queues_granted: u16,
    pub shadow_doorbells_supported: bool,
    pub shadow_doorbells_in_use: bool,
    pub volatile_write_cache: bool,
    pub namespaces: Vec<NamespaceInfo>,
    pub cmb: Option<CmbInfo>,
}

pub(crate) struct Admin {
    sq: DmaBuffer,
    cq: DmaBuffer,
    depth: u16,
    tail: u16,
    head: u16,
    phase: bool,
    next_cid: u16,
    scratch: DmaBuffer,
    doorbells: DoorbellPair,
}

pub(crate) struct QueueRec {
    qid: u16,
    depth: u16,
    sq_iova: u64,
    cq: DmaBuffer,
    /// Interrupt vector of the CQ (IEN = 1), or None for a polled CQ.
    iv: Option<u16>,
}

/// A queue [`Shared::create_queue`] created: what its owner needs to drive it.
pub(crate) struct NewQueue {
    pub qid: u16,
    pub doorbells: DoorbellPair,
    /// Vector and eventfd of the CQ's interrupt (None: polled).
    pub irq: Option<(u16, Arc<EventFd>)>,
    /// The controller generation the queue was created in.
    pub generation: u64,
}

struct CmbAlloc {
    /// Free ranges (offset, len), sorted by offset.
    free: Vec<(usize, usize)>,
}

struct CmbState {
    mem: DmaBuffer,
    info: CmbInfo,
    msc: CmbMsc,
    alloc: Arc<Mutex<CmbAlloc>>,
}

struct CmbLease {
    _bar: Arc<dyn DmaRegion>,
    alloc: Arc<Mutex<CmbAlloc>>,
    off: usize,
    len: usize,
}
impl DmaRegion for CmbLease {}
impl Drop for CmbLease {
    fn drop(&mut self) {
        let mut a = lock(&self.alloc);
        let pos = a.free.partition_point(|&(o, _)| o < self.off);
        a.free.insert(pos, (self.off, self.len));
        // Coalesce neighbours.
        let mut i = 0;
        while i + 1 < a.free.len() {
            if a.free[i].0 + a.free[i].1 == a.free[i + 1].0 {
                a.free[i].1 += a.free[i + 1].1;
                a.free.remove(i + 1);
            } else {
                i += 1;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Shared {
    platform: Arc<dyn Platform>,
    regs: Mmio,
    cap: Cap,
    name: String,
    opts: ControllerOptions,
    admin: Mutex<Admin>,
    pub(crate) generation: AtomicU64,
    queues: Mutex<Vec<QueueRec>>,
    granted: u16,
    shadow: Option<ShadowPages>,
    cmb: Mutex<Option<CmbState>>,
    info: ControllerInfo,
    /// Eventfds of the enabled interrupt vectors (empty until the first queue with
    /// interrupts; vector 0 is the admin queue's).
    irqs: Mutex<Vec<Arc<EventFd>>>,
}

/// How [`Controller::recover`] got a timed-out command back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The Abort command worked; the command completed (with an abort status).
    Aborted,
    /// The controller was reset and all queues recreated; outstanding commands on every
    /// queue pair complete with [`spec::Status::ABORTED_SQ_DELETED`].
    Reset,
}

/// An NVMe controller brought up by this driver. Cheap to share (`Send + Sync`); admin
/// commands serialise on an internal lock, I/O goes through [`IoQueuePair`]s.
pub struct Controller {
    shared: Arc<Shared>,
}

fn wait_ready(regs: &Mmio, cap: Cap, name: &str, want: bool) -> Result<()> {
    let timeout = cap.timeout();
    let start = Instant::now();
    loop {
        let csts = Csts(regs.read32(reg::CSTS));
        if csts.is_all_ones() {
            return Err(Error::DeviceGone { name: name.into() });
        }
        if (csts.rdy() == 1) == want {
            return Ok(());
        }
        if want && csts.cfs() == 1 {
            return Err(Error::ControllerFatal { name: name.into() });
        }
        if start.elapsed() > timeout {
            return Err(Error::NotReady {
                name: name.into(),
                csts: csts.0,
                waited: start.elapsed(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn disable(regs: &Mmio, cap: Cap, name: &str) -> Result<()> {
    let cc = Cc(regs.read32(reg::CC));
    if cc.0 == u32::MAX {
        return Err(Error::DeviceGone { name: name.into() });
    }
    if cc.en() == 1 {
        regs.write32(reg::CC, cc.0 & !1);
    }
    wait_ready(regs, cap, name, false)
}

impl Admin {
    fn new(p: &dyn Platform, cap: Cap, depth: u16) -> Result<Admin> {
        let dma = p.dma();
        Ok(Admin {
            sq: dma.alloc(depth as usize * 64)?,
            cq: dma.alloc(depth as usize * 16)?,
            depth,
            tail: 0,
            head: 0,
            phase: true,
            next_cid: 0,
            scratch: dma.alloc(2 * PAGE_SIZE)?,
            doorbells: DoorbellPair::new(p.regs(), cap.dstrd(), 0, None)?,
        })
    }

    fn reset_rings(&mut self) -> Result<()> {
        self.sq.fill(0, self.sq.len(), 0)?;
        self.cq.fill(0, self.cq.len(), 0)?;
        self.tail = 0;
        self.head = 0;
        self.phase = true;
        Ok(())
    }

    /// Submit `sqe` and wait for its completion.
    fn exec(&mut self, regs: &Mmio, name: &str, mut sqe: Sqe, timeout: Duration) -> Result<Cqe> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        sqe.set_cid(cid);
        let words: [u64; 8] = zerocopy::transmute!(sqe);
        self.sq
            .write_volatile_u64s(self.tail as usize * 64, &words)?;
        self.tail = (self.tail + 1) % self.depth;
        self.doorbells.sq.ring(self.tail);
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let off = self.head as usize * 16;
            let st = self.cq.read_u32(off + 12)? >> 16;
            if (st & 1 == 1) == self.phase {
                std::sync::atomic::fence(Ordering::Acquire);
                let mut raw = [0u8; 16];
                self.cq.read(off, &mut raw)?;
                let cqe =
                    Cqe::read_from_bytes(&raw).map_err(|_| Error::InvalidArgument("cqe".into()))?;
                self.head += 1;
                if self.head == self.depth {
                    self.head = 0;
                    self.phase = !self.phase;
                }
                self.doorbells.cq.ring(self.head);
                if cqe.cid.get() != cid {
                    continue; // a stale completion from before a timeout
                }
                let status = cqe.status();
                if !status.is_success() {
                    return Err(Error::Command {
                        qid: 0,
                        cid,
                        opcode: sqe.opcode(),
                        status,
                    });
                }
                return Ok(cqe);
            }
            spins += 1;
            if spins.is_multiple_of(256) {
                let csts = Csts(regs.read32(reg::CSTS));
                if csts.is_all_ones() {
                    return Err(Error::DeviceGone { name: name.into() });
                }
                if csts.cfs() == 1 {
                    return Err(Error::ControllerFatal { name: name.into() });
                }
                if start.elapsed() > timeout {
                    return Err(Error::Timeout {
                        qid: 0,
                        cid,
                        opcode: sqe.opcode(),
                        after: timeout,
                    });
                }
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Run a command whose data (<= 8 KiB) goes to/from the scratch buffer.
    fn exec_scratch(
        &mut self,
        regs: &Mmio,
        name: &str,
        mut sqe: Sqe,
        timeout: Duration,
    ) -> Result<Cqe> {
        sqe.prp1 = self.scratch.iova().into();
        sqe.prp2 = (self.scratch.iova() + PAGE_SIZE as u64).into();
        self.exec(regs, name, sqe, timeout)
    }
}

/// Controller enable sequence (admin rings already zeroed).
fn enable(regs: &Mmio, cap: Cap, name: &str, admin: &mut Admin) -> Result<()> {
    disable(regs, cap, name)?;
    admin.reset_rings()?;
    regs.write32(reg::AQA, Aqa::new(admin.depth - 1, admin.depth - 1).0);
    regs.write64(reg::ASQ, admin.sq.iova());
    regs.write64(reg::ACQ, admin.cq.iova());
    regs.write32(reg::CC, Cc::enabled_default().0);
    wait_ready(regs, cap, name, true)
}

fn set_num_queues(
    regs: &Mmio,
    name: &str,
    admin: &mut Admin,
    want: u16,
    t: Duration,
) -> Result<u16> {
    let want = want.clamp(1, 65534);
    let cqe = admin.exec(regs, name, Sqe::set_num_queues(want - 1, want - 1), t)?;
    let dw0 = cqe.dw0.get();
    let nsq = (dw0 & 0xffff) as u16 + 1;
    let ncq = (dw0 >> 16) as u16 + 1;
    Ok(want.min(nsq).min(ncq))
}

fn setup_shadow(
    regs: &Mmio,
    name: &str,
    admin: &mut Admin,
    sh: &ShadowPages,
    t: Duration,
) -> Result<()> {
    sh.doorbells.fill(0, sh.doorbells.len(), 0)?;
    sh.event_idx.fill(0, sh.event_idx.len(), 0)?;
    admin.exec(
        regs,
        name,
        Sqe::doorbell_buffer_config(sh.doorbells.iova(), sh.event_idx.iova()),
        t,
    )?;
    Ok(())
}

fn setup_cmb(
    p: &dyn Platform,
    regs: &Mmio,
    cap: Cap,
) -> Result<Option<(DmaBuffer, CmbInfo, CmbMsc)>> {
    if cap.cmbs() == 1 {
        regs.write64(reg::CMBMSC, CmbMsc::CRE);
    }
    let loc = CmbLoc(regs.read32(reg::CMBLOC));
    let sz = CmbSz(regs.read32(reg::CMBSZ));
    if sz.0 == 0 || sz.0 == u32::MAX || sz.size_bytes() == 0 {
        return Ok(None);
    }
    let bar = p.map_bar(loc.bir())?;
    let offset = loc.ofst() as u64 * sz.unit_bytes();
    let size = sz.size_bytes();
    let mem = bar.mem.slice(offset as usize, size as usize)?;
    let msc = CmbMsc::enable_at(mem.iova());
    if cap.cmbs() == 1 {
        regs.write64(reg::CMBMSC, msc.0);
        if CmbSts(regs.read32(reg::CMBSTS)).cbai() == 1 {
            return Err(Error::Unsupported {
                what: format!("CMB base address {:#x} rejected (CMBSTS.CBAI)", mem.iova()),
            });
        }
    }
    let info = CmbInfo {
        size,
        bar: loc.bir(),
        offset,
        bus_addr: mem.iova(),
        cmbloc: loc.0,
        cmbsz: sz.0,
        sqs: sz.sqs() == 1,
        cqs: sz.cqs() == 1,
        lists: sz.lists() == 1,
        rds: sz.rds() == 1,
        wds: sz.wds() == 1,
    };
    Ok(Some((mem, info, msc)))
}

impl Controller {
    /// Bring up the controller behind `platform`: disable, admin queue, enable (waiting
    /// up to CAP.TO), Identify, Set Features (Number of Queues), shadow doorbells, CMB.
    pub fn new(platform: Arc<dyn Platform>, opts: ControllerOptions) -> Result<Controller> {
        let name = platform.name();
        let regs = platform.regs().clone();
        let cap = Cap(regs.read64(reg::CAP));
        if cap.0 == u64::MAX {
            return Err(Error::DeviceGone { name });
        }
        let vs = Vs(regs.read32(reg::VS));
        let depth = opts
            .admin_depth
            .clamp(2, (cap.mqes() as u32 + 1).clamp(2, 4096) as u16);
        let mut admin = Admin::new(&*platform, cap, depth)?;
        let t = opts.admin_timeout;
        enable(&regs, cap, &name, &mut admin)?;

        admin.exec_scratch(&regs, &name, Sqe::identify(cns::CONTROLLER, 0, 0, 0), t)?;
        let mut page = [0u8; PAGE_SIZE];
        admin.scratch.read(0, &mut page)?;
        let id = IdentifyController::read_from_bytes(&page)
            .map_err(|_| Error::InvalidArgument("identify".into()))?;

        let mut nsids: Vec<u32> = match admin.exec_scratch(
            &regs,
            &name,
            Sqe::identify(cns::ACTIVE_NS_LIST, 0, 0, 0),
            t,
        ) {
            Ok(_) => {
                admin.scratch.read(0, &mut page)?;
                NamespaceList::read_from_bytes(&page)
                    .map(|l| l.iter().collect())
                    .unwrap_or_default()
            }
            Err(_) => (1..=id.nn.get().min(1024)).collect(),
        };
        nsids.truncate(1024);
        let mut namespaces = Vec::new();
        for nsid in nsids {
            if admin
                .exec_scratch(&regs, &name, Sqe::identify(cns::NAMESPACE, nsid, 0, 0), t)
                .is_err()
            {
                continue;
            }
            admin.scratch.read(0, &mut page)?;
            let Ok(ns) = IdentifyNamespace::read_from_bytes(&page) else {
                continue;
            };
            if ns.nsze.get() == 0 || ns.block_size() == 0 {
                continue;
            }
            namespaces.push(NamespaceInfo {
                nsid,
                blocks: ns.nsze.get(),
                block_size: ns.block_size(),
                lba_format_index: ns.lba_format_index(),
                lba_formats: ns
                    .lba_formats()
                    .iter()
                    .map(|f| LbaFormatInfo {
                        data_size: f.block_size(),
                        metadata_size: f.ms.get(),
                        relative_performance: f.rp & 3,
                    })
                    .collect(),
            });
        }

        let granted = set_num_queues(&regs, &name, &mut admin, opts.io_queues, t)?;

        let shadow_supported = id.supports_shadow_doorbells();
        let mut shadow = None;
        if shadow_supported && opts.shadow_doorbells {
            let sh = ShadowPages {
                doorbells: platform.dma().alloc(PAGE_SIZE)?,
                event_idx: platform.dma().alloc(PAGE_SIZE)?,
            };
            match setup_shadow(&regs, &name, &mut admin, &sh, t) {
                Ok(()) => shadow = Some(sh),
                Err(e) => {
                    tracing::warn!(controller = %name, "Doorbell Buffer Config failed, using MMIO doorbells: {e}")
                }
            }
        }

        let cmb = if opts.use_cmb {
            match setup_cmb(&*platform, &regs, cap) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(controller = %name, "CMB not usable: {e}");
                    None
                }
            }
        } else {
            None
        };

        let mdts_bytes = id.max_transfer_bytes(4096usize << cap.mpsmin());
        let max_transfer = mdts_bytes.unwrap_or(usize::MAX).min(DRIVER_MAX_TRANSFER);
        let info = ControllerInfo {
            name: name.clone(),
            model: id.model(),
            serial: id.serial(),
            firmware: id.firmware(),
            version: vs.to_string(),
            vid: id.vid.get(),
            cntlid: id.cntlid.get(),
            mdts_bytes,
            max_transfer,
            max_queue_entries: cap.mqes() as u32 + 1,
            doorbell_stride: cap.doorbell_stride(),
            timeout_ms: cap.timeout().as_millis() as u64,
            oacs: id.oacs.get(),
            oncs: id.oncs.get(),
            nn: id.nn.get(),
            io_queues_granted: granted,
            shadow_doorbells_supported: shadow_supported,
            shadow_doorbells_in_use: shadow.is_some(),
            volatile_write_cache: id.vwc & 1 == 1,
            namespaces,
            cmb: cmb.as_ref().map(|c| c.1.clone()),
        };
        let cmb = cmb.map(|(mem, info, msc)| {
            let len = mem.len();
            CmbState {
                mem,
                info,
                msc,
                alloc: Arc::new(Mutex::new(CmbAlloc {
                    free: vec![(0, len)],
                })),
            }
        });
        Ok(Controller {
            shared: Arc::new(Shared {
                platform,
                regs,
                cap,
                name,
                opts,
                admin: Mutex::new(admin),
                generation: AtomicU64::new(0),
                queues: Mutex::new(Vec::new()),
                granted,
                shadow,
                cmb: Mutex::new(cmb),
                info,
                irqs: Mutex::new(Vec::new()),
            }),
        })
    }

    /// What the controller reported at bring-up.
    pub fn info(&self) -> &ControllerInfo {
        &self.shared.info
    }
    /// Controller capabilities.
    pub fn cap(&self) -> Cap {
        self.shared.cap
    }
    /// The platform (VFIO device or simulator) this controller runs on.
    pub fn platform(&self) -> &Arc<dyn Platform> {
        &self.shared.platform
    }
    /// Number of controller resets done so far.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }
    /// Allocate DMA memory in host RAM.
    pub fn alloc_dma(&self, len: usize) -> Result<DmaBuffer> {
        self.shared.platform.dma().alloc(len)
    }
    /// Allocate a data buffer in the controller memory buffer (page aligned).
    pub fn alloc_cmb(&self, len: usize) -> Result<DmaBuffer> {
        self.shared.alloc_cmb(len)
    }
    /// The whole CMB mapping (its `iova` is the CMB's bus address), if enabled.
    pub fn cmb(&self) -> Option<DmaBuffer> {
        lock(&self.shared.cmb).as_ref().map(|c| c.mem.clone())
    }

    /// Run one admin command; `data` (<= 8 KiB, page aligned) is described by PRP1/PRP2.
    pub fn admin_command(&self, mut sqe: Sqe, data: Option<&DmaBuffer>) -> Result<Cqe> {
        if let Some(d) = data {
            if d.len() > 2 * PAGE_SIZE || d.iova() % PAGE_SIZE as u64 != 0 {
                return Err(Error::InvalidArgument(
                    "admin data must be page aligned and <= 8 KiB".into(),
                ));
            }
            sqe.prp1 = d.iova().into();
            sqe.prp2 = if d.len() > PAGE_SIZE {
                (d.iova() + PAGE_SIZE as u64).into()
            } else {
                0.into()
            };
        }
        let s = &self.shared;
        lock(&s.admin).exec(&s.regs, &s.name, sqe, s.opts.admin_timeout)
    }

    fn admin_read_page(&self, sqe: Sqe, len: usize) -> Result<Vec<u8>> {
        let s = &self.shared;
        let mut a = lock(&s.admin);
        a.exec_scratch(&s.regs, &s.name, sqe, s.opts.admin_timeout)?;
        let mut v = vec![0u8; len.min(2 * PAGE_SIZE)];
        a.scratch.read(0, &mut v)?;
        Ok(v)
    }

    /// Identify Controller.
    pub fn identify_controller(&self) -> Result<IdentifyController> {
        let v = self.admin_read_page(Sqe::identify(cns::CONTROLLER, 0, 0, 0), PAGE_SIZE)?;
        IdentifyController::read_from_bytes(&v)
            .map_err(|_| Error::InvalidArgument("identify".into()))
    }
    /// Identify Namespace.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace> {
        let v = self.admin_read_page(Sqe::identify(cns::NAMESPACE, nsid, 0, 0), PAGE_SIZE)?;
        IdentifyNamespace::read_from_bytes(&v)
            .map_err(|_| Error::InvalidArgument("identify".into()))
    }
    /// Get Log Page into a vector of `len` bytes (<= 8 KiB, multiple of 4).
    pub fn get_log_page(&self, lid: u8, nsid: u32, len: usize) -> Result<Vec<u8>> {
        if len == 0 || len > 2 * PAGE_SIZE || !len.is_multiple_of(4) {
            return Err(Error::InvalidArgument(format!("log page length {len}")));
        }
        self.admin_read_page(Sqe::get_log_page(lid, nsid, len as u32, 0, 0, 0), len)
    }
    /// SMART / health log.
    pub fn smart_log(&self) -> Result<spec::SmartLog> {
        let v = self.get_log_page(spec::log::SMART, 0xffff_ffff, 512)?;
        spec::SmartLog::read_from_bytes(&v).map_err(|_| Error::InvalidArgument("smart".into()))
    }

    /// Read CSTS and report a fatal controller or a vanished device.
    pub fn check_health(&self) -> Result<()> {
        let csts = Csts(self.shared.regs.read32(reg::CSTS));
        if csts.is_all_ones() {
            return Err(Error::DeviceGone {
                name: self.shared.name.clone(),
            });
        }
        if csts.cfs() == 1 {
            return Err(Error::ControllerFatal {
                name: self.shared.name.clone(),
            });
        }
        Ok(())
    }

    /// Create an I/O queue pair (CQ then SQ; polled, no interrupts).
    pub fn create_io_queue_pair(&self, qopts: QueueOptions) -> Result<IoQueuePair> {
        self.create_queue_pair(qopts, false)
    }

    /// Interrupt vectors the platform can deliver (MSI-X through VFIO eventfds, or the
    /// simulator's); 0 = none, queues are polled only.
    pub fn interrupt_vectors(&self) -> u16 {
        self.shared.platform.interrupt_vectors()
    }

    /// Create an I/O queue pair whose CQ raises an interrupt (IEN = 1) on its own MSI-X
    /// vector when the controller posts completions (vectors are shared once there are
    /// more queues than vectors; vector 0 is the admin queue's). The first such queue
    /// enables MSI-X on the device. Sleep on it with [`IoQueuePair::arm_interrupt`] +
    /// [`IoQueuePair::interrupt_fd`] in poll(2), or [`IoQueuePair::wait_interrupt`];
    /// [`IoQueuePair::poll`] works as on a polled queue.
    pub fn create_io_queue_pair_with_interrupts(&self, qopts: QueueOptions) -> Result<IoQueuePair> {
        self.create_queue_pair(qopts, true)
    }

    /// Set Features Interrupt Coalescing (08h): the controller may hold an I/O queue's
    /// interrupt until `threshold + 1` completions are posted or `time_100us` × 100 µs
    /// have passed (0, 0 = no coalescing; the controller may ignore it).
    pub fn set_interrupt_coalescing(&self, threshold: u8, time_100us: u8) -> Result<()> {
        let dw11 = threshold as u32 | ((time_100us as u32) << 8);
        self.admin_command(
            Sqe::set_features(spec::feat::INTERRUPT_COALESCING, dw11),
            None,
        )
        .map(|_| ())
    }

    fn create_queue_pair(&self, qopts: QueueOptions, interrupts: bool) -> Result<IoQueuePair> {
        let s = &self.shared;
        let depth = qopts
            .depth
            .clamp(2, (s.cap.mqes() as u32 + 1).clamp(2, 65535) as u16);
        let dma = s.platform.dma();
        let cq_buf = dma.alloc(depth as usize * 16)?;
        let sq_buf = if qopts.sq_in_cmb {
            let sqs = lock(&s.cmb).as_ref().is_some_and(|c| c.info.sqs);
            if !sqs {
                return Err(Error::Unsupported {
                    what: format!("SQs in the CMB on {} (no CMB or CMBSZ.SQS = 0)", s.name),
                });
            }
            s.alloc_cmb(depth as usize * 64)?
        } else {
            dma.alloc(depth as usize * 64)?
        };
        let prp = dma.alloc(depth as usize * PAGE_SIZE)?;
        let q = s.create_queue(sq_buf.iova(), &cq_buf, depth, interrupts)?;
        let ns_shift = s
            .info
            .namespaces
            .iter()
            .map(|n| (n.nsid, n.block_size.trailing_zeros()))
            .collect();
        let parts = QueueParts {
            qid: q.qid,
            depth,
            sq_buf,
            cq_buf,
            sq_in_cmb: qopts.sq_in_cmb,
            prp,
            doorbells: q.doorbells,
            max_transfer: s.info.max_transfer,
            ns_shift,
            generation: q.generation,
            irq: q.irq,
        };
        Ok(IoQueuePair::from_parts(parts, s.clone()))
    }

    /// Byte offsets in BAR0 of queue `qid`'s SQ tail and CQ head doorbells (CAP.DSTRD).
    pub fn doorbell_offsets(&self, qid: u16) -> (u64, u64) {
        let d = self.shared.cap.dstrd();
        (
            spec::sq_tail_doorbell(qid, d) as u64,
            spec::cq_head_doorbell(qid, d) as u64,
        )
    }

    /// Create an I/O SQ/CQ pair on rings the caller owns and fills (direct mode: a remote
    /// host writes SQEs and doorbells). `sq` must hold `depth` 64-byte entries and `cq`
    /// `depth` 16-byte entries, both page aligned; the CQ is zeroed here. The queues are
    /// recreated after a controller reset (check [`RawQueuePair::generation`]) and deleted
    /// on drop.
    ///
    /// With shadow doorbells in use, the controller takes SQ tails from the shadow buffer,
    /// so a doorbell written straight to MMIO (e.g. by RDMA into the exported doorbell
    /// page) is not seen: open the controller with `shadow_doorbells: false` for that.
    pub fn create_raw_queue_pair(
        &self,
        sq: DmaBuffer,
        cq: DmaBuffer,
        depth: u16,
    ) -> Result<RawQueuePair> {
        self.create_raw(sq, cq, depth, false)
    }

    /// [`create_raw_queue_pair`](Self::create_raw_queue_pair) with the CQ raising an
    /// interrupt (IEN = 1) on a vector of its own while vectors last (as
    /// [`create_io_queue_pair_with_interrupts`](Self::create_io_queue_pair_with_interrupts)):
    /// whoever watches the ring can sleep on [`RawQueuePair::interrupt_eventfd`] — clear
    /// it, look at the ring once more, then poll(2) — instead of polling while commands
    /// are in the device.
    pub fn create_raw_queue_pair_with_interrupts(
        &self,
        sq: DmaBuffer,
        cq: DmaBuffer,
        depth: u16,
    ) -> Result<RawQueuePair> {
        self.create_raw(sq, cq, depth, true)
    }

    fn create_raw(
        &self,
        sq: DmaBuffer,
        cq: DmaBuffer,
        depth: u16,
        interrupts: bool,
    ) -> Result<RawQueuePair> {
        let s = &self.shared;
        let max = (s.cap.mqes() as u32 + 1).min(65535) as u16;
        RawQueuePair::check_rings(&sq, &cq, depth, max)?;
        let q = s.create_queue(sq.iova(), &cq, depth, interrupts)?;
        Ok(RawQueuePair::new(
            q,
            depth,
            sq,
            cq,
            s.clone() as Arc<dyn QueueOwner>,
        ))
    }

    /// Send Abort for `cid` on queue `qid`. Returns whether the controller says it aborted
    /// the command (CQE DW0 bit 0 clear).
    pub fn abort(&self, qid: u16, cid: u16) -> Result<bool> {
        let cqe = self.admin_command(Sqe::abort(qid, cid), None)?;
        Ok(cqe.dw0.get() & 1 == 0)
    }

    /// Recover a timed-out command `cid` of `qp`: Abort it and wait `abort_grace` for its
    /// completion; if that fails (or the controller is fatal), reset the controller.
    /// Completions seen meanwhile are passed to `f`.
    pub fn recover<F: FnMut(Completion)>(
        &self,
        qp: &mut IoQueuePair,
        cid: u16,
        mut f: F,
    ) -> Result<Recovery> {
        if self.check_health().is_ok() {
            if let Ok(_aborted) = self.abort(qp.qid(), cid) {
                let start = Instant::now();
                while start.elapsed() < self.shared.opts.abort_grace {
                    qp.poll(usize::MAX, &mut f);
                    if !qp.is_outstanding(cid) {
                        return Ok(Recovery::Aborted);
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        tracing::warn!(controller = %self.shared.name, qid = qp.qid(), cid, "command not recovered by Abort; resetting the controller");
        self.shared.reset(false)?;
        qp.poll(usize::MAX, &mut f);
        Ok(Recovery::Reset)
    }

    /// Controller reset (CC.EN 1 → 0 → 1): re-run the enable sequence, Set Features, shadow
    /// doorbells and CMB, then recreate every live I/O queue pair. Outstanding commands
    /// complete with [`spec::Status::ABORTED_SQ_DELETED`] on the owners' next poll. Queue
    /// pairs must not be used by other threads while this runs (the target holds its poll
    /// groups' I/O around it: `transport::nvmf_target::Target::hold_backend_io`); the
    /// generation ([`Controller::generation`]) changes before any queue is re-created.
    pub fn reset(&self) -> Result<()> {
        self.shared.reset(false)
    }

    /// Device-level reset (FLR through `VFIO_DEVICE_RESET` or the simulator's equivalent),
    /// then a controller reset as in [`reset`](Self::reset). Exported dma-bufs are revoked
    /// during the FLR and usable again afterwards.
    pub fn reset_device(&self) -> Result<()> {
        self.shared.reset(true)
    }
}

/// The interrupt vector of I/O queue `qid` when `vectors` are enabled: its own one
/// (1..) while they last, then shared round-robin; vector 0 (the admin queue's) only if
/// it is the only one. None without vectors.
fn vector_for(qid: u16, vectors: usize) -> Option<u16> {
    match vectors {
        0 => None,
        1 => Some(0),
        n => Some(1 + (qid.saturating_sub(1) as usize % (n - 1)) as u16),
    }
}

impl Shared {
    /// The one queue-creation path, for [`IoQueuePair`]s and [`RawQueuePair`]s alike, on
    /// rings the caller allocated (`sq_iova`, `cq`; `depth` entries each): enables the
    /// interrupt vectors on first use when `interrupts`, takes the lowest free qid, its
    /// vector (see [`vector_for`]) and doorbells, creates the CQ then the SQ (deleting the
    /// CQ again when the SQ fails) and records the queue, so a reset re-creates it and
    /// [`Shared::release_queue`] deletes it. Nothing is left behind on failure.
    pub(crate) fn create_queue(
        &self,
        sq_iova: u64,
        cq: &DmaBuffer,
        depth: u16,
        interrupts: bool,
    ) -> Result<NewQueue> {
        let irq_fds = if interrupts {
            self.enable_irqs()?
        } else {
            Vec::new()
        };
        // Lock order: admin, then queues (as in reset and release_queue).
        let mut a = lock(&self.admin);
        let mut qs = lock(&self.queues);
        let qid = (1..=self.granted)
            .find(|q| !qs.iter().any(|r| r.qid == *q))
            .ok_or(Error::NoQueuesLeft {
                granted: self.granted,
            })?;
        let doorbells = DoorbellPair::new(&self.regs, self.cap.dstrd(), qid, self.shadow.as_ref())?;
        let iv = vector_for(qid, irq_fds.len());
        let rec = QueueRec {
            qid,
            depth,
            sq_iova,
            cq: cq.clone(),
            iv,
        };
        self.create_queue_locked(&mut a, &rec)?;
        qs.push(rec);
        Ok(NewQueue {
            qid,
            doorbells,
            irq: iv.and_then(|v| irq_fds.get(v as usize).map(|e| (v, e.clone()))),
            // Read under the admin lock, which a reset holds while it bumps the
            // generation and re-creates the queues.
            generation: self.generation.load(Ordering::Acquire),
        })
    }

    fn create_queue_locked(&self, a: &mut Admin, rec: &QueueRec) -> Result<()> {
        let t = self.opts.admin_timeout;
        rec.cq.fill(0, rec.cq.len(), 0)?;
        if let Some(sh) = &self.shadow {
            sh.clear_slots(rec.qid, self.cap.dstrd())?;
        }
        let create_cq = match rec.iv {
            Some(iv) => Sqe::create_io_cq_irq(rec.qid, rec.depth - 1, rec.cq.iova(), iv),
            None => Sqe::create_io_cq(rec.qid, rec.depth - 1, rec.cq.iova()),
        };
        a.exec(&self.regs, &self.name, create_cq, t)?;
        if let Err(e) = a.exec(
            &self.regs,
            &self.name,
            Sqe::create_io_sq(rec.qid, rec.depth - 1, rec.qid, rec.sq_iova),
            t,
        ) {
            let _ = a.exec(&self.regs, &self.name, Sqe::delete_io_cq(rec.qid), t);
            return Err(e);
        }
        Ok(())
    }

    /// The interrupt vectors' eventfds, enabling them on first use: one vector for the
    /// admin queue plus one per grantable I/O queue, as far as the platform has them.
    fn enable_irqs(&self) -> Result<Vec<Arc<EventFd>>> {
        let mut irqs = lock(&self.irqs);
        if irqs.is_empty() {
            let have = self.platform.interrupt_vectors();
            if have == 0 {
                return Err(Error::Unsupported {
                    what: format!("interrupts on {} (no MSI-X vectors)", self.name),
                });
            }
            let want = have.min(self.granted.saturating_add(1));
            *irqs = self.platform.enable_interrupts(want)?;
            tracing::debug!(controller = %self.name, vectors = irqs.len(), "interrupts enabled");
        }
        Ok(irqs.clone())
    }

    fn alloc_cmb(&self, len: usize) -> Result<DmaBuffer> {
        let g = lock(&self.cmb);
        let c = g.as_ref().ok_or_else(|| Error::Unsupported {
            what: format!("controller memory buffer on {}", self.name),
        })?;
        let len = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut a = lock(&c.alloc);
        let Some(i) = a.free.iter().position(|&(_, l)| l >= len) else {
            return Err(Error::OutOfDmaMemory {
                len,
                why: format!("CMB of {} bytes is full", c.mem.len()),
            });
        };
        let (off, l) = a.free[i];
        if l == len {
            a.free.remove(i);
        } else {
            a.free[i] = (off + len, l - len);
        }
        drop(a);
        let lease = CmbLease {
            _bar: c.mem.region().clone(),
            alloc: c.alloc.clone(),
            off,
            len,
        };
        let ptr = NonNull::new(c.mem.as_ptr().wrapping_add(off))
            .ok_or_else(|| Error::InvalidArgument("cmb".into()))?;
        // SAFETY: off+len lies inside the CMB mapping, which the lease keeps alive; the
        // range is reserved for this buffer until the lease drops.
        Ok(unsafe {
            DmaBuffer::from_raw_parts(ptr, c.mem.iova() + off as u64, len, Arc::new(lease))
        })
    }

    /// Controller reset, after a function-level reset of the device with `flr`; under
    /// the admin lock throughout, so no admin command (queue creation or deletion of
    /// another thread) runs into the middle of it.
    fn reset(&self, flr: bool) -> Result<()> {
        let mut a = lock(&self.admin);
        let t = self.opts.admin_timeout;
        // The new generation is published before any queue is re-created: whoever looks
        // at a queue from now on (see IoQueuePair::sync_generation, RawQueuePair::
        // generation) takes it as empty, never as the old queue with its old tail — which,
        // rung into the new one, would make the controller run stale entries.
        self.generation.fetch_add(1, Ordering::AcqRel);
        let r = (|| {
            if flr {
                self.platform.device_reset()?;
            }
            enable(&self.regs, self.cap, &self.name, &mut a)?;
            let granted = set_num_queues(&self.regs, &self.name, &mut a, self.opts.io_queues, t)?;
            if granted < self.granted {
                tracing::warn!(controller = %self.name, granted, "fewer queues granted after reset");
            }
            if let Some(sh) = &self.shadow {
                setup_shadow(&self.regs, &self.name, &mut a, sh, t)?;
            }
            if let Some(c) = lock(&self.cmb).as_ref() {
                if self.cap.cmbs() == 1 {
                    self.regs.write64(reg::CMBMSC, CmbMsc::CRE);
                    self.regs.write64(reg::CMBMSC, c.msc.0);
                }
            }
            let qs = lock(&self.queues);
            for rec in qs.iter() {
                self.create_queue_locked(&mut a, rec)?;
            }
            Ok(())
        })();
        r
    }

    pub(crate) fn release_queue(&self, qid: u16, generation: u64) {
        let mut a = lock(&self.admin);
        let mut qs = lock(&self.queues);
        let Some(pos) = qs.iter().position(|r| r.qid == qid) else {
            return;
        };
        qs.remove(pos);
        drop(qs);
        let healthy = Csts(self.regs.read32(reg::CSTS)).cfs() == 0
            && Csts(self.regs.read32(reg::CSTS)).rdy() == 1;
        let _ = generation;
        if healthy {
            let t = self.opts.admin_timeout.min(Duration::from_secs(1));
            for sqe in [Sqe::delete_io_sq(qid), Sqe::delete_io_cq(qid)] {
                if let Err(e) = a.exec(&self.regs, &self.name, sqe, t) {
                    tracing::warn!(controller = %self.name, qid, "deleting queue: {e}");
                }
            }
        }
    }
}

impl QueueOwner for Shared {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    fn release_queue(&self, qid: u16, generation: u64) {
        Shared::release_queue(self, qid, generation)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Stop the controller before its admin rings and queues are unmapped.
        if let Err(e) = disable(&self.regs, self.cap, &self.name) {
            tracing::warn!(controller = %self.name, "disabling on drop: {e}");
        }
    }
}
