//! Hand-written kernels for the engine's hot stages.

pub mod cpu;
