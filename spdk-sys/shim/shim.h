/* Thin shims for what SPDK keeps in its private headers (spdk-sys/build.rs). */
#ifndef NVMF_P2P_SPDK_SHIM_H
#define NVMF_P2P_SPDK_SHIM_H

#include <stdint.h>

struct spdk_nvme_ctrlr;

/*
 * The controller's Doorbell Buffer Config pages (NULL when SPDK did not set them up):
 * the shadow doorbells SPDK writes and the EventIdx page the controller writes. SPDK
 * has no public accessor; a queue created behind SPDK's back must ring through them
 * as SPDK's own queue pairs do, or the controller never sees its tails.
 */
void nvmf_p2p_spdk_shadow_doorbells(struct spdk_nvme_ctrlr *ctrlr, uint32_t **doorbells,
				    uint32_t **eventidx);

#endif
