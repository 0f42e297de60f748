//! Host-side criterion benches of per-I/O hot paths that need no device (docs/bench.md):
//!
//! - `capsule_parse`: the target's decode of a received command capsule — the SQE read
//!   from the receive buffer, the checks of `nvmf_target/queue.rs`'s `parse` on FUSE / PSDT
//!   / opcode, and the SGL descriptor decode (`fabrics::SglDescriptor::decode`), for a keyed
//!   read and an in-capsule write. (`parse` itself is private to the queue; this runs the
//!   same public pieces in the same order.)
//! - `sqe_build`: `nvme::spec::Sqe` builders as the VFIO driver uses them (PRPs) and the
//!   initiator's `initiator::cmd` builders (keyed SGL).
//! - `wr_chain`: `rdma::SendBatch` of a read's response as serve posts it (data WRITE +
//!   response SEND in one chain) and a 32-WR chain of SENDs; no verbs call.
//!
//! `cargo bench -p nvmf-p2p-benches --bench hot_paths` (the `bench` profile: thin LTO,
//! one codegen unit). CQ polling over the simulator is in `nvme_sim.rs`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nvme::spec::Sqe;
use rdma::{RemoteAddr, SendBatch, SendFlags, Sge, WrId};
use transport::fabrics::{DataSgl, SglDescriptor};
use transport::initiator::cmd;
use zerocopy::{FromBytes, IntoBytes};

/// A received capsule: the 64-byte SQE, then in-capsule data.
fn capsule(sqe: &Sqe) -> [u8; 64 + 4096] {
    let mut b = [0u8; 64 + 4096];
    b[..64].copy_from_slice(sqe.as_bytes());
    b
}

/// What the target decides from the bytes: opcode, data direction bytes, SGL.
fn parse(bytes: &[u8]) -> Option<(u8, DataSgl)> {
    let (cmd, _icd) = Sqe::read_from_prefix(bytes).ok()?;
    if cmd.fuse() != 0 || cmd.psdt() != 1 {
        return None;
    }
    let desc = SglDescriptor::read_from_bytes(&cmd.as_bytes()[24..40]).unwrap_or_default();
    desc.decode().ok().map(|s| (cmd.opcode(), s))
}

fn capsule_parse(c: &mut Criterion) {
    let read = capsule(&cmd::read(
        1,
        7,
        8,
        SglDescriptor::keyed(0x7f00_0000_1000, 4096, 0x1234, false),
    ));
    let write = capsule(&cmd::write(1, 7, 8, SglDescriptor::in_capsule(0, 4096)));
    // the benches time the accepting path
    assert!(matches!(
        parse(&read),
        Some((_, DataSgl::Keyed { len: 4096, .. }))
    ));
    assert!(matches!(
        parse(&write),
        Some((_, DataSgl::InCapsule { len: 4096, .. }))
    ));
    let mut g = c.benchmark_group("hot_paths/capsule_parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("read_keyed", |b| b.iter(|| parse(black_box(&read[..]))));
    g.bench_function("write_in_capsule", |b| {
        b.iter(|| parse(black_box(&write[..])))
    });
    g.finish();
}

fn sqe_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_paths/sqe_build");
    g.throughput(Throughput::Elements(1));
    g.bench_function("spec_read_prp", |b| {
        let mut cid = 0u16;
        b.iter(|| {
            cid = cid.wrapping_add(1);
            let mut s = Sqe::read(
                black_box(1),
                black_box(42),
                black_box(7),
                black_box(0x1000),
                0,
            );
            s.set_cid(cid);
            s
        })
    });
    g.bench_function("initiator_write_keyed", |b| {
        b.iter(|| {
            cmd::with_cid(
                cmd::write(
                    black_box(1),
                    black_box(42),
                    black_box(8),
                    SglDescriptor::keyed(black_box(0x7f00_0000_1000), 4096, 0x1234, false),
                ),
                black_box(9),
            )
        })
    });
    g.finish();
}

fn wr_chain(c: &mut Criterion) {
    let data = Sge {
        addr: 0x7f00_0000_1000,
        len: 4096,
        lkey: 0x11,
    };
    let rsp = Sge {
        addr: 0x7f00_0010_0000,
        len: 16,
        lkey: 0x11,
    };
    let remote = RemoteAddr {
        addr: 0x5500_0000_2000,
        rkey: 0x22,
    };
    let mut g = c.benchmark_group("hot_paths/wr_chain");
    g.throughput(Throughput::Elements(1));
    g.bench_function("read_response_write_send", |b| {
        let mut batch = SendBatch::<4>::new();
        b.iter(|| {
            batch.clear();
            batch
                .write(WrId::new(1, 7), black_box(data), remote, SendFlags::NONE)
                .and_then(|b| b.send(WrId::new(2, 7), Some(black_box(rsp)), SendFlags::SIGNALED))
                .expect("room for two WRs");
            black_box(batch.len())
        })
    });
    g.throughput(Throughput::Elements(32));
    g.bench_function("sends_32", |b| {
        let mut batch = SendBatch::<32>::new();
        b.iter(|| {
            batch.clear();
            for i in 0..32u32 {
                batch
                    .send(WrId::new(2, i), Some(black_box(rsp)), SendFlags::NONE)
                    .expect("room for 32 WRs");
            }
            black_box(batch.len())
        })
    });
    g.finish();
}

criterion_group!(benches, capsule_parse, sqe_build, wr_chain);
criterion_main!(benches);
