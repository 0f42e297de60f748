//! NVMe over Fabrics on RDMA: target, initiator, direct mode.
