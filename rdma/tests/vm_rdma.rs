//! VM tests (being written).
