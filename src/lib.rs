//! vlembed: serves the BGE-VL vision-language embedding models.
//!
//! Data flows one way through the modules. Preprocessing is not a stage of
//! the HTTP layer: the [`batching::Batcher`] runs it on a bounded blocking
//! pool after admission, then queues the prepared inputs for the workers.
//!
//! ```text
//! request ─▶ http ──(Input)──▶ batching::Batcher ─┬─▶ preprocess (blocking pool)
//!                                                 └─▶ batching::Queue ─▶ worker ─▶ models
//! response ◀─ http ◀── batching (re-assembly, L2 normalisation) ◀────────┘
//! ```
//!
//! - [`input`]: plain domain types for what a client asks to embed.
//! - [`preprocess`]: image decoding/resizing and tokenization into [`preprocess::Prepared`].
//! - [`models`]: candle model code and model loading (Hub id or local directory).
//! - [`vector`]: L2 normalisation (a leaf every front end shares).
//! - [`embedder`]: one loaded model = its preprocessor + a model replica, used
//!   synchronously (CLI, parity tests).
//! - [`config`]: layered configuration (defaults, file, environment, flags).
//! - [`batching`]: per-model admission, preprocessing, fair queue, batch
//!   selection, request re-assembly.
//! - [`worker`]: one OS thread per device owning a model replica.
//! - [`probe`]: startup probe inputs and golden-vector files.
//! - [`warmup`]: the batch shapes every replica runs before it serves.
//! - [`registry`]: the served models, their state and readiness (below both
//!   `http` and `app`).
//! - [`http`]: the axum router, request parsing, errors, auth.
//! - [`metrics`]: the Prometheus registry with the contract's metric names.
//! - [`app`]: wiring: listening, loading models in the background, shutdown.

pub mod app;
pub mod batching;
pub mod config;
pub mod embedder;
pub mod fetch;
pub mod http;
pub mod input;
pub mod metrics;
pub mod models;
pub mod otlp;
pub mod preprocess;
pub mod probe;
pub mod registry;
mod simd;
pub mod vector;
pub mod warmup;
pub mod worker;
