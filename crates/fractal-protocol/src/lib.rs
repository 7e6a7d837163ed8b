//! Fractal's shared vocabulary: everything two nodes must agree on byte for
//! byte, and nothing that touches the network or the disk.
//!
//! * [`keys`]: sr25519 keys compatible with Bittensor/substrate (SS58, mnemonics, `//hard` paths).
//! * [`btauth`]: the btauth/1 signed-HTTP scheme (message, headers, verification, replay cache).
//! * [`manifest`]: the pinned model, content-addressed by SHA-256.
//! * [`wire`]: versioned request/response types with validation.
//! * [`noise`]: seeded, platform-independent Gaussian noise (`fractal/noise/v1`).
//! * [`merkle`]: commitments over per-step latents and their audit paths.
//! * [`schedule`]: which manifests the subnet serves, from and until which block.

pub mod btauth;
pub mod ids;
pub mod keys;
pub mod manifest;
pub mod merkle;
pub mod noise;
pub mod schedule;
pub mod wire;

pub use ids::{Digest32, JobId, ManifestId, Seed};
pub use keys::{Hotkey, Keypair};
pub use manifest::ModelManifest;
pub use schedule::{ModelSchedule, ModelState, Upgrade};
