//! The map of the grid and routing (DESIGN.md section 8).
//!
//! * [`vivaldi`] — network coordinates from RTT samples.
//! * [`map`] — per-prover measurements and the routing decision: lowest
//!   predicted completion time (RTT + queue wait + service), power of two
//!   choices among the near-best (small jobs among slower nodes that are
//!   nearly as good), a bound on each request's queueing that the prover
//!   enforces, hedging, failover, circuit breakers, never a node the
//!   verifier scored zero.
//! * [`store`] — the map persisted in SQLite.
//! * [`sim`] — a deterministic grid simulator to compare policies.

pub mod map;
pub mod sim;
pub mod store;
pub mod vivaldi;

pub use map::{
    Admission, Breaker, Failure, GridMap, GridSnapshot, Load, NodeHealth, Prediction, RouterConfig,
    Ticket, Work,
};
pub use store::{MapStore, MapStoreError};
pub use vivaldi::{Coord, VivaldiConfig};
