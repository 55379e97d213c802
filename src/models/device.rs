//! Where a model runs and in what precision: [`DeviceSpec`] and
//! [`Precision`], as configured, the [`DeviceClass`] device-dependent
//! defaults follow, and opening a device; a leaf of `models`.
//!
//! Opening is panic-safe: a CUDA build on a machine without the driver
//! library panics inside cudarc when it first looks for `libcuda`; here that
//! becomes a [`DeviceError`] naming the cause, so `--devices cuda:0` fails
//! at once with a message instead of a backtrace.

use std::str::FromStr;

use candle_core::{DType, Device};
use serde::Serialize;

/// The floating point type the weights are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// A dtype name that is not f32, f16 or bf16.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}: expected f32, f16 or bf16")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Precision::F32),
            "f16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(UnknownPrecision(other.to_string())),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device name as configured: `cpu` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

/// A device name that is not `cpu` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadDevice {
    #[error("invalid CUDA device index in {0:?}")]
    Index(String),
    #[error("unknown device {0:?}: expected cpu or cuda:N")]
    Unknown(String),
    #[error("the device list is empty")]
    EmptyList,
}

impl FromStr for DeviceSpec {
    type Err = BadDevice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        if s == "cuda" {
            return Ok(DeviceSpec::Cuda(0));
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            return n
                .parse()
                .map(DeviceSpec::Cuda)
                .map_err(|_| BadDevice::Index(s.clone()));
        }
        Err(BadDevice::Unknown(s))
    }
}

impl DeviceSpec {
    /// Parses a comma-separated device list (`cpu`, `cuda:0,cuda:1`).
    pub fn parse_list(s: &str) -> Result<Vec<DeviceSpec>, BadDevice> {
        let devices = s
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if devices.is_empty() {
            return Err(BadDevice::EmptyList);
        }
        Ok(devices)
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// What kind of devices a model runs on, for the defaults that depend on
/// it (`dtype`, batch limits, pass sizes, preprocessing threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    /// At least one device is the CPU (or the list is empty): the CPU's
    /// defaults, which a mixed model's slowest replica needs.
    Cpu,
    /// Every device is a GPU.
    Gpu,
}

impl DeviceClass {
    /// The class of a model's device list.
    pub fn of(devices: &[DeviceSpec]) -> DeviceClass {
        if !devices.is_empty() && devices.iter().all(|d| matches!(d, DeviceSpec::Cuda(_))) {
            DeviceClass::Gpu
        } else {
            DeviceClass::Cpu
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceClass::Cpu => "cpu",
            DeviceClass::Gpu => "gpu",
        }
    }
}

/// A device that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {device}: {source}")]
pub struct DeviceError {
    pub device: DeviceSpec,
    #[source]
    pub source: Box<candle_core::Error>,
}

impl DeviceSpec {
    /// Opens the device. CUDA needs the `cuda` build feature and a driver; a
    /// panic while the driver library is looked for is returned as an error.
    pub fn open(self) -> Result<Device, DeviceError> {
        let fail = |source: candle_core::Error| DeviceError {
            device: self,
            source: Box::new(source),
        };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(_) if !candle_core::utils::cuda_is_available() => {
                Err(fail(candle_core::Error::Msg(
                    "this vlembed was built without CUDA support (build it with \
                     `--features cuda`, or use --devices cpu)"
                        .into(),
                )))
            }
            DeviceSpec::Cuda(i) => match std::panic::catch_unwind(|| Device::new_cuda(i)) {
                Ok(opened) => opened.map_err(fail),
                Err(panic) => Err(fail(candle_core::Error::Msg(format!(
                    "the CUDA driver could not be loaded: {}",
                    panic_message(panic.as_ref())
                )))),
            },
        }
    }

    /// Opens the device and runs one tiny computation on it, read back: a
    /// device that opens but cannot compute (no kernels for this GPU, a
    /// broken context) fails here, before any model file is read. The device
    /// is dropped again, so no handle outlives the check (a replica rebuilt
    /// after a sticky CUDA error must get a fresh context).
    pub fn check(self) -> Result<(), DeviceError> {
        let device = self.open()?;
        let probe = || -> candle_core::Result<f32> {
            let t = candle_core::Tensor::from_slice(&[1f32, 2.0], 2, &device)?;
            (&t + &t)?.sum_all()?.to_scalar::<f32>()
        };
        match probe() {
            Ok(6.0) => Ok(()),
            Ok(v) => Err(DeviceError {
                device: self,
                source: Box::new(candle_core::Error::Msg(format!(
                    "a test computation gave {v} instead of 6"
                ))),
            }),
            Err(e) => Err(DeviceError {
                device: self,
                source: Box::new(e),
            }),
        }
    }
}

/// The message of a panic caught around model code (a forward pass, a
/// replica's build, a driver library that would not load).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dtypes_and_devices() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("F16".parse::<Precision>().unwrap(), Precision::F16);
        assert!("f64".parse::<Precision>().is_err());
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(
            DeviceSpec::parse_list(" cuda:0, cuda:1 ").unwrap(),
            vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]
        );
        assert_eq!(DeviceSpec::parse_list(" , "), Err(BadDevice::EmptyList));
        assert_eq!(
            DeviceSpec::parse_list("cpu,gpu"),
            Err(BadDevice::Unknown("gpu".into()))
        );
    }

    #[test]
    fn a_model_is_gpu_class_only_when_every_device_is_a_gpu() {
        use DeviceSpec::{Cpu, Cuda};
        assert_eq!(DeviceClass::of(&[Cuda(0), Cuda(1)]), DeviceClass::Gpu);
        assert_eq!(DeviceClass::of(&[Cuda(0), Cpu]), DeviceClass::Cpu);
        assert_eq!(DeviceClass::of(&[Cpu]), DeviceClass::Cpu);
        assert_eq!(DeviceClass::of(&[]), DeviceClass::Cpu);
    }

    #[test]
    fn the_cpu_checks_and_cuda_fails_with_its_cause_on_a_cpu_build() {
        DeviceSpec::Cpu.check().unwrap();
        if !candle_core::utils::cuda_is_available() {
            let e = DeviceSpec::Cuda(0).check().unwrap_err().to_string();
            assert!(e.starts_with("cannot open cuda:0: "), "{e}");
            assert!(e.contains("built without CUDA support"), "{e}");
        }
    }
}
