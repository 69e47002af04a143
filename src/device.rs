//! `--device auto|cpu|cuda|cuda:N` parsing.

use tch::{Cuda, Device};

/// Parses a `--device` value. `auto` picks CUDA device 0 when libtorch sees a GPU, else the CPU;
/// an explicit `cuda[:N]` fails when that device does not exist.
pub fn parse_device(s: &str) -> Result<Device, String> {
    let s = s.trim().to_ascii_lowercase();
    let allowed = "allowed: auto, cpu, cuda, cuda:N";
    match s.as_str() {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        _ => {
            let index = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| format!("invalid device `{s}` ({allowed})"))?,
                None => return Err(format!("invalid device `{s}` ({allowed})")),
            };
            let count = if Cuda::is_available() { Cuda::device_count() as usize } else { 0 };
            if index >= count {
                return Err(format!(
                    "device `{s}` requested but libtorch sees {count} CUDA device(s) ({allowed}; `auto` falls back to cpu)"
                ));
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// Human-readable device name for logs.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(parse_device(" CPU "), Ok(Device::Cpu));
        for bad in ["gpu", "cuda:x", "cuda:", "tpu:0"] {
            let e = parse_device(bad).unwrap_err();
            assert!(e.contains("allowed: auto, cpu, cuda, cuda:N"), "{e}");
        }
        // Index far beyond any machine's device count.
        assert!(parse_device("cuda:999").unwrap_err().contains("CUDA device"));
        let auto = parse_device("auto").unwrap();
        assert_eq!(auto.is_cuda(), Cuda::is_available());
    }
}
