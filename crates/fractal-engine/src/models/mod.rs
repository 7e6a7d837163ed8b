//! The networks a pipeline calls, one file each, and the layers they share.

pub mod autoencoder_kl;
pub mod autoencoder_kl_wan;
pub mod clip;
pub mod clip_tokenizer;
pub(crate) mod layers;
pub mod t5;
pub mod t5_tokenizer;
pub mod unet3d;
pub mod wan_transformer;
