//! Reconfiguring a running target over the loopback transport (`Target::reconfigure`,
//! what `nvmf-p2p ctl` and serve's SIGHUP reload apply): namespaces appear and disappear
//! with the Namespace Attribute Changed event and the Changed Namespace List, a removed
//! namespace drains its commands in the device first, removed hosts and subsystems lose
//! their controllers, discovery controllers get the Discovery Log Change event and a new
//! generation counter, and a change that cannot be applied whole changes nothing.

mod common;
#[path = "async_common/fake.rs"]
mod fake;

use std::sync::Arc;

use common::*;
use fake::FakeBackend;
use nvme::spec::{cns, feat, log, IdentifyController, Status};
use transport::backend::open_backend;
use transport::config::{BackendSpec, NamespaceConfig, TargetConfig};
use transport::fabrics::{SglDescriptor, CNTLID_DYNAMIC, DISCOVERY_NQN};
use transport::initiator::cmd;
use zerocopy::FromBytes;

fn open(spec: &BackendSpec) -> transport::Result<Arc<dyn transport::backend::Backend>> {
    open_backend(spec, None)
}

/// `cfg` with namespace `nsid` (`ram:SIZE`) added to the first subsystem, checked.
fn with_ns(cfg: &TargetConfig, nsid: u32, size: &str) -> TargetConfig {
    let mut new = cfg.clone();
    new.subsystems[0].namespaces.push(NamespaceConfig {
        nsid: Some(nsid),
        backend: format!("ram:{size}").parse().unwrap(),
    });
    new.check("test").unwrap();
    new
}

fn active_ns(rig: &mut Rig, admin: &mut HostQ) -> Vec<u32> {
    let r = admin.wire().register(4096);
    let c = rig.exec(admin, cmd::identify(cns::ACTIVE_NS_LIST, 0, keyed(r)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    admin
        .wire()
        .read_region(r)
        .chunks(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .take_while(|&n| n != 0)
        .collect()
}

fn changed_ns(rig: &mut Rig, admin: &mut HostQ) -> Vec<u32> {
    let r = admin.wire().register(4096);
    let c = rig.exec(
        admin,
        cmd::get_log_page(log::CHANGED_NS_LIST, 0, 4096, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    admin
        .wire()
        .read_region(r)
        .chunks(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .take_while(|&n| n != 0)
        .collect()
}

/// An admin queue with `aec` enabled and one AER outstanding.
fn admin_with_aer(rig: &mut Rig, aec: u32) -> (HostQ, u16) {
    let (mut admin, cntlid) = rig.admin(0);
    let c = rig.exec(
        &mut admin,
        cmd::set_features(feat::ASYNC_EVENT_CONFIG, aec),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    admin.submit(cmd::async_event_request(), &[], 0).unwrap();
    rig.pump();
    assert!(admin.poll_one().is_none(), "AER held");
    (admin, cntlid)
}

#[test]
fn namespaces_come_and_go_with_an_event_and_the_changed_list() {
    let cfg = config("");
    let mut rig = Rig::new(&cfg);
    let (mut admin, cntlid) = admin_with_aer(&mut rig, 1 << 8);
    let mut io = rig.io(1, cntlid);
    assert_eq!(active_ns(&mut rig, &mut admin), [1]);

    let two = with_ns(&cfg, 2, "1MiB");
    let mut done = rig.target.reconfigure(&cfg, &two, open).unwrap();
    assert_eq!(done.pending_drains(), 0);
    assert!(
        done.changes
            .iter()
            .any(|c| c.contains("namespace 2 (ram") && c.ends_with("added")),
        "{:?}",
        done.changes
    );
    let aen = rig.wait(&mut admin);
    assert_eq!(aen.status(), Status::SUCCESS);
    assert_eq!(
        aen.cqe.dw0.get(),
        0x0004_0002,
        "notice, ns attribute changed, log 04h"
    );
    assert_eq!(changed_ns(&mut rig, &mut admin), [2]);
    assert!(
        changed_ns(&mut rig, &mut admin).is_empty(),
        "read clears it"
    );
    assert_eq!(active_ns(&mut rig, &mut admin), [1, 2]);
    // The new namespace takes I/O.
    let data = pattern(4096, 7);
    let c = rig.exec(
        &mut io,
        cmd::write(2, 8, 8, SglDescriptor::in_capsule(0, 4096)),
        &data,
    );
    assert_eq!(c.status(), Status::SUCCESS);

    // Remove nsid 1: I/O to it fails at once, the list and the event say so.
    admin.submit(cmd::async_event_request(), &[], 1).unwrap();
    rig.pump();
    let mut only2 = two.clone();
    only2.subsystems[0].namespaces.retain(|n| n.nsid == Some(2));
    only2.check("test").unwrap();
    let mut done = rig.target.reconfigure(&two, &only2, open).unwrap();
    rig.pump();
    assert_eq!(done.pending_drains(), 0, "nothing was in flight");
    assert_eq!(rig.wait(&mut admin).cqe.dw0.get(), 0x0004_0002);
    assert_eq!(changed_ns(&mut rig, &mut admin), [1]);
    assert_eq!(active_ns(&mut rig, &mut admin), [2]);
    let r = io.wire().register(4096);
    let c = rig.exec(
        &mut io,
        cmd::read(1, 0, 8, SglDescriptor::keyed(r.addr, 4096, r.key, false)),
        &[],
    );
    assert_status(&c, Status::INVALID_NAMESPACE);
    let c = rig.exec(
        &mut io,
        cmd::read(2, 8, 8, SglDescriptor::keyed(r.addr, 4096, r.key, false)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(io.wire().read_region(r), data);
    // The other subsystem's namespaces were not touched.
    assert_eq!(rig.target.subsystems()[2].namespaces().len(), 1);
}

#[test]
fn removing_a_namespace_drains_its_commands_in_the_device() {
    let cfg = config("");
    let b = FakeBackend::new(4 << 20, 64);
    let dev = b.dev.clone();
    let mut rig = Rig::with_backend(&cfg, Arc::new(b));
    assert_eq!(rig.group.channel_count(), 1);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    dev.ctl().hold = true;
    let region = io.wire().register(4 * 4096);
    for i in 0..4u64 {
        let d = SglDescriptor::keyed(region.addr + i * 4096, 4096, region.key, false);
        io.submit(cmd::read(1, i * 8, 8, d), &[], i).unwrap();
    }
    rig.pump();
    assert_eq!(rig.group.backend_in_flight(), 4);
    let mut none = cfg.clone();
    none.subsystems[0].namespaces.clear();
    none.check("test").unwrap();
    let mut done = rig.target.reconfigure(&cfg, &none, open).unwrap();
    for _ in 0..5 {
        rig.pump();
    }
    assert_eq!(done.pending_drains(), 1, "the group waits for the device");
    assert_eq!(rig.group.channel_count(), 1);
    // New commands are refused meanwhile.
    let d = SglDescriptor::keyed(region.addr, 4096, region.key, false);
    io.submit(cmd::read(1, 0, 8, d), &[], 9).unwrap();
    rig.pump();
    let c = io.poll_one().expect("refused at once");
    assert_status(&c, Status::INVALID_NAMESPACE);
    // The device completes: the four reads succeed, then the channel goes.
    dev.ctl().hold = false;
    let cs = rig.collect(&mut io, 4);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    rig.pump();
    assert_eq!(done.pending_drains(), 0);
    assert_eq!(rig.group.channel_count(), 0);
    assert_eq!(rig.group.free_buffers(), 16);
}

#[test]
fn removed_hosts_lose_their_controllers_and_attributes_change() {
    let cfg = config("");
    let mut rig = Rig::new(&cfg);
    let (mut admin, _) = rig.admin(0);
    // A controller of the other subsystem, which must not be disturbed.
    let mut other = rig.open(0, 32);
    let c = rig.connect_keyed(
        &mut other,
        "nqn.2026-11.io.nvmf-p2p:private",
        OTHER_HOST,
        CNTLID_DYNAMIC,
        31,
        0,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    // Serial and model change; Identify shows them to the live controller.
    let mut new = cfg.clone();
    new.subsystems[0].serial = "SN-NEW".into();
    new.subsystems[0].model = "renamed".into();
    new.check("test").unwrap();
    let done = rig.target.reconfigure(&cfg, &new, open).unwrap();
    assert_eq!(done.changes.len(), 2, "{:?}", done.changes);
    let r = admin.wire().register(4096);
    rig.exec(&mut admin, cmd::identify(cns::CONTROLLER, 0, keyed(r)), &[]);
    let id = IdentifyController::read_from_bytes(&admin.wire().read_region(r)).unwrap();
    assert_eq!(&id.sn[..6], b"SN-NEW");
    assert_eq!(&id.mn[..7], b"renamed");
    // Swap the allowed host: the connected one is torn down, the other subsystem's stays.
    let mut swapped = new.clone();
    swapped.subsystems[0].hosts = vec![OTHER_HOST.into()];
    swapped.check("test").unwrap();
    let done = rig.target.reconfigure(&new, &swapped, open).unwrap();
    assert!(
        done.changes.iter().any(|c| c.contains("removed")),
        "{:?}",
        done.changes
    );
    for _ in 0..5 {
        rig.pump();
    }
    let ctrls = rig.target.controllers();
    assert_eq!(ctrls.len(), 1, "only the other subsystem's controller");
    assert_eq!(ctrls[0].hostnqn(), OTHER_HOST);
    // It may not connect again; the newly allowed host may.
    let mut again = rig.open(0, 32);
    let c = rig.connect_keyed(&mut again, SUBNQN, HOSTNQN, CNTLID_DYNAMIC, 31, 0);
    assert_ne!(c.status(), Status::SUCCESS);
    let mut q = rig.open(0, 32);
    let c = rig.connect_keyed(&mut q, SUBNQN, OTHER_HOST, CNTLID_DYNAMIC, 31, 0);
    assert_eq!(c.status(), Status::SUCCESS);
}

fn discovery_header(rig: &mut Rig, q: &mut HostQ) -> (u64, u64) {
    let r = q.wire().register(1024);
    let c = rig.exec(
        q,
        cmd::get_log_page(log::DISCOVERY, 0, 1024, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let b = q.wire().read_region(r);
    (
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
    )
}

#[test]
fn subsystems_and_listeners_change_the_discovery_log_with_an_event() {
    let cfg = config("");
    let mut rig = Rig::new(&cfg);
    let mut disc = rig.open(0, 32);
    let c = rig.connect_keyed(&mut disc, DISCOVERY_NQN, HOSTNQN, CNTLID_DYNAMIC, 31, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    rig.enable(&mut disc);
    let c = rig.exec(
        &mut disc,
        cmd::set_features(feat::ASYNC_EVENT_CONFIG, 1 << 31),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let (gen0, n0) = discovery_header(&mut rig, &mut disc);
    assert_eq!(n0, 2, "discovery + the one subsystem this host may see");
    disc.submit(cmd::async_event_request(), &[], 0).unwrap();
    rig.pump();
    // A subsystem this host may see, and a second listener.
    let mut new = cfg.clone();
    let mut sub = new.subsystems[1].clone();
    sub.nqn = "nqn.2026-11.io.nvmf-p2p:new".into();
    sub.allow_any_host = true;
    sub.namespaces.clear();
    new.subsystems.push(sub);
    new.listeners.push(transport::config::ListenerConfig {
        port: 4421,
        ..cfg.listeners[0].clone()
    });
    new.check("test").unwrap();
    let done = rig.target.reconfigure(&cfg, &new, open).unwrap();
    assert_eq!(done.listeners_added.len(), 1);
    let aen = rig.wait(&mut disc);
    assert_eq!(
        aen.cqe.dw0.get(),
        0x0070_f002,
        "notice, discovery log change, log 70h"
    );
    let (gen1, n1) = discovery_header(&mut rig, &mut disc);
    assert!(gen1 > gen0, "generation counter {gen0} -> {gen1}");
    assert_eq!(n1, 2 * 3, "two listeners × (discovery + two subsystems)");
    // Removing it: its controllers go, the log shrinks again.
    let mut q = rig.open(0, 32);
    let c = rig.connect_keyed(
        &mut q,
        "nqn.2026-11.io.nvmf-p2p:new",
        HOSTNQN,
        CNTLID_DYNAMIC,
        31,
        0,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(rig.target.controllers().len(), 2);
    let done = rig.target.reconfigure(&new, &cfg, open).unwrap();
    assert_eq!(done.listeners_removed.len(), 1);
    for _ in 0..5 {
        rig.pump();
    }
    assert_eq!(
        rig.target.controllers().len(),
        1,
        "the discovery controller only"
    );
    let (gen2, n2) = discovery_header(&mut rig, &mut disc);
    assert!(gen2 > gen1);
    assert_eq!(n2, n0);
}

#[test]
fn a_change_that_cannot_be_applied_whole_changes_nothing() {
    let cfg = config("");
    let rig = Rig::new(&cfg);
    // A new namespace next to a setting the poll groups were built from.
    let mut new = with_ns(&cfg, 2, "1MiB");
    new.queue_depth = 64;
    let e = rig
        .target
        .reconfigure(&cfg, &new, open)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("queue_depth") && e.contains("restart"), "{e}");
    // A serial change next to a backend that does not open.
    let mut new = cfg.clone();
    new.subsystems[0].serial = "CHANGED".into();
    new.subsystems[0].namespaces.push(NamespaceConfig {
        nsid: Some(3),
        backend: "file:/nonexistent/dir/disk.img".parse().unwrap(),
    });
    new.check("test").unwrap();
    let e = rig
        .target
        .reconfigure(&cfg, &new, open)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("subsystem[0].namespace[1].backend"), "{e}");
    let sub = &rig.target.subsystems()[1];
    assert_eq!(sub.serial(), "SN123");
    assert_eq!(sub.namespaces().len(), 1);
    // The configuration file's own checks refuse a duplicate nsid, naming the field.
    let mut dup = cfg.clone();
    dup.subsystems[0].namespaces.push(NamespaceConfig {
        nsid: Some(1),
        backend: "ram:1MiB".parse().unwrap(),
    });
    let e = dup.check("ctl request").unwrap_err().to_string();
    assert!(
        e.contains("subsystem[0].namespace[1].nsid") && e.contains("duplicate nsid 1"),
        "{e}"
    );
    // Nothing changed, nothing to say.
    let done = rig.target.reconfigure(&cfg, &cfg, open).unwrap();
    assert!(done.is_empty());
}
