//! Fuzz entry points: one function per cargo-fuzz target (`fuzz/fuzz_targets/*.rs` call
//! them), also replayed over every file of `fuzz/corpus/<target>/` by
//! `transport/tests/fuzz_corpus.rs` on stable (`scripts/test`). See docs/reliability.md,
//! "Fuzzing".
//!
//! Every entry takes arbitrary bytes (most decode them into structured input with
//! [`arbitrary`]) and feeds them to the code that parses network or configuration input.
//! An entry panics only when an invariant of that code breaks: a panic in the target
//! itself, a capsule that got no answer or two, a response to a command nobody sent, a
//! poll group that never goes idle, a discovery log whose pieces disagree.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use nvme::spec::{reg, Cqe, Sqe, Status};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::config::TargetConfig;
use crate::direct::proto::{self, AttachRequest, ConnectPrivate, Descriptor};
use crate::direct::{AttachReply, DirectAttach};
use crate::fabrics::{
    validate_cm_request, CmLimits, ConnectData, DiscoveryLogEntry, DiscoveryLogHeader,
    SglDescriptor, CNTLID_DYNAMIC, DISCOVERY_NQN, LID_DISCOVERY,
};
use crate::initiator::cmd;
use crate::loopback::{HostRegion, LinkState, LoopbackHost, TargetRig};
use crate::nvmf_target::Target;

/// `NVMF_P2P_FUZZ_DEBUG` set: print the decoded input and every capsule sent (to read a
/// finding; docs/reliability.md).
fn debug() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("NVMF_P2P_FUZZ_DEBUG").is_some())
}

/// A fuzz entry function.
pub type Entry = fn(&[u8]);

/// Every target: name (the `fuzz/fuzz_targets/<name>.rs` file and `fuzz/corpus/<name>/`)
/// and entry function.
pub const TARGETS: &[(&str, Entry)] = &[
    ("capsule", capsule),
    ("commands", commands),
    ("sgl", sgl),
    ("connect_data", connect_data),
    ("cm_private", cm_private),
    ("direct_proto", direct_proto),
    ("discovery", discovery),
    ("config", config),
];

const SUBNQN: &str = "nqn.2026-11.io.nvmf-p2p:fuzz";
const PRIVATE_NQN: &str = "nqn.2026-11.io.nvmf-p2p:private";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000f022";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:99999999-0000-0000-0000-000000000009";
/// Queue entries of the fuzzed connections (the config's `queue_depth`).
const DEPTH: u16 = 16;
/// Bytes of the host memory region keyed SGLs point into.
const REGION: u32 = 16384;
/// Most `allow_any_host` subsystems the discovery target adds.
const MAX_EXTRA_SUBSYSTEMS: usize = 5;

/// A small target: two subsystems (one the fuzzed host may use, one it may not), 64 KiB
/// namespaces, few and small data buffers so that exhaustion is reachable. `extra`
/// subsystems with `allow_any_host` grow the discovery log.
fn config_text(extra_subsystems: usize) -> String {
    let mut s = format!(
        r#"
queue_depth = {DEPTH}
max_io_queues = 2
max_io_size = 8192
data_buffers = 4
in_capsule_data_size = 4096

[[listener]]
trtype = "rdma"
address = "10.0.0.1"

[[subsystem]]
nqn = "{SUBNQN}"
serial = "FUZZ"
hosts = ["{HOSTNQN}"]
[[subsystem.namespace]]
backend = "ram:64KiB"
[[subsystem.namespace]]
backend = "ram:32KiB"

[[subsystem]]
nqn = "{PRIVATE_NQN}"
hosts = ["{OTHER_HOST}"]
[[subsystem.namespace]]
backend = "ram:16KiB"
"#
    );
    for i in 0..extra_subsystems {
        s += &format!(
            "\n[[subsystem]]\nnqn = \"nqn.2026-11.io.nvmf-p2p:any{i}\"\nallow_any_host = true\n\
             [[subsystem.namespace]]\nbackend = \"ram:4KiB\"\n"
        );
    }
    s
}

/// A target on the loopback transport, polled from the calling thread at a clock the
/// input moves (keep-alive expiry is reachable, runs are reproducible).
struct Rig {
    lb: TargetRig,
    now: Instant,
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

impl Rig {
    fn new(extra_subsystems: usize) -> Rig {
        // Parsed once per shape: TOML parsing would be most of an execution's time.
        static CONFIGS: OnceLock<Vec<TargetConfig>> = OnceLock::new();
        let configs = CONFIGS.get_or_init(|| {
            (0..=MAX_EXTRA_SUBSYSTEMS)
                .map(|n| {
                    TargetConfig::parse(&config_text(n), Path::new("fuzz.toml"))
                        .expect("the fuzz configuration is valid")
                })
                .collect()
        });
        let target =
            Target::from_config(&configs[extra_subsystems.min(MAX_EXTRA_SUBSYSTEMS)], None)
                .expect("fuzz target");
        Rig {
            lb: TargetRig::new(target).expect("poll group"),
            now: Instant::now(),
        }
    }

    /// Accepts pending connections and polls until the group is idle.
    fn pump(&mut self) {
        let now = self.now;
        assert!(
            self.lb.pump_at(now, 10_000),
            "the poll group never went idle"
        );
    }

    /// A transport connection (CM level only) for `qid`.
    fn open(&mut self, qid: u16) -> Host {
        let wire = self.lb.connect(qid, DEPTH);
        self.pump();
        assert!(
            matches!(wire.state(), LinkState::Established(_)),
            "CM refused a valid request: {:?}",
            wire.state()
        );
        Host::new(wire, qid)
    }

    /// An enabled admin queue of a controller of `subnqn`; `None` when Connect failed.
    fn admin(&mut self, subnqn: &str, kato: u32) -> Option<(Host, u16)> {
        let mut q = self.open(0);
        let data = cmd::connect_data([1; 16], CNTLID_DYNAMIC, subnqn, HOSTNQN);
        let r = q.wire.register(1024);
        q.wire.write_region(r, 0, data.as_bytes());
        let c = self.exec(&mut q, cmd::connect(0, DEPTH - 1, kato, keyed(r)), &[])?;
        if !c.status().is_success() {
            return None;
        }
        let cntlid = c.dw0.get() as u16;
        let cc = 1 | (6 << 16) | (4 << 20);
        self.exec(&mut q, cmd::property_set(reg::CC as u32, cc), &[])?;
        Some((q, cntlid))
    }

    /// An I/O queue `qid` of controller `cntlid` (Connect data in the capsule).
    fn io(&mut self, qid: u16, cntlid: u16) -> Option<Host> {
        let mut q = self.open(qid);
        let data = cmd::connect_data([1; 16], cntlid, SUBNQN, HOSTNQN);
        let sqe = cmd::connect(qid, DEPTH - 1, 0, SglDescriptor::in_capsule(0, 1024));
        let c = self.exec(&mut q, sqe, data.as_bytes())?;
        c.status().is_success().then_some(q)
    }

    /// Sends one command and returns its response (None: none came, e.g. a held AER).
    fn exec(&mut self, q: &mut Host, sqe: Sqe, icd: &[u8]) -> Option<Cqe> {
        let cid = q.send(sqe.as_bytes().try_into().expect("64 bytes"), icd)?;
        self.pump();
        q.take(cid)
    }
}

fn keyed(r: HostRegion) -> SglDescriptor {
    SglDescriptor::keyed(r.addr, r.len, r.key, false)
}

/// The host end of one queue: sends raw capsules with fresh command ids and checks that
/// every response answers a command it sent on this queue, once.
struct Host {
    wire: LoopbackHost,
    qid: u16,
    next_cid: u16,
    outstanding: HashSet<u16>,
    /// The most commands ever outstanding at once: beyond the queue depth the host breaks
    /// the protocol, and the target may drop capsules (`QueueHandler::overflow_capsules`).
    most_outstanding: usize,
    answered: Vec<Cqe>,
}

impl Host {
    fn new(wire: LoopbackHost, qid: u16) -> Host {
        Host {
            wire,
            qid,
            next_cid: 0,
            outstanding: HashSet::new(),
            most_outstanding: 0,
            answered: Vec::new(),
        }
    }

    /// Sends `cmd` with the next command id; None when the link is down.
    fn send(&mut self, cmd: &[u8; 64], icd: &[u8]) -> Option<u16> {
        let mut c = *cmd;
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        c[2..4].copy_from_slice(&cid.to_le_bytes());
        self.wire.send(&c, icd).ok()?;
        if debug() {
            eprintln!("q{} cid {cid}: {:02x?} icd {}", self.qid, &c[..], icd.len());
        }
        self.outstanding.insert(cid);
        self.most_outstanding = self.most_outstanding.max(self.outstanding.len());
        Some(cid)
    }

    /// Moves received responses to `answered`, checking them.
    fn collect(&mut self) {
        while let Some((cqe, _)) = self.wire.recv() {
            let cid = cqe.cid.get();
            assert!(
                self.outstanding.remove(&cid),
                "queue {}: response to cid {cid}, which is not outstanding",
                self.qid
            );
            assert_eq!(cqe.sq_id.get(), self.qid, "response names another SQ");
            self.answered.push(cqe);
        }
    }

    /// The response to `cid` if it came.
    fn take(&mut self, cid: u16) -> Option<Cqe> {
        self.collect();
        let i = self.answered.iter().position(|c| c.cid.get() == cid)?;
        Some(self.answered.swap_remove(i))
    }
}

fn sqe_bytes(s: &Sqe) -> [u8; 64] {
    s.as_bytes().try_into().expect("64 bytes")
}

fn with_sgl(mut s: Sqe, d: SglDescriptor) -> Sqe {
    s.set_psdt(1);
    let mut b = [0u8; 16];
    b.copy_from_slice(d.as_bytes());
    s.set_dptr(b);
    s
}

/// Opcodes worth picking more often than 1 in 256: every admin and I/O command the target
/// implements, fabrics, the direct-mode vendor commands, and neighbours that it does not.
const OPCODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x10, 0x18, 0x7f, 0x80, 0xc0, 0xc2,
    0xff,
];

/// An opcode: mostly a known one.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Opcode {
    Known(u8),
    Any(u8),
}

impl Opcode {
    fn get(self) -> u8 {
        match self {
            Opcode::Known(i) => OPCODES[usize::from(i) % OPCODES.len()],
            Opcode::Any(o) => o,
        }
    }
}

/// A data pointer: aimed at the host region, in the capsule, or raw bytes.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Sgl {
    /// Keyed, `off` bytes into the region (may run past it), `len` bytes; `key_delta` 0 is
    /// the region's key.
    Keyed {
        off: i16,
        len: u16,
        key_delta: u8,
        invalidate: bool,
    },
    /// Keyed with every field free.
    KeyedAny {
        addr: u64,
        len: u32,
        key: u32,
    },
    InCapsule {
        offset: u16,
        len: u16,
    },
    Raw([u8; 16]),
}

impl Sgl {
    fn descriptor(self, r: HostRegion) -> SglDescriptor {
        match self {
            Sgl::Keyed {
                off,
                len,
                key_delta,
                invalidate,
            } => SglDescriptor::keyed(
                r.addr.wrapping_add_signed(i64::from(off)),
                u32::from(len),
                r.key.wrapping_add(u32::from(key_delta)),
                invalidate,
            ),
            Sgl::KeyedAny { addr, len, key } => {
                SglDescriptor::keyed(addr, len & 0xff_ffff, key, false)
            }
            Sgl::InCapsule { offset, len } => {
                SglDescriptor::in_capsule(u64::from(offset), u32::from(len))
            }
            Sgl::Raw(b) => SglDescriptor::read_from_bytes(&b[..]).unwrap_or_default(),
        }
    }
}

/// Command dwords: small values reach execution (namespace ranges are tiny), any values
/// reach the checks.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Dwords {
    Small([u8; 6]),
    Any([u32; 6]),
}

impl Dwords {
    fn get(self) -> [u32; 6] {
        match self {
            Dwords::Small(b) => b.map(u32::from),
            Dwords::Any(d) => d,
        }
    }
}

/// One command of the stateful target.
#[derive(Arbitrary, Debug, Clone)]
struct Command {
    opcode: Opcode,
    /// Fabrics command type when the opcode is 0x7f.
    fctype: u8,
    /// 0..=3 are namespaces worth hitting (0, 1, 2, absent), else broadcast or random.
    nsid: u32,
    fuse: u8,
    dwords: Dwords,
    sgl: Sgl,
    icd_len: u16,
}

impl Command {
    fn build(&self, r: HostRegion) -> (Sqe, Vec<u8>) {
        let opc = self.opcode.get();
        let mut s = with_sgl(Sqe::new(opc), self.sgl.descriptor(r));
        s.nsid = match self.nsid {
            n @ 0..=3 => n,
            4 | 5 => u32::MAX,
            n => n,
        }
        .into();
        s.cdw0 = (s.cdw0.get() | u32::from(self.fuse & 3) << 8).into();
        let d = self.dwords.get();
        let mut b = sqe_bytes(&s);
        for (i, dw) in d.iter().enumerate() {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&dw.to_le_bytes());
        }
        if opc == 0x7f {
            // Fabrics: FCTYPE at byte 4 (the NSID field), property offset/value in 40..56.
            b[4] = self.fctype;
        }
        let s = Sqe::read_from_bytes(&b[..]).expect("64 bytes");
        let icd = (0..usize::from(self.icd_len) % 9000)
            .map(|i| i as u8)
            .collect();
        (s, icd)
    }
}

/// A step of the stateful target.
#[derive(Arbitrary, Debug, Clone)]
enum Step {
    Admin(Command),
    Io {
        queue: u8,
        command: Command,
    },
    /// A capsule of any 64 bytes.
    Raw {
        queue: u8,
        bytes: [u8; 32],
        more: [u8; 32],
        icd_len: u16,
    },
    /// Several commands before the next poll (requests queue up, buffers run out).
    Burst {
        queue: u8,
        commands: Vec<Command>,
    },
    /// Connect another I/O queue (any qid, any controller id).
    ConnectIo {
        qid: u8,
        own_cntlid: bool,
        sqsize: u8,
    },
    /// The clock moves (keep-alive expiry).
    Advance {
        ms: u16,
    },
    /// Limit or lift the host's receive credits on a queue.
    Credits {
        queue: u8,
        n: u8,
    },
    /// The host drops a connection.
    Disconnect {
        queue: u8,
    },
}

/// Input of [`commands`]: the admin queue's keep-alive, then the steps.
#[derive(Arbitrary, Debug)]
struct Session {
    kato: u16,
    steps: Vec<Step>,
}

/// Capsule/SQE parsing: one capsule of any bytes (first byte: which queue state, then 64
/// bytes of command, then in-capsule data) on a queue before Connect, an enabled admin
/// queue, or an I/O queue. It gets one answer (none only for an AER held by the admin
/// queue, or before Connect when the capsule is refused by dropping the link) and the
/// queue still answers afterwards.
pub fn capsule(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mut cmd = [0u8; 64];
    let n = rest.len().min(64);
    cmd[..n].copy_from_slice(&rest[..n]);
    let icd = rest.get(64..).unwrap_or(&[]);
    // The SQE accessors on any bytes.
    let sqe = Sqe::read_from_bytes(&cmd[..]).expect("64 bytes");
    let _ = (
        sqe.opcode(),
        sqe.fuse(),
        sqe.psdt(),
        sqe.slba(),
        sqe.nlb0(),
        sqe.dptr(),
    );
    let _ = SglDescriptor::read_from_bytes(&cmd[24..40]).map(|d| d.decode());

    let mut rig = Rig::new(0);
    let mut q = match which % 3 {
        0 => rig.open(0),
        1 => rig.admin(SUBNQN, 0).expect("admin queue").0,
        _ => {
            let (_admin, cntlid) = rig.admin(SUBNQN, 0).expect("admin queue");
            rig.io(1, cntlid).expect("I/O queue")
        }
    };
    let Some(cid) = q.send(&cmd, icd) else {
        return;
    };
    rig.pump();
    let got = q.take(cid);
    if got.is_none() && which % 3 == 1 {
        assert_eq!(
            cmd[0], 0x0c,
            "only an AER may stay unanswered on the admin queue"
        );
    }
    if which % 3 == 2 {
        assert!(got.is_some(), "an I/O queue answers every capsule");
    }
    if got.is_none() && which % 3 == 0 {
        assert!(
            !matches!(q.wire.state(), LinkState::Established(_)),
            "a capsule before Connect got no answer on a live link"
        );
    }
}

/// The command layer over the loopback transport, stateful: Connect and enable first,
/// then a sequence of admin and I/O commands, raw capsules, more queues, clock steps,
/// credit limits and disconnects. Every response answers an outstanding command of its
/// queue, the group always goes idle, and while the controller is alive a Keep Alive
/// gets an answer.
pub fn commands(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(session) = Session::arbitrary(&mut u) else {
        return;
    };
    if debug() {
        eprintln!("{session:#?}");
    }
    let mut rig = Rig::new(0);
    let Some((admin, cntlid)) = rig.admin(SUBNQN, u32::from(session.kato)) else {
        panic!("Connect of the admin queue failed");
    };
    let region = admin.wire.register(REGION);
    let mut queues: Vec<(Host, HostRegion)> = vec![(admin, region)];
    if let Some(io) = rig.io(1, cntlid) {
        let r = io.wire.register(REGION);
        queues.push((io, r));
    }
    for step in session.steps.iter().take(64) {
        match step {
            Step::Admin(c) => {
                let (s, icd) = c.build(queues[0].1);
                queues[0].0.send(&sqe_bytes(&s), &icd);
            }
            Step::Io { queue, command } => {
                let i = 1 + usize::from(*queue) % queues.len().max(2).saturating_sub(1);
                if let Some((q, r)) = queues.get_mut(i) {
                    let (s, icd) = command.build(*r);
                    q.send(&sqe_bytes(&s), &icd);
                }
            }
            Step::Raw {
                queue,
                bytes,
                more,
                icd_len,
            } => {
                let i = usize::from(*queue) % queues.len();
                let mut c = [0u8; 64];
                c[..32].copy_from_slice(bytes);
                c[32..].copy_from_slice(more);
                let icd = vec![0x5a; usize::from(*icd_len) % 9000];
                queues[i].0.send(&c, &icd);
            }
            Step::Burst { queue, commands } => {
                let i = usize::from(*queue) % queues.len();
                for c in commands.iter().take(2 * usize::from(DEPTH)) {
                    let (s, icd) = c.build(queues[i].1);
                    queues[i].0.send(&sqe_bytes(&s), &icd);
                }
            }
            Step::ConnectIo {
                qid,
                own_cntlid,
                sqsize,
            } => {
                let qid = u16::from(*qid % 4);
                let wire = rig.connect(qid, DEPTH);
                rig.pump();
                if matches!(wire.state(), LinkState::Established(_)) {
                    let mut q = Host::new(wire, qid);
                    let id = if *own_cntlid { cntlid } else { cntlid ^ 1 };
                    let data = cmd::connect_data([1; 16], id, SUBNQN, HOSTNQN);
                    let sqe = cmd::connect(
                        qid,
                        u16::from(*sqsize),
                        0,
                        SglDescriptor::in_capsule(0, 1024),
                    );
                    q.send(&sqe_bytes(&sqe), data.as_bytes());
                    let r = q.wire.register(REGION);
                    queues.push((q, r));
                }
            }
            Step::Advance { ms } => rig.now += Duration::from_millis(u64::from(*ms) * 4),
            Step::Credits { queue, n } => {
                let i = usize::from(*queue) % queues.len();
                queues[i].0.wire.set_send_credits(if *n == 0 {
                    usize::MAX
                } else {
                    usize::from(*n)
                });
            }
            Step::Disconnect { queue } => {
                let i = usize::from(*queue) % queues.len();
                queues[i].0.wire.disconnect();
            }
        }
        rig.pump();
        for (q, _) in &mut queues {
            q.collect();
        }
    }
    // Lift every credit limit: what was held back goes out now.
    for (q, _) in &mut queues {
        q.wire.set_send_credits(usize::MAX);
    }
    rig.pump();
    for (q, _) in &mut queues {
        q.collect();
        let kept_to_depth = q.most_outstanding <= usize::from(DEPTH);
        if matches!(q.wire.state(), LinkState::Established(_)) && q.qid != 0 && kept_to_depth {
            // A live I/O queue whose host kept to its depth answered everything (nothing
            // waits on an I/O queue). Beyond the depth, capsules past one more depth of
            // unanswered overflows are dropped by design.
            assert!(
                q.outstanding.is_empty(),
                "I/O queue {} left {} commands unanswered: cids {:?}",
                q.qid,
                q.outstanding.len(),
                q.outstanding
            );
        }
    }
    let admin = &mut queues[0].0;
    if matches!(admin.wire.state(), LinkState::Established(_)) {
        let ka = cmd::keep_alive();
        if let Some(cid) = admin.send(&sqe_bytes(&ka), &[]) {
            rig.pump();
            let live = matches!(admin.wire.state(), LinkState::Established(_));
            assert!(
                admin.take(cid).is_some() || !live,
                "a live admin queue did not answer Keep Alive"
            );
        }
    }
    drop(queues);
    rig.pump();
    let _ = rig.target.controller_stats();
}

/// Input of [`sgl`].
#[derive(Arbitrary, Debug)]
struct SglCase {
    /// 0: write (host → target), 1: read, 2: Compare, 3: Dataset Management, 4: an admin
    /// command with data from the controller (Identify / Get Log Page), 5: an admin
    /// command with data to it (Set Features with data, the direct attach).
    kind: u8,
    slba: u8,
    nlb: u8,
    sgl: Sgl,
    icd: Vec<u8>,
    region_len: u16,
    /// A second command reusing the buffers right after.
    again: bool,
}

/// Keyed and in-capsule SGL handling: data commands whose descriptor points anywhere
/// around a registered host region or into the capsule, with any amount of in-capsule
/// data. Each gets exactly one answer; a keyed transfer touches only the region; and a
/// successful write is read back the same.
pub fn sgl(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(case) = SglCase::arbitrary(&mut u) else {
        return;
    };
    let mut rig = Rig::new(0);
    let (mut admin, cntlid) = rig.admin(SUBNQN, 0).expect("admin queue");
    let mut io = rig.io(1, cntlid).expect("I/O queue");
    let len = u32::from(case.region_len % 12288) + 1;
    let r = io.wire.register(len);
    let ar = admin.wire.register(len);
    let nlb = u16::from(case.nlb % 24);
    let slba = u64::from(case.slba % 140);
    let (q, sqe, region) = match case.kind % 6 {
        0 => (
            &mut io,
            cmd::write(1, slba, nlb, SglDescriptor::default()),
            r,
        ),
        1 => (
            &mut io,
            cmd::read(1, slba, nlb, SglDescriptor::default()),
            r,
        ),
        2 => (&mut io, Sqe::new(0x05), r),
        3 => (
            &mut io,
            cmd::deallocate(1, nlb as u8, SglDescriptor::default()),
            r,
        ),
        4 => (
            &mut admin,
            if case.nlb & 1 == 0 {
                cmd::identify(case.slba % 4, 1, SglDescriptor::default())
            } else {
                cmd::get_log_page(case.slba % 8, u32::MAX, 512, 0, SglDescriptor::default())
            },
            ar,
        ),
        _ => (&mut admin, cmd::set_features(0x0e, 0), ar),
    };
    let mut sqe = with_sgl(sqe, case.sgl.descriptor(region));
    if case.kind % 6 == 2 {
        sqe.nsid = 1.into();
        sqe.cdw10 = (slba as u32).into();
        sqe.cdw12 = u32::from(nlb).into();
    }
    let icd: Vec<u8> = case.icd.iter().copied().take(9000).collect();
    let before = q.wire.read_region(region);
    let c = rig
        .exec(q, sqe, &icd)
        .expect("a data command gets an answer");
    if case.kind % 6 == 1 && !c.status().is_success() {
        assert_eq!(
            q.wire.read_region(region),
            before,
            "a failed read wrote into host memory"
        );
    }
    if case.kind % 6 == 0 && c.status().is_success() && nlb < 16 {
        // Read back what was written, through a plain keyed SGL.
        // `cmd::read`/`cmd::write` count blocks 1-based (0 means 1).
        let bytes = usize::from(nlb.max(1)) * 512;
        let back = io.wire.register(bytes as u32);
        let rd = cmd::read(1, slba, nlb, keyed(back));
        let got = rig.exec(&mut io, rd, &[]).expect("read-back answer");
        assert_eq!(got.status(), Status::SUCCESS, "read back after a write");
        let written: Vec<u8> = match case.sgl.descriptor(r).decode() {
            Ok(crate::fabrics::DataSgl::InCapsule { offset, .. }) => {
                icd[offset as usize..offset as usize + bytes].to_vec()
            }
            Ok(crate::fabrics::DataSgl::Keyed { addr, .. }) => {
                let off = (addr - r.addr) as usize;
                io.wire.read_region(r)[off..off + bytes].to_vec()
            }
            Err(_) => panic!("a write with an unsupported SGL succeeded"),
        };
        assert_eq!(
            &io.wire.read_region(back)[..bytes],
            &written[..],
            "a successful write reads back different data"
        );
    }
    if case.again {
        let back = io.wire.register(512);
        let rd = cmd::read(1, 0, 0, keyed(back));
        let got = rig.exec(&mut io, rd, &[]).expect("answer");
        assert_eq!(got.status(), Status::SUCCESS, "a plain read after the case");
    }
}

/// Where Connect data comes from in [`connect_data`].
#[derive(Arbitrary, Debug)]
enum ConnectDataInput {
    /// Fields chosen from good and bad values.
    Fields {
        hostid: [u8; 16],
        cntlid: u16,
        subnqn: u8,
        hostnqn: u8,
        junk: Vec<u8>,
    },
    /// 1024 (or fewer) bytes of anything.
    Raw(Vec<u8>),
}

/// Input of [`connect_data`].
#[derive(Arbitrary, Debug)]
struct ConnectCase {
    /// Connect on an I/O queue (of the controller an admin queue made first).
    io: bool,
    qid: u8,
    sqsize: u16,
    kato: u32,
    recfmt: u16,
    cattr: u8,
    data: ConnectDataInput,
    /// 0: in the capsule, 1: keyed SGL, 2: the SGL of the input.
    delivery: u8,
    sgl: Sgl,
    /// A second Connect on the same queue.
    twice: bool,
}

/// Connect data and the Connect command: on an admin queue or an I/O queue, any field
/// values, delivered in the capsule or by keyed SGL. Exactly one answer; on success the
/// queue then answers commands.
pub fn connect_data(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(case) = ConnectCase::arbitrary(&mut u) else {
        return;
    };
    let mut rig = Rig::new(0);
    let mut own_cntlid = CNTLID_DYNAMIC;
    let _admin = if case.io {
        let (a, c) = rig.admin(SUBNQN, 0).expect("admin queue");
        own_cntlid = c;
        Some(a)
    } else {
        None
    };
    let qid = if case.io {
        1 + u16::from(case.qid % 2)
    } else {
        0
    };
    let mut q = rig.open(qid);
    let bytes: Vec<u8> = match &case.data {
        ConnectDataInput::Fields {
            hostid,
            cntlid,
            subnqn,
            hostnqn,
            junk,
        } => {
            let pick = |i: u8, junk: &[u8]| -> String {
                match i % 5 {
                    0 => SUBNQN.into(),
                    1 => HOSTNQN.into(),
                    2 => DISCOVERY_NQN.into(),
                    3 => PRIVATE_NQN.into(),
                    _ => String::from_utf8_lossy(junk).into_owned(),
                }
            };
            let cntlid = match cntlid % 4 {
                0 => CNTLID_DYNAMIC,
                1 => own_cntlid,
                _ => *cntlid,
            };
            let sub = pick(*subnqn, junk);
            let host = pick(hostnqn.wrapping_add(1), junk);
            let mut d = ConnectData::new(*hostid, cntlid, &sub, &host);
            if !junk.is_empty() {
                // Unterminated / non-UTF-8 NQN bytes.
                let b = d.as_mut_bytes();
                let n = junk.len().min(256);
                b[256 + (junk[0] as usize % 2) * 256..][..n].copy_from_slice(&junk[..n]);
            }
            d.as_bytes().to_vec()
        }
        ConnectDataInput::Raw(b) => b.iter().copied().take(1100).collect(),
    };
    let region = q.wire.register(1024);
    q.wire
        .write_region(region, 0, &bytes[..bytes.len().min(1024)]);
    let desc = match case.delivery % 3 {
        0 => SglDescriptor::in_capsule(0, bytes.len() as u32),
        1 => keyed(region),
        _ => case.sgl.descriptor(region),
    };
    let mut sqe = cmd::connect(qid, case.sqsize, case.kato, desc);
    {
        let b = sqe.as_mut_bytes();
        b[40..42].copy_from_slice(&case.recfmt.to_le_bytes());
        b[44] = case.cattr;
    }
    let icd = if case.delivery % 3 == 1 {
        &[][..]
    } else {
        &bytes[..]
    };
    let c = rig.exec(&mut q, sqe, icd).expect("Connect gets an answer");
    if case.twice {
        let c2 = rig
            .exec(&mut q, sqe, icd)
            .expect("a second Connect gets an answer");
        if c.status().is_success() {
            assert!(!c2.status().is_success(), "a queue connected twice");
        }
    }
    if c.status().is_success() {
        let ka = if qid == 0 {
            cmd::keep_alive()
        } else {
            cmd::flush(1)
        };
        assert!(
            rig.exec(&mut q, ka, &[]).is_some(),
            "a connected queue does not answer"
        );
    }
}

/// CM private data of a connection request: the validation directly, then through the
/// loopback transport, where the target must accept or reject (never leave it pending),
/// and an accepted queue takes capsules.
pub fn cm_private(data: &[u8]) {
    let lim = CmLimits {
        max_queue_size: DEPTH,
        max_io_queues: 2,
    };
    if let Ok((req, accept)) = validate_cm_request(data, lim) {
        assert!(req.qid.get() <= lim.max_io_queues);
        assert!(accept.crqsize.get() <= DEPTH && accept.crqsize.get() >= 2);
        assert_eq!(
            u32::from(accept.crqsize.get()),
            u32::from(req.hsqsize.get()) + 1
        );
    }
    let mut rig = Rig::new(0);
    let wire = rig.connector.connect_raw(data);
    rig.pump();
    match wire.state() {
        LinkState::Established(_) => {
            let (entries, _) = wire.accepted_geometry();
            assert!(
                (2..=DEPTH + 1).contains(&entries),
                "accepted {entries} entries"
            );
            let mut q = Host::new(wire, u16::MAX);
            let s = cmd::keep_alive();
            if let Some(cid) = q.send(&sqe_bytes(&s), &[]) {
                rig.pump();
                // Before Connect: an error answer (its sq_id is the queue's, unknown here).
                while let Some((cqe, _)) = q.wire.recv() {
                    assert_eq!(cqe.cid.get(), cid);
                    assert!(
                        !cqe.status().is_success(),
                        "a command before Connect succeeded"
                    );
                }
            }
        }
        LinkState::Rejected(_) => {}
        s => panic!("the target left a connection request {s:?}"),
    }
}

/// A direct-mode provider for [`direct_proto`]: answers attaches with the descriptor bytes
/// of the input (or a status), so the target's attach/detach command handling and the
/// host's parsing of the reply run on any bytes.
struct FuzzDirect {
    reply: Vec<u8>,
    status: Option<u16>,
}

impl DirectAttach for FuzzDirect {
    fn attach(
        &self,
        _subnqn: &str,
        _hostnqn: &str,
        _nsid: u32,
        req: AttachRequest,
        reply: AttachReply,
    ) {
        if let Some(s) = self.status {
            reply.send(Err(Status::from_field(s)));
            return;
        }
        let _ = (req.depth, req.pool_bytes, req.polled_cq);
        let mut d = Descriptor::new_zeroed();
        let n = self.reply.len().min(256);
        d.as_mut_bytes()[..n].copy_from_slice(&self.reply[..n]);
        reply.send(Ok(d));
    }

    fn detach(&self, _hostnqn: &str, token: u64) -> Result<(), Status> {
        if token & 1 == 0 {
            Ok(())
        } else {
            Err(proto::STATUS_ACCESS_DENIED)
        }
    }
}

/// Input of [`direct_proto`].
#[derive(Arbitrary, Debug)]
struct DirectCase {
    descriptor: Vec<u8>,
    connect_private: Vec<u8>,
    reply_private: Vec<u8>,
    imms: Vec<u32>,
    /// Entries of the queue the immediates are for.
    depth: u16,
    /// Commands completed after each immediate (pushed completions).
    completions: Vec<u8>,
    attach_dwords: [u32; 2],
    nsid: u32,
    status: Option<u16>,
    sgl: Sgl,
    detach: bool,
    cq_entries: Vec<u8>,
}

/// The direct-mode protocol: the attach descriptor, the direct connection's CM private
/// data and reply, the polled tail/head immediates, the attach/detach commands through
/// the target's admin queue with a provider answering the input's bytes, and the host's
/// CQ cursor over a ring of the descriptor's depth.
pub fn direct_proto(data: &[u8]) {
    use crate::direct::host::{doorbells, CqCursor};
    use crate::direct::target::tail_advance;
    let mut u = Unstructured::new(data);
    let Ok(case) = DirectCase::arbitrary(&mut u) else {
        return;
    };
    // Immediates: the polled form splits into what was joined; the target's tail
    // accounting (`tail_advance`) on any sequence of them keeps the tail in the ring and
    // never counts more commands in flight than the queue holds.
    let depth = u32::from(case.depth);
    let (mut tail, mut in_flight, mut pushed_tail) = (0u16, 0u32, 0u16);
    for (i, &imm) in case.imms.iter().enumerate() {
        let (t, h) = proto::split_polled_imm(imm);
        assert_eq!(proto::polled_imm(t, h), imm, "polled immediate round trip");
        let _ = proto::Level::from_u8(imm as u8).map(|l| l.name());
        if let Ok(added) = tail_advance(depth, tail, None, u32::from(t)) {
            assert!(u32::from(t) < depth && added < depth);
            tail = t;
        }
        // Pushed completions: the immediate is the tail; some commands complete between.
        if let Ok(added) = tail_advance(depth, pushed_tail, Some(in_flight), imm) {
            assert!(imm < depth, "a tail beyond the ring was taken");
            pushed_tail = imm as u16;
            in_flight += added;
            assert!(
                in_flight < depth.max(1),
                "{in_flight} in flight on a {depth}-entry queue"
            );
        }
        in_flight =
            in_flight.saturating_sub(u32::from(case.completions.get(i).copied().unwrap_or(0)));
    }
    // Attach / detach commands round trip through their SQE.
    let mut s = Sqe::new(proto::OPC_DIRECT_ATTACH);
    s.cdw10 = case.attach_dwords[0].into();
    s.cdw11 = case.attach_dwords[1].into();
    let req = AttachRequest::from_sqe(&s);
    let (depth, pool, polled) = (req.depth, req.pool_bytes, req.polled_cq);
    let again = AttachRequest::from_sqe(&req.to_sqe(case.nsid));
    assert_eq!(
        (again.depth, again.pool_bytes, again.polled_cq),
        (depth, pool, polled)
    );
    let token = u64::from(case.attach_dwords[0]) | u64::from(case.attach_dwords[1]) << 32;
    assert_eq!(proto::detach_token(&proto::detach_sqe(token)), token);
    // CM private data of the direct connection and its reply.
    if let Some(p) = ConnectPrivate::parse(&case.connect_private) {
        assert_eq!(p.magic.get(), proto::CONNECT_MAGIC);
        let _ = (
            p.flags.get(),
            p.token.get(),
            p.read_addr.get(),
            p.read_rkey.get(),
            p.read_stride.get(),
        );
    }
    let f = proto::reply_flags(&case.reply_private);
    if case.reply_private.len() >= 8
        && case.reply_private[..4] == proto::CONNECT_MAGIC.to_le_bytes()
    {
        assert_eq!(proto::reply_private(0, f)[6..8], case.reply_private[6..8]);
    }
    // The descriptor, as the host parses it, and the host's polled CQ cursor on its depth.
    if let Some(d) = Descriptor::parse(&case.descriptor) {
        let level = d.level();
        let _ = d.reason();
        let depth = d.depth.get();
        let mut cur = CqCursor::new(depth);
        for e in case
            .cq_entries
            .chunks(16)
            .take(4 * usize::from(depth.min(64)))
        {
            let span = cur.span();
            assert!((1..=proto::CQ_READ_ENTRIES).contains(&span));
            if cur.is_new(e) {
                cur.advance();
            }
            assert!(cur.head() < depth);
            for c in [
                crate::direct::host::Completions::Pushed,
                crate::direct::host::Completions::Polled,
            ] {
                let _ = doorbells(level, c, cur.head(), cur.head(), 0);
            }
        }
    }
    // The target's handling of attach and detach over an admin queue.
    let mut rig = Rig::new(0);
    rig.target.set_direct(Arc::new(FuzzDirect {
        reply: case.descriptor.clone(),
        status: case.status,
    }));
    let (mut admin, _) = rig.admin(SUBNQN, 0).expect("admin queue");
    let r = admin.wire.register(1024);
    let sqe = if case.detach {
        with_sgl(
            proto::detach_sqe(token),
            SglDescriptor::keyed(0, 0, 0, false),
        )
    } else {
        with_sgl(req.to_sqe(case.nsid), case.sgl.descriptor(r))
    };
    let c = rig
        .exec(&mut admin, sqe, &[])
        .expect("attach/detach gets an answer");
    if !case.detach && c.status().is_success() {
        let got = admin.wire.read_region(r);
        let _ = Descriptor::parse(&got);
    }
}

/// Input of [`discovery`].
#[derive(Arbitrary, Debug)]
struct DiscoveryCase {
    extra_subsystems: u8,
    offset: u16,
    len: u16,
    lsp_rae: u8,
    sgl_len: u16,
    /// Get the log through the discovery NQN, else through a subsystem's controller.
    through_discovery: bool,
}

/// The discovery log: a discovery controller with a varying number of subsystems; a read
/// at any offset and length answers once, and what it returns is the same slice of the
/// whole log (generation and record count agree with the header).
pub fn discovery(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(case) = DiscoveryCase::arbitrary(&mut u) else {
        return;
    };
    let extra = usize::from(case.extra_subsystems) % (MAX_EXTRA_SUBSYSTEMS + 1);
    let mut rig = Rig::new(extra);
    let nqn = if case.through_discovery {
        DISCOVERY_NQN
    } else {
        SUBNQN
    };
    let Some((mut q, _)) = rig.admin(nqn, 0) else {
        panic!("Connect to {nqn} failed");
    };
    // Header + 1 + MAX_EXTRA_SUBSYSTEMS entries fit in max_io_size (8192).
    let whole = q.wire.register(8192);
    let c = rig
        .exec(
            &mut q,
            cmd::get_log_page(LID_DISCOVERY, 0, 8192, 0, keyed(whole)),
            &[],
        )
        .expect("answer");
    let full = q.wire.read_region(whole);
    if case.through_discovery {
        assert_eq!(c.status(), Status::SUCCESS, "whole discovery log");
        let h = DiscoveryLogHeader::read_from_bytes(&full[..1024]).expect("header");
        // The fuzzed host sees the discovery subsystem itself, its subsystem and the
        // `allow_any_host` ones (not the private one).
        assert_eq!(h.numrec.get(), 2 + extra as u64, "discovery records");
        let mut current = 0;
        for i in 0..h.numrec.get() as usize {
            let e = DiscoveryLogEntry::read_from_bytes(&full[1024 + 1024 * i..2048 + 1024 * i])
                .expect("entry");
            current += usize::from(e.subtype == crate::fabrics::SUBTYPE_CURRENT_DISCOVERY);
            assert!(
                crate::fabrics::get_str(&e.subnqn).is_some_and(|n| n != PRIVATE_NQN),
                "discovery entry {i}: bad or foreign subsystem NQN"
            );
        }
        assert_eq!(current, 1, "one entry for the current discovery subsystem");
    }
    let part = q.wire.register(u32::from(case.sgl_len % 8192) + 1);
    // Log page lengths are whole dwords (NUMD).
    let len = (u32::from(case.len % 2048) + 1) * 4;
    let offset = u64::from(case.offset) & !3;
    let mut sqe = cmd::get_log_page(LID_DISCOVERY, 0, len, offset, keyed(part));
    sqe.cdw10 = (sqe.cdw10.get() | u32::from(case.lsp_rae) << 8).into();
    let c2 = rig.exec(&mut q, sqe, &[]).expect("answer");
    if case.through_discovery && c2.status().is_success() {
        let got = q.wire.read_region(part);
        let n = (len as usize).min(got.len());
        let start = (offset as usize).min(full.len());
        let end = (start + n).min(full.len());
        assert_eq!(
            &got[..end - start],
            &full[start..end],
            "a part of the discovery log differs from the whole"
        );
    }
}

/// The configuration parser: any text parses or fails with an error, and a configuration
/// that parses serializes (`--print-config`) to text that parses back to itself.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = TargetConfig::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    let again = cfg.to_toml();
    let back = TargetConfig::parse(&again, Path::new("print-config.toml"))
        .unwrap_or_else(|e| panic!("--print-config output does not parse: {e}\n{again}"));
    assert_eq!(back, cfg, "--print-config round trip");
}
