//! The control layer: the store (desired state), placement, the engine's typed command set and
//! the reconciler that moves the host towards the desired state. It knows nothing of HTTP; the
//! API layer translates requests into [`engine::Engine`] calls.

pub mod engine;
pub mod error;
pub mod placement;
pub mod store;
pub mod telemetry;

pub use engine::{Engine, EngineConfig, Principal};
pub use error::EngineError;
