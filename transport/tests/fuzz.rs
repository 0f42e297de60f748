//! Random capsules never panic the target, and the queue keeps answering.

mod common;

use std::time::Instant;

use common::*;
use nvme::spec::{Cqe, Sqe};
use proptest::prelude::*;
use transport::initiator::cmd;
use transport::loopback::LoopbackHost;
use zerocopy::{FromBytes, IntoBytes};

#[derive(Debug, Clone)]
struct Capsule {
    cmd: [u8; 64],
    icd_len: usize,
    admin: bool,
}

fn capsule() -> impl Strategy<Value = Capsule> {
    let opcodes = prop::sample::select(vec![
        0x00u8, 0x01, 0x02, 0x04, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18, 0x7f, 0xff,
    ]);
    (
        prop::array::uniform32(any::<u8>()),
        prop::array::uniform32(any::<u8>()),
        any::<bool>(),
        opcodes,
        0usize..10_000,
        any::<bool>(),
        prop::sample::select(vec![0x00u8, 0x01, 0x40, 0x4f, 0x20, 0x5a]),
    )
        .prop_map(|(a, b, structured, opc, icd_len, admin, sgl_id)| {
            let mut cmd = [0u8; 64];
            cmd[..32].copy_from_slice(&a);
            cmd[32..].copy_from_slice(&b);
            if structured {
                cmd[0] = opc;
                cmd[1] = 0x40; // PSDT = SGL, no fuse
                cmd[4..8].copy_from_slice(&1u32.to_le_bytes()); // nsid 1
                cmd[39] = sgl_id;
                // Keep lengths/LBAs small sometimes so commands reach execution.
                cmd[34] = 0;
                cmd[44..48].fill(0);
                cmd[41] &= 0x0f;
                cmd[48] &= 0x1f;
                cmd[49] = 0;
            }
            Capsule {
                cmd,
                icd_len,
                admin,
            }
        })
}

fn responses(h: &LoopbackHost) -> Vec<Cqe> {
    std::iter::from_fn(|| h.recv().map(|(c, _)| c)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn random_capsules_never_break_the_target(caps in prop::collection::vec(capsule(), 1..12)) {
        let mut rig = Rig::default_rig();
        rig.frozen = Some(Instant::now());
        let (mut admin, cntlid) = rig.admin(0);
        let mut io = rig.io(1, cntlid);
        let region = io.wire().register(256 * 1024);
        let mut parked = 0usize;
        for (i, c) in caps.iter().enumerate() {
            let mut cmd = c.cmd;
            let cid = 0x8000 + i as u16;
            cmd[2..4].copy_from_slice(&cid.to_le_bytes());
            let icd = vec![0xa5u8; c.icd_len];
            let q = if c.admin { &mut admin } else { &mut io };
            q.wire().send(&cmd, &icd).unwrap();
            rig.pump();
            let got = responses(q.wire());
            if c.admin {
                prop_assert!(got.len() <= 1 + parked, "at most this capsule and released AERs");
                if got.iter().all(|r| r.cid.get() != cid) {
                    // Held (an Asynchronous Event Request).
                    prop_assert_eq!(cmd[0], 0x0c);
                    parked += 1;
                }
            } else {
                prop_assert_eq!(got.len(), 1, "exactly one response on the I/O queue");
                prop_assert_eq!(got[0].cid.get(), cid);
                prop_assert_eq!(got[0].sq_id.get(), 1);
            }
        }
        // Both queues still answer.
        let c = rig.exec(&mut admin, cmd::keep_alive(), &[]);
        prop_assert!(c.cqe.cid.get() < 0x8000);
        let rd = Sqe::read_from_bytes(
            cmd::read(1, 0, 1, transport::fabrics::SglDescriptor::keyed(region.addr, 512, region.key, false)).as_bytes(),
        ).unwrap();
        let c = rig.exec(&mut io, rd, &[]);
        prop_assert!(c.status().is_success(), "read after fuzz: {}", c.status());
        prop_assert_eq!(rig.group.queue_count(), 2);
    }

    #[test]
    fn random_capsules_before_connect(caps in prop::collection::vec(capsule(), 1..8)) {
        let mut rig = Rig::default_rig();
        rig.frozen = Some(Instant::now());
        let q = rig.open(0, 32);
        for c in &caps {
            q.wire().send(&c.cmd, &vec![0u8; c.icd_len]).unwrap();
            rig.pump();
            // A random Connect that succeeds turns the queue into an admin queue; either
            // way every capsule gets exactly one answer until then.
            let got = responses(q.wire());
            prop_assert!(got.len() <= 1);
        }
        prop_assert_eq!(rig.group.queue_count(), 1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Well-formed admin commands with every command dword random: Identify, Get Log
    /// Page, Set/Get Features, Keep Alive, and fabrics property commands.
    #[test]
    fn admin_commands_with_random_fields(
        opc in prop::sample::select(vec![0x02u8, 0x06, 0x09, 0x0a, 0x18, 0x7f]),
        fctype in prop::sample::select(vec![0x00u8, 0x04, 0x01, 0x05]),
        nsid in prop::sample::select(vec![0u32, 1, 2, 0xffff_fffe, 0xffff_ffff]),
        len in 0u32..9000,
        dwords in prop::array::uniform6(any::<u32>()),
    ) {
        let mut rig = Rig::default_rig();
        rig.frozen = Some(Instant::now());
        let (mut admin, _) = rig.admin(0);
        let r = admin.wire().register(16384);
        let mut s = Sqe::new(opc);
        s.set_psdt(1);
        s.nsid = nvme::spec::U32::new(nsid);
        let d = transport::fabrics::SglDescriptor::keyed(r.addr, len, r.key, false);
        let mut b = [0u8; 16];
        b.copy_from_slice(d.as_bytes());
        s.set_dptr(b);
        let mut bytes = [0u8; 64];
        bytes.copy_from_slice(s.as_bytes());
        for (i, dw) in dwords.iter().enumerate() {
            bytes[40 + 4 * i..44 + 4 * i].copy_from_slice(&dw.to_le_bytes());
        }
        if opc == 0x7f {
            bytes[4] = fctype;
        }
        bytes[2..4].copy_from_slice(&0x9000u16.to_le_bytes());
        admin.wire().send(&bytes, &[]).unwrap();
        rig.pump();
        let got = responses(admin.wire());
        prop_assert_eq!(got.len(), 1);
        prop_assert_eq!(got[0].cid.get(), 0x9000);
        // A random Property Set may have disabled the controller; the queue still answers.
        let c = rig.exec(&mut admin, cmd::keep_alive(), &[]);
        prop_assert!(c.cqe.cid.get() < 0x8000);
    }
}
