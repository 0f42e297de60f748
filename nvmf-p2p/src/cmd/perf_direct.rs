//! `nvmf-p2p perf --direct`: the same workloads and report as `perf`, over direct-mode
//! queues (see docs/direct-mode.md). One admin connection attaches `--queues` direct
//! queues; one thread keeps `--queue-depth` commands in flight across them (spread
//! round-robin, as spdk_nvme_perf spreads a namespace's depth over its qpairs) and polls
//! them in turn. A queue the target drops (device reset) is re-attached and its
//! unacknowledged commands are submitted again, so a run survives `ctl reset-device`.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use transport::direct::host::{
    AttachError, Completions, DirectHost, DirectQueue, HostOptions, OpCounts,
};
use transport::initiator::LatencyHistogram;

use super::perf::{drive, stalled, Args, Pattern, Report, Run};
use super::CliError;

/// Largest I/O a direct queue carries (pool slot: PRP1 + PRP2, no PRP list).
const MAX_IO: usize = 8192;
/// How long an attach may wait for a device reset to finish.
const PATIENCE: Duration = Duration::from_secs(60);
/// Re-attaches after which a run gives up.
const MAX_REATTACH: u64 = 100;
/// `user` bit of a read.
const READ_BIT: u64 = 1 << 63;

/// What `perf --direct` adds to the report.
#[derive(Serialize)]
pub struct DirectReport {
    /// `forwarded` or `p2p`.
    pub level: String,
    /// Why that level (e.g. the dma-buf registration error).
    pub reason: String,
    /// How completions came back (`pushed` by the target or `polled` by us).
    pub completions: Completions,
    /// Direct queues used.
    pub queues: usize,
    /// Entries of each queue.
    pub queue_entries: u16,
    /// Queues lost and attached again (device resets).
    pub reattaches: u64,
    /// RDMA operations of the whole run, both directions.
    pub rdma_ops: OpCounts,
    /// `rdma_ops.total()` per I/O.
    pub rdma_ops_per_io: f64,
}

fn attach_err(e: AttachError) -> CliError {
    CliError::new(format!("direct attach: {e}"))
}

/// Commands in flight for queue `i` of `n` when `total` are spread round-robin.
pub(super) fn share(total: usize, n: usize, i: usize) -> usize {
    total / n + usize::from(i < total % n)
}

/// One direct queue of the run and the commands it should keep in flight.
struct Lane {
    q: DirectQueue,
    qd: usize,
    /// Commands to submit again after a re-attach (`user` values).
    retry: Vec<u64>,
}

pub fn run(a: &Args) -> Result<Report, CliError> {
    let (Some(addr), Some(subnqn)) = (a.traddr, a.subnqn.as_deref()) else {
        return Err(CliError::new("--direct needs --traddr and --subnqn"));
    };
    let bs = a.io_size;
    if bs > MAX_IO {
        return Err(CliError::new(format!(
            "--io-size {bs}: direct queues carry at most {MAX_IO} bytes per command"
        )));
    }
    let queues = usize::from(a.queues.max(1));
    let total = usize::from(a.qd);
    if total < queues {
        return Err(CliError::new(format!(
            "--queue-depth {total} is less than --queues {queues}: every queue needs a command"
        )));
    }
    let per_queue = share(total, queues, 0);
    let dst = SocketAddr::new(addr, a.trsvcid);
    let opts = HostOptions {
        addr: dst,
        subnqn: subnqn.to_string(),
        hostnqn: a.hostnqn.clone(),
        nsid: a.nsid,
        depth: u16::try_from(per_queue + 1).unwrap_or(u16::MAX),
        io_size: bs,
        completions: a.completions,
    };
    let mut host = DirectHost::connect(opts).map_err(|e| {
        CliError::new(format!(
            "cannot connect to {dst} as {}: {e} (is a target listening there?)",
            a.hostnqn
        ))
    })?;
    let mut lanes: Vec<Lane> = Vec::with_capacity(queues);
    for i in 0..queues {
        let q = host.open_queue(PATIENCE).map_err(attach_err)?;
        // The target may grant fewer entries than asked for (its MQES).
        let qd = share(total, queues, i).min(q.capacity());
        lanes.push(Lane {
            q,
            qd,
            retry: Vec::with_capacity(per_queue),
        });
    }
    let d = *lanes[0].q.descriptor();
    let lba = d.lba_size.get() as usize;
    if bs == 0 || !bs.is_multiple_of(lba) {
        return Err(CliError::new(format!(
            "--io-size {bs} is not a multiple of the {lba}-byte block"
        )));
    }
    let nlb = (bs / lba) as u64;
    let pattern = Pattern::new(d.blocks.get(), nlb, a)?;
    let wbuf: Vec<u8> = (0..bs).map(|i| (i as u8) ^ 0x5a).collect();

    let started = Instant::now();
    let run = DirectRun {
        host,
        lanes,
        pattern,
        wbuf,
        bs,
        hist: LatencyHistogram::new(),
        ios: 0,
        errors: 0,
        reattaches: 0,
        first_error: None,
        ops: OpCounts::default(),
        end: started + Duration::from_secs(a.secs),
        last_progress: started,
        failed: None,
    };
    let DirectRun {
        mut host,
        mut lanes,
        hist,
        ios,
        errors,
        reattaches,
        first_error,
        mut ops,
        failed,
        ..
    } = drive(run)?;
    if let Some(e) = failed {
        return Err(e);
    }
    let secs = started.elapsed().as_secs_f64();
    let level = lanes[0].q.level().name().to_string();
    let completions = lanes[0].q.completions();
    let entries = lanes[0].q.descriptor().depth.get();
    for lane in lanes.drain(..) {
        ops.add(&lane.q.ops);
        let token = lane.q.descriptor().token.get();
        drop(lane.q);
        if let Err(e) = host.detach(token) {
            tracing::info!(error = %e, "direct detach");
        }
    }
    let mut r = Report::new(
        format!("direct:{dst}/{subnqn}"),
        a,
        secs,
        ios,
        errors,
        &hist,
    );
    r.first_error = first_error;
    r.direct = Some(DirectReport {
        level,
        reason: d.reason(),
        completions,
        queues,
        queue_entries: entries,
        reattaches,
        rdma_ops: ops,
        rdma_ops_per_io: ((ops.total() as f64 / ios.max(1) as f64) * 100.0).round() / 100.0,
    });
    Ok(r)
}

/// A direct-mode run in flight.
struct DirectRun {
    host: DirectHost,
    lanes: Vec<Lane>,
    pattern: Pattern,
    wbuf: Vec<u8>,
    bs: usize,
    hist: LatencyHistogram,
    ios: u64,
    errors: u64,
    reattaches: u64,
    first_error: Option<String>,
    ops: OpCounts,
    end: Instant,
    last_progress: Instant,
    failed: Option<CliError>,
}

impl Run for DirectRun {
    // The reactor yields the CPU between empty steps (the default `arm`): on a 2-vCPU
    // guest soft-RoCE, the target and the device emulation need the CPU a spinning
    // initiator would take. Polled completions pace their own READs (PollBackoff).
    fn step(&mut self, now: Instant) -> Option<usize> {
        let running = now < self.end;
        let mut busy = 0usize;
        let mut progress = 0usize;
        for lane in self.lanes.iter_mut() {
            // Keep the lane full: resubmissions first, then new commands while the run lasts.
            while lane.q.outstanding() < lane.qd {
                let (slba, read) = match lane.retry.pop() {
                    Some(u) => (u & !READ_BIT, u & READ_BIT != 0),
                    None if running => self.pattern.next(),
                    None => break,
                };
                let user = slba | if read { READ_BIT } else { 0 };
                let r = if read {
                    lane.q.submit_read(slba, self.bs, user)
                } else {
                    lane.q.submit_write(slba, &self.wbuf, user)
                };
                if let Err(e) = r {
                    tracing::info!(error = %e, "direct submission failed; the queue is polled next");
                    lane.retry.push(user);
                    break;
                }
            }
            let (ios, errors, hist, first_error) = (
                &mut self.ios,
                &mut self.errors,
                &mut self.hist,
                &mut self.first_error,
            );
            let polled = lane.q.poll(|c, _| {
                *ios += 1;
                hist.record(c.latency);
                if !c.status.is_success() {
                    *errors += 1;
                    first_error.get_or_insert_with(|| format!("{:?}", c.status));
                }
            });
            match polled {
                Ok(n) => progress += n,
                Err(e) => {
                    // The queue is gone (device reset, disconnect): attach a new one and
                    // submit every command it had not acknowledged again.
                    tracing::info!(error = %e, "direct queue lost: re-attaching");
                    self.reattaches += 1;
                    if self.reattaches > MAX_REATTACH {
                        self.failed = Some(CliError::new(format!(
                            "direct queues lost more than {MAX_REATTACH} times: {e}"
                        )));
                        return None;
                    }
                    let users: Vec<u64> = lane.q.outstanding_users().map(|(_, u)| u).collect();
                    lane.retry.extend(users);
                    self.ops.add(&lane.q.ops);
                    match self.host.open_queue(PATIENCE) {
                        Ok(q) => lane.q = q,
                        Err(e) => {
                            self.failed = Some(attach_err(e));
                            return None;
                        }
                    }
                    progress += 1;
                }
            }
            busy += lane.q.outstanding() + lane.retry.len();
        }
        if busy == 0 && !running {
            return None;
        }
        if progress > 0 {
            self.last_progress = now;
        } else if let Some(e) = stalled(now, self.last_progress, busy) {
            self.failed = Some(e);
            return None;
        }
        Some(progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_spread_over_queues_without_loss() {
        for total in 1..70 {
            for n in 1..=total.min(8) {
                let parts: Vec<usize> = (0..n).map(|i| share(total, n, i)).collect();
                assert_eq!(parts.iter().sum::<usize>(), total, "{total} over {n}");
                assert!(parts.iter().all(|&p| p >= 1));
                assert!(parts.iter().max().unwrap() - parts.iter().min().unwrap() <= 1);
            }
        }
    }
}
