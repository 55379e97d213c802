//! Where a model runs and in what precision: [`DeviceSpec`] and
//! [`Precision`], as configured; a leaf of `models`.

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
    /// Opens the device. CUDA needs the `cuda` build feature.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => Device::new_cuda(i).map_err(|e| DeviceError {
                device: self,
                source: Box::new(e),
            }),
        }
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
}
