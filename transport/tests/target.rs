//! The whole target driven over the loopback transport.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nvme::spec::{
    admin_opc, cns, cse, feat, io_opc, log, nidt, oncs, parse_ns_id_descriptors, reg, sct, Cap,
    CommandsEffectsLog, DsmRange, ErrorLogEntry, FirmwareSlotLog, IdentifyController,
    IdentifyNamespace, SmartLog, Sqe, Status, U32,
};
use transport::fabrics::{
    cm_reject, connect_status, ConnectResponse, DiscoveryLogEntry, DiscoveryLogHeader,
    SglDescriptor, CNTLID_DYNAMIC, DISCOVERY_NQN,
};
use transport::initiator::{cm_request, cmd};
use transport::loopback::LinkState;
use zerocopy::{FromBytes, IntoBytes};

fn connect_status_of(sc: u8) -> Status {
    Status::new(nvme::spec::sct::COMMAND_SPECIFIC, sc)
}

#[test]
fn admin_connect_properties_identify() {
    let mut rig = Rig::default_rig();
    let mut q = rig.open(0, 32);
    // Before Connect, nothing but Connect is accepted.
    let c = rig.exec(&mut q, cmd::keep_alive(), &[]);
    assert_status(&c, Status::COMMAND_SEQUENCE_ERROR);
    let c = rig.connect_keyed(&mut q, SUBNQN, HOSTNQN, CNTLID_DYNAMIC, 31, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    let ConnectResponse::Success { cntlid, .. } =
        ConnectResponse::from_result(cmd::result64(&c), true)
    else {
        unreachable!()
    };
    assert!((1..0xfff0).contains(&cntlid));
    assert_eq!(c.sq_id.get(), 0);
    // The Connect data came over "RDMA READ".
    assert_eq!(q.wire().rdma_ops().0, 1);
    // Admin commands need CC.EN first.
    let r = q.wire().register(4096);
    let c = rig.exec(&mut q, cmd::identify(cns::CONTROLLER, 0, keyed(r)), &[]);
    assert_status(&c, Status::COMMAND_SEQUENCE_ERROR);

    let cap = Cap(cmd::result64(
        &rig.exec(&mut q, cmd::property_get(reg::CAP as u32, true), &[])
            .cqe,
    ));
    assert_eq!(cap.mqes(), 31);
    assert_eq!(cap.css() & 1, 1);
    let vs = rig
        .exec(&mut q, cmd::property_get(reg::VS as u32, false), &[])
        .cqe
        .dw0
        .get();
    assert_eq!(vs, 0x0001_0300);
    // CAP is 8 bytes: a 4-byte read of it is invalid, as is an unknown offset.
    let c = rig.exec(&mut q, cmd::property_get(reg::CAP as u32, false), &[]);
    assert_status(&c, Status::INVALID_FIELD);
    let c = rig.exec(&mut q, cmd::property_get(0x400, false), &[]);
    assert_status(&c, Status::INVALID_FIELD);
    rig.enable(&mut q);

    let c = rig.exec(&mut q, cmd::identify(cns::CONTROLLER, 0, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let id = IdentifyController::read_from_bytes(&q.wire().read_region(r)).unwrap();
    assert_eq!(id.cntlid.get(), cntlid);
    assert_eq!(id.serial(), "SN123");
    assert_eq!(id.model(), "loopback test");
    assert_eq!(id.subsystem_nqn(), SUBNQN);
    assert_eq!(id.mdts, 5); // 128 KiB in 4 KiB pages
    assert_eq!(id.sgls.get() & 0b101, 0b101, "SGLs + keyed SGL data blocks");
    assert_ne!(
        id.sgls.get() & (1 << 20),
        0,
        "SGL offsets (in-capsule data)"
    );
    assert_eq!(id.ioccsz.get(), (64 + 8192) / 16);
    assert_eq!(id.iorcsz.get(), 1);
    assert_eq!(id.msdbd, 1);
    assert_eq!(id.nn.get(), 1);
    assert_eq!(id.cntrltype, 1);

    let c = rig.exec(&mut q, cmd::identify(cns::NAMESPACE, 1, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let ns = IdentifyNamespace::read_from_bytes(&q.wire().read_region(r)).unwrap();
    assert_eq!(ns.nsze.get(), 4 << 20 >> 9);
    assert_eq!(ns.block_size(), 512);

    let c = rig.exec(&mut q, cmd::identify(cns::ACTIVE_NS_LIST, 0, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let list = q.wire().read_region(r);
    assert_eq!(&list[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);

    let c = rig.exec(
        &mut q,
        cmd::identify(cns::NS_ID_DESCRIPTORS, 1, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let descs = parse_ns_id_descriptors(&q.wire().read_region(r));
    assert_eq!(descs[0].nidt, nidt::NGUID);
    assert_eq!(descs[0].nid, ns.nguid.to_vec());

    let c = rig.exec(
        &mut q,
        cmd::identify(cns::NAMESPACE, 0xffff_ffff, keyed(r)),
        &[],
    );
    assert_status(&c, Status::INVALID_NAMESPACE);
    let c = rig.exec(&mut q, cmd::identify(0x55, 0, keyed(r)), &[]);
    assert_status(&c, Status::INVALID_FIELD);
    // CSI-specific identify (the Linux host asks when NS descriptors carry a CSI).
    let c = rig.exec(&mut q, cmd::identify(0x05, 1, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let c = rig.exec(&mut q, cmd::identify(0x06, 0, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let mut s = cmd::identify(0x05, 1, keyed(r));
    s.cdw11 = U32::new(2 << 24); // zoned command set: not supported
    assert_status(&rig.exec(&mut q, s, &[]), Status::INVALID_FIELD);

    // Shutdown notification completes.
    let cc = 1 | (6 << 16) | (4 << 20) | (1 << 14);
    rig.exec(&mut q, cmd::property_set(reg::CC as u32, cc), &[]);
    let csts = rig
        .exec(&mut q, cmd::property_get(reg::CSTS as u32, false), &[])
        .cqe
        .dw0
        .get();
    assert_eq!((csts >> 2) & 3, 2, "SHST complete");
}

#[test]
fn io_write_read_keyed_and_in_capsule() {
    let mut rig = Rig::default_rig();
    let (mut admin, cntlid) = rig.admin(0);
    let c = rig.exec(&mut admin, cmd::set_num_queues(2), &[]);
    assert_eq!(c.cqe.dw0.get(), 1 | (1 << 16));
    let mut io = rig.io(1, cntlid);

    // In-capsule write of 8 blocks (4 KiB).
    let a = pattern(4096, 1);
    let c = rig.exec(
        &mut io,
        cmd::write(1, 0, 8, SglDescriptor::in_capsule(0, 4096)),
        &a,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(c.cqe.sq_id.get(), 1);
    // Keyed write of 128 KiB (MDTS) via RDMA READ.
    let b = pattern(128 * 1024, 7);
    let wr = io.wire().register(b.len() as u32);
    io.wire().write_region(wr, 0, &b);
    let c = rig.exec(&mut io, cmd::write(1, 8, 256, keyed(wr)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    // Read both back in one keyed read (RDMA WRITE to host).
    let rd = io.wire().register(4096 + b.len() as u32);
    let c = rig.exec(
        &mut io,
        cmd::read(1, 0, 8, SglDescriptor::keyed(rd.addr, 4096, rd.key, false)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let c = rig.exec(
        &mut io,
        cmd::read(
            1,
            8,
            256,
            SglDescriptor::keyed(rd.addr + 4096, b.len() as u32, rd.key, false),
        ),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let back = io.wire().read_region(rd);
    assert_eq!(&back[..4096], &a[..]);
    assert_eq!(&back[4096..], &b[..]);
    let (reads, writes) = io.wire().rdma_ops();
    assert_eq!((reads, writes), (1, 2));

    // Flush, Write Zeroes, Dataset Management deallocate.
    assert_eq!(
        rig.exec(&mut io, cmd::flush(1), &[]).status(),
        Status::SUCCESS
    );
    assert_eq!(
        rig.exec(&mut io, cmd::flush(0xffff_ffff), &[]).status(),
        Status::SUCCESS
    );
    assert_eq!(
        rig.exec(&mut io, cmd::write_zeroes(1, 0, 4), &[]).status(),
        Status::SUCCESS
    );
    let range = DsmRange::new(8, 8);
    let c = rig.exec(
        &mut io,
        cmd::deallocate(1, 1, SglDescriptor::in_capsule(0, 16)),
        range.as_bytes(),
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let small = io.wire().register(16 * 512);
    let c = rig.exec(&mut io, cmd::read(1, 0, 16, keyed(small)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let back = io.wire().read_region(small);
    assert!(back[..2048].iter().all(|&x| x == 0), "write zeroes");
    assert_eq!(&back[2048..4096], &a[2048..4096]);
    assert!(back[4096..].iter().all(|&x| x == 0), "deallocated");

    // SMART counts the I/O; the invalidate flag travels back with the response.
    let inv = io.wire().register(512);
    io.submit(
        cmd::read(1, 0, 1, SglDescriptor::keyed(inv.addr, 512, inv.key, true)),
        &[],
        0,
    )
    .unwrap();
    rig.pump();
    let (cqe, key) = io.wire().recv().expect("response");
    assert_eq!(cqe.status(), Status::SUCCESS);
    assert_eq!(key, Some(inv.key));

    let lr = admin.wire().register(512);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::SMART, 0xffff_ffff, 512, 0, keyed(lr)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let smart = SmartLog::read_from_bytes(&admin.wire().read_region(lr)).unwrap();
    assert_eq!(smart.host_write_commands.get(), 2);
    assert_eq!(smart.host_read_commands.get(), 4);
    let s = rig.group.queue_stats();
    assert!(s
        .iter()
        .any(|q| q.qid == 1 && q.cntlid == cntlid && q.errors == 0));
}

#[test]
fn malformed_commands_get_exact_status_and_queue_lives() {
    let mut rig = Rig::default_rig();
    let (mut admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let buf = io.wire().register(256 * 1024);
    let ok_read = |rig: &mut Rig, io: &mut HostQ| {
        let c = rig.exec(
            io,
            cmd::read(1, 0, 1, SglDescriptor::keyed(buf.addr, 512, buf.key, false)),
            &[],
        );
        assert_eq!(c.status(), Status::SUCCESS, "queue must keep working");
    };

    // Unknown opcodes.
    let mut s = cmd::flush(1);
    s.cdw0 = U32::new((s.cdw0.get() & !0xff) | 0x7e);
    let c = rig.exec(&mut io, s, &[]);
    assert_status(&c, Status::INVALID_OPCODE);
    assert!(c.status().dnr());
    let mut s = cmd::keep_alive();
    s.cdw0 = U32::new((s.cdw0.get() & !0xff) | 0xc5);
    assert_status(&rig.exec(&mut admin, s, &[]), Status::INVALID_OPCODE);
    ok_read(&mut rig, &mut io);

    // Bad SGL type (segment descriptor, 0x20) and a bit-bucket (0x10).
    for id in [0x20u8, 0x10, 0x4e] {
        let mut d = SglDescriptor::keyed(buf.addr, 512, buf.key, false);
        d.id = id;
        let c = rig.exec(&mut io, cmd::read(1, 0, 1, d), &[]);
        assert_status(&c, Status::SGL_DESCRIPTOR_TYPE_INVALID);
    }
    // SGL longer than MDTS (128 KiB).
    let c = rig.exec(
        &mut io,
        cmd::read(
            1,
            0,
            1,
            SglDescriptor::keyed(buf.addr, 128 * 1024 + 512, buf.key, false),
        ),
        &[],
    );
    assert_status(&c, Status::SGL_DATA_LENGTH_INVALID);
    // Keyed length that does not match NLB.
    let c = rig.exec(
        &mut io,
        cmd::read(1, 0, 2, SglDescriptor::keyed(buf.addr, 512, buf.key, false)),
        &[],
    );
    assert_status(&c, Status::SGL_DATA_LENGTH_INVALID);
    // In-capsule length mismatch: descriptor says 4096, 512 bytes arrived.
    let c = rig.exec(
        &mut io,
        cmd::write(1, 0, 8, SglDescriptor::in_capsule(0, 4096)),
        &[0u8; 512],
    );
    assert_status(&c, Status::SGL_DATA_LENGTH_INVALID);
    // In-capsule offset beyond the data.
    let c = rig.exec(
        &mut io,
        cmd::write(1, 0, 1, SglDescriptor::in_capsule(1024, 512)),
        &[0u8; 512],
    );
    assert_status(&c, Status::SGL_OFFSET_INVALID);
    // In-capsule data bigger than the queue's in-capsule size.
    let c = rig.exec(
        &mut io,
        cmd::write(1, 0, 32, SglDescriptor::in_capsule(0, 16384)),
        &vec![0u8; 16384],
    );
    assert_status(&c, Status::SGL_DATA_LENGTH_INVALID);
    // In-capsule descriptor on a read.
    let c = rig.exec(
        &mut io,
        cmd::read(1, 0, 1, SglDescriptor::in_capsule(0, 512)),
        &[],
    );
    assert_status(&c, Status::INVALID_FIELD);
    ok_read(&mut rig, &mut io);

    // LBA out of range (last block + 1, and wrap-around).
    let blocks = (4u64 << 20) / 512;
    let c = rig.exec(
        &mut io,
        cmd::read(
            1,
            blocks - 1,
            2,
            SglDescriptor::keyed(buf.addr, 1024, buf.key, false),
        ),
        &[],
    );
    assert_status(&c, Status::LBA_OUT_OF_RANGE);
    let c = rig.exec(
        &mut io,
        cmd::read(
            1,
            u64::MAX,
            1,
            SglDescriptor::keyed(buf.addr, 512, buf.key, false),
        ),
        &[],
    );
    assert_status(&c, Status::LBA_OUT_OF_RANGE);
    let c = rig.exec(&mut io, cmd::write_zeroes(1, blocks, 1), &[]);
    assert_status(&c, Status::LBA_OUT_OF_RANGE);
    let range = DsmRange::new(blocks - 1, 2);
    let c = rig.exec(
        &mut io,
        cmd::deallocate(1, 1, SglDescriptor::in_capsule(0, 16)),
        range.as_bytes(),
    );
    assert_status(&c, Status::LBA_OUT_OF_RANGE);
    // Invalid namespace ids.
    for nsid in [0u32, 2, 0xffff_fffe] {
        let c = rig.exec(
            &mut io,
            cmd::read(
                nsid,
                0,
                1,
                SglDescriptor::keyed(buf.addr, 512, buf.key, false),
            ),
            &[],
        );
        assert_status(&c, Status::INVALID_NAMESPACE);
    }
    // PRP instead of SGL, fused command.
    let mut s = cmd::read(1, 0, 1, SglDescriptor::keyed(buf.addr, 512, buf.key, false));
    s.set_psdt(0);
    assert_status(&rig.exec(&mut io, s, &[]), Status::INVALID_FIELD);
    let mut s = cmd::flush(1);
    s.cdw0 = U32::new(s.cdw0.get() | (1 << 8));
    assert_status(&rig.exec(&mut io, s, &[]), Status::INVALID_FIELD);
    // Fabrics commands other than Connect on an I/O queue; Connect again on a live queue.
    assert_status(
        &rig.exec(&mut io, cmd::property_get(0, true), &[]),
        Status::INVALID_OPCODE,
    );
    let c = rig.connect_icd(&mut io, SUBNQN, HOSTNQN, cntlid, 31);
    assert!(c.status().same_code(Status::COMMAND_SEQUENCE_ERROR));
    // Unknown key: the RDMA READ fails → Data Transfer Error.
    let c = rig.exec(
        &mut io,
        cmd::write(1, 0, 1, SglDescriptor::keyed(0xdead_0000, 512, 0x77, false)),
        &[],
    );
    assert_status(&c, Status::DATA_TRANSFER_ERROR);
    ok_read(&mut rig, &mut io);

    // The error log has the failures, newest first, with the error location.
    let lr = admin.wire().register(4096);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::ERROR, 0, 4096, 0, keyed(lr)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let page = admin.wire().read_region(lr);
    let e0 = ErrorLogEntry::read_from_bytes(&page[..64]).unwrap();
    let e1 = ErrorLogEntry::read_from_bytes(&page[64..128]).unwrap();
    assert!(e0.error_count.get() > e1.error_count.get());
    assert_eq!(e0.sqid.get(), 1);
    assert!(Status::from_field(e0.status.get()).same_code(Status::DATA_TRANSFER_ERROR));
    // An unknown log page.
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(0x7f, 0, 512, 0, keyed(lr)),
        &[],
    );
    assert_status(&c, Status::INVALID_LOG_PAGE);
    // Unsupported feature.
    assert_status(
        &rig.exec(&mut admin, cmd::get_features(0x7d), &[]),
        Status::INVALID_FIELD,
    );
    assert_eq!(rig.group.queue_count(), 2, "no connection was dropped");
}

#[test]
fn connect_errors() {
    let mut rig = Rig::default_rig();
    let check = |c: &nvme::spec::Cqe, sc: u8, in_data: bool, offset: u16| {
        assert!(
            c.status().same_code(connect_status_of(sc)),
            "got {} want sc {sc:#x}",
            c.status()
        );
        assert_eq!(
            ConnectResponse::from_result(cmd::result64(c), false),
            ConnectResponse::InvalidParameter { in_data, offset },
        );
        // The raw DW0 the spec defines (IPO bits 15:00, IATTR bit 0 at bit 16) and the
        // kernel initiator decodes, independent of our decoder.
        assert_eq!(
            c.dw0.get(),
            u32::from(offset) | (u32::from(in_data) << 16),
            "raw Connect response DW0"
        );
    };
    let mut q = rig.open(0, 32);
    // What a host (perf, direct, the fio engine) prints for a refusal: named from the
    // real completion, not raw codes (transport::fabrics::connect_refusal).
    let named = |c: &nvme::spec::Cqe, subnqn: &str, hostnqn: &str| {
        let st = c.status();
        transport::fabrics::connect_refusal(st.sct(), st.sc(), c.dw0.get(), subnqn, hostnqn)
    };
    let c = rig.connect_keyed(&mut q, SUBNQN, OTHER_HOST, CNTLID_DYNAMIC, 31, 0);
    check(&c, connect_status::INVALID_HOST, true, 512);
    assert_eq!(
        named(&c, SUBNQN, OTHER_HOST),
        format!("host {OTHER_HOST} is not allowed by subsystem {SUBNQN} (add it to the subsystem's hosts, or set allow_any_host = true)")
    );
    let c = rig.connect_keyed(
        &mut q,
        "nqn.2026-11.io.nvmf-p2p:nope",
        HOSTNQN,
        CNTLID_DYNAMIC,
        31,
        0,
    );
    check(&c, connect_status::INVALID_PARAMETERS, true, 256);
    let msg = named(&c, "nqn.2026-11.io.nvmf-p2p:nope", HOSTNQN);
    assert!(
        msg.starts_with("subsystem nqn.2026-11.io.nvmf-p2p:nope not found on this target"),
        "{msg}"
    );
    let c = rig.connect_keyed(&mut q, SUBNQN, HOSTNQN, 5, 31, 0);
    check(&c, connect_status::INVALID_PARAMETERS, true, 16);
    let c = rig.connect_keyed(&mut q, SUBNQN, HOSTNQN, CNTLID_DYNAMIC, 0, 0);
    check(&c, connect_status::INVALID_PARAMETERS, false, 44);
    let c = rig.connect_keyed(&mut q, SUBNQN, HOSTNQN, CNTLID_DYNAMIC, 32, 0);
    check(&c, connect_status::INVALID_PARAMETERS, false, 44);
    // An empty host NQN (spdk_nvme_perf without `hostnqn:`) is not on the host list.
    let c = rig.connect_keyed(&mut q, SUBNQN, "", CNTLID_DYNAMIC, 31, 0);
    check(&c, connect_status::INVALID_HOST, true, 512);
    // The queue lives on and a correct Connect still works.
    let c = rig.connect_keyed(&mut q, SUBNQN, HOSTNQN, CNTLID_DYNAMIC, 31, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    let cntlid = c.dw0.get() as u16;

    // An I/O queue before the controller is enabled.
    let mut io = rig.open(1, 32);
    let c = rig.connect_icd(&mut io, SUBNQN, HOSTNQN, cntlid, 31);
    assert!(c.status().same_code(Status::COMMAND_SEQUENCE_ERROR));
    rig.enable(&mut q);
    // Connect data of the wrong size.
    let data = cmd::connect_data([1; 16], cntlid, SUBNQN, HOSTNQN);
    let c = rig.exec(
        &mut io,
        cmd::connect(1, 31, 0, SglDescriptor::in_capsule(0, 512)),
        &data.as_bytes()[..512],
    );
    assert!(c.status().same_code(Status::SGL_DATA_LENGTH_INVALID));
    // Wrong controller id, another host's NQN, qid different from the CM's.
    let c = rig.connect_icd(&mut io, SUBNQN, HOSTNQN, cntlid + 1, 31);
    check(&c, connect_status::INVALID_PARAMETERS, true, 16);
    let c = rig.exec(
        &mut io,
        cmd::connect(2, 31, 0, SglDescriptor::in_capsule(0, 1024)),
        data.as_bytes(),
    );
    check(&c.cqe, connect_status::INVALID_PARAMETERS, false, 42);
    assert_eq!(
        rig.connect_icd(&mut io, SUBNQN, HOSTNQN, cntlid, 31)
            .status(),
        Status::SUCCESS
    );
    // The same qid twice → controller busy.
    let mut dup = rig.open(1, 32);
    let c = rig.connect_icd(&mut dup, SUBNQN, HOSTNQN, cntlid, 31);
    assert!(c
        .status()
        .same_code(connect_status_of(connect_status::CONTROLLER_BUSY)));
    // More queues than granted by Set Features.
    let c = rig.exec(&mut q, cmd::set_num_queues(2), &[]);
    assert_eq!(c.cqe.dw0.get(), 1 | (1 << 16));
    let mut q3 = rig.open(3, 32);
    let c = rig.connect_icd(&mut q3, SUBNQN, HOSTNQN, cntlid, 31);
    check(&c, connect_status::INVALID_PARAMETERS, false, 42);

    // CM-level rejects.
    for (req, sts) in [
        (cm_request(5, 32), cm_reject::INVALID_QID),
        (cm_request(1, 33), cm_reject::INVALID_HSQSIZE),
        (cm_request(1, 1), cm_reject::INVALID_HSQSIZE),
    ] {
        let h = rig.connector.connect(&req);
        rig.pump();
        assert_eq!(h.state(), LinkState::Rejected(sts));
    }
    let h = rig.connector.connect_raw(&[0u8; 3]);
    rig.pump();
    assert_eq!(h.state(), LinkState::Rejected(cm_reject::INVALID_LENGTH));
}

#[test]
fn keep_alive_timeout_tears_controller_down() {
    let mut rig = Rig::default_rig();
    let t0 = Instant::now();
    rig.frozen = Some(t0);
    let (mut admin, cntlid) = rig.admin(500);
    let io = rig.io(1, cntlid);
    assert_eq!(rig.target.controllers().len(), 1);
    // Get Features reports the timer; a Keep Alive at t0+400ms restarts it.
    let c = rig.exec(&mut admin, cmd::get_features(feat::KEEP_ALIVE_TIMER), &[]);
    assert_eq!(c.cqe.dw0.get(), 500);
    rig.frozen = Some(t0 + Duration::from_millis(400));
    assert_eq!(
        rig.exec(&mut admin, cmd::keep_alive(), &[]).status(),
        Status::SUCCESS
    );
    rig.frozen = Some(t0 + Duration::from_millis(800));
    rig.pump();
    assert_eq!(rig.group.queue_count(), 2, "timer was restarted at 400 ms");
    rig.frozen = Some(t0 + Duration::from_millis(950));
    rig.pump();
    assert_eq!(rig.group.queue_count(), 0, "admin and I/O queues torn down");
    assert!(rig.target.controllers().is_empty());
    assert_eq!(admin.wire().state(), LinkState::Closed);
    assert_eq!(io.wire().state(), LinkState::Closed);
    assert_eq!(rig.group.free_buffers(), 16);
}

#[test]
fn host_disconnect_frees_controller_and_queues() {
    let mut rig = Rig::default_rig();
    let (admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    // An I/O in flight when the host goes away.
    let r = io.wire().register(4096);
    io.submit(cmd::read(1, 0, 8, keyed(r)), &[], 0).unwrap();
    admin.wire().disconnect();
    rig.pump();
    assert_eq!(rig.group.queue_count(), 0);
    assert!(rig.target.controllers().is_empty());
    assert_eq!(rig.group.free_buffers(), 16);
}

#[test]
fn subsystem_and_namespace_totals_outlive_the_controller() {
    let mut rig = Rig::default_rig();
    let sub = rig
        .target
        .subsystems()
        .into_iter()
        .find(|s| s.nqn == SUBNQN)
        .unwrap();
    for round in 0..2u64 {
        let (admin, cntlid) = rig.admin(0);
        let mut io = rig.io(1, cntlid);
        let a = pattern(4096, 3);
        let c = rig.exec(
            &mut io,
            cmd::write(1, 0, 8, SglDescriptor::in_capsule(0, 4096)),
            &a,
        );
        assert_eq!(c.status(), Status::SUCCESS);
        let r = io.wire().register(4096);
        let c = rig.exec(&mut io, cmd::read(1, 0, 8, keyed(r)), &[]);
        assert_eq!(c.status(), Status::SUCCESS);
        // one failed read: past the end of the 4 MiB namespace
        let c = rig.exec(&mut io, cmd::read(1, 8192, 8, keyed(r)), &[]);
        assert!(!c.status().is_success());
        let live = rig.target.subsystem_totals(&sub);
        assert_eq!(
            (live.read_commands, live.write_commands, live.errors),
            (round + 1, round + 1, round + 1),
            "round {round}: {live:?}"
        );
        admin.wire().disconnect();
        drop(io);
        rig.pump();
        assert!(rig.target.controllers().is_empty());
        let t = rig.target.subsystem_totals(&sub);
        assert_eq!(t, live, "round {round}: totals kept after the disconnect");
        assert_eq!(t.bytes_read, 4096 * (round + 1));
        assert_eq!(t.bytes_written, 4096 * (round + 1));
    }
    let ns = sub.namespace(1).unwrap().stats.totals();
    assert_eq!(
        (ns.read_commands, ns.write_commands, ns.errors),
        (2, 2, 2),
        "{ns:?}"
    );
    assert_eq!((ns.bytes_read, ns.bytes_written), (8192, 8192));
}

#[test]
fn async_event_request_held_until_namespace_change() {
    let mut rig = Rig::default_rig();
    let (mut admin, _) = rig.admin(0);
    let c = rig.exec(
        &mut admin,
        cmd::set_features(feat::ASYNC_EVENT_CONFIG, 1 << 8),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    for i in 0..4 {
        admin.submit(cmd::async_event_request(), &[], i).unwrap();
    }
    rig.pump();
    assert!(admin.poll_one().is_none(), "AERs are held");
    // A fifth exceeds AERL.
    let c = rig.exec(&mut admin, cmd::async_event_request(), &[]);
    assert!(c.status().same_code(connect_status_of(0x05)));
    // Other admin commands still flow while AERs are held.
    assert_eq!(
        rig.exec(&mut admin, cmd::keep_alive(), &[]).status(),
        Status::SUCCESS
    );
    rig.target.notify_namespace_changed(SUBNQN, 1);
    let c = rig.wait(&mut admin);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(
        c.cqe.dw0.get(),
        0x0004_0002,
        "notice / ns attribute changed / log 04h"
    );
    rig.pump();
    assert!(admin.poll_one().is_none(), "one event, one completion");
    let r = admin.wire().register(4096);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::CHANGED_NS_LIST, 0, 4096, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(&admin.wire().read_region(r)[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    // Reading without RAE cleared it.
    rig.exec(
        &mut admin,
        cmd::get_log_page(log::CHANGED_NS_LIST, 0, 4096, 0, keyed(r)),
        &[],
    );
    assert_eq!(&admin.wire().read_region(r)[..4], &[0, 0, 0, 0]);
}

#[test]
fn features_get_set() {
    let mut rig = Rig::default_rig();
    let (mut admin, _) = rig.admin(0);
    let c = rig.exec(&mut admin, cmd::set_num_queues(64), &[]);
    assert_eq!(
        c.cqe.dw0.get(),
        3 | (3 << 16),
        "capped at max_io_queues = 4"
    );
    assert_eq!(
        rig.exec(&mut admin, cmd::get_features(feat::NUM_QUEUES), &[])
            .cqe
            .dw0
            .get(),
        3 | (3 << 16)
    );
    // A RAM namespace has no volatile write cache: the feature does not exist.
    assert_status(
        &rig.exec(
            &mut admin,
            cmd::set_features(feat::VOLATILE_WRITE_CACHE, 1),
            &[],
        ),
        Status::INVALID_FIELD,
    );
    assert_status(
        &rig.exec(
            &mut admin,
            cmd::get_features(feat::VOLATILE_WRITE_CACHE),
            &[],
        ),
        Status::INVALID_FIELD,
    );
    rig.exec(
        &mut admin,
        cmd::set_features(feat::ASYNC_EVENT_CONFIG, 0x100),
        &[],
    );
    assert_eq!(
        rig.exec(&mut admin, cmd::get_features(feat::ASYNC_EVENT_CONFIG), &[])
            .cqe
            .dw0
            .get(),
        0x100
    );
    rig.exec(
        &mut admin,
        cmd::set_features(feat::KEEP_ALIVE_TIMER, 120_000),
        &[],
    );
    assert_eq!(
        rig.exec(&mut admin, cmd::get_features(feat::KEEP_ALIVE_TIMER), &[])
            .cqe
            .dw0
            .get(),
        120_000
    );
}

#[test]
fn discovery_log_page() {
    let mut rig = Rig::default_rig();
    let mut q = rig.open(0, 32);
    let c = rig.connect_keyed(&mut q, DISCOVERY_NQN, HOSTNQN, CNTLID_DYNAMIC, 31, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    rig.enable(&mut q);
    let r = q.wire().register(4096);
    let c = rig.exec(&mut q, cmd::identify(cns::CONTROLLER, 0, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let id = IdentifyController::read_from_bytes(&q.wire().read_region(r)).unwrap();
    assert_eq!(id.cntrltype, 2);
    assert_eq!(id.subsystem_nqn(), DISCOVERY_NQN);
    // Header first (as nvme-cli does), then the whole page.
    let c = rig.exec(
        &mut q,
        cmd::get_log_page(
            log::DISCOVERY,
            0,
            1024,
            0,
            SglDescriptor::keyed(r.addr, 1024, r.key, false),
        ),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let hdr = DiscoveryLogHeader::read_from_bytes(&q.wire().read_region(r)[..1024]).unwrap();
    assert_eq!(
        hdr.numrec.get(),
        2,
        "discovery + the one subsystem this host may see"
    );
    let c = rig.exec(
        &mut q,
        cmd::get_log_page(
            log::DISCOVERY,
            0,
            3072,
            0,
            SglDescriptor::keyed(r.addr, 3072, r.key, false),
        ),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let page = q.wire().read_region(r);
    let e = DiscoveryLogEntry::read_from_bytes(&page[2048..3072]).unwrap();
    assert_eq!(e.trtype, 1);
    assert_eq!(e.adrfam, 1);
    assert_eq!(e.subtype, 2);
    assert_eq!(transport::fabrics::get_str(&e.subnqn), Some(SUBNQN));
    assert_eq!(std::str::from_utf8(&e.trsvcid[..4]).unwrap(), "4420");
    assert_eq!(std::str::from_utf8(&e.traddr[..8]).unwrap(), "10.0.0.1");
    // Offset read of the second entry alone.
    let c = rig.exec(
        &mut q,
        cmd::get_log_page(
            log::DISCOVERY,
            0,
            1024,
            2048,
            SglDescriptor::keyed(r.addr, 1024, r.key, false),
        ),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(&q.wire().read_region(r)[..1024], e.as_bytes());
    // Offsets past the page and the largest NUMD do not upset the target.
    let c = rig.exec(
        &mut q,
        cmd::get_log_page(
            log::DISCOVERY,
            0,
            1024,
            u64::MAX - 3,
            SglDescriptor::keyed(r.addr, 1024, r.key, false),
        ),
        &[],
    );
    assert_status(&c, Status::INVALID_FIELD);
    let mut s = cmd::get_log_page(
        log::DISCOVERY,
        0,
        1024,
        0,
        SglDescriptor::keyed(r.addr, 4096, r.key, false),
    );
    s.cdw10 = U32::new(u32::from(log::DISCOVERY) | 0xffff_0000);
    s.cdw11 = U32::new(0xffff);
    let c = rig.exec(&mut q, s, &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    // No I/O queues on the discovery controller; no NVM log pages.
    let c = rig.exec(
        &mut q,
        cmd::get_log_page(log::SMART, 0, 512, 0, keyed(r)),
        &[],
    );
    assert_status(&c, Status::INVALID_LOG_PAGE);
    let cntlid = rig.target.controllers()[0].cntlid();
    let mut io = rig.open(1, 32);
    let data = cmd::connect_data([1; 16], cntlid, DISCOVERY_NQN, HOSTNQN);
    let c = rig.exec(
        &mut io,
        cmd::connect(1, 31, 0, SglDescriptor::in_capsule(0, 1024)),
        data.as_bytes(),
    );
    assert!(c
        .status()
        .same_code(connect_status_of(connect_status::INVALID_PARAMETERS)));
}

#[test]
fn backpressure_when_buffers_and_send_credits_run_out() {
    let cfg = config("");
    let mut cfg = cfg;
    cfg.data_buffers = 1;
    let mut rig = Rig::new(&cfg);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let n = 8u64;
    let regions: Vec<_> = (0..n)
        .map(|i| {
            let r = io.wire().register(4096);
            io.wire().write_region(r, 0, &pattern(4096, i as u8));
            r
        })
        .collect();
    for (i, r) in regions.iter().enumerate() {
        io.submit(cmd::write(1, i as u64 * 8, 8, keyed(*r)), &[], i as u64)
            .unwrap();
    }
    let cs = rig.collect(&mut io, n as usize);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    let stats = rig.group.queue_stats();
    let q1 = stats.iter().find(|s| s.qid == 1).unwrap();
    assert!(q1.buffer_waits > 0, "requests waited for the single buffer");
    assert_eq!(rig.group.free_buffers(), 1);

    // Send credits: only one response may be outstanding at the host at a time.
    io.wire().set_send_credits(1);
    let rd = io.wire().register(4096 * n as u32);
    for i in 0..n {
        let d = SglDescriptor::keyed(rd.addr + i * 4096, 4096, rd.key, false);
        io.submit(cmd::read(1, i * 8, 8, d), &[], i).unwrap();
    }
    let mut done = 0;
    for _ in 0..100 {
        rig.pump();
        if let Some(c) = io.poll_one() {
            assert_eq!(c.status(), Status::SUCCESS);
            done += 1;
        }
        assert!(io.poll_one().is_none(), "more responses than credits");
        if done == n {
            break;
        }
    }
    assert_eq!(done, n);
    let back = io.wire().read_region(rd);
    for i in 0..n as usize {
        assert_eq!(&back[i * 4096..(i + 1) * 4096], &pattern(4096, i as u8)[..]);
    }
    let q1 = rig
        .group
        .queue_stats()
        .into_iter()
        .find(|s| s.qid == 1)
        .unwrap();
    assert!(q1.wire_busy > 0);
}

/// spdk_nvme_perf sends an empty host NQN when its `-r` has no `hostnqn:`; like Linux nvmet
/// and SPDK's nvmf_tgt, a subsystem that allows any host accepts it (admin and I/O queue).
#[test]
fn empty_host_nqn_allowed_by_allow_any_host() {
    let text =
        config_text("").replace(&format!("hosts = [\"{HOSTNQN}\"]"), "allow_any_host = true");
    let cfg =
        transport::config::TargetConfig::parse(&text, std::path::Path::new("t.toml")).unwrap();
    let mut rig = Rig::new(&cfg);
    let mut q = rig.open(0, 32);
    let c = rig.connect_keyed(&mut q, SUBNQN, "", CNTLID_DYNAMIC, 31, 0);
    assert_eq!(c.status(), Status::SUCCESS, "{}", c.status());
    let cntlid = c.dw0.get() as u16;
    rig.enable(&mut q);
    let mut io = rig.open(1, 32);
    let c = rig.connect_icd(&mut io, SUBNQN, "", cntlid, 31);
    assert_eq!(c.status(), Status::SUCCESS, "{}", c.status());
}

/// `s` with opcode `opc` (the data pointer and other fields kept).
fn with_opcode(mut s: Sqe, opc: u8) -> Sqe {
    s.cdw0 = U32::new((s.cdw0.get() & !0xff) | u32::from(opc));
    s
}

/// A command without data of opcode `opc` (a Keep Alive's SGL: keyed, length 0).
fn no_data(opc: u8) -> Sqe {
    with_opcode(cmd::keep_alive(), opc)
}

fn identify_ctrl(rig: &mut Rig, admin: &mut HostQ) -> IdentifyController {
    let r = admin.wire().register(4096);
    let c = rig.exec(admin, cmd::identify(cns::CONTROLLER, 0, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    IdentifyController::read_from_bytes(&admin.wire().read_region(r)).unwrap()
}

fn getf(rig: &mut Rig, q: &mut HostQ, fid: u8, sel: u32, dw11: u32) -> (Status, u32) {
    let c = rig.exec(q, get_feature_sel(fid, sel, dw11), &[]);
    (c.status(), c.cqe.dw0.get())
}

fn get_feature_sel(fid: u8, sel: u32, dw11: u32) -> Sqe {
    let mut s = cmd::get_features(fid);
    s.cdw10 = U32::new(u32::from(fid) | (sel << 8));
    s.cdw11 = U32::new(dw11);
    s
}

#[test]
fn firmware_slot_log() {
    let mut rig = Rig::default_rig();
    let (mut admin, _) = rig.admin(0);
    let id = identify_ctrl(&mut rig, &mut admin);
    assert_eq!(id.frmw, 0b11, "one slot, slot 1 read only");
    let r = admin.wire().register(512);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::FIRMWARE_SLOT, u32::MAX, 512, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let f = FirmwareSlotLog::read_from_bytes(&admin.wire().read_region(r)).unwrap();
    assert_eq!(f.afi, 1, "running slot 1, no pending activation");
    assert_eq!(
        f.frs[0], id.fr,
        "slot 1 holds the running firmware revision"
    );
    assert!(
        f.frs[1..].iter().all(|s| *s == [0; 8]),
        "other slots absent"
    );
}

#[test]
fn commands_supported_and_effects_log_matches_what_is_answered() {
    let mut rig = Rig::default_rig();
    let (mut admin, cntlid) = rig.admin(0);
    let id = identify_ctrl(&mut rig, &mut admin);
    assert_ne!(id.lpa & (1 << 1), 0, "LPA: effects log supported");
    let r = admin.wire().register(4096);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::COMMANDS_SUPPORTED, 0, 4096, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let e = CommandsEffectsLog::read_from_bytes(&admin.wire().read_region(r)).unwrap();
    assert_eq!(
        e.iocs[usize::from(io_opc::WRITE)].get(),
        cse::CSUPP | cse::LBCC
    );
    assert_eq!(e.iocs[usize::from(io_opc::READ)].get(), cse::CSUPP);
    assert_eq!(e.acs[usize::from(admin_opc::ABORT)].get(), cse::CSUPP);
    // Another command set than NVM: Invalid Field.
    let mut s = cmd::get_log_page(log::COMMANDS_SUPPORTED, 0, 4096, 0, keyed(r));
    s.cdw14 = U32::new(2 << 24);
    assert_status(&rig.exec(&mut admin, s, &[]), Status::INVALID_FIELD);
    // Every opcode: listed as supported exactly when not refused as an invalid opcode.
    // (AER is held by design; fabrics commands are outside the log.)
    for opc in 0..=255u8 {
        if opc == admin_opc::ASYNC_EVENT_REQUEST || opc == 0x7f {
            continue;
        }
        let mut s = no_data(opc);
        s.nsid = U32::new(1);
        let c = rig.exec(&mut admin, s, &[]);
        let listed = e.acs[usize::from(opc)].get() & cse::CSUPP != 0;
        assert_eq!(
            !c.status().same_code(Status::INVALID_OPCODE),
            listed,
            "admin opcode {opc:#04x}: {}",
            c.status()
        );
    }
    let mut io = rig.io(1, cntlid);
    for opc in 0..=255u8 {
        if opc == 0x7f {
            continue;
        }
        let mut s = no_data(opc);
        s.nsid = U32::new(1);
        let c = rig.exec(&mut io, s, &[]);
        let listed = e.iocs[usize::from(opc)].get() & cse::CSUPP != 0;
        assert_eq!(
            !c.status().same_code(Status::INVALID_OPCODE),
            listed,
            "I/O opcode {opc:#04x}: {}",
            c.status()
        );
    }
    // ONCS says the same about the optional NVM commands.
    let o = id.oncs.get();
    assert_ne!(o & oncs::COMPARE, 0);
    assert_ne!(o & oncs::DSM, 0);
    assert_ne!(o & oncs::WRITE_ZEROES, 0);
    assert_eq!(
        o & (oncs::WRITE_UNCORRECTABLE | oncs::VERIFY | oncs::COPY),
        0
    );
    assert_eq!(e.iocs[usize::from(io_opc::VERIFY)].get(), 0);
}

#[test]
fn temperature_threshold_and_feature_select() {
    let mut rig = Rig::default_rig();
    let (mut admin, _) = rig.admin(5000);
    let id = identify_ctrl(&mut rig, &mut admin);
    assert_ne!(
        id.oncs.get() & oncs::SAVE_SELECT,
        0,
        "ONCS: SV and SEL supported"
    );
    let wctemp = u32::from(id.wctemp.get());
    assert!(wctemp > 273, "WCTEMP reported");
    let tt = feat::TEMPERATURE_THRESHOLD;
    let under = 1 << 20; // THSEL 1
    assert_eq!(
        getf(&mut rig, &mut admin, tt, 0, 0),
        (Status::SUCCESS, wctemp),
        "over = WCTEMP"
    );
    assert_eq!(
        getf(&mut rig, &mut admin, tt, 0, under),
        (Status::SUCCESS, 0)
    );
    assert!(
        getf(&mut rig, &mut admin, tt, 0, 1 << 16)
            .0
            .same_code(Status::INVALID_FIELD),
        "sensor 1"
    );
    assert!(
        getf(&mut rig, &mut admin, tt, 0, 2 << 20)
            .0
            .same_code(Status::INVALID_FIELD),
        "THSEL 2"
    );
    // Lower the over threshold below the composite temperature: SMART warns.
    let c = rig.exec(&mut admin, cmd::set_features(tt, 290), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let c = rig.exec(&mut admin, cmd::set_features(tt, under | 10), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(
        getf(&mut rig, &mut admin, tt, 0, 0),
        (Status::SUCCESS, 290),
        "current"
    );
    assert_eq!(
        getf(&mut rig, &mut admin, tt, 0, under),
        (Status::SUCCESS, 10)
    );
    assert_eq!(
        getf(&mut rig, &mut admin, tt, 1, 0),
        (Status::SUCCESS, wctemp),
        "default"
    );
    assert_eq!(
        getf(&mut rig, &mut admin, tt, 2, 0),
        (Status::SUCCESS, wctemp),
        "saved = default"
    );
    assert_eq!(
        getf(&mut rig, &mut admin, tt, 3, 0),
        (Status::SUCCESS, 0b100),
        "changeable only"
    );
    assert!(
        getf(&mut rig, &mut admin, tt, 4, 0)
            .0
            .same_code(Status::INVALID_FIELD),
        "SEL 4 reserved"
    );
    let r = admin.wire().register(512);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::SMART, u32::MAX, 512, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let smart = SmartLog::read_from_bytes(&admin.wire().read_region(r)).unwrap();
    assert_eq!(
        smart.critical_warning & (1 << 1),
        1 << 1,
        "temperature warning"
    );
    // SEL for the other features.
    rig.exec(&mut admin, cmd::set_num_queues(2), &[]);
    assert_eq!(
        getf(&mut rig, &mut admin, feat::NUM_QUEUES, 0, 0).1,
        1 | (1 << 16)
    );
    assert_eq!(
        getf(&mut rig, &mut admin, feat::NUM_QUEUES, 1, 0).1,
        3 | (3 << 16),
        "max_io_queues 4"
    );
    rig.exec(
        &mut admin,
        cmd::set_features(feat::KEEP_ALIVE_TIMER, 9000),
        &[],
    );
    assert_eq!(
        getf(&mut rig, &mut admin, feat::KEEP_ALIVE_TIMER, 0, 0).1,
        9000
    );
    assert_eq!(
        getf(&mut rig, &mut admin, feat::KEEP_ALIVE_TIMER, 1, 0).1,
        5000,
        "Connect's KATO"
    );
    rig.exec(
        &mut admin,
        cmd::set_features(feat::ASYNC_EVENT_CONFIG, 1 << 8),
        &[],
    );
    assert_eq!(
        getf(&mut rig, &mut admin, feat::ASYNC_EVENT_CONFIG, 1, 0).1,
        0
    );
    for fid in [
        feat::NUM_QUEUES,
        feat::KEEP_ALIVE_TIMER,
        feat::ASYNC_EVENT_CONFIG,
    ] {
        assert_eq!(
            getf(&mut rig, &mut admin, fid, 3, 0),
            (Status::SUCCESS, 0b100)
        );
    }
    assert!(getf(&mut rig, &mut admin, feat::ARBITRATION, 3, 0)
        .0
        .same_code(Status::INVALID_FIELD));
    // Save: nothing is saveable.
    let mut s = cmd::set_features(tt, 300);
    s.cdw10 = U32::new(s.cdw10.get() | 1 << 31);
    assert_status(&rig.exec(&mut admin, s, &[]), Status::FEATURE_NOT_SAVEABLE);
}

fn disconnect_cmd(recfmt: u16) -> Sqe {
    let mut s = no_data(0x7f);
    s.nsid = U32::new(0x08); // fctype
    s.cdw10 = U32::new(u32::from(recfmt));
    s
}

#[test]
fn fabrics_disconnect_deletes_the_io_queue() {
    let mut rig = Rig::default_rig();
    let (mut admin, cntlid) = rig.admin(0);
    assert_status(
        &rig.exec(&mut admin, disconnect_cmd(0), &[]),
        Status::INVALID_OPCODE,
    );
    let mut io = rig.io(1, cntlid);
    assert_status(
        &rig.exec(&mut io, disconnect_cmd(1), &[]),
        connect_status_of(connect_status::INCOMPATIBLE_FORMAT),
    );
    let c = rig.exec(&mut io, disconnect_cmd(0), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    // The queue is gone: a command needs a Connect first.
    assert_status(
        &rig.exec(&mut io, cmd::flush(1), &[]),
        Status::COMMAND_SEQUENCE_ERROR,
    );
    // Its queue id is free for a new connection; the controller lives on.
    let mut io2 = rig.io(1, cntlid);
    assert_eq!(
        rig.exec(&mut io2, cmd::flush(1), &[]).status(),
        Status::SUCCESS
    );
    assert_eq!(
        rig.exec(&mut admin, cmd::keep_alive(), &[]).status(),
        Status::SUCCESS
    );
}

fn abort_cmd(sqid: u16, cid: u16) -> Sqe {
    let mut s = no_data(admin_opc::ABORT);
    s.cdw10 = U32::new(u32::from(sqid) | (u32::from(cid) << 16));
    s
}

#[test]
fn abort_aborts_a_held_aer_else_reports_not_aborted() {
    let mut rig = Rig::default_rig();
    let (mut admin, cntlid) = rig.admin(0);
    let aer = admin.submit(cmd::async_event_request(), &[], 0).unwrap();
    rig.pump();
    assert!(admin.poll_one().is_none(), "AER held");
    admin.submit(abort_cmd(0, aer), &[], 1).unwrap();
    let (mut got_abort, mut got_aer) = (None, None);
    for _ in 0..2 {
        let c = rig.wait(&mut admin);
        if c.cid == aer {
            got_aer = Some(c);
        } else {
            got_abort = Some(c);
        }
    }
    let (a, e) = (got_abort.unwrap(), got_aer.unwrap());
    assert_eq!(a.status(), Status::SUCCESS);
    assert_eq!(a.cqe.dw0.get() & 1, 0, "aborted");
    assert_status(&e, Status::ABORT_REQUESTED);
    // Nothing with that CID any more, or a command on an I/O queue: not aborted.
    let c = rig.exec(&mut admin, abort_cmd(0, aer), &[]);
    assert_eq!((c.status(), c.cqe.dw0.get() & 1), (Status::SUCCESS, 1));
    let _io = rig.io(1, cntlid);
    let c = rig.exec(&mut admin, abort_cmd(1, 0), &[]);
    assert_eq!((c.status(), c.cqe.dw0.get() & 1), (Status::SUCCESS, 1));
    // The aborted AER no longer counts against AERL: four fit again.
    for i in 0..4 {
        admin
            .submit(cmd::async_event_request(), &[], 10 + i)
            .unwrap();
    }
    rig.pump();
    assert!(admin.poll_one().is_none(), "four AERs held, none refused");
}

/// Compare of `nlb` blocks at `slba` against `data`.
pub fn compare_cmd(slba: u64, nlb: u16, data: SglDescriptor) -> Sqe {
    with_opcode(cmd::write(1, slba, nlb, data), io_opc::COMPARE)
}

#[test]
fn compare_matches_and_fails_and_fused_is_refused() {
    let mut rig = Rig::default_rig();
    let (mut admin, cntlid) = rig.admin(0);
    let id = identify_ctrl(&mut rig, &mut admin);
    assert_eq!(id.fuses.get(), 0, "no fused operations");
    let mut io = rig.io(1, cntlid);
    let a = pattern(4096, 3);
    let c = rig.exec(
        &mut io,
        cmd::write(1, 16, 8, SglDescriptor::in_capsule(0, 4096)),
        &a,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let ic = SglDescriptor::in_capsule(0, 4096);
    assert_eq!(
        rig.exec(&mut io, compare_cmd(16, 8, ic), &a).status(),
        Status::SUCCESS
    );
    let mut b = a.clone();
    b[4000] ^= 1;
    let c = rig.exec(&mut io, compare_cmd(16, 8, ic), &b);
    assert_status(&c, Status::new(sct::MEDIA, 0x85));
    // Keyed (RDMA READ of the host's data).
    let r = io.wire().register(4096);
    io.wire().write_region(r, 0, &a);
    assert_eq!(
        rig.exec(&mut io, compare_cmd(16, 8, keyed(r)), &[])
            .status(),
        Status::SUCCESS
    );
    let c = rig.exec(&mut io, compare_cmd(17, 8, keyed(r)), &[]);
    assert_status(&c, Status::COMPARE_FAILURE);
    let c = rig.exec(
        &mut io,
        compare_cmd(8191, 2, SglDescriptor::in_capsule(0, 1024)),
        &a[..1024],
    );
    assert_status(&c, Status::LBA_OUT_OF_RANGE);
    // Fused Compare and Write (first/second command): refused, queue lives on.
    let mut first = compare_cmd(16, 8, ic);
    first.cdw0 = U32::new(first.cdw0.get() | 1 << 8);
    assert_status(&rig.exec(&mut io, first, &a), Status::INVALID_FIELD);
    let mut second = cmd::write(1, 16, 8, ic);
    second.cdw0 = U32::new(second.cdw0.get() | 2 << 8);
    assert_status(&rig.exec(&mut io, second, &a), Status::INVALID_FIELD);
    assert_eq!(
        rig.exec(&mut io, compare_cmd(16, 8, ic), &a).status(),
        Status::SUCCESS
    );
}

/// A RAM namespace behind a volatile write cache that counts flushes.
struct CachedRam {
    ram: transport::backend::RamBackend,
    flushes: std::sync::atomic::AtomicU64,
}

impl transport::backend::Backend for CachedRam {
    fn describe(&self) -> String {
        "cached-ram".into()
    }
    fn block_size(&self) -> u32 {
        self.ram.block_size()
    }
    fn block_count(&self) -> u64 {
        self.ram.block_count()
    }
    fn read(&self, slba: u64, buf: &mut [u8]) -> transport::Result<()> {
        self.ram.read(slba, buf)
    }
    fn write(&self, slba: u64, buf: &[u8]) -> transport::Result<()> {
        self.ram.write(slba, buf)
    }
    fn flush(&self) -> transport::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn write_zeroes(&self, slba: u64, nlb: u64) -> transport::Result<()> {
        self.ram.write_zeroes(slba, nlb)
    }
    fn volatile_write_cache(&self) -> bool {
        true
    }
}

#[test]
fn volatile_write_cache_disabled_means_write_through() {
    use std::sync::atomic::Ordering::SeqCst;
    use transport::backend::Backend as _;
    let ns = std::sync::Arc::new(CachedRam {
        ram: transport::backend::RamBackend::new(4 << 20, 512).unwrap(),
        flushes: Default::default(),
    });
    let mut rig = Rig::with_backend(&config(""), ns.clone());
    let (mut admin, cntlid) = rig.admin(0);
    let id = identify_ctrl(&mut rig, &mut admin);
    assert_eq!(id.vwc & 1, 1, "VWC present");
    let vwc = feat::VOLATILE_WRITE_CACHE;
    assert_eq!(
        rig.exec(&mut admin, cmd::get_features(vwc), &[])
            .cqe
            .dw0
            .get(),
        1
    );
    let mut io = rig.io(1, cntlid);
    let a = pattern(4096, 9);
    let w = cmd::write(1, 0, 8, SglDescriptor::in_capsule(0, 4096));
    assert_eq!(rig.exec(&mut io, w, &a).status(), Status::SUCCESS);
    assert_eq!(ns.flushes.load(SeqCst), 0, "write-back: no flush per write");
    let c = rig.exec(&mut admin, cmd::set_features(vwc, 0), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(
        rig.exec(&mut admin, cmd::get_features(vwc), &[])
            .cqe
            .dw0
            .get(),
        0
    );
    assert_eq!(rig.exec(&mut io, w, &a).status(), Status::SUCCESS);
    assert_eq!(
        ns.flushes.load(SeqCst),
        1,
        "write-through: flushed before completion"
    );
    assert_eq!(
        rig.exec(&mut io, cmd::write_zeroes(1, 0, 8), &[]).status(),
        Status::SUCCESS
    );
    assert_eq!(ns.flushes.load(SeqCst), 2);
    let rd = keyed(io.wire().register(4096));
    assert_eq!(
        rig.exec(&mut io, cmd::read(1, 0, 8, rd), &[]).status(),
        Status::SUCCESS
    );
    assert_eq!(ns.flushes.load(SeqCst), 2, "reads do not flush");
    rig.exec(&mut admin, cmd::set_features(vwc, 1), &[]);
    assert_eq!(rig.exec(&mut io, w, &a).status(), Status::SUCCESS);
    assert_eq!(ns.flushes.load(SeqCst), 2, "write-back again");
    assert_eq!(ns.block_count(), 8192);
}

/// A direct-mode provider that answers attaches later, from another thread (as the
/// direct service's control thread does).
#[derive(Default)]
struct LaterDirect {
    replies: std::sync::Mutex<Vec<transport::direct::AttachReply>>,
}

impl transport::direct::DirectAttach for LaterDirect {
    fn attach(
        &self,
        _subnqn: &str,
        _hostnqn: &str,
        _nsid: u32,
        _req: transport::direct::proto::AttachRequest,
        reply: transport::direct::AttachReply,
    ) {
        self.replies.lock().unwrap().push(reply);
    }
    fn detach(&self, _hostnqn: &str, _token: u64) -> Result<(), Status> {
        Ok(())
    }
}

#[test]
fn direct_attach_waits_for_its_answer_without_holding_the_poll_group() {
    use transport::direct::proto::{AttachRequest, Descriptor, Level};
    use zerocopy::byteorder::little_endian::{U16, U64};
    let mut rig = Rig::default_rig();
    let provider = std::sync::Arc::new(LaterDirect::default());
    rig.target.set_direct(provider.clone());
    let (mut admin, _) = rig.admin(0);
    let attach = |admin: &mut HostQ| {
        let r = admin.wire().register(256);
        let mut s = AttachRequest::default().to_sqe(1);
        s.set_psdt(1);
        let mut dptr = [0u8; 16];
        dptr.copy_from_slice(keyed(r).as_bytes());
        s.set_dptr(dptr);
        (s, r)
    };
    let (sqe, r) = attach(&mut admin);
    admin.submit(sqe, &[], 7).unwrap();
    rig.pump();
    assert!(
        admin.poll_one().is_none(),
        "the attach waits for its answer"
    );
    assert_eq!(provider.replies.lock().unwrap().len(), 1);
    // The poll group goes on serving the queue meanwhile.
    assert_eq!(
        rig.exec(&mut admin, cmd::keep_alive(), &[]).status(),
        Status::SUCCESS
    );
    // The answer comes from another thread and wakes the group's mailbox eventfd.
    let reply = provider.replies.lock().unwrap().pop().unwrap();
    std::thread::spawn(move || {
        let mut d = Descriptor::new();
        d.level = Level::Forwarded.to_u8();
        d.token = U64::new(42);
        d.depth = U16::new(16);
        assert!(reply.send(Ok(d)), "the command still waits");
    })
    .join()
    .unwrap();
    let mut fd = libc::pollfd {
        fd: rig.group.mailbox_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fd` is one valid pollfd that outlives the call; zero timeout.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    assert_eq!(ready, 1, "the group was woken");
    rig.group.mailbox_woken();
    let c = rig.wait(&mut admin);
    assert_eq!(c.status(), Status::SUCCESS);
    let d = Descriptor::parse(&admin.wire().read_region(r)).expect("descriptor");
    assert_eq!(d.token.get(), 42);
    // A refusal comes back as the command's status.
    let (sqe, _) = attach(&mut admin);
    admin.submit(sqe, &[], 8).unwrap();
    rig.pump();
    let reply = provider.replies.lock().unwrap().pop().unwrap();
    assert!(reply.send(Err(Status::NAMESPACE_NOT_READY)));
    assert_status(&rig.wait(&mut admin), Status::NAMESPACE_NOT_READY);
    // The admin queue goes away while an attach is being built: the provider learns it
    // when it answers (and drops what it built).
    let (sqe, _) = attach(&mut admin);
    admin.submit(sqe, &[], 9).unwrap();
    rig.pump();
    admin.wire().disconnect();
    rig.pump();
    assert_eq!(rig.group.queue_count(), 0);
    let reply = provider.replies.lock().unwrap().pop().unwrap();
    assert!(!reply.send(Err(Status::INTERNAL_ERROR)), "nobody waits");
}

/// The poll group's wire owns the queue pairs: a queue that closes gives its queue pair
/// back (the core removes it once every transfer was reported), and a new connection
/// takes the freed place and works.
#[test]
fn queue_pairs_live_in_the_wire_and_go_with_their_queue() {
    let mut rig = Rig::default_rig();
    let (_admin, cntlid) = rig.admin(0);
    let io = rig.io(1, cntlid);
    assert_eq!(rig.group.wire().qpair_count(), 2);
    io.wire().disconnect();
    rig.pump();
    assert_eq!(rig.group.queue_count(), 1);
    assert_eq!(rig.group.wire().qpair_count(), 1);
    let mut io = rig.io(1, cntlid);
    assert_eq!(rig.group.wire().qpair_count(), 2);
    let r = io.wire().register(4096);
    let c = rig.exec(&mut io, cmd::read(1, 0, 8, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
}
