//! What a failed forward pass means for the replica that ran it: the
//! [`Fault`] of a [`ModelError`].
//!
//! Why: a CUDA context that hit an illegal address, a launch failure, an
//! uncorrectable ECC error or an unknown error is poisoned: every later call
//! on it fails the same way ("sticky" errors, CUDA Programming Guide), so
//! retrying the batch in halves on the same replica only fails every request
//! that reaches it while `/ready` stays 200. Such a replica must be dropped
//! and rebuilt on a fresh context. Out of memory, by contrast, is the batch's
//! size: a smaller batch may fit, so the worker splits it as for any other
//! failing batch. Everything else (bad input, a shape the kernels refuse) is
//! ordinary: split, then fail only the input at fault.
//!
//! How: candle wraps driver errors as `Error::Cuda(Box<CudaError>)`, cuBLAS
//! errors likewise, and adds backtrace/context wrappers. With the `cuda`
//! feature the driver's `CUresult` and cuBLAS's status are read from the
//! typed errors; in every build (and as a fallback) the error's text is
//! searched for the code's name (`CUDA_ERROR_ILLEGAL_ADDRESS`,
//! `CUBLAS_STATUS_ALLOC_FAILED`), which cudarc's messages always carry.
//! Both ways end in [`classify_code`], one table, unit-tested on CPU with
//! injected errors. A leaf of `models`.

use super::error::ModelError;

/// What a failure says about the replica that ran the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The device context is poisoned: drop the replica, rebuild it on a
    /// fresh context.
    Sticky,
    /// The device ran out of memory: a smaller batch may fit.
    OutOfMemory,
    /// The batch (or one input of it) failed; the replica is fine.
    Ordinary,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Sticky => "sticky",
            Fault::OutOfMemory => "out_of_memory",
            Fault::Ordinary => "ordinary",
        }
    }
}

/// Driver (`CUresult`) and cuBLAS codes that poison the context. From the
/// CUDA driver API's documentation of each code ("the context cannot be
/// used, so it must be destroyed (and a new one should be created)") and
/// cuBLAS's execution failure (a kernel that did not run).
const STICKY: &[&str] = &[
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_UNKNOWN",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    "CUDA_ERROR_DEINITIALIZED",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_EXTERNAL_DEVICE",
    "CUBLAS_STATUS_EXECUTION_FAILED",
];

/// Codes that mean the device's memory is exhausted.
const OUT_OF_MEMORY: &[&str] = &["CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED"];

/// The fault of a CUDA driver or cuBLAS code, by its name
/// (`CUDA_ERROR_*`, `CUBLAS_STATUS_*`).
pub fn classify_code(name: &str) -> Fault {
    if STICKY.contains(&name) {
        Fault::Sticky
    } else if OUT_OF_MEMORY.contains(&name) {
        Fault::OutOfMemory
    } else {
        Fault::Ordinary
    }
}

/// The CUDA code names in `text` (words starting `CUDA_ERROR_` or
/// `CUBLAS_STATUS_`), classified; the most severe wins.
fn classify_text(text: &str) -> Fault {
    let words = text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
    worst(
        words
            .filter(|w| w.starts_with("CUDA_ERROR_") || w.starts_with("CUBLAS_STATUS_"))
            .map(classify_code),
    )
}

/// The most severe of `faults` (sticky, then out of memory).
fn worst(faults: impl IntoIterator<Item = Fault>) -> Fault {
    faults
        .into_iter()
        .fold(Fault::Ordinary, |acc, f| match (acc, f) {
            (Fault::Sticky, _) | (_, Fault::Sticky) => Fault::Sticky,
            (Fault::OutOfMemory, _) | (_, Fault::OutOfMemory) => Fault::OutOfMemory,
            _ => Fault::Ordinary,
        })
}

/// The fault of a candle error: its CUDA codes, typed where the build has
/// CUDA, else read from its text (its own and its sources').
pub fn candle_fault(e: &candle_core::Error) -> Fault {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => {
            candle_fault(inner)
        }
        E::Cuda(inner) => match typed_cuda_fault(inner.as_ref()) {
            Some(f) => f,
            None => classify_text(&chain_text(inner.as_ref())),
        },
        E::NotCompiledWithCudaSupport => Fault::Ordinary,
        other => classify_text(&chain_text(other)),
    }
}

/// An error's message followed by its sources'.
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The fault read from candle's typed CUDA error (`cuda` builds).
#[cfg(feature = "cuda")]
fn typed_cuda_fault(e: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<Fault> {
    use candle_core::cuda_backend::cudarc::{cublas::result::CublasError, driver::DriverError};
    use candle_core::cuda_backend::CudaError;
    let name = |code: &dyn std::fmt::Debug| format!("{code:?}");
    if let Some(d) = e.downcast_ref::<DriverError>() {
        return Some(classify_code(&name(&d.0)));
    }
    match e.downcast_ref::<CudaError>()? {
        CudaError::Cuda(d) | CudaError::Load { cuda: d, .. } => Some(classify_code(&name(&d.0))),
        CudaError::Cublas(CublasError(status)) => Some(classify_code(&name(status))),
        _ => None,
    }
}

/// Without the `cuda` feature there are no typed CUDA errors.
#[cfg(not(feature = "cuda"))]
fn typed_cuda_fault(_: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<Fault> {
    None
}

impl ModelError {
    /// What this failure says about the replica (see the module doc).
    pub fn fault(&self) -> Fault {
        match self {
            ModelError::Candle(e) => candle_fault(e),
            ModelError::Build { source, .. } => candle_fault(source),
            ModelError::Device(d) => candle_fault(&d.source),
            ModelError::Warmup { source, .. } => source.fault(),
            _ => Fault::Ordinary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error printed the way cudarc prints a driver error.
    #[derive(Debug)]
    struct FakeDriverError(&'static str, &'static str);

    impl std::fmt::Display for FakeDriverError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "DriverError({}, {:?})", self.0, self.1)
        }
    }

    impl std::error::Error for FakeDriverError {}

    fn cuda(code: &'static str, text: &'static str) -> ModelError {
        ModelError::Candle(candle_core::Error::Cuda(Box::new(FakeDriverError(
            code, text,
        ))))
    }

    #[test]
    fn sticky_codes_poison_the_replica() {
        for (code, text) in [
            (
                "CUDA_ERROR_ILLEGAL_ADDRESS",
                "an illegal memory access was encountered",
            ),
            ("CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"),
            (
                "CUDA_ERROR_ECC_UNCORRECTABLE",
                "uncorrectable ECC error encountered",
            ),
            ("CUDA_ERROR_UNKNOWN", "unknown error"),
        ] {
            assert_eq!(cuda(code, text).fault(), Fault::Sticky, "{code}");
        }
        let cublas = ModelError::Candle(candle_core::Error::Msg(
            "CublasError(CUBLAS_STATUS_EXECUTION_FAILED)".into(),
        ));
        assert_eq!(cublas.fault(), Fault::Sticky);
    }

    #[test]
    fn out_of_memory_splits_the_batch() {
        let oom = cuda("CUDA_ERROR_OUT_OF_MEMORY", "out of memory");
        assert_eq!(oom.fault(), Fault::OutOfMemory);
        let alloc = ModelError::Candle(candle_core::Error::Cuda(Box::new(FakeDriverError(
            "CUBLAS_STATUS_ALLOC_FAILED",
            "",
        ))));
        assert_eq!(alloc.fault(), Fault::OutOfMemory);
    }

    #[test]
    fn wrappers_are_looked_through() {
        let inner = candle_core::Error::Cuda(Box::new(FakeDriverError(
            "CUDA_ERROR_LAUNCH_FAILED",
            "unspecified launch failure",
        )));
        let wrapped = inner
            .bt()
            .context("in layer 3")
            .with_path("/models/x.safetensors");
        assert_eq!(ModelError::Candle(wrapped).fault(), Fault::Sticky);
        let build = ModelError::Build {
            family: "CLIP",
            source: Box::new(candle_core::Error::Cuda(Box::new(FakeDriverError(
                "CUDA_ERROR_OUT_OF_MEMORY",
                "out of memory",
            )))),
        };
        assert_eq!(build.fault(), Fault::OutOfMemory);
    }

    #[test]
    fn ordinary_failures_stay_ordinary() {
        let shape = ModelError::Candle(candle_core::Error::Msg("shape mismatch in matmul".into()));
        assert_eq!(shape.fault(), Fault::Ordinary);
        assert_eq!(
            cuda("CUDA_ERROR_INVALID_VALUE", "invalid argument").fault(),
            Fault::Ordinary
        );
        assert_eq!(
            ModelError::Batch("CUDA_ERROR_ILLEGAL_ADDRESS in a prompt".into()).fault(),
            Fault::Ordinary,
            "a batch refused for its input says nothing of the device"
        );
        assert_eq!(ModelError::Interrupted.fault(), Fault::Ordinary);
        let not_built = ModelError::Candle(candle_core::Error::NotCompiledWithCudaSupport);
        assert_eq!(not_built.fault(), Fault::Ordinary);
        // A name that merely starts like a sticky one is not it.
        assert_eq!(classify_code("CUDA_ERROR_UNKNOWN_THING"), Fault::Ordinary);
    }

    #[test]
    fn the_most_severe_code_wins() {
        assert_eq!(
            classify_text("CUDA_ERROR_OUT_OF_MEMORY then CUDA_ERROR_ILLEGAL_ADDRESS"),
            Fault::Sticky
        );
        assert_eq!(classify_text("no codes here"), Fault::Ordinary);
    }
}
