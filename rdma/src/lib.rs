//! Safe libibverbs/librdmacm wrappers and the adaptive polled engine.
