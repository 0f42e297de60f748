//! Bindgen bindings to the SPDK that `scripts/setup` builds (`spdk/nvme.h`, `spdk/env.h`;
//! libraries `spdk_nvme`, `spdk_env_dpdk`), behind the off-by-default cargo feature `spdk`.
//! Without the feature this crate is empty; with it and no SPDK installed the build stops
//! with one sentence saying to run `scripts/setup` (see `build.rs`).
//!
//! Only bindings live here: the safe layer (env init, controllers, queue pairs, DMA
//! memory) is `nvmf-p2p`'s `spdk` backend. The tests check that SPDK's wire structures
//! have the layout of the `nvme::spec` types they are exchanged with, so a command or
//! completion can be passed between the two by a plain byte copy.
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    missing_docs,
    unsafe_op_in_unsafe_fn
)]
#![allow(clippy::all, clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "spdk")]
include!(concat!(env!("OUT_DIR"), "/spdk.rs"));

#[cfg(all(test, feature = "spdk"))]
mod layout {
    use super::*;
    use core::mem::{offset_of, size_of};
    use nvme::spec::{self, Cqe, IdentifyController, IdentifyNamespace, Sqe, Status};
    use zerocopy::IntoBytes;

    /// Reinterprets the bytes of one of our spec types as SPDK's type of the same size.
    fn as_spdk<T: IntoBytes + zerocopy::Immutable, S: Copy>(ours: &T) -> S {
        let bytes = ours.as_bytes();
        assert_eq!(bytes.len(), size_of::<S>());
        // SAFETY: the length matches (asserted) and every SPDK wire struct here is plain
        // old data (integers and bitfields) for which any bit pattern is valid;
        // read_unaligned copies without needing S's alignment.
        unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<S>()) }
    }

    #[test]
    fn struct_sizes_are_the_ones_facts_md_lists() {
        // FACTS.md "SPDK": v26.05 (same as v25.09)
        assert_eq!(size_of::<spdk_nvme_ctrlr_opts>(), 856);
        assert_eq!(size_of::<spdk_nvme_io_qpair_opts>(), 80);
        assert_eq!(size_of::<spdk_nvme_cmd>(), 64);
        assert_eq!(size_of::<spdk_nvme_cpl>(), 16);
        assert_eq!(size_of::<spdk_env_opts>(), 128);
    }

    #[test]
    fn sqe_matches_spdk_nvme_cmd() {
        assert_eq!(size_of::<spdk_nvme_cmd>(), size_of::<Sqe>());
        assert_eq!(offset_of!(spdk_nvme_cmd, cid), 2);
        assert_eq!(offset_of!(spdk_nvme_cmd, nsid), offset_of!(Sqe, nsid));
        assert_eq!(offset_of!(spdk_nvme_cmd, mptr), offset_of!(Sqe, mptr));
        assert_eq!(offset_of!(spdk_nvme_cmd, dptr), offset_of!(Sqe, prp1));
        // a read of 8 blocks at LBA 0x1_0000_0002 of namespace 3, CID 0x1234
        let mut sqe = Sqe::read(3, 0x1_0000_0002, 7, 0x1000, 0x2000);
        sqe.set_cid(0x1234);
        let cmd: spdk_nvme_cmd = as_spdk(&sqe);
        assert_eq!(cmd.opc(), u16::from(spec::io_opc::READ));
        assert_eq!(cmd.psdt(), 0);
        assert_eq!(cmd.cid, 0x1234);
        assert_eq!(cmd.nsid, 3);
        // SAFETY: reading plain integers of unions of integers
        let (prp1, prp2, cdw10, cdw11, cdw12) = unsafe {
            (
                cmd.dptr.prp.prp1,
                cmd.dptr.prp.prp2,
                cmd.__bindgen_anon_1.cdw10,
                cmd.__bindgen_anon_2.cdw11,
                cmd.__bindgen_anon_3.cdw12,
            )
        };
        assert_eq!((prp1, prp2), (0x1000, 0x2000));
        assert_eq!((cdw10, cdw11), (2, 1), "SLBA split into CDW10/11");
        assert_eq!(cdw12 & 0xffff, 7, "NLB is 0-based in CDW12");
    }

    #[test]
    fn cqe_and_status_match_spdk_nvme_cpl() {
        assert_eq!(size_of::<spdk_nvme_cpl>(), size_of::<Cqe>());
        assert_eq!(offset_of!(spdk_nvme_cpl, cdw0), offset_of!(Cqe, dw0));
        assert_eq!(offset_of!(spdk_nvme_cpl, sqhd), offset_of!(Cqe, sq_head));
        assert_eq!(offset_of!(spdk_nvme_cpl, sqid), offset_of!(Cqe, sq_id));
        assert_eq!(offset_of!(spdk_nvme_cpl, cid), offset_of!(Cqe, cid));
        // Connect Invalid Parameters (SCT 1, SC 0x82) with DNR, phase 1
        let st = Status::new(spec::sct::COMMAND_SPECIFIC, 0x82).with_dnr();
        let cqe = Cqe::new(0x42, 5, 17, st, true);
        let cpl: spdk_nvme_cpl = as_spdk(&cqe);
        assert_eq!((cpl.cid, cpl.sqid, cpl.sqhd), (0x42, 5, 17));
        // SAFETY: the status union holds a plain u16 bitfield struct
        let s = unsafe { cpl.__bindgen_anon_1.status };
        assert_eq!(s.p(), 1);
        assert_eq!(s.sc(), 0x82);
        assert_eq!(s.sct(), u16::from(spec::sct::COMMAND_SPECIFIC));
        assert_eq!(s.dnr(), 1);
        assert_eq!(s.m(), 0);
        // and back: SPDK's raw status field decodes to the same Status
        // SAFETY: as above
        let raw = unsafe { cpl.__bindgen_anon_1.status_raw };
        assert_eq!(Status::from_field(raw), st);
    }

    #[test]
    fn identify_controller_matches_spdk_nvme_ctrlr_data() {
        assert_eq!(
            size_of::<spdk_nvme_ctrlr_data>(),
            size_of::<IdentifyController>()
        );
        macro_rules! same {
            ($($f:ident),*) => {$(
                assert_eq!(
                    offset_of!(spdk_nvme_ctrlr_data, $f),
                    offset_of!(IdentifyController, $f),
                    concat!("offset of ", stringify!($f))
                );
            )*};
        }
        same!(
            vid, ssvid, sn, mn, fr, rab, ieee, mdts, cntlid, ver, rtd3r, rtd3e, oaes, ctratt,
            fguid, oacs, acl, aerl, frmw, lpa, elpe, npss, kas, sqes, cqes, maxcmd, nn, oncs,
            fuses, fna, vwc, awun, awupf, sgls, subnqn
        );
    }

    #[test]
    fn identify_namespace_matches_spdk_nvme_ns_data() {
        assert_eq!(
            size_of::<spdk_nvme_ns_data>(),
            size_of::<IdentifyNamespace>()
        );
        macro_rules! same {
            ($($f:ident),*) => {$(
                assert_eq!(
                    offset_of!(spdk_nvme_ns_data, $f),
                    offset_of!(IdentifyNamespace, $f),
                    concat!("offset of ", stringify!($f))
                );
            )*};
        }
        same!(
            nsze, ncap, nuse, nsfeat, nlbaf, flbas, mc, dpc, dps, nmic, nawun, nawupf, nacwu,
            nabsn, nabo, nabspf, noiob, nvmcap, npwg, npwa, npdg, npda, nows, anagrpid, nsattr,
            nvmsetid, endgid, nguid, eui64, lbaf
        );
    }
}
