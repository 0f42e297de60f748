/* Built against SPDK's lib/nvme/nvme_internal.h of the SPDK scripts/setup built. */
#include "nvme_internal.h"
#include "shim.h"

void
nvmf_p2p_spdk_shadow_doorbells(struct spdk_nvme_ctrlr *ctrlr, uint32_t **doorbells,
			       uint32_t **eventidx)
{
	*doorbells = ctrlr->shadow_doorbell;
	*eventidx = ctrlr->eventidx;
}
