//! Userspace NVMe-oF/RDMA initiator smoke/perf tool on the `transport` initiator core:
//!
//! `rdma_perf ADDR:PORT SUBNQN [QD] [SECONDS] [BLOCK_BYTES] [read|write]`
//!
//! Connects an admin and one I/O queue (Connect data by keyed SGL, as Linux does),
//! enables the controller, identifies it, verifies a write/read round trip, then runs
//! random I/O at queue depth QD and prints IOPS, MiB/s and latency percentiles as JSON.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nvme::spec::{cns, reg, IdentifyController, IdentifyNamespace};
use transport::fabrics::{SglDescriptor, CNTLID_DYNAMIC};
use transport::initiator::{cmd, execute, InitiatorQueue};
use transport::nvmf_rdma::RdmaHost;
use zerocopy::{FromBytes, IntoBytes};

const T: Duration = Duration::from_secs(10);
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5eed0000-0000-4000-8000-00000000cafe";

fn main() {
    if let Err(e) = run() {
        eprintln!("rdma_perf: {e}");
        std::process::exit(1);
    }
}

fn keyed(buf: &rdma::RegisteredBuffer, off: usize, len: usize) -> SglDescriptor {
    let r = buf.mr().remote(off);
    SglDescriptor::keyed(r.addr, len as u32, r.rkey, false)
}

fn run() -> transport::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 2 {
        eprintln!("usage: rdma_perf ADDR:PORT SUBNQN [QD] [SECONDS] [BLOCK_BYTES] [read|write]");
        std::process::exit(2);
    }
    let dst: SocketAddr = a[0].parse().expect("ADDR:PORT");
    let subnqn = &a[1];
    let qd: u16 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let secs: u64 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let bs: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let write = a.get(5).is_some_and(|s| s == "write");

    // Admin queue.
    let host = RdmaHost::connect(dst, 0, 32, 0, T)?;
    let abuf = host.register(8192)?;
    let mut admin = InitiatorQueue::new(host, 0, 31);
    let data = cmd::connect_data([7; 16], CNTLID_DYNAMIC, subnqn, HOSTNQN);
    abuf.write(0, data.as_bytes()).expect("buffer");
    let c = execute(
        &mut admin,
        cmd::connect(0, 31, 30_000, keyed(&abuf, 0, 1024)),
        &[],
        T,
    )?;
    let cntlid = c.cqe.dw0.get() as u16;
    let cc = 1 | (6 << 16) | (4 << 20);
    execute(&mut admin, cmd::property_set(reg::CC as u32, cc), &[], T)?;
    let start = Instant::now();
    while execute(
        &mut admin,
        cmd::property_get(reg::CSTS as u32, false),
        &[],
        T,
    )?
    .cqe
    .dw0
    .get()
        & 1
        == 0
    {
        if start.elapsed() > T {
            eprintln!("controller never became ready");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    execute(
        &mut admin,
        cmd::identify(cns::CONTROLLER, 0, keyed(&abuf, 0, 4096)),
        &[],
        T,
    )?;
    let mut raw = vec![0u8; 4096];
    abuf.read(0, &mut raw).expect("buffer");
    let id = IdentifyController::read_from_bytes(&raw[..]).expect("4096 bytes");
    execute(
        &mut admin,
        cmd::identify(cns::NAMESPACE, 1, keyed(&abuf, 0, 4096)),
        &[],
        T,
    )?;
    abuf.read(0, &mut raw).expect("buffer");
    let ns = IdentifyNamespace::read_from_bytes(&raw[..]).expect("4096 bytes");
    let lba = ns.block_size() as usize;
    let blocks = ns.nsze.get();
    if lba < 512 || !bs.is_multiple_of(lba) {
        eprintln!("namespace 1 reports a {lba}-byte block; cannot run {bs}-byte I/O");
        std::process::exit(1);
    }
    eprintln!(
        "connected cntlid {cntlid}: model '{}' serial '{}' mdts {} ioccsz {} sgls {:#x}; ns1 {} x {} B",
        id.model(), id.serial(), id.mdts, id.ioccsz.get(), id.sgls.get(), blocks, lba
    );
    execute(&mut admin, cmd::set_num_queues(1), &[], T)?;

    // I/O queue.
    let io_host = RdmaHost::connect(dst, 1, qd + 1, 0, T)?;
    let buf = io_host.register(usize::from(qd) * bs + 4096)?;
    let mut io = InitiatorQueue::new(io_host, 1, qd);
    let data = cmd::connect_data([7; 16], cntlid, subnqn, HOSTNQN);
    buf.write(0, data.as_bytes()).expect("buffer");
    execute(
        &mut io,
        cmd::connect(1, qd, 0, keyed(&buf, 0, 1024)),
        &[],
        T,
    )?;

    // Round trip check.
    let nlb = (bs / lba) as u16;
    let pattern: Vec<u8> = (0..bs).map(|i| (i * 7 + 3) as u8).collect();
    buf.write(0, &pattern).expect("buffer");
    execute(&mut io, cmd::write(1, 8, nlb, keyed(&buf, 0, bs)), &[], T)?;
    buf.write(0, &vec![0u8; bs]).expect("buffer");
    execute(&mut io, cmd::read(1, 8, nlb, keyed(&buf, 0, bs)), &[], T)?;
    let mut back = vec![0u8; bs];
    buf.read(0, &mut back).expect("buffer");
    assert_eq!(back, pattern, "read-back mismatch");
    eprintln!("write/read round trip verified");

    // Random I/O at QD.
    let span = blocks
        .min((1u64 << 30) / lba as u64)
        .saturating_sub(u64::from(nlb))
        .max(1);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let next = |rng: &mut u64| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        (*rng % span) / u64::from(nlb) * u64::from(nlb)
    };
    let end = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut done = 0u64;
    let mut errors = 0u64;
    for slot in 0..u64::from(qd) {
        let lba0 = next(&mut rng);
        let d = keyed(&buf, slot as usize * bs, bs);
        let sqe = if write {
            cmd::write(1, lba0, nlb, d)
        } else {
            cmd::read(1, lba0, nlb, d)
        };
        io.submit(sqe, &[], slot)?;
    }
    while io.outstanding() > 0 {
        let Some(c) = io.poll_one() else { continue };
        done += 1;
        if !c.status().is_success() {
            errors += 1;
        }
        if Instant::now() < end {
            let lba0 = next(&mut rng);
            let d = keyed(&buf, c.user as usize * bs, bs);
            let sqe = if write {
                cmd::write(1, lba0, nlb, d)
            } else {
                cmd::read(1, lba0, nlb, d)
            };
            io.submit(sqe, &[], c.user)?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = &io.histogram;
    let us = |p: f64| h.percentile(p).as_secs_f64() * 1e6;
    println!(
        "{{\"target\":\"{dst}\",\"rw\":\"{}\",\"qd\":{qd},\"bs\":{bs},\"ios\":{done},\"errors\":{errors},\"iops\":{:.0},\"mib_s\":{:.2},\"p50_us\":{:.0},\"p99_us\":{:.0},\"max_us\":{:.0}}}",
        if write { "randwrite" } else { "randread" },
        done as f64 / elapsed,
        done as f64 * bs as f64 / elapsed / 1048576.0,
        us(50.0),
        us(99.0),
        h.max().as_secs_f64() * 1e6
    );
    Ok(())
}
