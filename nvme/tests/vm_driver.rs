//! Driver tests on the testbed VM's emulated NVMe through VFIO. Built only with
//! `--features vm-tests`; the device comes from `NVMF_P2P_BDF` (bound to vfio-pci).
//! Run with `--test-threads=1` (one VFIO group user at a time).

use std::io::{Seek, SeekFrom};
use std::time::{Duration, Instant};

use nvme::vfio::NvmeDevice;
use nvme::{Controller, ControllerOptions, DmaBuffer, IoQueuePair, QueueOptions};

const IO: usize = 128 * 1024;
const T: Duration = Duration::from_secs(30);

fn bdf() -> String {
    std::env::var("NVMF_P2P_BDF").expect("NVMF_P2P_BDF must name the NVMe bound to vfio-pci")
}

fn open(shadow: bool) -> NvmeDevice {
    let opts = ControllerOptions {
        shadow_doorbells: shadow,
        ..Default::default()
    };
    NvmeDevice::open(&bdf(), opts).unwrap_or_else(|e| panic!("opening {}: {e}", bdf()))
}

fn fill_block(out: &mut [u8], seed: u64, lba: u64) {
    let mut x = (seed ^ lba.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn expected(seed: u64, slba: u64, len: usize, bs: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, b) in v.chunks_mut(bs).enumerate() {
        fill_block(b, seed, slba + i as u64);
    }
    v
}

/// Write the pattern over `blocks` blocks from 0 at queue depth `qd`, then read back and
/// verify at the same depth. Returns the number of I/Os.
fn write_verify(
    ctrl: &Controller,
    qp: &mut IoQueuePair,
    blocks: u64,
    qd: usize,
    io: usize,
    seed: u64,
) -> usize {
    let ns = ctrl.info().namespaces[0].clone();
    let bs = ns.block_size as usize;
    let per = (io / bs) as u64;
    let n_ios = blocks.div_ceil(per) as usize;
    let pool = ctrl.alloc_dma(qd * io).unwrap();
    let bufs: Vec<DmaBuffer> = pool.chunks(io);
    for write in [true, false] {
        let mut next = 0usize;
        let mut done = 0usize;
        let mut free: Vec<usize> = (0..qd).collect();
        let start = Instant::now();
        while done < n_ios {
            while next < n_ios {
                let Some(&b) = free.last() else { break };
                let slba = next as u64 * per;
                let nblk = per.min(blocks - slba) as usize;
                let buf = bufs[b].slice(0, nblk * bs).unwrap();
                let r = if write {
                    buf.write(0, &expected(seed, slba, nblk * bs, bs)).unwrap();
                    qp.write(ns.nsid, slba, &buf, (b as u64) << 32 | next as u64)
                } else {
                    qp.read(ns.nsid, slba, &buf, (b as u64) << 32 | next as u64)
                };
                match r {
                    Ok(_) => {
                        free.pop();
                        next += 1;
                    }
                    Err(nvme::Error::QueueFull { .. }) => break,
                    Err(e) => panic!("submit: {e}"),
                }
            }
            qp.poll(usize::MAX, |c| {
                assert!(
                    c.is_ok(),
                    "I/O {} failed: {}",
                    c.tag & 0xffff_ffff,
                    c.status
                );
                let b = (c.tag >> 32) as usize;
                let i = c.tag & 0xffff_ffff;
                if !write {
                    let slba = i * per;
                    let nblk = per.min(blocks - slba) as usize;
                    let mut got = vec![0u8; nblk * bs];
                    bufs[b].read(0, &mut got).unwrap();
                    assert!(
                        got == expected(seed, slba, nblk * bs, bs),
                        "data mismatch at LBA {slba} (qd {qd})"
                    );
                }
                free.push(b);
                done += 1;
            });
            assert!(
                start.elapsed() < T * 4,
                "workload stalled at {done}/{n_ios}"
            );
        }
    }
    n_ios
}

#[test]
fn identify_and_cmb_match_the_testbed() {
    let dev = open(true);
    let info = dev.controller().info();
    eprintln!(
        "{} {} fw {} v{} mdts {:?} queues {} cmb {:?}",
        info.model,
        info.serial,
        info.firmware,
        info.version,
        info.mdts_bytes,
        info.io_queues_granted,
        info.cmb
    );
    let ns = &info.namespaces[0];
    assert_eq!(
        ns.blocks * ns.block_size as u64,
        64 << 20,
        "the testbed's namespace is 64 MiB"
    );
    let cmb = info.cmb.as_ref().expect("the testbed NVMe has a CMB");
    assert_eq!(cmb.size, 16 << 20);
    assert!(cmb.sqs);
    assert!(
        info.shadow_doorbells_in_use,
        "QEMU supports Doorbell Buffer Config"
    );
}

#[test]
fn dma_buf_exports_succeed_and_cmb_size_matches_cmbsz() {
    let dev = open(true);
    let db = dev.export_doorbells().expect("doorbell export");
    let mut f = std::fs::File::from(db);
    let size = f.seek(SeekFrom::End(0)).unwrap();
    assert_eq!(size, dev.doorbell_range().1);
    let cmb = dev.controller().info().cmb.clone().unwrap();
    let sz = nvme::spec::CmbSz(cmb.cmbsz);
    let c = dev.export_cmb(0..sz.size_bytes()).expect("CMB export");
    let mut f = std::fs::File::from(c);
    assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), sz.size_bytes());
    // A partial range works too; a range past the CMB is a clear error.
    assert!(dev.export_cmb(4096..8192).is_ok());
    assert!(dev.export_cmb(0..sz.size_bytes() + 4096).is_err());
}

#[test]
fn whole_namespace_write_verify_qd1_qd32_qd128() {
    let dev = open(true);
    let ctrl = dev.controller();
    let ns = ctrl.info().namespaces[0].clone();
    for (qd, seed) in [(1usize, 11u64), (32, 22), (128, 33)] {
        let mut qp = ctrl
            .create_io_queue_pair(QueueOptions {
                depth: (qd + 1).max(2) as u16,
                sq_in_cmb: false,
            })
            .unwrap();
        let start = Instant::now();
        let n = write_verify(ctrl, &mut qp, ns.blocks, qd, IO, seed);
        eprintln!(
            "qd {qd}: {n} x {IO} B written + verified in {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn sq_in_cmb_and_shadow_doorbells_off() {
    let dev = open(true);
    let ctrl = dev.controller();
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 32,
            sq_in_cmb: true,
        })
        .unwrap();
    assert!(qp.sq_in_cmb());
    write_verify(ctrl, &mut qp, 2048, 16, 16384, 44);
    drop(qp);
    drop(dev);
    let dev = open(false);
    let ctrl = dev.controller();
    assert!(!ctrl.info().shadow_doorbells_in_use);
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 32,
            sq_in_cmb: false,
        })
        .unwrap();
    assert!(!qp.shadow_doorbells());
    write_verify(ctrl, &mut qp, 4096, 16, 16384, 55);
    let s = qp.stats();
    assert!(s.mmio_doorbell_writes >= s.submitted);
}

/// Whether the queue's interrupt eventfd becomes readable within `timeout`.
fn irq_readable(qp: &IoQueuePair, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let fd = qp.interrupt_fd().expect("interrupt fd").as_raw_fd();
    nvme::irq::wait_readable(&[fd], timeout).expect("poll") > 0
}

#[test]
fn msix_interrupts_through_vfio_eventfds_wake_a_sleeping_thread() {
    for shadow in [true, false] {
        let dev = open(shadow);
        let ctrl = dev.controller();
        let vectors = dev.vfio().msix_vectors();
        eprintln!("shadow doorbells {shadow}: VFIO offers {vectors} MSI-X vectors");
        assert!(
            vectors >= 2,
            "QEMU's NVMe has MSI-X: VFIO reports {vectors} vectors"
        );
        assert_eq!(ctrl.interrupt_vectors(), vectors);
        let mut qp = ctrl
            .create_io_queue_pair_with_interrupts(QueueOptions {
                depth: 64,
                sq_in_cmb: false,
            })
            .unwrap_or_else(|e| panic!("queue with interrupts: {e}"));
        assert!(qp.interrupt_vector().unwrap() >= 1);
        let ns = ctrl.info().namespaces[0].clone();
        let buf = ctrl.alloc_dma(ns.block_size as usize).unwrap();

        // Nothing in flight: armed, and nothing arrives.
        assert!(qp.arm_interrupt());
        assert!(!irq_readable(&qp, Duration::from_millis(50)));
        // One read: QEMU's MSI-X write reaches the eventfd through VFIO.
        qp.read(ns.nsid, 0, &buf, 1).unwrap();
        assert!(irq_readable(&qp, T), "no MSI-X interrupt from the NVMe");
        let mut got = 0;
        qp.poll(usize::MAX, |c| {
            assert!(c.is_ok());
            got += 1;
        });
        assert_eq!(got, 1);
        // QEMU 7.2 refuses Interrupt Coalescing (Feature Not Changeable): the refusal is
        // a clean command error and interrupts keep working (checked below).
        match ctrl.set_interrupt_coalescing(0, 0) {
            Ok(()) => eprintln!("interrupt coalescing accepted"),
            Err(nvme::Error::Command { status, .. }) => {
                eprintln!("interrupt coalescing refused: {status:?}")
            }
            Err(e) => panic!("Set Features Interrupt Coalescing: {e}"),
        }

        // A thread that owns the queue sleeps in poll(2) on the eventfd after every
        // submission; each completion must wake it (a timeout fails), and most waits
        // must really sleep (the device is slower than submit + arm).
        let n = 200u64;
        let waiter = std::thread::spawn(move || {
            let (mut slept, mut early) = (0u32, 0u32);
            let start = Instant::now();
            for i in 0..n {
                qp.read(ns.nsid, i % ns.blocks, &buf, i).unwrap();
                let mut done = false;
                while !done {
                    if qp.arm_interrupt() {
                        assert!(
                            irq_readable(&qp, Duration::from_secs(5)),
                            "read {i}: asleep 5 s, no interrupt"
                        );
                        slept += 1;
                    } else {
                        early += 1;
                    }
                    qp.poll(usize::MAX, |c| {
                        assert!(c.is_ok() && c.tag == i);
                        done = true;
                    });
                }
            }
            (slept, early, start.elapsed(), qp)
        });
        let (slept, early, took, mut qp) = waiter.join().unwrap();
        eprintln!(
            "{n} reads, each waited for in poll(2): slept {slept}x, completion already there {early}x, {:?}/read",
            took / n as u32
        );
        assert!(slept as u64 >= n / 2, "slept only {slept} of {n} times");

        // Interrupts work again after a device reset (FLR + queues recreated).
        dev.reset_device().unwrap();
        let buf = ctrl.alloc_dma(ns.block_size as usize).unwrap();
        assert!(qp.arm_interrupt());
        qp.read(ns.nsid, 0, &buf, 2).unwrap();
        assert!(irq_readable(&qp, T), "no interrupt after reset_device");
        let mut got = 0;
        qp.poll(usize::MAX, |c| {
            assert!(c.is_ok());
            got += 1;
        });
        assert_eq!(got, 1);
    }
}

#[test]
fn reset_device_mid_workload_keeps_acknowledged_writes() {
    let dev = open(true);
    let ctrl = dev.controller();
    let before = dev.export_doorbells().expect("export before reset");
    let ns = ctrl.info().namespaces[0].clone();
    let bs = ns.block_size as usize;
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 64,
            sq_in_cmb: false,
        })
        .unwrap();
    let io = 16384;
    let per = (io / bs) as u64;
    let n: usize = 512; // 8 MiB
    let pool = ctrl.alloc_dma(n * io).unwrap();
    let bufs = pool.chunks(io);
    let seed = 66;
    for (i, b) in bufs.iter().enumerate() {
        b.write(0, &expected(seed, i as u64 * per, io, bs)).unwrap();
    }
    let mut acked = vec![false; n];
    let mut pending: Vec<usize> = (0..n).rev().collect();
    let mut in_flight = 0usize;
    let mut reset_done = false;
    let mut lost = 0;
    let mut in_flight_at_reset = 0;
    let start = Instant::now();
    while acked.iter().any(|a| !a) {
        while let Some(&i) = pending.last() {
            match qp.write(ns.nsid, i as u64 * per, &bufs[i], i as u64) {
                Ok(_) => {
                    pending.pop();
                    in_flight += 1;
                }
                Err(nvme::Error::QueueFull { .. }) => break,
                Err(e) => panic!("submit: {e}"),
            }
        }
        if !reset_done && acked.iter().filter(|a| **a).count() >= n / 3 {
            // Reset with the batch just submitted still in flight.
            in_flight_at_reset = in_flight;
            dev.reset_device().expect("reset_device");
            reset_done = true;
        }
        qp.poll(usize::MAX, |c| {
            in_flight -= 1;
            if c.is_ok() {
                acked[c.tag as usize] = true;
            } else {
                lost += 1;
                pending.push(c.tag as usize); // retry what was not acknowledged
            }
        });
        assert!(start.elapsed() < T * 4);
    }
    assert!(reset_done);
    eprintln!(
        "reset_device with {in_flight_at_reset} in flight; {lost} writes reported lost and retried"
    );
    assert!(
        in_flight_at_reset > 0,
        "the reset should happen mid-workload"
    );
    assert_eq!(
        lost, in_flight_at_reset,
        "every command in flight at the reset is reported lost"
    );
    // Every acknowledged write reads back.
    let r = ctrl.alloc_dma(io).unwrap();
    for i in 0..n {
        let c = qp
            .execute(
                nvme::spec::Sqe::read(ns.nsid, i as u64 * per, (per - 1) as u16, 0, 0),
                Some(&r),
                T,
            )
            .unwrap();
        assert!(c.is_ok());
        let mut got = vec![0u8; io];
        r.read(0, &mut got).unwrap();
        assert!(
            got == expected(seed, i as u64 * per, io, bs),
            "block range {i} lost after reset"
        );
    }
    // Exports still work after the FLR (old fd stays open, new export succeeds).
    drop(before);
    assert!(dev.export_doorbells().is_ok());
    assert!(dev.export_cmb(0..4096).is_ok());
}

#[test]
fn cmb_data_buffers_and_raw_queue_in_cmb() {
    // Direct-mode shape: SQ in the CMB written by "someone else", MMIO doorbell, shadow
    // doorbells off (the controller would otherwise read tails from the shadow page).
    let dev = open(false);
    let ctrl = dev.controller();
    let ns = ctrl.info().namespaces[0].clone();
    let bs = ns.block_size as usize;
    let depth = 16u16;
    let sq = ctrl.alloc_cmb(depth as usize * 64).unwrap();
    let cq = ctrl.alloc_dma(4096).unwrap();
    let raw = ctrl
        .create_raw_queue_pair(sq.clone(), cq.clone(), depth)
        .unwrap();
    // Data in the CMB too (RDS/WDS), 8 KiB: PRP1 + PRP2 both CMB addresses.
    let data = ctrl.alloc_cmb(8192).unwrap();
    let want = expected(77, 100, 8192, bs);
    let words: Vec<u64> = want
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    data.write_volatile_u64s(0, &words).unwrap();
    let nlb0 = (8192 / bs - 1) as u16;
    let mut phase = true;
    let mut head = 0u16;
    for (i, mut sqe) in [
        nvme::spec::Sqe::write(ns.nsid, 100, nlb0, data.iova(), data.iova() + 4096),
        nvme::spec::Sqe::read(ns.nsid, 100, nlb0, data.iova(), data.iova() + 4096),
    ]
    .into_iter()
    .enumerate()
    {
        if i == 1 {
            data.write_volatile_u64s(0, &vec![0u64; 1024]).unwrap();
        }
        sqe.set_cid(i as u16);
        let w: [u64; 8] = zerocopy::transmute!(sqe);
        sq.write_volatile_u64s(i * 64, &w).unwrap();
        raw.ring_sq(i as u16 + 1);
        let start = Instant::now();
        loop {
            let mut b = [0u8; 16];
            cq.read(head as usize * 16, &mut b).unwrap();
            let st = u16::from_le_bytes([b[14], b[15]]);
            if (st & 1 == 1) == phase {
                assert_eq!(st >> 1, 0, "command {i} failed: status {:#x}", st >> 1);
                break;
            }
            assert!(start.elapsed() < T);
        }
        head += 1;
        if head == depth {
            head = 0;
            phase = !phase;
        }
        raw.ring_cq(head);
    }
    let mut got = vec![0u8; 8192];
    data.read(0, &mut got).unwrap();
    assert!(got == want, "CMB data read back differs");
}

#[test]
fn zz_wrong_driver_is_a_clear_error_and_bind_restores() {
    let bdf = bdf();
    let o = nvme::pci::unbind_from_vfio(&bdf, Some("nvme")).expect("unbind to nvme");
    assert_eq!(o.driver.as_deref(), Some("nvme"));
    let e = NvmeDevice::open(&bdf, ControllerOptions::default())
        .err()
        .expect("must fail");
    assert!(matches!(e, nvme::Error::BoundToOtherDriver { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("run `nvmf-p2p bind {bdf}`")),
        "{e}"
    );
    let o = nvme::pci::bind_vfio(&bdf).expect("bind back");
    assert_eq!(o.driver.as_deref(), Some("vfio-pci"));
    assert!(o.vfio_group_path.is_some());
    let dev = open(true);
    assert_eq!(dev.controller().info().namespaces.len(), 1);
}
