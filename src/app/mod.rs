//! Top-level wiring of the server: startup and shutdown around the model
//! [`crate::registry`].
//!
//! Owns the order of things: bind the listener, answer `/health` and `/ready`
//! at once, load models in the background (one worker thread per device),
//! and on shutdown stop admitting, drain in-flight requests, then stop the
//! workers. It adds no model code, no HTTP handlers and no batching policy.

pub mod connections;
pub mod server;
pub mod summary;

pub use crate::registry::{ModelSlot, ModelStatus, Registry, ServedModel};
pub use server::{start, Hooks, ServeError, ServerHandle, ShutdownTrigger};
