//! The witness backend (being written).
