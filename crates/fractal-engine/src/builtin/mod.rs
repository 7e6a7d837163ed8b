//! Models built into the binary: their configs and weights derived from
//! parameter names, so tests and `fractal grid` need no download.

pub mod tiny;
