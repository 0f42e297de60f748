/* See shim.h: each function forwards to the rdma-core inline of the same name. */
#include "shim.h"

int rdma_sys_ibv_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr,
                           struct ibv_send_wr **bad_wr)
{
	return ibv_post_send(qp, wr, bad_wr);
}

int rdma_sys_ibv_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr,
                           struct ibv_recv_wr **bad_wr)
{
	return ibv_post_recv(qp, wr, bad_wr);
}

int rdma_sys_ibv_post_srq_recv(struct ibv_srq *srq, struct ibv_recv_wr *wr,
                               struct ibv_recv_wr **bad_wr)
{
	return ibv_post_srq_recv(srq, wr, bad_wr);
}

int rdma_sys_ibv_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc)
{
	return ibv_poll_cq(cq, num_entries, wc);
}

int rdma_sys_ibv_req_notify_cq(struct ibv_cq *cq, int solicited_only)
{
	return ibv_req_notify_cq(cq, solicited_only);
}

int rdma_sys_ibv_query_port(struct ibv_context *context, uint8_t port_num,
                            struct ibv_port_attr *port_attr)
{
	/* A macro in verbs.h routing to ___ibv_query_port (ibv_query_port_ex or compat). */
	return ibv_query_port(context, port_num, port_attr);
}
