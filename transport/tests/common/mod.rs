//! Test rig: a target on the loopback transport, driven from the same thread.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nvme::spec::{reg, Cqe, Sqe, Status};
use transport::backend::{open_backend, Backend};
use transport::config::{BackendSpec, TargetConfig};
use transport::fabrics::{SglDescriptor, CNTLID_DYNAMIC};
use transport::initiator::{cmd, Completion, InitiatorQueue};
use transport::loopback::{HostRegion, LinkState, LoopbackHost, TargetRig};
use transport::nvmf_target::Target;
use zerocopy::IntoBytes;

pub const SUBNQN: &str = "nqn.2026-11.io.nvmf-p2p:test";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
pub const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:99999999-0000-0000-0000-000000000009";

pub fn config(extra: &str) -> TargetConfig {
    TargetConfig::parse(&config_text(extra), Path::new("test.toml")).expect("test config")
}

/// The TOML text behind [`config`].
pub fn config_text(extra: &str) -> String {
    format!(
        r#"
queue_depth = 32
max_io_queues = 4
max_io_size = 131072
data_buffers = 16
{extra}

[[listener]]
trtype = "rdma"
address = "10.0.0.1"

[[subsystem]]
nqn = "{SUBNQN}"
serial = "SN123"
model = "loopback test"
hosts = ["{HOSTNQN}"]
[[subsystem.namespace]]
backend = "ram:4MiB"

[[subsystem]]
nqn = "nqn.2026-11.io.nvmf-p2p:private"
hosts = ["{OTHER_HOST}"]
[[subsystem.namespace]]
backend = "ram:1MiB"
"#
    )
}

/// The library's loopback rig ([`TargetRig`]: target, transport, connector, poll group,
/// reached through `Deref`) with the tests' clock and host helpers.
pub struct Rig {
    pub lb: TargetRig,
    /// When set, polls use this fixed time (keep-alive never expires by itself).
    pub frozen: Option<Instant>,
}

impl std::ops::Deref for Rig {
    type Target = TargetRig;
    fn deref(&self) -> &TargetRig {
        &self.lb
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut TargetRig {
        &mut self.lb
    }
}

pub type HostQ = InitiatorQueue<LoopbackHost>;

impl Rig {
    pub fn new(cfg: &TargetConfig) -> Rig {
        Rig::with_target(Target::from_config(cfg, None).expect("target"))
    }

    /// A rig whose 4 MiB namespace (`backend = "ram:4MiB"`, nsid 1 of SUBNQN) is `ns`.
    pub fn with_backend(cfg: &TargetConfig, ns: Arc<dyn Backend>) -> Rig {
        let target = Target::with_backends(cfg, |spec| match spec {
            BackendSpec::Ram { size } if *size == 4 << 20 => Ok(ns.clone()),
            s => open_backend(s, None),
        })
        .expect("target");
        Rig::with_target(target)
    }

    /// A rig around `target`: one poll group on a loopback transport.
    pub fn with_target(target: Target) -> Rig {
        Rig {
            lb: TargetRig::new(target).expect("poll group"),
            frozen: None,
        }
    }

    pub fn default_rig() -> Rig {
        Rig::new(&config(""))
    }

    /// Accepts pending connections and polls until the group is idle.
    pub fn pump(&mut self) {
        let now = self.frozen.unwrap_or_else(Instant::now);
        assert!(self.lb.pump_at(now, 1000), "target never went idle");
    }

    /// Polls until `n` completions arrived on `q` (or panics after a few seconds), in
    /// the order they came.
    pub fn collect(&mut self, q: &mut HostQ, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while out.len() < n {
            while let Some(c) = q.poll_one() {
                out.push(c);
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} completions",
                out.len()
            );
            let now = self.frozen.unwrap_or_else(Instant::now);
            if !self.lb.pump_at(now, 1) {
                std::thread::yield_now();
            }
        }
        out
    }

    /// Opens the transport connection of queue `qid` (CM level only).
    pub fn open(&mut self, qid: u16, entries: u16) -> HostQ {
        let host = self.lb.connect(qid, entries);
        self.pump();
        assert!(
            matches!(host.state(), LinkState::Established(_)),
            "CM: {:?}",
            host.state()
        );
        InitiatorQueue::new(host, qid, entries)
    }

    /// Submits and waits for the completion.
    pub fn exec(&mut self, q: &mut HostQ, sqe: Sqe, icd: &[u8]) -> Completion {
        q.submit(sqe, icd, 0).expect("submit");
        self.wait(q)
    }

    pub fn wait(&mut self, q: &mut HostQ) -> Completion {
        for _ in 0..100 {
            if let Some(c) = q.poll_one() {
                return c;
            }
            self.pump();
        }
        panic!("no response");
    }

    /// Connect with Connect data in host memory (keyed SGL, RDMA READ), as Linux does on
    /// the admin queue.
    pub fn connect_keyed(
        &mut self,
        q: &mut HostQ,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        sqsize: u16,
        kato: u32,
    ) -> Cqe {
        let data = cmd::connect_data([1; 16], cntlid, subnqn, hostnqn);
        let r = q.wire().register(1024);
        q.wire().write_region(r, 0, data.as_bytes());
        let sqe = cmd::connect(q.qid(), sqsize, kato, keyed(r));
        self.exec(q, sqe, &[]).cqe
    }

    /// Connect with Connect data in the capsule.
    pub fn connect_icd(
        &mut self,
        q: &mut HostQ,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        sqsize: u16,
    ) -> Cqe {
        let data = cmd::connect_data([1; 16], cntlid, subnqn, hostnqn);
        let sqe = cmd::connect(q.qid(), sqsize, 0, SglDescriptor::in_capsule(0, 1024));
        self.exec(q, sqe, data.as_bytes()).cqe
    }

    /// Admin queue connected and enabled; returns (queue, cntlid).
    pub fn admin(&mut self, kato: u32) -> (HostQ, u16) {
        let mut q = self.open(0, 32);
        let c = self.connect_keyed(&mut q, SUBNQN, HOSTNQN, CNTLID_DYNAMIC, 31, kato);
        assert_eq!(c.status(), Status::SUCCESS, "connect");
        let cntlid = c.dw0.get() as u16;
        self.enable(&mut q);
        (q, cntlid)
    }

    pub fn enable(&mut self, q: &mut HostQ) {
        let cc = 1 | (6 << 16) | (4 << 20);
        let c = self.exec(q, cmd::property_set(reg::CC as u32, cc), &[]);
        assert_eq!(c.status(), Status::SUCCESS);
        let c = self.exec(q, cmd::property_get(reg::CSTS as u32, false), &[]);
        assert_eq!(c.cqe.dw0.get() & 1, 1, "CSTS.RDY");
    }

    /// I/O queue `qid` connected to `cntlid`.
    pub fn io(&mut self, qid: u16, cntlid: u16) -> HostQ {
        let mut q = self.open(qid, 32);
        let c = self.connect_icd(&mut q, SUBNQN, HOSTNQN, cntlid, 31);
        assert_eq!(c.status(), Status::SUCCESS, "io connect");
        q
    }
}

pub fn keyed(r: HostRegion) -> SglDescriptor {
    SglDescriptor::keyed(r.addr, r.len, r.key, false)
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Asserts status (ignoring DNR/More bits).
#[track_caller]
pub fn assert_status(c: &Completion, want: Status) {
    assert!(
        c.status().same_code(want),
        "cid {}: got {} want {}",
        c.cid,
        c.status(),
        want
    );
}
