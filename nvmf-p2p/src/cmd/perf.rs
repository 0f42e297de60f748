//! `nvmf-p2p perf` — random or sequential I/O at a fixed queue depth, like spdk_nvme_perf:
//! over NVMe-oF/RDMA with our userspace initiator (`--traddr`), or on a local controller
//! through our VFIO driver (`--local BDF`), or over direct-mode queues (`--direct`, see
//! [`super::perf_direct`]). Prints IOPS, MiB/s and latency percentiles.
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use transport::initiator::{cmd, HostWire, InitiatorQueue, LatencyHistogram};
use transport::nvmf_rdma::{keyed, RdmaHost, Session, SessionOptions};

use super::{print_json, CliError, CliResult};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Host NQN used when `--hostnqn` is not given.
pub use transport::nvmf_rdma::DEFAULT_HOSTNQN;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Randread,
    Randwrite,
    Randrw,
    Read,
    Write,
}

#[derive(clap::Args)]
pub struct Args {
    /// Target address (NVMe-oF over RDMA).
    #[arg(long, required_unless_present_any = ["local", "batch"], conflicts_with = "local")]
    pub traddr: Option<IpAddr>,
    /// Target port.
    #[arg(long, default_value_t = 4420)]
    pub trsvcid: u16,
    /// Subsystem NQN to connect to.
    #[arg(long, required_unless_present_any = ["local", "batch"])]
    pub subnqn: Option<String>,
    /// Our host NQN (the same default as `nvmf-p2p direct` and the fio engine; list it
    /// in the subsystem's hosts, and direct_hosts for --direct).
    #[arg(long, default_value = DEFAULT_HOSTNQN)]
    pub hostnqn: String,
    /// Run on a local NVMe controller (bound to vfio-pci) through our driver instead.
    #[arg(long, value_name = "BDF")]
    pub local: Option<String>,
    /// Namespace id.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// Queue depth.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 32)]
    pub qd: u16,
    /// I/O size in bytes (suffixes k/K, m/M: 4k, 128k).
    #[arg(short = 'o', long = "io-size", default_value = "4k", value_parser = parse_size)]
    pub io_size: usize,
    /// Access pattern.
    #[arg(short = 'w', long = "workload", value_enum, default_value_t = Workload::Randread)]
    pub workload: Workload,
    /// Percentage of reads in randrw.
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub secs: u64,
    /// With --local: do not use Doorbell Buffer Config (shadow doorbells + EventIdx) even
    /// when the controller offers it.
    #[arg(long, requires = "local")]
    pub no_shadow_doorbells: bool,
    /// Direct mode: attach direct queues (the host must be on the subsystem's
    /// `direct_hosts`) and drive the backing controller by one-sided RDMA.
    #[arg(long, conflicts_with = "local")]
    pub direct: bool,
    /// I/O queues (with --direct: direct queues to attach); --queue-depth is spread over
    /// them round-robin.
    #[arg(short = 'P', long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub queues: u16,
    /// With --direct: completions pushed by the target (SEND, read data by RDMA WRITE) or
    /// polled by this host (RDMA READ of the CQ ring, read data by RDMA READ).
    #[arg(long, default_value_t = transport::direct::host::Completions::default(), requires = "direct")]
    pub completions: transport::direct::host::Completions,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Read runs from standard input, one per line (this command's flags, e.g.
    /// `-w randread -q 32 -t 4 --traddr 10.0.0.1 --subnqn NQN`), and print each run's
    /// result as one JSON line (`{"error": ...}` for a run that failed) as soon as it is
    /// done; exits at the end of input. One process for many runs: a benchmark's point
    /// then does not pay the binary's start-up (seconds under the testbed's TCG).
    #[arg(long, exclusive = true)]
    pub batch: bool,
}

/// One line of `--batch` input, parsed with the command's own flags.
#[derive(clap::Parser)]
#[command(name = "perf", no_binary_name = true)]
struct BatchLine {
    #[command(flatten)]
    args: Args,
}

pub(crate) fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1usize),
        Some((i, _)) => {
            let m = match &t[i..] {
                "k" | "K" | "KiB" => 1 << 10,
                "m" | "M" | "MiB" => 1 << 20,
                other => return Err(format!("unknown size suffix '{other}' (use k or m)")),
            };
            (&t[..i], m)
        }
    };
    let n: usize = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if v == 0 || !v.is_multiple_of(512) {
        return Err(format!(
            "'{s}': the I/O size must be a non-zero multiple of 512"
        ));
    }
    Ok(v)
}

/// One run's result.
#[derive(Serialize)]
pub struct Report {
    pub target: String,
    pub workload: Workload,
    pub queue_depth: u16,
    pub io_size: usize,
    pub seconds: f64,
    pub ios: u64,
    pub errors: u64,
    /// Status of the first failed command, e.g. "sct 0x0 sc 0x80 (LBA Out of Range)".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub iops: f64,
    pub mib_s: f64,
    pub lat_us: Latency,
    /// Direct-mode details (`--direct`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct: Option<super::perf_direct::DirectReport>,
}

#[derive(Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Report {
    pub(super) fn new(
        target: String,
        a: &Args,
        secs: f64,
        ios: u64,
        errors: u64,
        h: &LatencyHistogram,
    ) -> Self {
        let us = |d: Duration| (d.as_secs_f64() * 1e7).round() / 10.0;
        Report {
            target,
            workload: a.workload,
            queue_depth: a.qd,
            io_size: a.io_size,
            seconds: (secs * 100.0).round() / 100.0,
            ios,
            errors,
            first_error: None,
            iops: (ios as f64 / secs).round(),
            mib_s: (ios as f64 * a.io_size as f64 / secs / 1048576.0 * 100.0).round() / 100.0,
            lat_us: Latency {
                mean: us(h.mean()),
                p50: us(h.percentile(50.0)),
                p90: us(h.percentile(90.0)),
                p99: us(h.percentile(99.0)),
                p99_9: us(h.percentile(99.9)),
                max: us(h.max()),
            },
            direct: None,
        }
    }

    fn print_text(&self) {
        println!(
            "{} {:?} qd={} io={}B {:.1}s: {:.0} IOPS, {:.2} MiB/s, {} errors",
            self.target,
            self.workload,
            self.queue_depth,
            self.io_size,
            self.seconds,
            self.iops,
            self.mib_s,
            self.errors
        );
        if let Some(e) = &self.first_error {
            println!("first error: {e}");
        }
        let l = &self.lat_us;
        println!(
            "latency us: mean {:.1} p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
            l.mean, l.p50, l.p90, l.p99, l.p99_9, l.max
        );
        if let Some(d) = &self.direct {
            println!(
                "direct: level {} ({}), {} completions, {} queue(s) of {} entries, {:.2} RDMA ops/I/O, {} re-attach(es)",
                d.level, d.reason, d.completions, d.queues, d.queue_entries, d.rdma_ops_per_io, d.reattaches
            );
        }
    }
}

/// Next LBA and direction of a run: xorshift for random, a cursor for sequential.
pub(super) struct Pattern {
    rng: u64,
    cursor: u64,
    span: u64,
    nlb: u64,
    workload: Workload,
    read_pct: u64,
}

impl Pattern {
    pub(super) fn new(blocks: u64, nlb: u64, a: &Args) -> Result<Self, CliError> {
        if blocks < nlb {
            return Err(CliError::new(format!(
                "the namespace has {blocks} blocks, fewer than one {}-byte I/O",
                a.io_size
            )));
        }
        Ok(Pattern {
            rng: 0x9e37_79b9_7f4a_7c15,
            cursor: 0,
            span: blocks / nlb,
            nlb,
            workload: a.workload,
            read_pct: u64::from(a.rwmixread),
        })
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// (slba, is_read)
    pub(super) fn next(&mut self) -> (u64, bool) {
        let slot = match self.workload {
            Workload::Read | Workload::Write => {
                let s = self.cursor;
                self.cursor = (self.cursor + 1) % self.span;
                s
            }
            _ => self.rand() % self.span,
        };
        let read = match self.workload {
            Workload::Read | Workload::Randread => true,
            Workload::Write | Workload::Randwrite => false,
            Workload::Randrw => self.rand() % 100 < self.read_pct,
        };
        (slot * self.nlb, read)
    }
}

pub fn run(a: Args) -> CliResult {
    if a.batch {
        return run_batch(std::io::stdin().lock(), std::io::stdout().lock());
    }
    let report = measure(&a)?;
    if a.json {
        print_json(&report)
    } else {
        report.print_text();
        Ok(())
    }
}

/// `--batch`: one run per input line, one JSON line per run; a line that does not parse
/// or a run that fails gives `{"error": ...}` and the next line runs.
fn run_batch(input: impl std::io::BufRead, mut out: impl std::io::Write) -> CliResult {
    let io = |e: std::io::Error| CliError::new(format!("perf --batch: {e}"));
    for line in input.lines() {
        let line = line.map_err(io)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        let result = match <BatchLine as clap::Parser>::try_parse_from(words) {
            Ok(BatchLine { args }) if args.batch => {
                Err(CliError::new("--batch cannot be given on an input line"))
            }
            Ok(BatchLine { args }) => measure(&args),
            Err(e) => Err(CliError::new(e.render().to_string().trim_end())),
        };
        let json = match result {
            Ok(report) => serde_json::to_string(&report),
            Err(CliError(e)) => serde_json::to_string(&serde_json::json!({ "error": e })),
        }
        .map_err(|e| CliError::new(e.to_string()))?;
        writeln!(out, "{json}").map_err(io)?;
        out.flush().map_err(io)?;
    }
    Ok(())
}

/// One run, as `--json` prints it.
fn measure(a: &Args) -> Result<Report, CliError> {
    if a.qd == 0 {
        return Err(CliError::new("--queue-depth must be at least 1"));
    }
    let report = match &a.local {
        Some(_) if a.queues > 1 => {
            return Err(CliError::new(
                "--queues applies to --traddr runs; --local uses one queue",
            ))
        }
        Some(bdf) => run_local(bdf, a)?,
        None if a.direct => super::perf_direct::run(a)?,
        None => run_remote(a)?,
    };
    Ok(report)
}

fn terr(e: transport::Error) -> CliError {
    CliError(e.to_string())
}

fn run_remote(a: &Args) -> Result<Report, CliError> {
    let (Some(addr), Some(subnqn)) = (a.traddr, a.subnqn.as_deref()) else {
        return Err(CliError::new(
            "--traddr and --subnqn are required (or --local BDF)",
        ));
    };
    let dst = SocketAddr::new(addr, a.trsvcid);
    let bs = a.io_size;
    let queues = a.queues.max(1);
    let total = usize::from(a.qd);
    if total < usize::from(queues) {
        return Err(CliError::new(format!(
            "--queue-depth {total} is less than --queues {queues}: every queue needs a command"
        )));
    }

    // admin queue: connect, enable, identify the namespace, ask for the I/O queues
    let session = Session::connect(SessionOptions {
        dst,
        subnqn: subnqn.to_string(),
        hostnqn: a.hostnqn.clone(),
        nsid: a.nsid,
        io_queues: queues,
        kato_ms: 30_000,
        timeout: ADMIN_TIMEOUT,
    })
    .map_err(terr)?;
    let ns = session.namespace();
    let lba = ns.block_size as usize;
    let blocks = ns.blocks;
    if !bs.is_multiple_of(lba) {
        return Err(CliError::new(format!(
            "--io-size {bs} is not a multiple of the {lba}-byte block"
        )));
    }
    let granted = session.granted_queues();
    if granted < queues {
        return Err(CliError::new(format!(
            "the target grants {granted} I/O queue(s), fewer than --queues {queues}"
        )));
    }

    // I/O queues 1..=queues, --queue-depth spread over them round-robin (as spdk_nvme_perf
    // spreads a namespace's depth over its qpairs), one data slot per command.
    let mut lanes = Vec::with_capacity(usize::from(queues));
    for qid in 1..=queues {
        let want = super::perf_direct::share(total, usize::from(queues), usize::from(qid - 1));
        let want = u16::try_from(want).unwrap_or(u16::MAX);
        let io = session.connect_io_queue(qid, want).map_err(terr)?;
        let qd = io.depth();
        let buf = io
            .wire()
            .register(usize::from(qd) * bs + 4096)
            .map_err(terr)?;
        if !matches!(a.workload, Workload::Read | Workload::Randread) {
            // give written blocks a recognisable pattern
            for slot in 0..usize::from(qd) {
                let pat: Vec<u8> = (0..bs).map(|i| (i as u8) ^ (slot as u8)).collect();
                buf.write(slot * bs, &pat)
                    .map_err(|e| CliError(e.to_string()))?;
            }
        }
        lanes.push(Lane { io, buf, qd });
    }

    let nlb = (bs / lba) as u64;
    let pattern = Pattern::new(blocks, nlb, a)?;
    // the fabrics command builders take a 1-based block count
    let nlb16 = u16::try_from(nlb)
        .map_err(|_| CliError::new(format!("--io-size {bs} is more than 65535 blocks")))?;
    let started = Instant::now();
    let mut run = RemoteRun {
        session,
        lanes,
        pattern,
        nsid: a.nsid,
        nlb16,
        bs,
        end: started + Duration::from_secs(a.secs),
        done: 0,
        errors: 0,
        first_error: None,
        last_progress: started,
        failed: None,
    };
    for i in 0..run.lanes.len() {
        for slot in 0..u64::from(run.lanes[i].qd) {
            run.issue(i, slot).map_err(terr)?;
        }
    }
    let run = drive(run)?;
    if let Some(e) = run.failed {
        return Err(e);
    }
    let secs = started.elapsed().as_secs_f64();
    let mut hist = LatencyHistogram::new();
    for lane in &run.lanes {
        hist.merge(&lane.io.histogram);
    }
    let mut r = Report::new(
        format!("rdma:{dst}/{subnqn}"),
        a,
        secs,
        run.done,
        run.errors,
        &hist,
    );
    r.first_error = run.first_error;
    Ok(r)
}

/// One I/O queue of a remote run and its data slots.
struct Lane {
    io: InitiatorQueue<RdmaHost>,
    buf: rdma::RegisteredBuffer,
    qd: u16,
}

/// A remote run in flight.
struct RemoteRun {
    session: Session,
    lanes: Vec<Lane>,
    pattern: Pattern,
    nsid: u32,
    nlb16: u16,
    bs: usize,
    end: Instant,
    done: u64,
    errors: u64,
    first_error: Option<String>,
    last_progress: Instant,
    failed: Option<CliError>,
}

/// How long a run waits for any completion before it calls the target dead.
const STALL: Duration = Duration::from_secs(30);

/// The error of a run (standard or direct) that has seen no completion since
/// `last_progress` for longer than [`STALL`] with `outstanding` commands out.
pub(super) fn stalled(
    now: Instant,
    last_progress: Instant,
    outstanding: usize,
) -> Option<CliError> {
    (now.duration_since(last_progress) > STALL).then(|| {
        CliError::new(format!(
            "no completion for {}s with {outstanding} commands outstanding: the target stopped answering",
            STALL.as_secs(),
        ))
    })
}

impl RemoteRun {
    fn issue(&mut self, lane: usize, slot: u64) -> transport::Result<u16> {
        let (slba, read) = self.pattern.next();
        let l = &mut self.lanes[lane];
        let d = keyed(&l.buf, slot as usize * self.bs, self.bs);
        let sqe = if read {
            cmd::read(self.nsid, slba, self.nlb16, d)
        } else {
            cmd::write(self.nsid, slba, self.nlb16, d)
        };
        l.io.submit(sqe, &[], slot)
    }

    /// Reaps every completion there is and reissues until the end time. Returns the
    /// completions reaped, or `None` once the run is over (all in, or failed).
    fn step(&mut self, now: Instant) -> Option<usize> {
        // Keep Alive every KATO/2: a run longer than the KATO must not lose its controller
        if let Err(e) = self.session.keep_alive_tick(now) {
            self.failed = Some(terr(e));
            return None;
        }
        let mut work = 0;
        let mut outstanding = 0;
        for i in 0..self.lanes.len() {
            while let Some(c) = self.lanes[i].io.poll_one() {
                work += 1;
                self.done += 1;
                let st = c.status();
                if !st.is_success() {
                    self.errors += 1;
                    self.first_error.get_or_insert(format!("{st:?}"));
                }
                if now < self.end {
                    if let Err(e) = self.issue(i, c.user) {
                        self.failed = Some(terr(e));
                        return None;
                    }
                }
            }
            outstanding += self.lanes[i].io.outstanding();
        }
        if outstanding == 0 {
            return None;
        }
        if work > 0 {
            self.last_progress = now;
        } else if let Some(e) = stalled(now, self.last_progress, outstanding) {
            self.failed = Some(e);
            return None;
        }
        Some(work)
    }
}

impl Run for RemoteRun {
    fn step(&mut self, now: Instant) -> Option<usize> {
        RemoteRun::step(self, now)
    }

    fn arm(&mut self, wake: &mut rdma::WakeSet) -> rdma::Arm {
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            let wire = lane.io.wire_mut();
            match wire.arm() {
                Ok(true) => {
                    if let Some(fd) = HostWire::wake_fd(wire) {
                        wake.add(fd, i as u32);
                    }
                }
                Ok(false) | Err(_) => return rdma::Arm::Nap(Duration::from_micros(50)),
            }
        }
        // A response that raced the arm raises no event: look once more.
        if self.lanes.iter_mut().any(|l| l.io.has_response()) {
            return rdma::Arm::Ready;
        }
        rdma::Arm::Sleep
    }

    fn woken(&mut self, tag: u32) {
        if let Some(lane) = self.lanes.get_mut(tag as usize) {
            lane.io.wire_mut().woken();
        }
    }
}

/// A run of `perf` (standard or direct) as the reactor drives it.
pub(super) trait Run: Send + 'static {
    /// Reaps every completion there is and reissues until the end time. Returns the
    /// completions reaped, or `None` once the run is over (all in, or failed).
    fn step(&mut self, now: Instant) -> Option<usize>;

    /// Arms the queues' wake-ups before the reactor sleeps (see [`rdma::Poller::arm`]);
    /// by default the run never sleeps and the reactor yields the CPU between empty
    /// steps.
    fn arm(&mut self, wake: &mut rdma::WakeSet) -> rdma::Arm {
        let _ = wake;
        rdma::Arm::Ready
    }

    /// One of the fds `arm` added fired.
    fn woken(&mut self, tag: u32) {
        let _ = tag;
    }
}

/// Runs `run` on a reactor of the calling thread until it is over and gives it back: it
/// polls while completions flow and sleeps on the queues' wake fds while every command
/// is out at the target, through the same loop as the target's poll groups
/// (rdma::reactor).
pub(super) fn drive<R: Run>(run: R) -> Result<R, CliError> {
    let mut reactor = rdma::Reactor::new(rdma::ReactorConfig::default())
        .map_err(|e| CliError(format!("cannot create the reactor: {e}")))?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    reactor.add(Box::new(RunPoller {
        run: Some(Box::new(run)),
        tx,
    }));
    loop {
        if let Ok(run) = rx.try_recv() {
            return Ok(*run);
        }
        if reactor.pass() == 0 {
            reactor.idle();
        }
    }
}

/// A [`Run`] on the reactor; hands the run back through `tx` when it is over.
struct RunPoller<R: Run> {
    run: Option<Box<R>>,
    tx: std::sync::mpsc::SyncSender<Box<R>>,
}

impl<R: Run> rdma::Poller for RunPoller<R> {
    fn poll(&mut self, now: Instant) -> usize {
        let Some(run) = &mut self.run else { return 0 };
        match run.step(now) {
            Some(work) => work,
            None => {
                if let Some(run) = self.run.take() {
                    let _ = self.tx.send(run);
                }
                1
            }
        }
    }

    fn spell(&self) -> rdma::Spell {
        // Every command is out at the target and its response wakes the queue: the short
        // spell, like commands in a device that interrupts.
        rdma::Spell::Device
    }

    fn arm(&mut self, _idle: Duration, wake: &mut rdma::WakeSet) -> rdma::Arm {
        match &mut self.run {
            Some(run) => run.arm(wake),
            None => rdma::Arm::Ready,
        }
    }

    fn woken(&mut self, tag: u32) {
        if let Some(run) = &mut self.run {
            run.woken(tag);
        }
    }

    fn finished(&self) -> bool {
        self.run.is_none()
    }
}

fn run_local(bdf: &str, a: &Args) -> Result<Report, CliError> {
    use nvme::vfio::NvmeDevice;
    use nvme::{ControllerOptions, QueueOptions};
    let nerr = |e: nvme::Error| CliError(e.to_string());
    let opts = ControllerOptions {
        shadow_doorbells: !a.no_shadow_doorbells,
        ..ControllerOptions::default()
    };
    let dev = NvmeDevice::open(bdf, opts).map_err(nerr)?;
    let ctrl = dev.controller();
    let ns = ctrl
        .info()
        .namespaces
        .iter()
        .find(|n| n.nsid == a.nsid)
        .cloned()
        .ok_or_else(|| CliError::new(format!("{bdf} has no active namespace {}", a.nsid)))?;
    let bs = a.io_size;
    let lba = ns.block_size as usize;
    if !bs.is_multiple_of(lba) {
        return Err(CliError::new(format!(
            "--io-size {bs} is not a multiple of the {lba}-byte block"
        )));
    }
    let depth = a.qd.saturating_add(1).max(2);
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth,
            sq_in_cmb: false,
        })
        .map_err(nerr)?;
    let qd = usize::from(a.qd.min(qp.depth() - 1));
    let pool = ctrl.alloc_dma(qd * bs).map_err(nerr)?;
    let slots: Vec<_> = pool.chunks(bs);
    let mut pattern = Pattern::new(ns.blocks, (bs / lba) as u64, a)?;
    let mut started_at = vec![Instant::now(); qd];
    let mut hist = LatencyHistogram::new();
    let nsid = a.nsid;
    // Submissions go in batches: one doorbell write per refill, not one per command (the
    // MMIO write is the expensive part, the more so under emulation).
    let issue = |batch: &mut nvme::Batch<'_>, pattern: &mut Pattern, slot: usize| {
        let (slba, read) = pattern.next();
        if read {
            batch.read(nsid, slba, &slots[slot], slot as u64)
        } else {
            batch.write(nsid, slba, &slots[slot], slot as u64)
        }
    };
    let started = Instant::now();
    let end = started + Duration::from_secs(a.secs);
    {
        let mut batch = qp.batch();
        for slot in 0..qd {
            issue(&mut batch, &mut pattern, slot).map_err(nerr)?;
        }
    }
    let (mut done, mut errors, mut outstanding) = (0u64, 0u64, qd);
    let mut first_error = None;
    let mut reaped = vec![0usize; qd];
    while outstanding > 0 {
        let mut n = 0;
        qp.poll(qd, |c| {
            if !c.is_ok() {
                errors += 1;
                first_error.get_or_insert(c.status);
            }
            reaped[n] = c.tag as usize;
            n += 1;
        });
        if n == 0 {
            continue;
        }
        // one clock read per batch of completions
        let now = Instant::now();
        done += n as u64;
        outstanding -= n;
        for &slot in &reaped[..n] {
            hist.record(now.saturating_duration_since(started_at[slot]));
        }
        if now < end {
            let mut batch = qp.batch();
            for &slot in &reaped[..n] {
                started_at[slot] = now;
                issue(&mut batch, &mut pattern, slot).map_err(nerr)?;
                outstanding += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut report = Report::new(
        format!("local:{bdf}/ns{nsid}"),
        a,
        secs,
        done,
        errors,
        &hist,
    );
    report.first_error = first_error.map(|st| format!("{st:?}"));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_every_line_and_goes_on_after_a_bad_one() {
        let input = "-w bogus -t 1 --local x\n\n--batch\n-q 0 -t 1 --local 0000:ff:1f.7\n";
        let mut out = Vec::new();
        run_batch(input.as_bytes(), &mut out).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        let err = |i: usize| lines[i]["error"].as_str().unwrap_or_default().to_string();
        assert!(err(0).contains("bogus"), "{}", err(0));
        assert!(err(1).contains("--batch"), "{}", err(1));
        assert!(
            err(2).contains("--queue-depth must be at least 1"),
            "{}",
            err(2)
        );
    }

    #[test]
    fn sizes_parse_with_suffixes_and_reject_nonsense() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("100").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn patterns_stay_inside_the_namespace() {
        let args = |w| Args {
            traddr: None,
            trsvcid: 4420,
            subnqn: None,
            hostnqn: DEFAULT_HOSTNQN.into(),
            local: Some("x".into()),
            nsid: 1,
            qd: 1,
            io_size: 4096,
            workload: w,
            rwmixread: 70,
            secs: 1,
            batch: false,
            no_shadow_doorbells: false,
            direct: false,
            queues: 1,
            completions: Default::default(),
            json: false,
        };
        for w in [Workload::Randread, Workload::Randrw, Workload::Write] {
            let mut p = Pattern::new(1000, 8, &args(w)).unwrap();
            let mut reads = 0;
            for _ in 0..10_000 {
                let (slba, read) = p.next();
                assert!(slba + 8 <= 1000 && slba % 8 == 0, "{w:?} slba {slba}");
                reads += usize::from(read);
            }
            match w {
                Workload::Randread => assert_eq!(reads, 10_000),
                Workload::Write => assert_eq!(reads, 0),
                _ => assert!(
                    (6000..8000).contains(&reads),
                    "randrw 70% reads gave {reads}"
                ),
            }
        }
        assert!(Pattern::new(4, 8, &args(Workload::Randread)).is_err());
    }
}
