//! dits: class-conditional Diffusion Transformers (DiT) in Rust, on burn.
//!
//! The modules follow the data: [`data`] (IDX files → batches) → [`model`] (the DiT, with its
//! CPU [`kernels`]) → [`diffusion`] (schedule, noising, samplers) → [`train`] (with
//! [`distributed`] beside it, both on [`optim`]) → [`sample`] → [`eval`] and [`serve`]; [`bench`]
//! measures.
//! The leaves below them: [`rng`] (named random streams), [`ranges`] (even splits),
//! [`collective`] (the collective operations), [`fsutil`], [`images`], [`device`],
//! [`profile`], [`memory`]. Each layer imports only from the layers below it.

pub mod bench;
pub mod collective;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod distributed;
pub mod eval;
pub mod fsutil;
pub mod images;
pub mod info;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod optim;
pub mod profile;
pub mod ranges;
pub mod report;
pub mod rng;
pub mod sample;
pub mod serve;
pub mod train;
