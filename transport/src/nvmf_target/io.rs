//! NVM I/O commands: Read, Write, Compare, Flush, Write Zeroes, Dataset Management.

use nvme::spec::{dsm, io_opc, DsmRange, Sqe, Status};
use zerocopy::FromBytes;

use super::controller::Controller;
use super::queue::{loc, Outcome};
use crate::error::Error;

fn backend_status(e: &Error, write: bool) -> Status {
    match e {
        Error::LbaOutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        _ if write => Status::WRITE_FAULT,
        _ => Status::UNRECOVERED_READ_ERROR,
    }
}

/// Executes an I/O command whose data (if any) is in `data`. Parsing already checked
/// the opcode, namespace, LBA range of Read/Write and the data length.
pub(crate) fn execute(ctrl: &Controller, cmd: &Sqe, data: &mut [u8]) -> Outcome {
    let sub = ctrl.subsystem();
    let nsid = cmd.nsid.get();
    if cmd.opcode() == io_opc::FLUSH && nsid == u32::MAX {
        for ns in sub.namespaces() {
            if let Err(e) = ns.backend.flush() {
                tracing::warn!(error = %e, "flush");
                return Outcome::err(Status::WRITE_FAULT, loc::OPCODE);
            }
        }
        return Outcome::ok();
    }
    let Some(ns) = sub.namespace(nsid) else {
        return Outcome::err(Status::INVALID_NAMESPACE, loc::NSID);
    };
    let b = &*ns.backend;
    ns.stats.count(cmd.opcode(), data.len() as u64);
    let res = match cmd.opcode() {
        io_opc::READ => b.read(cmd.slba(), data).map(|_| Outcome::data(data.len())),
        io_opc::WRITE => b.write(cmd.slba(), data).map(|_| Outcome::ok()),
        io_opc::COMPARE => compare(b, cmd.slba(), data),
        io_opc::FLUSH => b.flush().map(|_| Outcome::ok()),
        io_opc::WRITE_ZEROES => {
            let nlb = u64::from(cmd.nlb0()) + 1;
            let end = cmd.slba().checked_add(nlb);
            if end.is_none_or(|e| e > b.block_count()) {
                return Outcome::err(Status::LBA_OUT_OF_RANGE, loc::CDW10);
            }
            // Deallocate bit (CDW12 bit 25): zeroes either way.
            b.write_zeroes(cmd.slba(), nlb).map(|_| Outcome::ok())
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
        tracing::warn!(error = %e, nsid, "backend I/O failed");
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
