//! RDMA micro-benchmark over one device in loopback (soft-RoCE in the testbed), shaped like
//! perftest so `scripts/bench-rdma` can print ratios against it:
//!
//! - `write_bw`: RDMA WRITE message rate and bandwidth at 8 B, 4 KiB and 64 KiB
//!   (chains of 16 WRs posted with one call, the last one signaled, up to 128 in flight;
//!   like `ib_write_bw` with `-t 128`);
//! - `send_lat`: SEND/RECV ping-pong, inline, half round trip (like `ib_send_lat`);
//! - `write_lat`: RDMA WRITE ping-pong polling memory, half round trip (like `ib_write_lat`).
//!
//! Usage: `rdma_bench [ADDR] [--iters-bw N] [--iters-lat N] [--spin] [--only TEST SIZE ITERS]`;
//! ADDR defaults to `$NVMF_P2P_ADDR`; `--spin` busy-polls without yielding (perftest's
//! behaviour); `--only` runs one measurement. Prints one `key=value` line per measurement. Prints, never asserts.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::cm::{self, CmEventKind, Connector, EventChannel, Listener};
use rdma::{
    Access, CompletionQueue, Connection, ProtectionDomain, QpInit, RecvBatch, RegisteredBuffer,
    SendBatch, SendFlags, WorkCompletion, WrId,
};

const T: Duration = Duration::from_secs(20);

/// When set (the default), an empty poll yields the CPU: on the 2-vCPU testbed soft-RoCE's
/// kernel workers share our CPUs, and a pure spin delays them until the next tick.
static YIELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn idle() {
    if YIELD.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}
const CHAIN: usize = 16;
const DEPTH: usize = 128;
/// The benchmark never looks at completion ids: every WR carries the same one.
const ID: WrId = WrId::new(0, 0);

struct Pair {
    server: Connection,
    client: Connection,
    scq: Arc<CompletionQueue>,
    ccq: Arc<CompletionQueue>,
    _listener: Listener,
    _ch: EventChannel,
}

fn connect(ip: IpAddr, pd: &Arc<ProtectionDomain>) -> rdma::Result<Pair> {
    let ctx = pd.context();
    let scq = CompletionQueue::new(ctx, 4096, None)?;
    let ccq = CompletionQueue::new(ctx, 4096, None)?;
    let mut init = QpInit::new(&scq);
    init.max_send_wr = 2 * DEPTH as u32;
    init.max_recv_wr = 2 * DEPTH as u32;
    let srv_init = init.clone();
    let mut cli_init = QpInit::new(&ccq);
    cli_init.max_send_wr = 2 * DEPTH as u32;
    cli_init.max_recv_wr = 2 * DEPTH as u32;
    let ch = EventChannel::new()?;
    let listener = Listener::bind(&ch, SocketAddr::new(ip, 0), 4)?;
    let dst = listener.local_addr();
    let pd2 = Arc::clone(pd);
    let client =
        std::thread::spawn(move || Connector::resolve(dst, T)?.connect(&pd2, &cli_init, b"", T));
    let server = loop {
        let ev = ch.wait_event(T)?.ok_or(rdma::Error::Timeout {
            what: "connect request",
            timeout: T,
        })?;
        if let CmEventKind::ConnectRequest(req) = ev.kind {
            break req.accept(pd, &srv_init, b"")?;
        }
    };
    let client = client.join().expect("client thread panicked")?;
    Ok(Pair {
        server,
        client,
        scq,
        ccq,
        _listener: listener,
        _ch: ch,
    })
}

fn reap(cq: &CompletionQueue, wcs: &mut [WorkCompletion]) -> rdma::Result<usize> {
    let n = cq.poll(wcs)?;
    for wc in &wcs[..n] {
        wc.result()?;
    }
    Ok(n)
}

fn write_bw(
    p: &Pair,
    src: &RegisteredBuffer,
    dst: &RegisteredBuffer,
    size: usize,
    iters: usize,
) -> rdma::Result<()> {
    let iters = iters.div_ceil(CHAIN) * CHAIN;
    let mut wcs = [WorkCompletion::default(); 32];
    let sge = src.mr().sge(0, size)?;
    let remote = dst.mr().remote(0);
    let (mut posted, mut done) = (0usize, 0usize);
    let start = Instant::now();
    let mut batch = SendBatch::<CHAIN>::new();
    while done < iters {
        while posted < iters && posted - done + CHAIN <= DEPTH {
            batch.clear();
            for i in 0..CHAIN {
                let flags = if i == CHAIN - 1 {
                    SendFlags::SIGNALED
                } else {
                    SendFlags::NONE
                };
                batch.write(ID, sge, remote, flags)?;
            }
            p.client.qp().post_send(&mut batch)?;
            posted += CHAIN;
        }
        let n = reap(&p.ccq, &mut wcs)?;
        if n == 0 {
            idle();
        }
        done += n * CHAIN;
    }
    let secs = start.elapsed().as_secs_f64();
    let mib_s = (size * iters) as f64 / secs / (1 << 20) as f64;
    println!(
        "write_bw size={size} iters={iters} mpps={:.6} mib_s={mib_s:.2}",
        iters as f64 / secs / 1e6
    );
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p) as usize]
}

fn print_lat(name: &str, size: usize, mut halves: Vec<f64>) {
    let avg = halves.iter().sum::<f64>() / halves.len() as f64;
    let p99 = percentile(&mut halves, 0.99);
    let p50 = percentile(&mut halves, 0.5);
    println!(
        "{name} size={size} iters={} typical_us={p50:.2} avg_us={avg:.2} p99_us={p99:.2}",
        halves.len()
    );
}

fn send_lat(p: &Pair, size: usize, iters: usize) -> rdma::Result<()> {
    let sbuf = RegisteredBuffer::new(p.server.qp().pd(), 4096, Access::LOCAL_WRITE)?;
    let cbuf = RegisteredBuffer::new(p.client.qp().pd(), 4096, Access::LOCAL_WRITE)?;
    let payload = vec![0x5au8; size];
    // Keep 64 RECVs posted on both sides; replenish as they are consumed.
    let prime = |qp: &rdma::QueuePair, buf: &RegisteredBuffer, n: usize| -> rdma::Result<()> {
        let mut rb = RecvBatch::<64>::new();
        for i in 0..n {
            rb.recv(WrId::new(0, i as u32), Some(buf.mr().sge(0, 4096)?))?;
        }
        qp.post_recv(&mut rb)
    };
    prime(p.server.qp(), &sbuf, 64)?;
    prime(p.client.qp(), &cbuf, 64)?;
    let server = {
        let qp = p.server.qp();
        let scq = &p.scq;
        let payload = &payload;
        let sbuf = &sbuf;
        move || -> rdma::Result<()> {
            let mut wcs = [WorkCompletion::default(); 16];
            let mut answered = 0;
            let mut sends = 0u64;
            while answered < iters {
                let n = reap(scq, &mut wcs)?;
                if n == 0 {
                    idle();
                }
                for wc in &wcs[..n] {
                    if wc.opcode().name() != "RECV" {
                        continue;
                    }
                    let mut rb = RecvBatch::<1>::new();
                    rb.recv(ID, Some(sbuf.mr().sge(0, 4096)?))?;
                    qp.post_recv(&mut rb)?;
                    let mut sb = SendBatch::<1>::new();
                    sends += 1;
                    let flags = if sends & 31 == 0 {
                        SendFlags::SIGNALED
                    } else {
                        SendFlags::NONE
                    };
                    sb.send_inline(ID, payload, flags)?;
                    qp.post_send(&mut sb)?;
                    answered += 1;
                }
            }
            Ok(())
        }
    };
    let mut halves = Vec::with_capacity(iters);
    std::thread::scope(|s| -> rdma::Result<()> {
        let srv = s.spawn(server);
        let mut wcs = [WorkCompletion::default(); 16];
        for i in 0..iters {
            let t0 = Instant::now();
            let mut sb = SendBatch::<1>::new();
            let flags = if (i + 1) & 31 == 0 {
                SendFlags::SIGNALED
            } else {
                SendFlags::NONE
            };
            sb.send_inline(ID, &payload, flags)?;
            p.client.qp().post_send(&mut sb)?;
            'wait: loop {
                let n = reap(&p.ccq, &mut wcs)?;
                if n == 0 {
                    idle();
                }
                for wc in &wcs[..n] {
                    if wc.opcode().name() == "RECV" {
                        break 'wait;
                    }
                }
            }
            halves.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0);
            let mut rb = RecvBatch::<1>::new();
            rb.recv(ID, Some(cbuf.mr().sge(0, 4096)?))?;
            p.client.qp().post_recv(&mut rb)?;
        }
        srv.join().expect("server thread panicked")
    })?;
    print_lat("send_lat", size, halves);
    Ok(())
}

fn write_lat(p: &Pair, size: usize, iters: usize) -> rdma::Result<()> {
    // Each buffer has an incoming half (the peer WRITEs there) and an outgoing half (the
    // source of our WRITEs); the last 8 bytes of a message carry the iteration number.
    const IN: usize = 0;
    const OUT: usize = 2048;
    let size = size.clamp(8, OUT);
    let flag = size - 8;
    let pd = p.server.qp().pd();
    let sbuf = RegisteredBuffer::new(pd, 4096, Access::ALL)?;
    let cbuf = RegisteredBuffer::new(pd, 4096, Access::ALL)?;
    let (s_in, c_in) = (sbuf.mr().remote(IN), cbuf.mr().remote(IN));
    let signal = |i: u64| {
        if i & 31 == 0 {
            SendFlags::SIGNALED
        } else {
            SendFlags::NONE
        }
    };
    let server = || -> rdma::Result<()> {
        let mut wcs = [WorkCompletion::default(); 16];
        for i in 1..=iters as u64 {
            while sbuf.read_volatile_u64(IN + flag)? != i {
                idle();
            }
            sbuf.write_volatile_u64(OUT + flag, i)?;
            let mut sb = SendBatch::<1>::new();
            sb.write(ID, sbuf.mr().sge(OUT, size)?, c_in, signal(i))?;
            p.server.qp().post_send(&mut sb)?;
            reap(&p.scq, &mut wcs)?;
        }
        Ok(())
    };
    let mut halves = Vec::with_capacity(iters);
    std::thread::scope(|s| -> rdma::Result<()> {
        let srv = s.spawn(server);
        let mut wcs = [WorkCompletion::default(); 16];
        for i in 1..=iters as u64 {
            let t0 = Instant::now();
            cbuf.write_volatile_u64(OUT + flag, i)?;
            let mut sb = SendBatch::<1>::new();
            sb.write(ID, cbuf.mr().sge(OUT, size)?, s_in, signal(i))?;
            p.client.qp().post_send(&mut sb)?;
            while cbuf.read_volatile_u64(IN + flag)? != i {
                idle();
            }
            reap(&p.ccq, &mut wcs)?;
            halves.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0);
        }
        srv.join().expect("server thread panicked")
    })?;
    print_lat("write_lat", size, halves);
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("rdma_bench: {e}");
        std::process::exit(1);
    }
}

/// Command-line mistakes are plain messages; RDMA failures keep their typed source.
fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut addr = std::env::var("NVMF_P2P_ADDR").ok();
    let (mut iters_bw, mut iters_lat) = (5000usize, 1000usize);
    let mut only: Option<(String, usize, usize)> = None;
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--iters-bw" => iters_bw = num("--iters-bw")?,
            "--iters-lat" => iters_lat = num("--iters-lat")?,
            "--spin" => YIELD.store(false, std::sync::atomic::Ordering::Relaxed),
            "--only" => {
                // --only TEST SIZE ITERS: one measurement (scripts/bench-rdma interleaves
                // these with perftest runs).
                let test = args.next().ok_or("--only needs a test")?;
                let mut num = |what: &str| -> Result<usize, String> {
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| format!("--only needs {what}"))
                };
                let size = num("a size")?;
                let iters = num("an iteration count")?;
                only = Some((test, size, iters));
            }
            other => addr = Some(other.to_owned()),
        }
    }
    let ip: IpAddr = addr
        .ok_or("give an address or set NVMF_P2P_ADDR")?
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    let ctx = cm::context_for(ip)?;
    let pd = ProtectionDomain::new(&ctx)?;
    let p = connect(ip, &pd)?;
    let mode = if YIELD.load(std::sync::atomic::Ordering::Relaxed) {
        "yield"
    } else {
        "spin"
    };
    eprintln!("device={} addr={ip} idle={mode}", ctx.name());
    let src = RegisteredBuffer::new(&pd, 64 << 10, Access::LOCAL_WRITE)?;
    let dst = RegisteredBuffer::new(&pd, 64 << 10, Access::ALL)?;
    if let Some((test, size, iters)) = only {
        return match test.as_str() {
            "write_bw" if size <= 64 << 10 => Ok(write_bw(&p, &src, &dst, size, iters)?),
            "send_lat" if size <= 4096 => Ok(send_lat(&p, size, iters)?),
            "write_lat" if size <= 2048 => Ok(write_lat(&p, size, iters)?),
            _ => Err(format!("unknown test {test} or size {size} too large").into()),
        };
    }
    for size in [8usize, 4096, 65536] {
        write_bw(&p, &src, &dst, size, iters_bw)?;
    }
    send_lat(&p, 8, iters_lat)?;
    write_lat(&p, 8, iters_lat)?;
    Ok(())
}
