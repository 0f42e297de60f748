//! What `nvmf-p2p stats` shows of direct mode (`direct: {...}`, listed in
//! `docs/direct-mode.md`, "Enabling it"): the service's counters and one entry per queue.

use super::super::host::Completions;
use super::super::proto::Level;
use super::forward::ForwardCounts;

/// One attached queue, for stats.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueReport {
    /// Attachment token.
    pub token: u64,
    /// Host NQN.
    pub hostnqn: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Chosen level.
    pub level: Level,
    /// Why (the P2P registration error when forwarded).
    pub reason: String,
    /// The SQ ring is in the controller memory buffer (P2P level only).
    pub sq_in_cmb: bool,
    /// NVMe queue id on the backing controller.
    pub qid: u16,
    /// Entries.
    pub depth: u16,
    /// Whether the host's direct connection is up.
    pub connected: bool,
    /// How completions reach the host (what the host asked for at connect).
    pub completions: Completions,
    /// SQ tail doorbells forwarded to MMIO.
    pub doorbells_forwarded: u64,
    /// CQ head doorbells forwarded to MMIO (polled completions).
    pub cq_heads_forwarded: u64,
    /// CQEs pushed to the host.
    pub cqes_pushed: u64,
    /// Read data pushed to the host (RDMA WRITE before the CQE).
    pub reads_pushed: u64,
    /// MSI-X vector of the CQ (None: the poller polls it, or the host does).
    pub interrupt_vector: Option<u16>,
}

/// What an attached queue is, when it is attached (its counters start at 0).
pub(super) struct QueueIdentity {
    pub token: u64,
    pub hostnqn: String,
    pub subnqn: String,
    pub level: Level,
    pub reason: String,
    pub sq_in_cmb: bool,
    pub qid: u16,
    pub depth: u16,
    pub interrupt_vector: Option<u16>,
}

impl QueueReport {
    /// A queue just attached: not connected, nothing forwarded.
    pub(super) fn attached(q: QueueIdentity) -> Self {
        QueueReport {
            token: q.token,
            hostnqn: q.hostnqn,
            subnqn: q.subnqn,
            level: q.level,
            reason: q.reason,
            sq_in_cmb: q.sq_in_cmb,
            qid: q.qid,
            depth: q.depth,
            connected: false,
            completions: Completions::Pushed,
            doorbells_forwarded: 0,
            cq_heads_forwarded: 0,
            cqes_pushed: 0,
            reads_pushed: 0,
            interrupt_vector: q.interrupt_vector,
        }
    }

    /// The queue's doorbell counters as its forwarded queue has them now.
    pub(super) fn set_forwarded(&mut self, c: ForwardCounts) {
        self.doorbells_forwarded = c.sq_doorbells;
        self.cq_heads_forwarded = c.cq_heads;
    }
}

/// Service-wide counters and state, for stats.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ServiceReport {
    /// Direct CM port.
    pub port: u16,
    /// Attach requests refused because the host is not on `direct_hosts`.
    pub refused: u64,
    /// Attaches done.
    pub attached: u64,
    /// Attaches refused by a [`DirectLimits`](super::DirectLimits) bound.
    pub limited: u64,
    /// Attachments dropped because their host did not connect in time.
    pub expired: u64,
    /// SQ tails ignored because they would put more commands in flight than the queue
    /// holds (a host writing bogus tails).
    pub bogus_tails: u64,
    /// Pinned bytes of all attachments now.
    pub pinned_bytes: u64,
    /// Times the poller went to sleep on its channels.
    pub sleeps: u64,
    /// Of those, sleeps on NVMe interrupts while commands were in the device.
    pub device_sleeps: u64,
    /// Poller iterations.
    pub polls: u64,
    /// Queues.
    pub queues: Vec<QueueReport>,
}

/// The poller's own counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PollerCounts {
    pub sleeps: u64,
    pub device_sleeps: u64,
    pub polls: u64,
}

/// One publication of the poller's state into the [`ServiceReport`].
pub(super) struct Snapshot {
    pub queues: Vec<QueueReport>,
    /// Attachments reaped since the last publication.
    pub expired: u64,
    pub bogus_tails: u64,
    pub pinned_bytes: u64,
    pub poller: PollerCounts,
}

impl ServiceReport {
    /// Takes a snapshot: counters of now replace the old ones, `expired` adds up; what
    /// the attach path counts (refused, attached, limited) stays.
    pub(super) fn publish(&mut self, s: Snapshot) {
        self.expired += s.expired;
        self.bogus_tails = s.bogus_tails;
        self.pinned_bytes = s.pinned_bytes;
        self.queues = s.queues;
        self.sleeps = s.poller.sleeps;
        self.device_sleeps = s.poller.device_sleeps;
        self.polls = s.poller.polls;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> QueueReport {
        QueueReport::attached(QueueIdentity {
            token: 7,
            hostnqn: "h".into(),
            subnqn: "s".into(),
            level: Level::Forwarded,
            reason: "ibv_reg_dmabuf_mr: EOPNOTSUPP".into(),
            sq_in_cmb: false,
            qid: 3,
            depth: 64,
            interrupt_vector: Some(2),
        })
    }

    #[test]
    fn stats_keys_are_the_documented_ones() {
        // docs/direct-mode.md lists these; `nvmf-p2p stats` and the VM tests read them.
        let mut r = ServiceReport {
            port: 4421,
            ..Default::default()
        };
        r.queues.push(queue());
        let v = serde_json::to_value(&r).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let mut want = [
            "port",
            "refused",
            "attached",
            "limited",
            "expired",
            "bogus_tails",
            "pinned_bytes",
            "sleeps",
            "device_sleeps",
            "polls",
            "queues",
        ];
        want.sort();
        assert_eq!(keys(&v), want);
        let q = &v["queues"][0];
        let mut want = [
            "token",
            "hostnqn",
            "subnqn",
            "level",
            "reason",
            "sq_in_cmb",
            "qid",
            "depth",
            "connected",
            "completions",
            "doorbells_forwarded",
            "cq_heads_forwarded",
            "cqes_pushed",
            "reads_pushed",
            "interrupt_vector",
        ];
        want.sort();
        assert_eq!(keys(q), want);
        assert_eq!(q["level"], "forwarded");
        assert_eq!(q["completions"], "pushed");
        assert_eq!(q["connected"], false);
        assert_eq!(q["interrupt_vector"], 2);
    }

    #[test]
    fn publishing_replaces_counters_and_adds_up_expiries() {
        let mut r = ServiceReport {
            refused: 2,
            attached: 5,
            limited: 1,
            ..Default::default()
        };
        let mut q = queue();
        q.set_forwarded(ForwardCounts {
            sq_doorbells: 10,
            cq_heads: 4,
        });
        assert_eq!((q.doorbells_forwarded, q.cq_heads_forwarded), (10, 4));
        let snap = |expired, polls| Snapshot {
            queues: vec![q.clone()],
            expired,
            bogus_tails: 3,
            pinned_bytes: 1 << 20,
            poller: PollerCounts {
                sleeps: 1,
                device_sleeps: 0,
                polls,
            },
        };
        r.publish(snap(1, 100));
        r.publish(snap(2, 150));
        assert_eq!(r.expired, 3, "expiries add up");
        assert_eq!((r.polls, r.bogus_tails, r.pinned_bytes), (150, 3, 1 << 20));
        assert_eq!(
            (r.refused, r.attached, r.limited),
            (2, 5, 1),
            "attach counts stay"
        );
        assert_eq!(r.queues.len(), 1);
        r.publish(Snapshot {
            queues: Vec::new(),
            ..snap(0, 151)
        });
        assert!(r.queues.is_empty());
    }
}
