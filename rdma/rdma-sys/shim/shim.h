/*
 * Out-of-line shims for the `static inline` verbs of <infiniband/verbs.h>.
 *
 * rdma-core defines the data-path verbs as inline functions that dispatch
 * through the provider's ops table; they have no symbol in libibverbs.so.
 * Each shim below calls the inline function unchanged, so the provider's
 * behaviour (including EOPNOTSUPP for a missing op) is exactly rdma-core's.
 */
#ifndef RDMA_SYS_SHIM_H
#define RDMA_SYS_SHIM_H

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

int rdma_sys_ibv_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr,
                           struct ibv_send_wr **bad_wr);
int rdma_sys_ibv_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr,
                           struct ibv_recv_wr **bad_wr);
int rdma_sys_ibv_post_srq_recv(struct ibv_srq *srq, struct ibv_recv_wr *wr,
                               struct ibv_recv_wr **bad_wr);
int rdma_sys_ibv_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc);
int rdma_sys_ibv_req_notify_cq(struct ibv_cq *cq, int solicited_only);
int rdma_sys_ibv_query_port(struct ibv_context *context, uint8_t port_num,
                            struct ibv_port_attr *port_attr);

#endif
