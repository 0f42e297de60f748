//! Direct mode in the binary: the target-side service that `serve` starts when a
//! subsystem lists `direct_hosts`, and the `nvmf-p2p direct` host subcommand (attach,
//! then random I/O for a time, or fill / check a pattern over an LBA range).
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use transport::config::{BackendSpec, SubsystemConfig, TargetConfig};
use transport::direct::host::{AttachError, Completions, DirectHost, HostOptions, OpCounts};
use transport::direct::target::{DirectConfig, DirectNamespace, DirectService, DirectSubsystem};
use transport::direct::{pattern, DirectProvider};
use transport::initiator::LatencyHistogram;
use transport::nvmf_target::Target;

use super::{print_json, CliError, CliResult};
use crate::devices::Devices;

/// Starts the direct-mode service when some subsystem lists `direct_hosts` and hooks it
/// into `target`. `vfio:` and `spdk:` namespaces can be attached.
pub fn start_service(
    cfg: &TargetConfig,
    devices: &Devices,
    target: &Target,
) -> Result<Option<Arc<DirectService>>, CliError> {
    if cfg.subsystems.iter().all(|s| s.direct_hosts.is_empty()) {
        return Ok(None);
    }
    let Some(l) = cfg.listeners.first() else {
        return Ok(None);
    };
    let mut subsystems = HashMap::new();
    for sub in cfg.subsystems.iter().filter(|s| !s.direct_hosts.is_empty()) {
        subsystems.insert(sub.nqn.clone(), direct_subsystem(sub, devices));
    }
    let svc = DirectService::start(DirectConfig {
        address: l.address,
        port: cfg.direct_port,
        default_depth: 128,
        max_pool: 64 << 20,
        subsystems,
        try_p2p: true,
        interrupts: cfg.nvme_interrupts,
    })
    .map_err(|e| CliError::new(format!("direct mode: {e}")))?;
    target.set_direct(svc.clone() as DirectProvider);
    Ok(Some(svc))
}

/// Direct-mode settings of `sub`: its `direct_hosts` and its `vfio:` and `spdk:`
/// namespaces (at startup, and when a reconfiguration changes them).
pub fn direct_subsystem(sub: &SubsystemConfig, devices: &Devices) -> DirectSubsystem {
    let mut namespaces = HashMap::new();
    for (nsid, ns) in TargetConfig::nsids(sub) {
        let dev_nsid = match &ns.backend {
            BackendSpec::Vfio { nsid, .. } => *nsid,
            #[cfg(feature = "spdk")]
            BackendSpec::Spdk { nsid, .. } => *nsid,
            _ => continue,
        };
        if let Some(device) = devices.direct_device(&ns.backend) {
            namespaces.insert(
                nsid,
                DirectNamespace {
                    device,
                    nsid: dev_nsid,
                },
            );
        }
    }
    if namespaces.is_empty() {
        tracing::warn!(subnqn = %sub.nqn, "direct_hosts set but no vfio: or spdk: namespace: direct mode cannot attach anything");
    }
    DirectSubsystem {
        hosts: sub.direct_hosts.clone(),
        namespaces,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Randread,
    Randwrite,
}

#[derive(clap::Args)]
pub struct Args {
    /// Target RDMA address.
    #[arg(long)]
    pub traddr: IpAddr,
    /// Target port.
    #[arg(long, default_value_t = 4420)]
    pub trsvcid: u16,
    /// Subsystem NQN.
    #[arg(long)]
    pub subnqn: String,
    /// Host NQN: must be on the subsystem's direct_hosts and hosts (or allow_any_host).
    /// The default is `perf`'s and the fio engine's.
    #[arg(long, default_value = DEFAULT_HOSTNQN)]
    pub hostnqn: String,
    /// Namespace id.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// Commands in flight (≤ queue entries − 1). Same flag as `perf -q`.
    #[arg(
        short = 'q',
        long = "queue-depth",
        visible_alias = "qd",
        default_value_t = 32
    )]
    pub qd: u16,
    /// I/O size in bytes (suffixes k/K: 4k), at most 8k: a direct queue's commands
    /// carry two PRPs and no PRP list (docs/direct-mode.md). Same flag as `perf -o`.
    #[arg(short = 'o', long = "io-size", visible_alias = "bs", default_value = "4k", value_parser = super::perf::parse_size)]
    pub bs: usize,
    /// Random workload for `--time` seconds (unless --fill/--check/--attach-only). Same
    /// flag as `perf -w`.
    #[arg(
        short = 'w',
        long = "workload",
        visible_alias = "rw",
        value_enum,
        default_value = "randread"
    )]
    pub rw: Rw,
    /// Seconds of random I/O (`perf -t`).
    #[arg(short = 't', long, default_value_t = 5.0)]
    pub time: f64,
    /// Write the pattern of SEED over [--lba, --lba + --blocks) and exit.
    #[arg(long, value_name = "SEED")]
    pub fill: Option<u64>,
    /// Read [--lba, --lba + --blocks) and compare with the pattern of SEED.
    #[arg(long, value_name = "SEED")]
    pub check: Option<u64>,
    /// First LBA of --fill/--check and of the random span.
    #[arg(long, default_value_t = 0)]
    pub lba: u64,
    /// Blocks of --fill/--check and of the random span (0: to the end, capped at 1 GiB).
    #[arg(long, default_value_t = 0)]
    pub blocks: u64,
    /// How completions come back: pushed by the target (SEND, read data by RDMA WRITE) or
    /// polled by this host (RDMA READ of the CQ ring, read data by RDMA READ).
    #[arg(long, default_value_t = Completions::default())]
    pub completions: Completions,
    /// Only attach, print the descriptor summary, detach.
    #[arg(long)]
    pub attach_only: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    level: String,
    reason: String,
    qid: u16,
    depth: u16,
    lba_size: u32,
    blocks: u64,
    mode: String,
    completions: Completions,
    qd: u16,
    bs: usize,
    ios: u64,
    errors: u64,
    mismatches: u64,
    reattaches: u64,
    seconds: f64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    rdma_ops: OpCounts,
    rdma_ops_per_io: f64,
}

const WRITE_BIT: u64 = 1 << 63;
/// Host NQN used when `--hostnqn` is not given: the one default of every host command.
pub use transport::nvmf_rdma::DEFAULT_HOSTNQN;
/// Largest I/O of a direct queue (two PRPs, no PRP list: docs/direct-mode.md).
pub const MAX_DIRECT_IO: usize = 8192;

pub fn run(a: Args) -> CliResult {
    if a.bs > MAX_DIRECT_IO {
        return Err(CliError::new(format!(
            "-o/--io-size {}: a direct queue carries at most {MAX_DIRECT_IO} bytes per I/O (its commands have two PRPs and no PRP list; docs/direct-mode.md)",
            a.bs
        )));
    }
    let opts = HostOptions {
        addr: SocketAddr::new(a.traddr, a.trsvcid),
        subnqn: a.subnqn.clone(),
        hostnqn: a.hostnqn.clone(),
        nsid: a.nsid,
        depth: a.qd.saturating_add(1).max(2),
        io_size: a.bs,
        completions: a.completions,
    };
    let mut host = DirectHost::connect(opts).map_err(|e| CliError::new(e.to_string()))?;
    let patience = Duration::from_secs(60);
    let mut q = host.open_queue(patience).map_err(attach_err)?;
    let d = *q.descriptor();
    if a.attach_only {
        let r = serde_json::json!({
            "level": q.level().name(),
            "reason": d.reason(),
            "qid": d.qid.get(),
            "depth": d.depth.get(),
            "lba_size": d.lba_size.get(),
            "blocks": d.blocks.get(),
            "pool_len": d.pool_len.get(),
            "port": d.port.get(),
            "completions": q.completions(),
        });
        let _ = host.detach(d.token.get());
        if a.json {
            return print_json(&r);
        }
        println!(
            "attached: level {} ({}), NVMe qid {}, {} entries, {} x {} B",
            q.level().name(),
            d.reason(),
            d.qid.get(),
            d.depth.get(),
            d.blocks.get(),
            d.lba_size.get()
        );
        return Ok(());
    }
    let lba_size = d.lba_size.get() as usize;
    if a.bs == 0 || !a.bs.is_multiple_of(lba_size) {
        return Err(CliError::new(format!(
            "-o/--io-size {} is not a multiple of the {lba_size}-byte LBA",
            a.bs
        )));
    }
    let nlb = (a.bs / lba_size) as u64;
    let end_lba = d.blocks.get();
    let span = if a.blocks == 0 {
        (end_lba.saturating_sub(a.lba)).min((1 << 30) / lba_size as u64)
    } else {
        a.blocks.min(end_lba.saturating_sub(a.lba))
    };
    let jobs = span / nlb;
    if jobs == 0 {
        return Err(CliError::new("empty LBA range".to_string()));
    }
    let (mode, seed, timed) = match (a.fill, a.check) {
        (Some(s), _) => ("fill", s, false),
        (None, Some(s)) => ("check", s, false),
        _ => (
            match a.rw {
                Rw::Randread => "randread",
                Rw::Randwrite => "randwrite",
            },
            0,
            true,
        ),
    };
    let write_mode = mode == "fill" || mode == "randwrite";
    let qd = usize::from(a.qd).min(q.capacity()).max(1);
    let mut wbuf = vec![0u8; a.bs];
    let mut expect = vec![0u8; lba_size];
    let mut hist = LatencyHistogram::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ seed;
    let mut next_job = 0u64;
    let (mut ios, mut errors, mut mismatches, mut reattaches) = (0u64, 0u64, 0u64, 0u64);
    let mut ops = OpCounts::default();
    let mut retry: Vec<u64> = Vec::with_capacity(qd);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.time);
    let next_lba = |rng: &mut u64, next_job: &mut u64| -> Option<u64> {
        if timed {
            if Instant::now() >= deadline {
                return None;
            }
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            Some(a.lba + (*rng % jobs) * nlb)
        } else if *next_job < jobs {
            *next_job += 1;
            Some(a.lba + (*next_job - 1) * nlb)
        } else {
            None
        }
    };
    let mut draining = false;
    loop {
        // Keep the queue full: retries first, then new jobs.
        while q.outstanding() < qd {
            let lba = match retry.pop() {
                Some(l) => l,
                None if draining => break,
                None => match next_lba(&mut rng, &mut next_job) {
                    Some(l) => l,
                    None => {
                        draining = true;
                        break;
                    }
                },
            };
            let r = if write_mode {
                if mode == "fill" {
                    for (i, chunk) in wbuf.chunks_mut(lba_size).enumerate() {
                        pattern(seed, lba + i as u64, chunk);
                    }
                }
                q.submit_write(lba, &wbuf, lba | WRITE_BIT)
            } else {
                q.submit_read(lba, a.bs, lba)
            };
            if let Err(e) = r {
                tracing::info!(error = %e, "direct submission failed: re-attaching");
                retry.push(lba);
                break;
            }
        }
        if q.outstanding() == 0 && retry.is_empty() && draining {
            break;
        }
        let polled = q.poll(|c, data| {
            ios += 1;
            hist.record(c.latency);
            if !c.status.is_success() {
                errors += 1;
                return;
            }
            if mode == "check" {
                let lba = c.user & !WRITE_BIT;
                for (i, got) in data.chunks(lba_size).enumerate() {
                    pattern(seed, lba + i as u64, &mut expect);
                    if got != &expect[..] {
                        mismatches += 1;
                    }
                }
                if data.len() != a.bs {
                    mismatches += 1;
                }
            }
        });
        if let Ok(0) = polled {
            // Nothing yet: let soft-RoCE, the target and the device emulation have the CPU
            // (on a 2-vCPU guest, a spinning initiator starves them).
            std::thread::yield_now();
        }
        if let Err(e) = polled {
            // The queue is gone (device reset, disconnect): re-attach and resubmit every
            // command not acknowledged.
            tracing::info!(error = %e, "direct queue lost: re-attaching");
            retry.extend(q.outstanding_users().map(|(_, u)| u & !WRITE_BIT));
            ops.add(&q.ops);
            drop(q);
            reattaches += 1;
            q = host.open_queue(patience).map_err(attach_err)?;
            if reattaches > 100 {
                return Err(CliError::new(
                    "direct queue lost more than 100 times".to_string(),
                ));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    ops.add(&q.ops);
    let completions = q.completions();
    let token = q.descriptor().token.get();
    let level = q.level();
    drop(q);
    let _ = host.detach(token);
    let us = |p: f64| hist.percentile(p).as_secs_f64() * 1e6;
    let r = Report {
        level: level.name().into(),
        reason: d.reason(),
        qid: d.qid.get(),
        depth: d.depth.get(),
        lba_size: d.lba_size.get(),
        blocks: d.blocks.get(),
        mode: mode.into(),
        completions,
        qd: qd as u16,
        bs: a.bs,
        ios,
        errors,
        mismatches,
        reattaches,
        seconds: secs,
        iops: ios as f64 / secs.max(1e-9),
        p50_us: us(50.0),
        p99_us: us(99.0),
        max_us: hist.max().as_secs_f64() * 1e6,
        rdma_ops: ops,
        rdma_ops_per_io: ops.total() as f64 / (ios.max(1) as f64),
    };
    if a.json {
        print_json(&r)?;
    } else {
        println!(
            "direct {} ({}), {} completions: {} QD{} bs {}: {} I/Os in {:.2} s = {:.0} IOPS, p50 {:.0} us, p99 {:.0} us; {:.2} RDMA ops/I/O; errors {}, mismatches {}, re-attaches {}",
            r.level, r.reason, r.completions, r.mode, r.qd, r.bs, r.ios, r.seconds, r.iops, r.p50_us, r.p99_us,
            r.rdma_ops_per_io, r.errors, r.mismatches, r.reattaches
        );
    }
    if errors > 0 || mismatches > 0 {
        return Err(CliError::new(format!(
            "{errors} I/O errors, {mismatches} mismatched blocks"
        )));
    }
    Ok(())
}

fn attach_err(e: AttachError) -> CliError {
    CliError::new(format!("direct attach: {e}"))
}

/// Adds the direct-mode report (level, reason, counters per queue) to a stats reply.
pub fn with_report(mut stats: serde_json::Value, svc: Option<&DirectService>) -> serde_json::Value {
    if let (Some(svc), Some(obj)) = (svc, stats.as_object_mut()) {
        obj.insert(
            "direct".into(),
            serde_json::to_value(svc.report()).unwrap_or_default(),
        );
    }
    stats
}

/// Direct queues dropped (and attaches refused) while this lives: around a device reset.
pub struct Quiesced<'a>(Option<&'a DirectService>);

/// How long a device reset waits for the direct poller to drop its queues.
const QUIESCE_WAIT: Duration = Duration::from_secs(5);

impl<'a> Quiesced<'a> {
    /// Stops direct mode; an error when the direct poller did not confirm within
    /// [`QUIESCE_WAIT`] (it may still ring the device's doorbells: a reset now would race
    /// with it, so the caller does not reset). Attaches are allowed again on the error.
    pub fn new(svc: Option<&'a DirectService>) -> Result<Self, String> {
        let quiesced = Quiesced(svc);
        if let Some(s) = svc {
            if !s.quiesce(QUIESCE_WAIT) {
                return Err(format!(
                    "the direct poller did not drop its queues within {QUIESCE_WAIT:?}: device not reset"
                ));
            }
        }
        Ok(quiesced)
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            s.resume();
        }
    }
}
