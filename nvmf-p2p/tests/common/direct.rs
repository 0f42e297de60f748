//! Direct-mode helpers shared by the VM tests of a `vfio:` (vm_direct) and an `spdk:`
//! (vm_spdk_backend) namespace: the `nvmf-p2p direct` host command, the pattern, reads and
//! writes through the kernel initiator (dd) and through our initiator library, and a
//! device reset under QD32 direct writes.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::serve::{Serve, BIN};
use super::{env, sh};

/// The host NQN on the direct-mode subsystems' `direct_hosts`.
pub const DIRECT_HOST: &str =
    "nqn.2014-08.org.nvmexpress:uuid:6e766d66-7032-7000-8000-0000000000d1";
/// A host NQN allowed by the subsystems (allow_any_host) but not on `direct_hosts`.
pub const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:6e766d66-7032-7000-8000-0000000000e2";

/// A serve's direct-mode subsystem.
#[derive(Clone, Copy)]
pub struct DirectTarget {
    pub port: u16,
    pub nqn: &'static str,
}

impl DirectTarget {
    /// The subsystem section: `backend` as namespace 1, DIRECT_HOST on direct_hosts.
    pub fn subsystem(&self, backend: &str) -> String {
        format!(
            "[[subsystem]]\nnqn = \"{}\"\nallow_any_host = true\ndirect_hosts = [\"{DIRECT_HOST}\"]\n\
             [[subsystem.namespace]]\nbackend = \"{backend}\"\n",
            self.nqn
        )
    }

    /// serve with that subsystem, once direct mode is up.
    pub fn start_serve(&self, name: &str, backend: &str) -> Serve {
        let mut s = Serve::start(name, self.port, &self.subsystem(backend));
        let t0 = Instant::now();
        while !s.log_text().contains("direct mode on") {
            if let Some(st) = s.child_status() {
                panic!("serve exited early ({st}):\n{}", s.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "direct mode did not come up:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    /// Arguments of `nvmf-p2p direct --json` as `host`, then `extra`.
    pub fn args(&self, host: &str, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "direct",
            "--traddr",
            &env("NVMF_P2P_ADDR"),
            "--trsvcid",
            &self.port.to_string(),
            "--subnqn",
            self.nqn,
            "--hostnqn",
            host,
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// `nvmf-p2p direct` as DIRECT_HOST with `extra`, which must succeed; its JSON report.
    pub fn run(&self, serve: &Serve, extra: &[&str]) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(self.args(DIRECT_HOST, extra))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "direct {extra:?} failed ({}):\n{}\n{}\n--- serve log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            serve.log_text()
        );
        serde_json::from_slice(&out.stdout).expect("direct --json is JSON")
    }

    /// A host not on direct_hosts is refused with "access denied".
    pub fn assert_refused(&self, host: &str) {
        let out = Command::new(BIN)
            .args(self.args(host, &["--attach-only"]))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "non-allow-listed host attached");
        assert!(err.contains("access denied"), "unclear refusal: {err}");
        eprintln!("refusal: {}", err.trim());
    }

    /// A device reset (`ctl reset-device`) while `direct --fill SEED` writes 65536 blocks
    /// from `lba` at QD32 with `completions`: the load re-attaches and finishes, then every
    /// block reads back with the pattern.
    pub fn reset_under_load(&self, serve: &Serve, completions: &str, seed: &str, lba: &str) {
        let load = Command::new(BIN)
            .args(self.args(
                DIRECT_HOST,
                &[
                    "--completions",
                    completions,
                    "--fill",
                    seed,
                    "--lba",
                    lba,
                    "--blocks",
                    "65536",
                    "--qd",
                    "32",
                ],
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Reset once the load's direct queue is up and I/O flows.
        let t0 = Instant::now();
        loop {
            let st = serve.stats();
            let flowing = st["direct"]["queues"].as_array().is_some_and(|q| {
                q.iter().any(|q| {
                    q["completions"] == completions && q["doorbells_forwarded"].as_u64() > Some(20)
                })
            });
            if flowing {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "direct load ({completions}) never started: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let reset = serve.ctl("reset-device");
        eprintln!("reset ({completions}): {}", reset.trim());
        let out = load.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "direct load ({completions}) across the reset failed:\n{}\n{}\n--- serve log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            serve.log_text()
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("across reset ({completions}): {r}");
        assert!(
            r["reattaches"].as_u64().unwrap() >= 1,
            "the load ({completions}) did not see the reset: {r}"
        );
        self.run(
            serve,
            &[
                "--check", seed, "--lba", lba, "--blocks", "65536", "--qd", "32",
            ],
        );
    }

    /// Reads (`write: None`) or writes `blocks` blocks at `lba` through our initiator
    /// library (standard mode, one I/O queue, 64 KiB commands) as OTHER_HOST.
    pub fn ours_io(&self, lba: u64, blocks: u64, lba_size: usize, write: Option<&[u8]>) -> Vec<u8> {
        use transport::initiator::{cmd, execute};
        use transport::nvmf_rdma::{keyed, Session, SessionOptions};
        let dst: SocketAddr = format!("{}:{}", env("NVMF_P2P_ADDR"), self.port)
            .parse()
            .unwrap();
        let s = Session::connect(SessionOptions {
            dst,
            subnqn: self.nqn.into(),
            hostnqn: OTHER_HOST.into(),
            nsid: 1,
            io_queues: 1,
            kato_ms: 0,
            timeout: Duration::from_secs(10),
        })
        .expect("our initiator connects");
        let mut q = s.connect_io_queue(1, 8).expect("our I/O queue");
        let chunk = 65536usize;
        let buf = q.wire().register(chunk).expect("registered buffer");
        let total = blocks as usize * lba_size;
        let mut out = vec![0u8; if write.is_some() { 0 } else { total }];
        let mut off = 0usize;
        while off < total {
            let len = chunk.min(total - off);
            let slba = lba + (off / lba_size) as u64;
            let nlb = (len / lba_size) as u16;
            let sqe = match write {
                Some(data) => {
                    buf.write(0, &data[off..off + len]).unwrap();
                    cmd::write(1, slba, nlb, keyed(&buf, 0, len))
                }
                None => cmd::read(1, slba, nlb, keyed(&buf, 0, len)),
            };
            execute(&mut q, sqe, &[], Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("our initiator at LBA {slba}: {e}"));
            if write.is_none() {
                buf.read(0, &mut out[off..off + len]).unwrap();
            }
            off += len;
        }
        out
    }
}

/// The pattern of `seed` over `blocks` blocks from `lba`.
pub fn expected(seed: u64, lba: u64, blocks: u64, lba_size: usize) -> Vec<u8> {
    let mut v = vec![0u8; blocks as usize * lba_size];
    for (i, c) in v.chunks_mut(lba_size).enumerate() {
        transport::direct::pattern(seed, lba + i as u64, c);
    }
    v
}

/// Reads `blocks` blocks at `lba` of the block device `dev` (O_DIRECT).
pub fn dd_read(dev: &str, lba: u64, blocks: u64, lba_size: usize) -> Vec<u8> {
    let out = sh(
        "dd",
        &[
            &format!("if={dev}"),
            "iflag=direct,skip_bytes,count_bytes",
            "bs=64k",
            &format!("skip={}", lba * lba_size as u64),
            &format!("count={}", blocks * lba_size as u64),
            "status=none",
        ],
    );
    assert!(
        out.status.success(),
        "dd read: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes `data` at `lba` of the block device `dev` (O_DIRECT).
pub fn dd_write(dev: &str, lba: u64, data: &[u8], lba_size: usize) {
    let mut child = Command::new("dd")
        .args([
            &format!("of={dev}"),
            "oflag=direct,seek_bytes",
            "bs=64k",
            "iflag=fullblock",
            &format!("seek={}", lba * lba_size as u64),
            "status=none",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    assert!(child.wait().unwrap().success(), "dd write failed");
}
