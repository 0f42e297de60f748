//! Fabrics and admin commands.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme::spec::{
    admin_opc, build_ns_id_descriptors, cns, cse, feat, feat_sel, io_opc, log, nidt, oncs,
    set_ascii_field, CommandsEffectsLog, FirmwareSlotLog, IdentifyController, IdentifyNamespace,
    LbaFormat, NsIdDescriptor, SmartLog, Sqe, Status, U128, U16, U32, U64,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::addr_family;
use super::controller::{
    Controller, CtrlState, AEC_DISCOVERY_CHANGE, AEC_NS_ATTR, AER_LIMIT, CCTEMP_KELVIN,
    COMPOSITE_TEMP_KELVIN, ERROR_LOG_ENTRIES, VERSION, WCTEMP_KELVIN,
};
use super::queue::{loc, Outcome, QueueCtx};
use crate::config::TrType;
use crate::fabrics::{
    connect_offset, connect_status, get_str, put_str, put_str_space, ConnectCommand, ConnectData,
    ConnectResponse, DiscoveryLogEntry, DiscoveryLogHeader, PropertyCommand, CNTLID_DYNAMIC,
    FCTYPE_CONNECT, FCTYPE_DISCONNECT, FCTYPE_PROPERTY_GET, FCTYPE_PROPERTY_SET,
    SUBTYPE_CURRENT_DISCOVERY, SUBTYPE_NVME, TRTYPE_RDMA,
};

fn connect_err(sc: u8, in_data: bool, offset: u16) -> Outcome {
    let mut o = Outcome::err(Status::new(nvme::spec::sct::COMMAND_SPECIFIC, sc), offset);
    o.result = ConnectResponse::InvalidParameter { in_data, offset }.to_result();
    o
}

fn invalid_param(in_data: bool, offset: u16) -> Outcome {
    connect_err(connect_status::INVALID_PARAMETERS, in_data, offset)
}

/// Admin commands the target implements, with their Commands Supported and Effects
/// entries (log page 05h); the dispatch in [`execute`] and `admin_shape` in `queue.rs`
/// answer exactly these (the direct-mode opcodes only where direct mode is configured).
pub(crate) const ADMIN_COMMANDS: &[(u8, u32)] = &[
    (admin_opc::GET_LOG_PAGE, cse::CSUPP),
    (admin_opc::IDENTIFY, cse::CSUPP),
    (admin_opc::ABORT, cse::CSUPP),
    (admin_opc::SET_FEATURES, cse::CSUPP),
    (admin_opc::GET_FEATURES, cse::CSUPP),
    (admin_opc::ASYNC_EVENT_REQUEST, cse::CSUPP),
    (admin_opc::KEEP_ALIVE, cse::CSUPP),
];

/// NVM I/O commands the target implements, with their effects entries; `io_shape` in
/// `queue.rs` accepts exactly these.
pub(crate) const IO_COMMANDS: &[(u8, u32)] = &[
    (io_opc::FLUSH, cse::CSUPP),
    (io_opc::WRITE, cse::CSUPP | cse::LBCC),
    (io_opc::READ, cse::CSUPP),
    (io_opc::COMPARE, cse::CSUPP),
    (io_opc::WRITE_ZEROES, cse::CSUPP | cse::LBCC),
    (io_opc::DATASET_MANAGEMENT, cse::CSUPP | cse::LBCC),
];

/// Whether `opc` is an I/O command we implement.
pub(crate) fn io_supported(opc: u8) -> bool {
    IO_COMMANDS.iter().any(|&(o, _)| o == opc)
}

/// Fabrics commands: Connect, Property Get, Property Set, Disconnect.
pub(crate) fn fabrics(ctx: &mut QueueCtx, cmd: &Sqe, data: &[u8], now: Instant) -> Outcome {
    let fctype = cmd.as_bytes()[4];
    match fctype {
        FCTYPE_CONNECT => connect(ctx, cmd, data, now),
        FCTYPE_DISCONNECT => disconnect(ctx, cmd),
        FCTYPE_PROPERTY_GET | FCTYPE_PROPERTY_SET => {
            let Some(ctrl) = &ctx.ctrl else {
                return Outcome::err(Status::COMMAND_SEQUENCE_ERROR, loc::OPCODE);
            };
            let Ok(p) = PropertyCommand::read_from_bytes(cmd.as_bytes()) else {
                return Outcome::err(Status::INTERNAL_ERROR, 0);
            };
            let size8 = match p.attrib & 7 {
                0 => false,
                1 => true,
                _ => {
                    return Outcome::err(
                        Status::INVALID_FIELD,
                        crate::fabrics::property_offset::ATTRIB,
                    )
                }
            };
            if fctype == FCTYPE_PROPERTY_GET {
                match ctrl.property_get(p.ofst.get(), size8) {
                    Some(v) => Outcome::result(v),
                    None => {
                        Outcome::err(Status::INVALID_FIELD, crate::fabrics::property_offset::OFST)
                    }
                }
            } else if ctrl.property_set(p.ofst.get(), size8, p.value.get()) {
                Outcome::ok()
            } else {
                Outcome::err(Status::INVALID_FIELD, crate::fabrics::property_offset::OFST)
            }
        }
        _ => Outcome::err(Status::INVALID_OPCODE, loc::FCTYPE),
    }
}

/// Disconnect (I/O queues only; `parse` refuses it on the admin queue): the I/O queue is
/// deleted — its queue id is free for a new Connect and later commands on this
/// connection need a Connect first. The host tears the connection down (the response
/// must reach it first, so the target does not).
fn disconnect(ctx: &mut QueueCtx, cmd: &Sqe) -> Outcome {
    if cmd.cdw10.get() & 0xffff != 0 {
        return Outcome::err(
            Status::new(
                nvme::spec::sct::COMMAND_SPECIFIC,
                connect_status::INCOMPATIBLE_FORMAT,
            ),
            loc::CDW10,
        );
    }
    if let Some(ctrl) = ctx.ctrl.take() {
        ctrl.release_io_queue(ctx.qid);
        tracing::debug!(
            cntlid = ctrl.cntlid(),
            qid = ctx.qid,
            "I/O queue disconnected"
        );
    }
    Outcome::ok()
}

/// Connect, with every refusal logged at warn: an operator sees which subsystem and host
/// were refused and why, as the host's own log shows only a status code.
fn connect(ctx: &mut QueueCtx, cmd: &Sqe, data: &[u8], now: Instant) -> Outcome {
    let o = connect_checked(ctx, cmd, data, now);
    if o.status != Status::SUCCESS {
        let d = ConnectData::read_from_bytes(data).ok();
        let field = |f: Option<&[u8]>| f.and_then(get_str).unwrap_or("?").to_owned();
        let invalid_host = Status::new(
            nvme::spec::sct::COMMAND_SPECIFIC,
            connect_status::INVALID_HOST,
        );
        let why = if o.status.same_code(invalid_host) {
            "host not allowed"
        } else if o.result >> 16 & 1 == 1 {
            match o.result as u16 {
                connect_offset::DATA_SUBNQN => "no such subsystem",
                connect_offset::DATA_HOSTNQN => "bad host NQN",
                connect_offset::DATA_CNTLID => "bad controller id",
                _ => "bad Connect data",
            }
        } else {
            "bad Connect command"
        };
        tracing::warn!(
            qid = ctx.qid,
            subnqn = %field(d.as_ref().map(|d| &d.subnqn[..])),
            hostnqn = %field(d.as_ref().map(|d| &d.hostnqn[..])),
            status = %o.status,
            field_offset = o.loc,
            "Connect refused: {why}"
        );
    }
    o
}

fn connect_checked(ctx: &mut QueueCtx, cmd: &Sqe, data: &[u8], now: Instant) -> Outcome {
    let (Ok(c), Ok(d)) = (
        ConnectCommand::read_from_bytes(cmd.as_bytes()),
        ConnectData::read_from_bytes(data),
    ) else {
        return Outcome::err(Status::SGL_DATA_LENGTH_INVALID, loc::SGL);
    };
    if c.recfmt.get() != 0 {
        return connect_err(
            connect_status::INCOMPATIBLE_FORMAT,
            false,
            connect_offset::RECFMT,
        );
    }
    let qid = c.qid.get();
    if qid != ctx.qid {
        return invalid_param(false, connect_offset::QID);
    }
    let sqsize = c.sqsize.get();
    if sqsize == 0 || sqsize >= ctx.entries || sqsize >= ctx.shared.limits.queue_depth {
        return invalid_param(false, connect_offset::SQSIZE);
    }
    let Some(subnqn) = get_str(&d.subnqn) else {
        return invalid_param(true, connect_offset::DATA_SUBNQN);
    };
    let Some(sub) = ctx.shared.subsystem(subnqn) else {
        return invalid_param(true, connect_offset::DATA_SUBNQN);
    };
    // An empty host NQN is what spdk_nvme_perf sends when `-r` has no `hostnqn:` (it copies
    // the transport ID's empty field over SPDK's default). Linux nvmet and SPDK's nvmf_tgt
    // accept it where any host is allowed, and so do we; a host list never matches it.
    let Some(hostnqn) = get_str(&d.hostnqn) else {
        return invalid_param(true, connect_offset::DATA_HOSTNQN);
    };
    if !sub.host_allowed(hostnqn) {
        return connect_err(
            connect_status::INVALID_HOST,
            true,
            connect_offset::DATA_HOSTNQN,
        );
    }
    let cntlid = d.cntlid.get();
    let ctrl = if qid == 0 {
        if cntlid != CNTLID_DYNAMIC {
            return invalid_param(true, connect_offset::DATA_CNTLID);
        }
        let Some(id) = ctx.shared.alloc_cntlid() else {
            return connect_err(connect_status::CONTROLLER_BUSY, false, 0);
        };
        let kato = c.kato.get();
        let ctrl = Arc::new(Controller::new(
            id,
            sub,
            hostnqn.to_owned(),
            d.hostid,
            kato,
            ctx.shared.limits,
            now,
        ));
        ctx.shared.controllers().insert(id, ctrl.clone());
        tracing::info!(cntlid = id, hostnqn, subnqn, "controller created");
        ctrl
    } else {
        if sub.discovery {
            return invalid_param(false, connect_offset::QID);
        }
        let found = ctx.shared.controllers().get(&cntlid).cloned();
        let Some(ctrl) = found
            .filter(|c| c.is_alive() && c.subsystem().nqn == sub.nqn && c.hostnqn() == hostnqn)
        else {
            return invalid_param(true, connect_offset::DATA_CNTLID);
        };
        if !ctrl.is_ready() {
            return Outcome::err(Status::COMMAND_SEQUENCE_ERROR, loc::OPCODE);
        }
        if qid > ctrl.lock().nsq_granted {
            return invalid_param(false, connect_offset::QID);
        }
        if ctrl.claim_io_queue(qid).is_err() {
            return connect_err(connect_status::CONTROLLER_BUSY, false, connect_offset::QID);
        }
        ctrl
    };
    let id = ctrl.cntlid();
    ctx.ctrl = Some(ctrl);
    ctx.stats.cntlid = id;
    Outcome::result(
        ConnectResponse::Success {
            cntlid: id,
            authreq: 0,
        }
        .to_result(),
    )
}

/// Admin commands on a connected, enabled controller.
pub(crate) fn execute(
    ctx: &mut QueueCtx,
    ctrl: &Arc<Controller>,
    cmd: &Sqe,
    data: &mut [u8],
    now: Instant,
) -> Outcome {
    match cmd.opcode() {
        admin_opc::IDENTIFY => identify(ctrl, cmd, data),
        admin_opc::GET_LOG_PAGE => get_log_page(ctx, ctrl, cmd, data),
        admin_opc::SET_FEATURES => set_features(ctrl, cmd, now),
        admin_opc::GET_FEATURES => get_features(ctrl, cmd),
        admin_opc::KEEP_ALIVE => {
            ctrl.keep_alive(now);
            Outcome::ok()
        }
        admin_opc::ASYNC_EVENT_REQUEST => {
            if ctx.aers >= AER_LIMIT {
                return Outcome::err(
                    Status::new(nvme::spec::sct::COMMAND_SPECIFIC, 0x05),
                    loc::OPCODE,
                );
            }
            Outcome {
                park: true,
                ..Outcome::ok()
            }
        }
        crate::direct::proto::OPC_DIRECT_ATTACH | crate::direct::proto::OPC_DIRECT_DETACH => {
            direct(ctx, ctrl, cmd)
        }
        _ => Outcome::err(Status::INVALID_OPCODE, loc::OPCODE),
    }
}

/// Identify CNS 05h: I/O command set specific Identify Namespace.
const CNS_CSI_NAMESPACE: u8 = 0x05;
/// Identify CNS 06h: I/O command set specific Identify Controller.
const CNS_CSI_CONTROLLER: u8 = 0x06;

fn copy_out(data: &mut [u8], bytes: &[u8]) -> Outcome {
    let n = data.len().min(bytes.len());
    data[..n].copy_from_slice(&bytes[..n]);
    data[n..].fill(0);
    Outcome::data(data.len())
}

fn identify(ctrl: &Controller, cmd: &Sqe, data: &mut [u8]) -> Outcome {
    let cns_v = cmd.cdw10.get() as u8;
    let sub = ctrl.subsystem();
    let nsid = cmd.nsid.get();
    match cns_v {
        cns::CONTROLLER => copy_out(data, identify_controller(ctrl).as_bytes()),
        _ if sub.discovery => Outcome::err(Status::INVALID_FIELD, loc::CDW10),
        cns::NAMESPACE => {
            if nsid == 0 || nsid == u32::MAX {
                return Outcome::err(Status::INVALID_NAMESPACE, loc::NSID);
            }
            let mut id = IdentifyNamespace::new_zeroed();
            if let Some(ns) = sub.namespace(nsid) {
                let blocks = ns.backend.block_count();
                id.nsze = U64::new(blocks);
                id.ncap = U64::new(blocks);
                id.nuse = U64::new(blocks);
                id.nsfeat = 1 << 2; // NGUID/EUI64 never reused
                id.nlbaf = 0;
                id.flbas = 0;
                id.nmic = 1; // may be shared by several controllers
                id.dlfeat = 1 | (1 << 3); // deallocated blocks read zeroes; WZ deallocate
                id.lbaf[0] = LbaFormat::new(ns.backend.block_size().trailing_zeros() as u8, 0);
                id.nguid = ns.nguid;
            }
            copy_out(data, id.as_bytes())
        }
        cns::ACTIVE_NS_LIST => {
            if nsid >= 0xffff_fffe {
                return Outcome::err(Status::INVALID_NAMESPACE, loc::NSID);
            }
            let mut list = [U32::new(0); 1024];
            for (slot, ns) in list
                .iter_mut()
                .zip(sub.namespaces().iter().filter(|n| n.nsid > nsid))
            {
                *slot = U32::new(ns.nsid);
            }
            copy_out(data, list.as_bytes())
        }
        cns::NS_ID_DESCRIPTORS => match sub.namespace(nsid) {
            Some(ns) => {
                let descs = [
                    NsIdDescriptor {
                        nidt: nidt::NGUID,
                        nid: ns.nguid.to_vec(),
                    },
                    NsIdDescriptor {
                        nidt: nidt::CSI,
                        nid: vec![0],
                    },
                ];
                copy_out(data, &build_ns_id_descriptors(&descs))
            }
            None => Outcome::err(Status::INVALID_NAMESPACE, loc::NSID),
        },
        // I/O Command Set specific Identify Namespace / Controller for the NVM command set
        // (CSI 0): every field we could report is zero (no PI, no extended LBA formats).
        CNS_CSI_NAMESPACE | CNS_CSI_CONTROLLER if cmd.cdw11.get() >> 24 == 0 => {
            if cns_v == CNS_CSI_NAMESPACE && sub.namespace(nsid).is_none() {
                return Outcome::err(Status::INVALID_NAMESPACE, loc::NSID);
            }
            copy_out(data, &[0u8; 4096])
        }
        _ => Outcome::err(Status::INVALID_FIELD, loc::CDW10),
    }
}

/// Identify Controller data for `ctrl`.
pub(crate) fn identify_controller(ctrl: &Controller) -> IdentifyController {
    let sub = ctrl.subsystem();
    let lim = ctrl.limits();
    let mut id = IdentifyController::zeroed();
    set_ascii_field(&mut id.sn, &sub.serial());
    set_ascii_field(&mut id.mn, &sub.model());
    set_ascii_field(&mut id.fr, env!("CARGO_PKG_VERSION"));
    id.rab = 6;
    id.cmic = 1 << 1; // several controllers per subsystem
    id.mdts = (lim.max_io_size / 4096).trailing_zeros() as u8;
    id.cntlid = U16::new(ctrl.cntlid());
    id.ver = U32::new(VERSION.0);
    id.cntrltype = if sub.discovery { 2 } else { 1 };
    id.acl = 3;
    id.aerl = (AER_LIMIT - 1) as u8;
    id.frmw = (1 << 1) | 1; // one firmware slot, read only
                            // Commands Supported and Effects log; extended data for Get Log Page (offsets).
    id.lpa = (1 << 1) | (1 << 2);
    id.elpe = (ERROR_LOG_ENTRIES - 1) as u8;
    id.kas = U16::new(10); // 100 ms units: 1 s granularity
    id.maxcmd = U16::new(lim.queue_depth);
    put_str(&mut id.subnqn, &sub.nqn);
    id.sgls = U32::new(1 | (1 << 2) | (1 << 20)); // SGLs, keyed data blocks, offsets
    id.msdbd = 1;
    if sub.discovery {
        id.oaes = U32::new(AEC_DISCOVERY_CHANGE);
        return id;
    }
    id.oaes = U32::new(AEC_NS_ATTR);
    id.sqes = 0x66;
    id.cqes = 0x44;
    id.nn = U32::new(sub.max_nsid());
    id.wctemp = U16::new(WCTEMP_KELVIN);
    id.cctemp = U16::new(CCTEMP_KELVIN);
    // Fused operations: none (FUSES 0); a fused command is refused with Invalid Field.
    id.oncs = U16::new(oncs::COMPARE | oncs::DSM | oncs::WRITE_ZEROES | oncs::SAVE_SELECT);
    id.vwc = if ctrl.has_volatile_cache() {
        1 | (3 << 1)
    } else {
        3 << 1
    };
    id.ioccsz = U32::new((64 + lim.in_capsule_data_size) / 16);
    id.iorcsz = U32::new(1);
    id
}

fn get_log_page(ctx: &QueueCtx, ctrl: &Controller, cmd: &Sqe, data: &mut [u8]) -> Outcome {
    let lid = cmd.cdw10.get() as u8;
    let rae = cmd.cdw10.get() & (1 << 15) != 0;
    let offset = u64::from(cmd.cdw12.get()) | (u64::from(cmd.cdw13.get()) << 32);
    if offset % 4 != 0 {
        return Outcome::err(Status::INVALID_FIELD, loc::CDW12);
    }
    let sub = ctrl.subsystem();
    // Each page is produced into a small fixed buffer except the discovery log, which is
    // produced entry by entry straight into the data buffer.
    let mut page = [0u8; 4096];
    let len = match (lid, sub.discovery) {
        (log::DISCOVERY, true) => return discovery_log(ctx, ctrl, offset, data),
        (log::ERROR, _) => {
            // This controller's errors (newest first), then the devices' (passed through).
            let mut entries: Vec<nvme::spec::ErrorLogEntry> =
                ctrl.lock().error_log.iter().copied().collect();
            entries.truncate(ERROR_LOG_ENTRIES);
            let room = ERROR_LOG_ENTRIES - entries.len();
            entries.extend(super::device_logs::errors(sub, room));
            for (i, e) in entries.iter().enumerate().take(page.len() / 64) {
                page[i * 64..(i + 1) * 64].copy_from_slice(e.as_bytes());
            }
            (entries.len() * 64).clamp(64, page.len())
        }
        (log::FIRMWARE_SLOT, false) => {
            let mut f = FirmwareSlotLog::new_zeroed();
            f.afi = 1; // running slot 1; next reset: the same (bits 6:4 zero)
            f.frs[0] = identify_controller(ctrl).fr;
            page[..512].copy_from_slice(f.as_bytes());
            512
        }
        (log::COMMANDS_SUPPORTED, false) => {
            // Command set specific (NVMe 2.0): CSI in CDW14 bits 31:24; only NVM (0).
            if cmd.cdw14.get() >> 24 != 0 {
                return Outcome::err(Status::INVALID_FIELD, loc::CDW14);
            }
            let mut e = CommandsEffectsLog::new_zeroed();
            for &(opc, fx) in ADMIN_COMMANDS {
                e.acs[usize::from(opc)] = U32::new(fx);
            }
            if ctx.shared.direct.get().is_some() {
                for opc in [
                    crate::direct::proto::OPC_DIRECT_ATTACH,
                    crate::direct::proto::OPC_DIRECT_DETACH,
                ] {
                    e.acs[usize::from(opc)] = U32::new(cse::CSUPP);
                }
            }
            for &(opc, fx) in IO_COMMANDS {
                e.iocs[usize::from(opc)] = U32::new(fx);
            }
            page.copy_from_slice(e.as_bytes());
            4096
        }
        (log::SMART, false) => {
            // The devices' health, combined (device_logs.rs); without a device, this
            // controller's own counters and a nominal temperature.
            let own_errors = u128::from(ctrl.lock().error_count);
            let mut s = match super::device_logs::smart(sub) {
                Some(mut s) => {
                    let n = s.num_error_log_entries.get().saturating_add(own_errors);
                    s.num_error_log_entries = U128::new(n);
                    s
                }
                None => {
                    let mut s = SmartLog::zeroed();
                    s.temperature = U16::new(COMPOSITE_TEMP_KELVIN);
                    s.avail_spare = 100;
                    s.spare_thresh = 10;
                    let st = &ctrl.stats;
                    let units = |b: u64| U128::new(u128::from(b.div_ceil(512_000)));
                    s.data_units_read = units(st.bytes_read.load(Ordering::Relaxed));
                    s.data_units_written = units(st.bytes_written.load(Ordering::Relaxed));
                    s.host_read_commands =
                        U128::new(st.read_commands.load(Ordering::Relaxed).into());
                    s.host_write_commands =
                        U128::new(st.write_commands.load(Ordering::Relaxed).into());
                    s.num_error_log_entries = U128::new(own_errors);
                    s
                }
            };
            {
                // The thresholds a host set with Set Features (FID 04h) apply to the
                // composite temperature we report.
                let st = ctrl.lock();
                let t = s.temperature.get();
                if t > st.temp_over || t < st.temp_under {
                    s.critical_warning |= 1 << 1; // temperature threshold condition
                }
            }
            page[..512].copy_from_slice(s.as_bytes());
            512
        }
        (log::CHANGED_NS_LIST, false) => {
            let mut st = ctrl.lock();
            for (i, id) in st.changed_ns.iter().enumerate().take(1024) {
                page[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
            }
            if !rae {
                st.changed_ns.clear();
            }
            4096
        }
        _ => return Outcome::err(Status::INVALID_LOG_PAGE, loc::CDW10),
    };
    if offset >= len as u64 && offset != 0 {
        return Outcome::err(Status::INVALID_FIELD, loc::CDW12);
    }
    copy_out(data, &page[offset as usize..len])
}

fn discovery_log(ctx: &QueueCtx, ctrl: &Controller, offset: u64, data: &mut [u8]) -> Outcome {
    let shared = &ctx.shared;
    let host = ctrl.hostnqn();
    let mut entries: Vec<DiscoveryLogEntry> = Vec::new();
    let subsystems = shared.subsystem_list();
    for (portid, l) in shared.listener_list().iter().enumerate() {
        for sub in subsystems
            .iter()
            .filter(|s| s.discovery || s.host_allowed(host))
        {
            let mut e = DiscoveryLogEntry::new_zeroed();
            e.trtype = match l.trtype {
                TrType::Rdma => TRTYPE_RDMA,
            };
            e.adrfam = addr_family(&l.address);
            e.subtype = if sub.discovery {
                SUBTYPE_CURRENT_DISCOVERY
            } else {
                SUBTYPE_NVME
            };
            e.treq = 0; // secure channel not specified
            e.portid = U16::new(portid as u16);
            e.cntlid = U16::new(CNTLID_DYNAMIC);
            e.asqsz = U16::new(32);
            put_str_space(&mut e.trsvcid, &l.port.to_string());
            put_str(&mut e.subnqn, &sub.nqn);
            put_str_space(&mut e.traddr, &l.address.to_string());
            e.tsas[0] = 1; // RDMA QP type: reliable connected
            e.tsas[1] = 1; // provider type: not specified
            e.tsas[2] = 1; // connection management: RDMA CM
            entries.push(e);
        }
    }
    let mut hdr = DiscoveryLogHeader::new_zeroed();
    hdr.genctr = U64::new(shared.discovery_genctr.load(Ordering::Relaxed));
    hdr.numrec = U64::new(entries.len() as u64);
    let total = 1024 * (1 + entries.len());
    if offset > total as u64 {
        return Outcome::err(Status::INVALID_FIELD, loc::CDW12);
    }
    // Copy the requested window [offset, offset + data.len()) of header + entries.
    let mut pos = 0usize;
    let want = offset as usize;
    for chunk in std::iter::once(hdr.as_bytes()).chain(entries.iter().map(|e| e.as_bytes())) {
        let (start, end) = (pos, pos + chunk.len());
        pos = end;
        let lo = want.max(start);
        let hi = (want + data.len()).min(end);
        if lo < hi {
            data[lo - want..hi - want].copy_from_slice(&chunk[lo - start..hi - start]);
        }
    }
    if want + data.len() > total {
        let from = total.saturating_sub(want).min(data.len());
        data[from..].fill(0);
    }
    Outcome::data(data.len())
}

/// Temperature Threshold (FID 04h) selection in CDW11: which threshold of which sensor.
/// Only the composite temperature (TMPSEL 0; 0Fh = all sensors, Set Features only) is
/// reported, so only it has thresholds. `Err` on another sensor or a reserved THSEL.
fn temp_threshold_sel(dw11: u32, set: bool) -> Result<bool, Outcome> {
    let tmpsel = (dw11 >> 16) & 0xf;
    let thsel = (dw11 >> 20) & 0x3;
    if !(tmpsel == 0 || (set && tmpsel == 0xf)) || thsel > 1 {
        return Err(Outcome::err(Status::INVALID_FIELD, loc::CDW11));
    }
    Ok(thsel == 0) // true: over temperature threshold
}

/// Whether feature `fid` exists on this controller.
fn feature_supported(ctrl: &Controller, fid: u8) -> bool {
    let io = !ctrl.subsystem().discovery;
    match fid {
        feat::KEEP_ALIVE_TIMER | feat::ASYNC_EVENT_CONFIG => true,
        feat::NUM_QUEUES | feat::TEMPERATURE_THRESHOLD => io,
        // Without a volatile write cache the feature does not exist (Identify VWC = 0).
        feat::VOLATILE_WRITE_CACHE => io && ctrl.has_volatile_cache(),
        _ => false,
    }
}

fn set_features(ctrl: &Controller, cmd: &Sqe, now: Instant) -> Outcome {
    let fid = cmd.cdw10.get() as u8;
    let dw11 = cmd.cdw11.get();
    if !feature_supported(ctrl, fid) {
        return Outcome::err(Status::INVALID_FIELD, loc::CDW10);
    }
    // Save (SV, CDW10 bit 31): no feature is saveable.
    if cmd.cdw10.get() >> 31 != 0 {
        return Outcome::err(Status::FEATURE_NOT_SAVEABLE, loc::CDW10);
    }
    let mut st = ctrl.lock();
    match fid {
        feat::NUM_QUEUES => {
            let (nsq, ncq) = ((dw11 & 0xffff) as u16, (dw11 >> 16) as u16);
            if nsq == 0xffff || ncq == 0xffff {
                return Outcome::err(Status::INVALID_FIELD, loc::CDW11);
            }
            let max = ctrl.limits().max_io_queues;
            let granted = (nsq.min(ncq) + 1).min(max);
            st.nsq_granted = granted;
            let g = u64::from(granted.saturating_sub(1));
            Outcome::result(g | (g << 16))
        }
        feat::KEEP_ALIVE_TIMER => {
            st.kato = Duration::from_millis(u64::from(dw11));
            st.last_keep_alive = now;
            Outcome::ok()
        }
        feat::ASYNC_EVENT_CONFIG => {
            st.aec = dw11;
            Outcome::ok()
        }
        feat::TEMPERATURE_THRESHOLD => {
            let over = match temp_threshold_sel(dw11, true) {
                Ok(o) => o,
                Err(o) => return o,
            };
            let t = dw11 as u16;
            if over {
                st.temp_over = t;
            } else {
                st.temp_under = t;
            }
            Outcome::ok()
        }
        feat::VOLATILE_WRITE_CACHE => {
            ctrl.set_write_cache(&mut st, dw11 & 1 != 0);
            Outcome::ok()
        }
        _ => Outcome::err(Status::INVALID_FIELD, loc::CDW10),
    }
}

/// Value of feature `fid` in `st` (CQE DW0); `default` gives the value at controller
/// creation instead of the current one.
fn feature_value(ctrl: &Controller, st: &CtrlState, fid: u8, dw11: u32, default: bool) -> Outcome {
    match fid {
        feat::NUM_QUEUES => {
            let n = if default {
                ctrl.limits().max_io_queues
            } else {
                st.nsq_granted
            };
            let g = u64::from(n.saturating_sub(1));
            Outcome::result(g | (g << 16))
        }
        feat::KEEP_ALIVE_TIMER => {
            let k = if default { st.kato_connect } else { st.kato };
            Outcome::result(k.as_millis() as u64)
        }
        feat::ASYNC_EVENT_CONFIG => Outcome::result(if default { 0 } else { u64::from(st.aec) }),
        feat::TEMPERATURE_THRESHOLD => match temp_threshold_sel(dw11, false) {
            Ok(true) => Outcome::result(u64::from(if default {
                WCTEMP_KELVIN
            } else {
                st.temp_over
            })),
            Ok(false) => Outcome::result(if default { 0 } else { u64::from(st.temp_under) }),
            Err(o) => o,
        },
        feat::VOLATILE_WRITE_CACHE => Outcome::result(u64::from(default || st.vwc_enabled)),
        _ => Outcome::err(Status::INVALID_FIELD, loc::CDW10),
    }
}

/// Get Features with the Select field (CDW10 bits 10:8): current, default, saved (no
/// feature is saveable, so the default) or supported capabilities (every feature we have
/// is changeable, none saveable, none namespace specific).
fn get_features(ctrl: &Controller, cmd: &Sqe) -> Outcome {
    let fid = cmd.cdw10.get() as u8;
    let sel = ((cmd.cdw10.get() >> 8) & 7) as u8;
    if !feature_supported(ctrl, fid) {
        return Outcome::err(Status::INVALID_FIELD, loc::CDW10);
    }
    let st = ctrl.lock();
    match sel {
        feat_sel::CURRENT => feature_value(ctrl, &st, fid, cmd.cdw11.get(), false),
        feat_sel::DEFAULT | feat_sel::SAVED => feature_value(ctrl, &st, fid, cmd.cdw11.get(), true),
        feat_sel::SUPPORTED_CAPABILITIES => Outcome::result(u64::from(feat_sel::CAP_CHANGEABLE)),
        _ => Outcome::err(Status::INVALID_FIELD, loc::CDW10),
    }
}

/// Direct-mode attach/detach (vendor specific; see `docs/direct-mode.md`). An attach is
/// handed to the provider and answered later ([`direct_reply`]): the request waits in
/// AWAIT_REPLY for `ctx.reply`.
fn direct(ctx: &mut QueueCtx, ctrl: &Controller, cmd: &Sqe) -> Outcome {
    use crate::direct::proto;
    let Some(provider) = ctx.shared.direct.get() else {
        return Outcome::err(Status::INVALID_OPCODE, loc::OPCODE);
    };
    let sub = ctrl.subsystem();
    if cmd.opcode() == proto::OPC_DIRECT_ATTACH {
        let (reply, pending) = crate::direct::attach_reply(ctx.wake.clone());
        provider.attach(
            &sub.nqn,
            ctrl.hostnqn(),
            cmd.nsid.get(),
            proto::AttachRequest::from_sqe(cmd),
            reply,
        );
        ctx.reply = Some(pending);
        return Outcome::ok();
    }
    provider
        .detach(ctrl.hostnqn(), proto::detach_token(cmd))
        .map_or_else(|st| Outcome::err(st, loc::OPCODE), |()| Outcome::ok())
}

/// The outcome of an attach once its provider answered: the descriptor copied into the
/// command's data buffer, or the status.
pub(crate) fn direct_reply(r: crate::direct::AttachResult, data: &mut [u8]) -> Outcome {
    match r {
        Ok(d) => copy_out(data, d.as_bytes()),
        Err(st) => Outcome::err(st, loc::OPCODE),
    }
}
