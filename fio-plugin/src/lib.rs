//! fio external ioengine (`--ioengine=external:libnvmf_p2p_fio.so`). Not yet implemented.
