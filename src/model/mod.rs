//! The contract every backend meets, below the backends: [`params`] names GPT-2's tensors,
//! [`forward`] is the forward pass over a backend's operations, [`batch`] checks every batch once
//! for all backends ([`SeqInput`], [`Logits`]), [`device`] says where a model runs and how it is
//! stored ([`Device`], [`LoadOptions`]). The model consumers hold, [`crate::Model`], is the
//! backends' handle above this.

pub(crate) mod batch;
pub(crate) mod device;
pub(crate) mod forward;
pub(crate) mod params;
pub(crate) mod sites;

pub use batch::{Logits, Rows, SeqInput};
pub use device::{Device, LoadOptions, MAX_THREADS};
pub use sites::{Activations, BlockSite, Hooked, Patch, Site};
