//! NVM I/O commands: Read, Write, Flush, Write Zeroes, Dataset Management.

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
    let res = match cmd.opcode() {
        io_opc::READ => b.read(cmd.slba(), data).map(|_| Outcome::data(data.len())),
        io_opc::WRITE => b.write(cmd.slba(), data).map(|_| Outcome::ok()),
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
    res.unwrap_or_else(|e| {
        tracing::warn!(error = %e, nsid, "backend I/O failed");
        Outcome::err(backend_status(&e, cmd.opcode() != io_opc::READ), loc::CDW10)
    })
}
