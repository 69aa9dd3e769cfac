//! The number formats weights are stored in.

use std::fmt;

/// Storage type of the weights: f32, 16-bit floats, or 8-bit blocks (CPU only; see
/// `backend::cpu::q8`). On the GPU the activations use the same type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DType {
    #[default]
    F32,
    F16,
    Bf16,
    Q8,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::Bf16, DType::Q8];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "f32" | "fp32" | "float32" => DType::F32,
            "f16" | "fp16" | "float16" => DType::F16,
            "bf16" | "bfloat16" => DType::Bf16,
            "q8" | "q8_0" | "int8" => DType::Q8,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::Q8 => "q8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
