/* The fio headers the engine binds (fio-plugin/build.rs); config-host.h comes first, as
 * fio's own build passes it with -include. */
#include "config-host.h"
#include "fio.h"
#include "ioengines.h"
#include "optgroup.h"
