//! Soft-RoCE tests, run inside the testbed VM (one rxe device in loopback):
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-rdma cargo test -p rdma --features vm-tests --no-run
//! scripts/testbed -- /work/target-rdma/debug/deps/vm_rdma-<hash> --test-threads=1
//! ```
//!
//! The device comes from `NVMF_P2P_RXE` and the guest address bound to it from
//! `NVMF_P2P_ADDR` (both exported by scripts/testbed).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::cm::{self, CmEventKind, Connector, EventChannel, Listener};
use rdma::reactor::{Arm, Poller, Reactor, ReactorConfig, WakeSet};
use rdma::{
    Access, CompletionChannel, CompletionQueue, Connection, Context, Error, ProtectionDomain,
    QpInit, RecvBatch, RegisteredBuffer, SendBatch, SendFlags, SharedReceiveQueue, WorkCompletion,
    WrId,
};

const T: Duration = Duration::from_secs(10);

/// The id of test work request `n` (kind 0, tag `n`).
fn id(n: u64) -> WrId {
    WrId::new(0, u32::try_from(n).expect("test ids fit the tag"))
}

fn ip() -> IpAddr {
    std::env::var("NVMF_P2P_ADDR")
        .expect("NVMF_P2P_ADDR not set: run inside scripts/testbed")
        .parse()
        .expect("NVMF_P2P_ADDR is not an IP address")
}

/// Device context, PD and a CQ with a completion channel, on the device behind the address.
struct Res {
    ctx: Arc<Context>,
    pd: Arc<ProtectionDomain>,
}

fn res() -> Res {
    let ctx = cm::context_for(ip()).expect("context for NVMF_P2P_ADDR");
    let rxe = std::env::var("NVMF_P2P_RXE").unwrap_or_default();
    assert!(
        rxe.split_whitespace().any(|d| d == ctx.name()),
        "device {} not in NVMF_P2P_RXE={rxe}",
        ctx.name()
    );
    let pd = ProtectionDomain::new(&ctx).unwrap();
    Res { ctx, pd }
}

fn cq(r: &Res, with_channel: bool) -> Arc<CompletionQueue> {
    let ch = with_channel.then(|| CompletionChannel::new(&r.ctx).unwrap());
    CompletionQueue::new(&r.ctx, 1024, ch.as_ref()).unwrap()
}

/// Waits for the next CM event on `ch`.
fn event(ch: &EventChannel) -> cm::CmEvent {
    ch.wait_event(T).unwrap().expect("CM event timed out")
}

/// A connected pair: the client connects from a helper thread, the server accepts here.
struct Pair {
    server: Connection,
    client: Connection,
    _listener: Listener,
    srv_ch: EventChannel,
}

fn connect_pair(
    r: &Res,
    srv_init: &QpInit,
    cli_init: &QpInit,
    req_pd: &[u8],
    acc_pd: &[u8],
) -> Pair {
    let srv_ch = EventChannel::new().unwrap();
    let listener = Listener::bind(&srv_ch, SocketAddr::new(ip(), 0), 16).unwrap();
    let dst = listener.local_addr();
    let pd = Arc::clone(&r.pd);
    let cli_init = cli_init.clone();
    let req_pd = req_pd.to_vec();
    let client =
        std::thread::spawn(move || Connector::resolve(dst, T)?.connect(&pd, &cli_init, &req_pd, T));
    let ev = event(&srv_ch);
    let CmEventKind::ConnectRequest(req) = ev.kind else {
        panic!("expected CONNECT_REQUEST, got {ev:?}");
    };
    assert_eq!(ev.listen_key, listener.id_key());
    let server = req.accept(&r.pd, srv_init, acc_pd).unwrap();
    let est = event(&srv_ch);
    assert!(matches!(est.kind, CmEventKind::Established), "{est:?}");
    assert_eq!(est.id_key, server.id_key());
    let client = client.join().unwrap().expect("client connect");
    Pair {
        server,
        client,
        _listener: listener,
        srv_ch,
    }
}

/// Polls `cq` until `n` completions arrived (all must succeed) or the timeout passes.
fn wait_wcs(cq: &CompletionQueue, n: usize) -> Vec<WorkCompletion> {
    let deadline = Instant::now() + T;
    let mut out = Vec::new();
    let mut wcs = [WorkCompletion::default(); 16];
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completions",
            out.len()
        );
        let k = cq.poll(&mut wcs).unwrap();
        for wc in &wcs[..k] {
            wc.result().unwrap();
            out.push(*wc);
        }
    }
    out
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

#[test]
fn device_port_and_gid_queries() {
    let r = res();
    let dev = r.ctx.query_device().unwrap();
    assert!(dev.max_qp > 0 && dev.max_cqe > 0, "{dev:?}");
    let port = r.ctx.query_port(1).unwrap();
    assert_eq!(port.state, rdma::sys::ibv_port_state::IBV_PORT_ACTIVE);
    let gid = r.ctx.query_gid(1, 0).unwrap();
    assert_ne!(gid, [0u8; 16]);
    assert!(rdma::device_names().unwrap().contains(&r.ctx.name()));
}

#[test]
fn cm_private_data_round_trips_both_ways() {
    let r = res();
    let c = cq(&r, false);
    let init = QpInit::new(&c);
    let p = connect_pair(&r, &init, &init, b"hello from the host", b"welcome, host");
    assert!(p
        .server
        .peer_private_data()
        .starts_with(b"hello from the host"));
    assert!(p.client.peer_private_data().starts_with(b"welcome, host"));
    assert_eq!(
        p.client.qp().state().unwrap(),
        rdma::sys::ibv_qp_state::IBV_QPS_RTS
    );
}

#[test]
fn send_recv_ping_pong() {
    let r = res();
    let (cs, cc) = (cq(&r, false), cq(&r, false));
    let p = connect_pair(&r, &QpInit::new(&cs), &QpInit::new(&cc), b"", b"");
    let sbuf = RegisteredBuffer::new(&r.pd, 4096, Access::LOCAL_WRITE).unwrap();
    let cbuf = RegisteredBuffer::new(&r.pd, 4096, Access::LOCAL_WRITE).unwrap();
    for i in 0u64..100 {
        let mut rb = RecvBatch::<1>::new();
        rb.recv(id(i), Some(sbuf.mr().sge(0, 64).unwrap())).unwrap();
        p.server.qp().post_recv(&mut rb).unwrap();
        let mut rb = RecvBatch::<1>::new();
        rb.recv(id(i), Some(cbuf.mr().sge(0, 64).unwrap())).unwrap();
        p.client.qp().post_recv(&mut rb).unwrap();

        let ping = format!("ping {i}");
        let mut sb = SendBatch::<1>::new();
        sb.send_inline(id(i), ping.as_bytes(), SendFlags::SIGNALED)
            .unwrap();
        p.client.qp().post_send(&mut sb).unwrap();
        let wcs = wait_wcs(&cs, 1);
        assert_eq!(wcs[0].byte_len() as usize, ping.len());
        let mut got = vec![0u8; ping.len()];
        sbuf.read(0, &mut got).unwrap();
        assert_eq!(got, ping.as_bytes());

        let pong = format!("pong {i}");
        sb.clear();
        sb.send_inline(id(i), pong.as_bytes(), SendFlags::SIGNALED)
            .unwrap();
        p.server.qp().post_send(&mut sb).unwrap();
        // Client CQ: its SEND completion and the RECV of the pong.
        let wcs = wait_wcs(&cc, 2);
        assert!(wcs.iter().any(|w| w.opcode().name() == "RECV"));
        let mut got = vec![0u8; pong.len()];
        cbuf.read(0, &mut got).unwrap();
        assert_eq!(got, pong.as_bytes());
        wait_wcs(&cs, 1); // the pong's SEND completion
    }
}

#[test]
fn rdma_write_and_read_random_sizes() {
    const MIB: usize = 1 << 20;
    let r = res();
    let (cs, cc) = (cq(&r, false), cq(&r, false));
    let p = connect_pair(&r, &QpInit::new(&cs), &QpInit::new(&cc), b"", b"");
    let remote = RegisteredBuffer::new(&r.pd, MIB, Access::ALL).unwrap();
    let src = RegisteredBuffer::new(&r.pd, MIB, Access::LOCAL_WRITE).unwrap();
    let dst = RegisteredBuffer::new(&r.pd, MIB, Access::LOCAL_WRITE).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut sizes = vec![1usize, MIB];
    sizes.extend((0..14).map(|_| 1 + rng.below(MIB as u64) as usize));
    for (i, &len) in sizes.iter().enumerate() {
        let off = rng.below((MIB - len + 1) as u64) as usize;
        let data = pattern(i as u64 + 1, len);
        src.write(0, &data).unwrap();
        let mut sb = SendBatch::<1>::new();
        sb.write(
            id(1),
            src.mr().sge(0, len).unwrap(),
            remote.mr().remote(off),
            SendFlags::SIGNALED,
        )
        .unwrap();
        p.client.qp().post_send(&mut sb).unwrap();
        wait_wcs(&cc, 1);
        let mut got = vec![0u8; len];
        remote.read(off, &mut got).unwrap();
        assert!(got == data, "WRITE of {len} B at {off} differs");

        dst.write(0, &vec![0u8; len]).unwrap();
        sb.clear();
        sb.read(
            id(2),
            dst.mr().sge(0, len).unwrap(),
            remote.mr().remote(off),
            SendFlags::SIGNALED,
        )
        .unwrap();
        p.client.qp().post_send(&mut sb).unwrap();
        let wc = wait_wcs(&cc, 1);
        assert_eq!(wc[0].opcode().name(), "RDMA_READ");
        dst.read(0, &mut got).unwrap();
        assert!(got == data, "READ of {len} B at {off} differs");
    }
}

#[test]
fn chained_write_data_entry_flag_is_observed_in_order() {
    const DATA: usize = 4096;
    let r = res();
    let (cs, cc) = (cq(&r, false), cq(&r, false));
    let p = connect_pair(&r, &QpInit::new(&cs), &QpInit::new(&cc), b"", b"");
    // Responder layout: [data 4 KiB][entry u64][flag u64].
    let target = Arc::new(RegisteredBuffer::new(&r.pd, DATA + 16, Access::ALL).unwrap());
    let src = RegisteredBuffer::new(&r.pd, DATA + 16, Access::LOCAL_WRITE).unwrap();
    let rounds = 200u64;
    let t2 = Arc::clone(&target);
    let responder = std::thread::spawn(move || {
        let mut data = vec![0u8; DATA];
        for seq in 1..=rounds {
            let deadline = Instant::now() + T;
            while t2.read_volatile_u64(DATA + 8).unwrap() < seq {
                assert!(Instant::now() < deadline, "flag {seq} never arrived");
                std::hint::spin_loop();
            }
            std::sync::atomic::fence(Ordering::Acquire);
            let flag = t2.read_volatile_u64(DATA + 8).unwrap();
            let entry = t2.read_volatile_u64(DATA).unwrap();
            assert!(entry >= flag, "entry {entry} behind flag {flag}");
            t2.read(0, &mut data).unwrap();
            // Data of round `flag` was written before its entry and flag: every byte is
            // at least that new (rounds < 256, so bytes do not wrap).
            if let Some(b) = data.iter().find(|&&b| u64::from(b) < flag) {
                panic!("data byte {b} behind flag {flag}: WRITEs landed out of order");
            }
        }
    });
    let remote = target.mr().remote(0);
    for seq in 1..=rounds {
        src.write(0, &vec![seq as u8; DATA]).unwrap();
        src.write_volatile_u64(DATA, seq).unwrap();
        src.write_volatile_u64(DATA + 8, seq).unwrap();
        let mut sb = SendBatch::<3>::new();
        sb.write(
            id(seq * 3),
            src.mr().sge(0, DATA).unwrap(),
            remote,
            SendFlags::NONE,
        )
        .unwrap()
        .write(
            id(seq * 3 + 1),
            src.mr().sge(DATA, 8).unwrap(),
            remote.offset(DATA as u64),
            SendFlags::NONE,
        )
        .unwrap()
        .write(
            id(seq * 3 + 2),
            src.mr().sge(DATA + 8, 8).unwrap(),
            remote.offset(DATA as u64 + 8),
            SendFlags::SIGNALED,
        )
        .unwrap();
        p.client.qp().post_send(&mut sb).unwrap();
        // The source buffer is reused next round: wait for the chain's completion.
        let wc = wait_wcs(&cc, 1);
        assert_eq!(wc[0].wr_id(), id(seq * 3 + 2));
    }
    responder.join().unwrap();
}

#[test]
fn srq_shared_by_many_qps() {
    const QPS: usize = 4;
    const MSGS: usize = 3;
    let r = res();
    let scq = cq(&r, false);
    let srq = SharedReceiveQueue::new(&r.pd, 64, 1).unwrap();
    let mut srv_init = QpInit::new(&scq);
    srv_init.srq = Some(Arc::clone(&srq));
    let bufs = RegisteredBuffer::new(&r.pd, 64 * 64, Access::LOCAL_WRITE).unwrap();
    let mut rb = RecvBatch::<32>::new();
    for i in 0..32 {
        rb.recv(id(i as u64), Some(bufs.mr().sge(i * 64, 64).unwrap()))
            .unwrap();
    }
    srq.post_recv(&mut rb).unwrap();
    let mut pairs = Vec::new();
    let mut ccqs = Vec::new();
    for _ in 0..QPS {
        let c = cq(&r, false);
        pairs.push(connect_pair(&r, &srv_init, &QpInit::new(&c), b"", b""));
        ccqs.push(c);
    }
    for (q, p) in pairs.iter().enumerate() {
        for m in 0..MSGS {
            let msg = format!("qp{q} msg{m}");
            let mut sb = SendBatch::<1>::new();
            sb.send_inline(id(m as u64), msg.as_bytes(), SendFlags::SIGNALED)
                .unwrap();
            p.client.qp().post_send(&mut sb).unwrap();
        }
    }
    let wcs = wait_wcs(&scq, QPS * MSGS);
    let mut seen = std::collections::BTreeMap::<u32, usize>::new();
    let mut texts = Vec::new();
    for wc in &wcs {
        assert_eq!(wc.opcode().name(), "RECV");
        *seen.entry(wc.qp_num()).or_default() += 1;
        let mut b = vec![0u8; wc.byte_len() as usize];
        bufs.read(wc.wr_id().tag() as usize * 64, &mut b).unwrap();
        texts.push(String::from_utf8(b).unwrap());
    }
    let server_qps: std::collections::BTreeSet<u32> =
        pairs.iter().map(|p| p.server.qp().qp_num()).collect();
    assert_eq!(
        seen.keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        server_qps
    );
    assert!(seen.values().all(|&n| n == MSGS), "{seen:?}");
    texts.sort();
    let mut want: Vec<String> = (0..QPS)
        .flat_map(|q| (0..MSGS).map(move |m| format!("qp{q} msg{m}")))
        .collect();
    want.sort();
    assert_eq!(texts, want);
}

#[test]
fn reject_carries_private_data() {
    let r = res();
    let c = cq(&r, false);
    let init = QpInit::new(&c);
    let srv_ch = EventChannel::new().unwrap();
    let listener = Listener::bind(&srv_ch, SocketAddr::new(ip(), 0), 4).unwrap();
    let dst = listener.local_addr();
    let pd = Arc::clone(&r.pd);
    let client = std::thread::spawn(move || {
        Connector::resolve(dst, T)?.connect(&pd, &init, b"let me in", T)
    });
    let ev = event(&srv_ch);
    let CmEventKind::ConnectRequest(req) = ev.kind else {
        panic!("expected CONNECT_REQUEST, got {ev:?}");
    };
    assert!(req.private_data().starts_with(b"let me in"));
    req.reject(b"go away: bad hostnqn").unwrap();
    match client.join().unwrap() {
        Err(Error::Rejected {
            status,
            private_data,
            ..
        }) => {
            assert_eq!(status, cm::REJECT_CONSUMER_DEFINED);
            assert!(private_data.starts_with(b"go away: bad hostnqn"));
        }
        Err(e) => panic!("expected Rejected, got {e}"),
        Ok(_) => panic!("connection was accepted"),
    }
}

#[test]
fn connect_without_listener_is_a_typed_error() {
    let r = res();
    let c = cq(&r, false);
    // A port nobody listens on.
    let dst = SocketAddr::new(ip(), 4999);
    let err = Connector::resolve(dst, T)
        .and_then(|k| k.connect(&r.pd, &QpInit::new(&c), b"", T))
        .err()
        .expect("connected to nothing");
    assert!(
        matches!(err, Error::NoListener { .. } | Error::Unreachable { .. }),
        "{err:?}"
    );
    eprintln!("no listener -> {err}");
}

#[test]
fn bad_input_gives_one_clear_error_each() {
    let r = res();
    let ch = EventChannel::new().unwrap();
    let l = Listener::bind(&ch, SocketAddr::new(ip(), 0), 4).unwrap();
    let again = Listener::bind(&ch, l.local_addr(), 4)
        .err()
        .expect("port reused");
    assert!(matches!(again, Error::AddrInUse { .. }), "{again:?}");

    // An address with no RDMA device behind it.
    let err = Listener::bind(&ch, "127.0.0.1:4420".parse().unwrap(), 4)
        .err()
        .expect("bound loopback without an RDMA device");
    assert!(matches!(err, Error::NoDeviceForAddress { .. }), "{err:?}");
    eprintln!("loopback -> {err}");

    let c = cq(&r, false);
    let too_long = [7u8; cm::MAX_CONNECT_PRIVATE_DATA + 1];
    let err = Connector::resolve(l.local_addr(), T)
        .unwrap()
        .connect(&r.pd, &QpInit::new(&c), &too_long, T)
        .err()
        .expect("oversized private data accepted");
    assert!(matches!(err, Error::PrivateDataTooLong { .. }), "{err:?}");
}

#[test]
fn peer_disconnect_mid_traffic_surfaces_qp_error() {
    let r = res();
    let (cs, cc) = (cq(&r, false), cq(&r, false));
    let p = connect_pair(&r, &QpInit::new(&cs), &QpInit::new(&cc), b"", b"");
    let sbuf = RegisteredBuffer::new(&r.pd, 64 * 256, Access::LOCAL_WRITE).unwrap();
    let mut rb = RecvBatch::<64>::new();
    for i in 0..64 {
        rb.recv(id(i), Some(sbuf.mr().sge(i as usize * 64, 64).unwrap()))
            .unwrap();
    }
    p.server.qp().post_recv(&mut rb).unwrap();
    let cli_ch = p
        .client
        .channel()
        .expect("active side has its channel")
        .clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0u64;
    let mut outstanding = 0usize;
    let mut wcs = [WorkCompletion::default(); 16];
    let mut error = None;
    let mut disconnected = false;
    while error.is_none() || !disconnected {
        assert!(
            Instant::now() < deadline,
            "hang: error={error:?} disconnected={disconnected} sent={sent}"
        );
        if sent == 20 {
            p.server.disconnect().unwrap();
        }
        if error.is_none() && outstanding < 8 {
            let mut sb = SendBatch::<1>::new();
            sb.send_inline(id(sent), b"traffic", SendFlags::SIGNALED)
                .unwrap();
            match p.client.qp().post_send(&mut sb) {
                Ok(()) => {
                    sent += 1;
                    outstanding += 1;
                }
                Err(e) => error = Some(e),
            }
        }
        let n = cc.poll(&mut wcs).unwrap();
        outstanding -= n.min(outstanding);
        for wc in &wcs[..n] {
            if let Err(e) = wc.result() {
                error.get_or_insert(e);
            }
        }
        while let Some(ev) = cli_ch.try_event().unwrap() {
            if matches!(ev.kind, CmEventKind::Disconnected) {
                // The owner's answer to DISCONNECTED: error the QP so in-flight WRs flush.
                disconnected = true;
                p.client.disconnect().unwrap();
            }
        }
        // Drain the server channel too (its DISCONNECTED).
        while srv_event(&p).is_some() {}
    }
    let e = error.unwrap();
    eprintln!("after peer disconnect: {e}");
    assert!(
        matches!(e, Error::WorkCompletion { .. } | Error::Post { .. }),
        "{e:?}"
    );
    assert_eq!(
        p.client.qp().state().unwrap(),
        rdma::sys::ibv_qp_state::IBV_QPS_ERR
    );
}

fn srv_event(p: &Pair) -> Option<cm::CmEvent> {
    p.srv_ch.try_event().unwrap()
}

#[test]
fn dmabuf_mr_on_rxe_is_unsupported() {
    let r = res();
    let fd = match udmabuf(2 << 20) {
        Ok(fd) => fd,
        Err(why) => {
            // Without /dev/udmabuf there is no real dma-buf to hand in; rxe refuses the verb
            // before looking at the fd, so a memfd still exercises the error path.
            eprintln!("no udmabuf ({why}); using a plain memfd");
            // SAFETY: plain syscall with a static name.
            let fd = unsafe { libc::memfd_create(c"rdma-test".as_ptr(), 0) };
            assert!(fd >= 0);
            fd
        }
    };
    let err = rdma::MemoryRegion::register_dmabuf(&r.pd, fd, 0, 4096, 0, Access::ALL)
        .err()
        .expect("rxe accepted a dma-buf MR");
    // SAFETY: closing the fd made above.
    unsafe { libc::close(fd) };
    match err {
        Error::Unsupported { op, errno } => {
            assert_eq!(op, "ibv_reg_dmabuf_mr");
            assert_eq!(errno, libc::EOPNOTSUPP);
        }
        e => panic!("expected Unsupported, got {e:?}"),
    }
}

/// A real dma-buf: a udmabuf over a sealed memfd.
fn udmabuf(size: u64) -> Result<i32, String> {
    #[repr(C)]
    struct UdmabufCreate {
        memfd: u32,
        flags: u32,
        offset: u64,
        size: u64,
    }
    const UDMABUF_CREATE: libc::c_ulong = 0x4018_7542; // _IOW('u', 0x42, struct udmabuf_create)
    const UDMABUF_FLAGS_CLOEXEC: u32 = 1;
    // SAFETY: plain syscalls on fds created here; every result is checked; the ioctl
    // argument is a valid struct udmabuf_create.
    unsafe {
        let dev = libc::open(c"/dev/udmabuf".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if dev < 0 {
            return Err(format!("/dev/udmabuf: {}", std::io::Error::last_os_error()));
        }
        let memfd = libc::memfd_create(c"udmabuf".as_ptr(), libc::MFD_ALLOW_SEALING);
        if memfd < 0 || libc::ftruncate(memfd, size as i64) != 0 {
            libc::close(dev);
            return Err(format!("memfd: {}", std::io::Error::last_os_error()));
        }
        if libc::fcntl(memfd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) != 0 {
            libc::close(dev);
            libc::close(memfd);
            return Err(format!("seal: {}", std::io::Error::last_os_error()));
        }
        let arg = UdmabufCreate {
            memfd: memfd as u32,
            flags: UDMABUF_FLAGS_CLOEXEC,
            offset: 0,
            size,
        };
        let buf = libc::ioctl(dev, UDMABUF_CREATE, &arg);
        let err = std::io::Error::last_os_error();
        libc::close(dev);
        libc::close(memfd);
        if buf < 0 {
            return Err(format!("UDMABUF_CREATE: {err}"));
        }
        Ok(buf)
    }
}

/// The server side of a pair on a reactor: counts completions of its CQ and CM events of
/// its channel (read when their fd wakes the sleeping reactor).
struct Counting {
    cq: Arc<CompletionQueue>,
    cm: EventChannel,
    wcs: [WorkCompletion; 16],
    completions: Arc<AtomicU64>,
    cm_events: Arc<AtomicU64>,
}

impl Poller for Counting {
    fn poll(&mut self, _now: Instant) -> usize {
        let n = self.cq.poll(&mut self.wcs).unwrap();
        for wc in &self.wcs[..n] {
            wc.result().unwrap();
        }
        self.completions.fetch_add(n as u64, Ordering::Relaxed);
        n
    }
    fn arm(&mut self, _idle: Duration, wake: &mut WakeSet) -> Arm {
        self.cq.arm(false).unwrap();
        wake.add(self.cq.channel().unwrap().fd(), 0);
        wake.add(self.cm.fd(), 1);
        if self.poll(Instant::now()) > 0 {
            Arm::Ready
        } else {
            Arm::Sleep
        }
    }
    fn woken(&mut self, tag: u32) {
        if tag == 0 {
            self.cq.channel().unwrap().drain_events().unwrap();
        } else {
            while let Some(_ev) = self.cm.try_event().unwrap() {
                self.cm_events.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[test]
fn reactor_sleeps_when_idle_and_wakes_on_traffic() {
    let r = res();
    let scq = cq(&r, true);
    let ccq = cq(&r, false);
    let p = connect_pair(&r, &QpInit::new(&scq), &QpInit::new(&ccq), b"", b"");
    let sbuf = RegisteredBuffer::new(&r.pd, 64 * 64, Access::LOCAL_WRITE).unwrap();
    let mut rb = RecvBatch::<64>::new();
    for i in 0..64 {
        rb.recv(id(i), Some(sbuf.mr().sge(i as usize * 64, 64).unwrap()))
            .unwrap();
    }
    p.server.qp().post_recv(&mut rb).unwrap();

    rdma::reactor::pin_to_cpu(0).unwrap();
    let mut reactor = Reactor::new(ReactorConfig {
        idle_spell: Duration::from_micros(500),
        max_sleep: Duration::from_secs(2),
        ..Default::default()
    })
    .unwrap();
    let completions = Arc::new(AtomicU64::new(0));
    let cm_events = Arc::new(AtomicU64::new(0));
    reactor.add(Box::new(Counting {
        cq: Arc::clone(&scq),
        cm: p.srv_ch.clone(),
        wcs: [WorkCompletion::default(); 16],
        completions: Arc::clone(&completions),
        cm_events: Arc::clone(&cm_events),
    }));
    let h = reactor.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let t = std::thread::spawn(move || reactor.run(&s2));

    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = process_cpu();
    let c0 = h.counters();
    std::thread::sleep(Duration::from_secs(1));
    let idle_cpu = process_cpu() - cpu0;
    let c1 = h.counters();
    eprintln!("idle second: cpu {idle_cpu:?}, counters {c0:?} -> {c1:?}");
    assert!(
        idle_cpu < Duration::from_millis(50),
        "reactor burnt {idle_cpu:?} while idle"
    );
    assert!(c1.sleeps >= 1);
    assert!(
        c1.passes - c0.passes < 100,
        "kept polling: {c0:?} -> {c1:?}"
    );

    for i in 0..10u64 {
        let mut sb = SendBatch::<1>::new();
        sb.send_inline(id(i), b"wake up", SendFlags::SIGNALED)
            .unwrap();
        p.client.qp().post_send(&mut sb).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_wcs(&ccq, 10);
    let deadline = Instant::now() + T;
    while completions.load(Ordering::Relaxed) < 10 {
        assert!(Instant::now() < deadline, "reactor did not wake");
        std::thread::sleep(Duration::from_millis(5));
    }
    let c2 = h.counters();
    eprintln!("after traffic: {c2:?}");
    assert!(c2.wakeups > c1.wakeups);
    assert_eq!(completions.load(Ordering::Relaxed), 10);

    // A CM event (the peer disconnecting) wakes the sleeping reactor too.
    std::thread::sleep(Duration::from_millis(100));
    let c3 = h.counters();
    p.client.disconnect().unwrap();
    let deadline = Instant::now() + T;
    while cm_events.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "DISCONNECTED did not reach the reactor"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(h.counters().wakeups > c3.wakeups);
    h.stop();
    t.join().unwrap();
}

#[test]
fn verbs_qp_without_cm_transitions_sends_and_flushes_on_error() {
    use rdma::{QueuePair, RemoteQp};
    let r = res();
    let c = cq(&r, false);
    let init = QpInit::new(&c);
    let a = QueuePair::new_rc(&r.pd, &init).unwrap();
    let b = QueuePair::new_rc(&r.pd, &init).unwrap();
    assert_eq!(a.state().unwrap(), rdma::sys::ibv_qp_state::IBV_QPS_RESET);
    // Address the QPs by the GID of NVMF_P2P_ADDR (::ffff:a.b.c.d): resolving it needs no
    // neighbour lookup, unlike the link-local GID 0, whose resolution can time out.
    let IpAddr::V4(v4) = ip() else {
        panic!("NVMF_P2P_ADDR is not IPv4")
    };
    let mut want = [0u8; 16];
    want[10] = 0xff;
    want[11] = 0xff;
    want[12..].copy_from_slice(&v4.octets());
    let tbl = r.ctx.query_port(1).unwrap().gid_tbl_len;
    let sgid_index = (0..tbl)
        .find(|&i| r.ctx.query_gid(1, i).is_ok_and(|g| g == want))
        .expect("no GID for NVMF_P2P_ADDR") as u8;
    let gid = want;
    let mtu = rdma::sys::ibv_mtu::IBV_MTU_1024;
    for (me, peer, psn) in [(&a, &b, 100u32), (&b, &a, 200u32)] {
        me.to_init(1, Access::ALL).unwrap();
        let remote = RemoteQp {
            qp_num: peer.qp_num(),
            psn: if psn == 100 { 200 } else { 100 },
            gid,
            lid: 0,
        };
        me.to_rtr(1, sgid_index, mtu, &remote).unwrap();
        me.to_rts(psn).unwrap();
        assert_eq!(me.state().unwrap(), rdma::sys::ibv_qp_state::IBV_QPS_RTS);
    }
    let buf = RegisteredBuffer::new(&r.pd, 4096, Access::ALL).unwrap();
    let mut rb = RecvBatch::<2>::new();
    rb.recv(id(1), Some(buf.mr().sge(0, 64).unwrap()))
        .unwrap()
        .recv(id(2), Some(buf.mr().sge(64, 64).unwrap()))
        .unwrap();
    b.post_recv(&mut rb).unwrap();
    buf.write(2048, b"no cm needed").unwrap();
    let mut sb = SendBatch::<2>::new();
    sb.send_inline(id(10), b"no cm needed", SendFlags::SIGNALED)
        .unwrap()
        .write(
            id(11),
            buf.mr().sge(2048, 12).unwrap(),
            buf.mr().remote(1024),
            SendFlags::SIGNALED,
        )
        .unwrap();
    a.post_send(&mut sb).unwrap();
    let wcs = wait_wcs(&c, 3);
    let mut got = [0u8; 12];
    buf.read(0, &mut got).unwrap();
    assert_eq!(&got, b"no cm needed");
    buf.read(1024, &mut got).unwrap();
    assert_eq!(&got, b"no cm needed");
    assert!(wcs
        .iter()
        .any(|w| w.wr_id() == id(1) && w.opcode().name() == "RECV"));

    // Teardown step one: ERROR flushes the RECV still posted.
    b.to_error().unwrap();
    let deadline = Instant::now() + T;
    let mut wcs = [WorkCompletion::default(); 4];
    loop {
        assert!(Instant::now() < deadline, "no flush completion");
        let n = c.poll(&mut wcs).unwrap();
        if n > 0 {
            assert_eq!(wcs[0].wr_id(), id(2));
            let e = wcs[0].result().unwrap_err();
            assert!(e.to_string().contains("WR_FLUSH_ERR"), "{e}");
            break;
        }
    }
}
