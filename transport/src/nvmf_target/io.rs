//! NVM I/O commands: Read, Write, Compare, Flush, Write Zeroes, Dataset Management —
//! the one executor for both kinds of namespace backend.
//!
//! [`start`] runs a command on the namespace's asynchronous channel in this poll group
//! when it has one and the command suits it (Read/Write with the data in a buffer of the
//! DMA pool, Flush, Write Zeroes), else on the backend's synchronous methods. Either way
//! the namespace's counters are updated once, when the command is issued, and
//! [`complete`] — the one completion path — updates the controller's counters and makes
//! the outcome: at once for the synchronous path, or when the channel reports the command
//! done (`QueueHandler::backend_done`). Ranges were checked once, by `parse` (`io_shape`:
//! Read, Write, Compare, Write Zeroes); Dataset Management's ranges, which are data, here.

use std::sync::Arc;

use nvme::spec::{dsm, io_opc, DsmRange, Sqe, Status};
use zerocopy::FromBytes;

use super::controller::Controller;
use super::queue::{loc, Channel, Data, Outcome, QueueStats};
use super::{Namespace, Subsystem, Target, TargetShared};
use crate::backend::{AsyncOp, Fault, SubmitError};
use crate::error::Error;
use crate::pool::BufferPool;

/// What [`start`] did with an I/O command.
pub(crate) enum Started {
    /// Finished (synchronously, or refused): complete the request with this.
    Done(Outcome),
    /// In the namespace's asynchronous channel; its completion comes back through
    /// [`complete`].
    InDevice,
    /// Channel full or no buffer for in-capsule data: try again on a later pass.
    Wait,
}

/// Where [`start`] sends a command.
enum Route {
    /// The backend's synchronous methods.
    Sync,
    /// Handed to the channel (or refused by it: `Err`).
    Channel(Result<(), SubmitError>),
    /// Not now (see [`Started::Wait`]).
    Wait,
}

/// Starts I/O command `cmd` whose data (if any) is `data` (`icd`: the request's in-capsule
/// data). `chans` are the poll group's asynchronous channels (none while backend I/O is
/// held), `key` the tag their completion carries. A synchronous command failing with a
/// device fault (a timeout, a fatal controller) goes to the target's recovery, as a
/// channel's does (`IoChannel::check_health`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    shared: &Arc<TargetShared>,
    ctrl: &Controller,
    cmd: &Sqe,
    data: &mut Data,
    icd: &mut [u8],
    pool: &mut BufferPool,
    chans: &mut [Channel],
    key: u64,
    stats: &mut QueueStats,
) -> Started {
    let sub = ctrl.subsystem();
    let nsid = cmd.nsid.get();
    let opc = cmd.opcode();
    if opc == io_opc::FLUSH && nsid == u32::MAX {
        return Started::Done(flush_all(shared, sub));
    }
    let Some(ns) = sub.namespace(nsid) else {
        return Started::Done(Outcome::err(Status::INVALID_NAMESPACE, loc::NSID));
    };
    let route = if chans.is_empty() {
        Route::Sync
    } else {
        route(ctrl, &ns, cmd, data, icd, pool, chans, key, stats)
    };
    let len = data.len();
    match route {
        Route::Wait => Started::Wait,
        Route::Channel(Ok(())) => {
            ns.stats.count(opc, len as u64);
            stats.backend_commands += 1;
            Started::InDevice
        }
        Route::Channel(Err(SubmitError::Busy)) => {
            stats.backend_busy += 1;
            Started::Wait
        }
        Route::Channel(Err(SubmitError::Failed(status))) => {
            ns.stats.count(opc, len as u64);
            Started::Done(complete(ctrl, cmd, len, Outcome::failed(status)))
        }
        Route::Sync => {
            ns.stats.count(opc, len as u64);
            // SAFETY: the request is in EXECUTING (its data transfer done, none posted)
            // and this command goes to no channel.
            let bytes = unsafe { data.bytes_mut(icd) };
            let out = execute(shared, ctrl, &ns, cmd, bytes);
            Started::Done(complete(ctrl, cmd, len, out))
        }
    }
}

/// The one completion path of I/O commands: counts a successful Read/Write of `len`
/// bytes on the controller and makes `out` the command's outcome (a Read's data goes to
/// the host).
pub(crate) fn complete(ctrl: &Controller, cmd: &Sqe, len: usize, out: Outcome) -> Outcome {
    if !out.status.is_success() {
        return out;
    }
    ctrl.stats.count(cmd.opcode(), len as u64);
    if cmd.opcode() == io_opc::READ {
        Outcome::data(len)
    } else {
        out
    }
}

/// Picks the asynchronous channel for `cmd`, when there is one and it suits, and submits.
/// Read/Write data is the request's pool buffer, handed to the device as is (zero copy);
/// in-capsule write data (host memory the device cannot reach) is copied into a pool
/// buffer first.
#[allow(clippy::too_many_arguments)]
fn route(
    ctrl: &Controller,
    ns: &Namespace,
    cmd: &Sqe,
    data: &mut Data,
    icd: &[u8],
    pool: &mut BufferPool,
    chans: &mut [Channel],
    key: u64,
    stats: &mut QueueStats,
) -> Route {
    let opc = cmd.opcode();
    if !matches!(
        opc,
        io_opc::READ | io_opc::WRITE | io_opc::FLUSH | io_opc::WRITE_ZEROES
    ) {
        return Route::Sync;
    }
    // Write-through (the host disabled the volatile write cache): the synchronous path
    // flushes after the write.
    if matches!(opc, io_opc::WRITE | io_opc::WRITE_ZEROES)
        && ctrl.write_through()
        && ns.backend.volatile_write_cache()
    {
        return Route::Sync;
    }
    let id = super::queue::backend_id(&ns.backend);
    let Some(ch) = chans.iter_mut().find(|c| c.backend == id) else {
        return Route::Sync;
    };
    let nlb = u32::from(cmd.nlb0()) + 1;
    let slba = cmd.slba();
    let op = match opc {
        io_opc::FLUSH => return Route::Channel(ch.chan.submit(key, AsyncOp::Flush)),
        io_opc::WRITE_ZEROES => {
            return Route::Channel(ch.chan.submit(key, AsyncOp::WriteZeroes { slba, nlb }))
        }
        _ => opc,
    };
    let len = nlb as usize * ns.backend.block_size() as usize;
    if len > ch.max_transfer || !pool.is_dma() {
        return Route::Sync;
    }
    if let Data::InCapsule { offset, len: l } = *data {
        if l != len || op != io_opc::WRITE {
            return Route::Sync;
        }
        let Some(mut buf) = pool.alloc_io() else {
            stats.buffer_waits += 1;
            return Route::Wait;
        };
        // SAFETY: `buf` was just taken from the pool: nothing else has it.
        unsafe { buf.bytes_mut(len) }.copy_from_slice(&icd[offset..offset + len]);
        *data = Data::Pool { buf, len };
    }
    let Data::Pool { buf, len: l } = &*data else {
        return Route::Sync;
    };
    let Some(buf) = (*l == len).then(|| pool.dma(buf, len)).flatten() else {
        return Route::Sync;
    };
    let op = if op == io_opc::READ {
        AsyncOp::Read {
            slba,
            nlb,
            buf: &buf,
        }
    } else {
        AsyncOp::Write {
            slba,
            nlb,
            buf: &buf,
        }
    };
    Route::Channel(ch.chan.submit(key, op))
}

fn flush_all(shared: &Arc<TargetShared>, sub: &Subsystem) -> Outcome {
    for ns in sub.namespaces() {
        if let Err(e) = ns.backend.flush() {
            tracing::warn!(error = %e, "flush");
            report(shared, &ns, &e);
            return Outcome::err(Status::WRITE_FAULT, loc::OPCODE);
        }
    }
    Outcome::ok()
}

fn backend_status(e: &Error, write: bool) -> Status {
    match e {
        Error::LbaOutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        _ if write => Status::WRITE_FAULT,
        _ => Status::UNRECOVERED_READ_ERROR,
    }
}

/// Hands a device fault behind `e` (a failed synchronous command of `ns`) to the target's
/// recovery.
fn report(shared: &Arc<TargetShared>, ns: &Namespace, e: &Error) {
    if let Some(fault) = Fault::of(e) {
        let target = Target {
            shared: shared.clone(),
        };
        target.report_fault(super::queue::backend_id(&ns.backend), fault);
    }
}

/// Runs an I/O command on `ns`'s synchronous methods with its data (if any) in `data`.
fn execute(
    shared: &Arc<TargetShared>,
    ctrl: &Controller,
    ns: &Namespace,
    cmd: &Sqe,
    data: &mut [u8],
) -> Outcome {
    let b = &*ns.backend;
    let res = match cmd.opcode() {
        io_opc::READ => b.read(cmd.slba(), data).map(|_| Outcome::ok()),
        io_opc::WRITE => b.write(cmd.slba(), data).map(|_| Outcome::ok()),
        io_opc::COMPARE => compare(b, cmd.slba(), data),
        io_opc::FLUSH => b.flush().map(|_| Outcome::ok()),
        io_opc::WRITE_ZEROES => {
            // Deallocate bit (CDW12 bit 25): zeroes either way.
            b.write_zeroes(cmd.slba(), u64::from(cmd.nlb0()) + 1)
                .map(|_| Outcome::ok())
        }
        io_opc::DATASET_MANAGEMENT => {
            if cmd.cdw11.get() & dsm::DEALLOCATE == 0 {
                return Outcome::ok(); // integral read/write hints only: nothing to do
            }
            for chunk in data.chunks_exact(16) {
                let Ok(r) = DsmRange::read_from_bytes(chunk) else {
                    continue;
                };
                let (slba, nlb) = (r.slba.get(), u64::from(r.nlb.get()));
                if slba.checked_add(nlb).is_none_or(|e| e > b.block_count()) {
                    return Outcome::err(Status::LBA_OUT_OF_RANGE, loc::SGL);
                }
            }
            let mut res = Ok(Outcome::ok());
            for chunk in data.chunks_exact(16) {
                let Ok(r) = DsmRange::read_from_bytes(chunk) else {
                    continue;
                };
                if r.nlb.get() > 0 {
                    if let Err(e) = b.deallocate(r.slba.get(), u64::from(r.nlb.get())) {
                        res = Err(e);
                        break;
                    }
                }
            }
            res
        }
        _ => return Outcome::err(Status::INVALID_OPCODE, loc::OPCODE),
    };
    // Write-through when the host disabled the volatile write cache: the data is durable
    // before the command completes.
    let changed = matches!(
        cmd.opcode(),
        io_opc::WRITE | io_opc::WRITE_ZEROES | io_opc::DATASET_MANAGEMENT
    );
    let res = match res {
        Ok(o) if changed && ctrl.write_through() && b.volatile_write_cache() => {
            b.flush().map(|_| o)
        }
        r => r,
    };
    res.unwrap_or_else(|e| {
        tracing::warn!(error = %e, nsid = ns.nsid, "backend I/O failed");
        report(shared, ns, &e);
        Outcome::err(backend_status(&e, cmd.opcode() != io_opc::READ), loc::CDW10)
    })
}

/// Compare: reads the blocks at `slba` a few at a time into a stack buffer (a larger
/// block than that takes one heap buffer) and compares them with the host's `data`.
fn compare(
    b: &dyn crate::backend::Backend,
    slba: u64,
    data: &[u8],
) -> crate::error::Result<Outcome> {
    let bs = b.block_size() as usize;
    let mut stack = [0u8; 4096];
    let mut heap = Vec::new();
    let scratch: &mut [u8] = if bs <= stack.len() {
        &mut stack[..4096 / bs * bs]
    } else {
        heap.resize(bs, 0);
        &mut heap
    };
    let mut lba = slba;
    for chunk in data.chunks(scratch.len()) {
        let got = &mut scratch[..chunk.len()];
        b.read(lba, got)?;
        if got != chunk {
            return Ok(Outcome::err(Status::COMPARE_FAILURE, loc::CDW10));
        }
        lba += (chunk.len() / bs) as u64;
    }
    Ok(Outcome::ok())
}
