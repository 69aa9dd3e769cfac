//! The instruction-set token every SIMD kernel takes ([`Isa`]), the macro that compiles a kernel
//! for each level, and the branch-free scalar helpers those kernels share: the ground floor under
//! the CPU backend's kernels and the host-side log-sum-exp.

/// Compile a kernel for AVX-512 and AVX2+FMA besides the baseline and pick one at run time: the
/// `#[inline(always)]` helpers it calls are then compiled with those features (`mul_add` becomes one
/// instruction instead of a call, loops use wide registers). Every version gives the same bits.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                match $crate::numerics::simd::Isa::detect().level() {
                    // SAFETY: an `Isa` of this level proves the CPU has its features.
                    $crate::numerics::simd::Level::Avx512 => return unsafe { v512($($arg),*) },
                    // SAFETY: as above.
                    $crate::numerics::simd::Level::Avx2 => return unsafe { v256($($arg),*) },
                    $crate::numerics::simd::Level::Portable => {}
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// An instruction set the kernels can run with; all give identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    /// AVX2 with FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F and VL, with AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => "avx512",
        }
    }
}

/// Proof that the running CPU has an instruction set: only detection makes one, so a kernel given
/// an `Isa` of some [`Level`] may use that level's instructions (every `unsafe` SIMD call relies on
/// this).
///
/// ```
/// use gpt2::internal::{Isa, Level};
/// let best = Isa::detect();
/// assert!(Isa::new(best.level()).is_some());
/// assert_eq!(Isa::portable().level(), Level::Portable);
/// ```
///
/// No safe code can claim a level the CPU lacks:
///
/// ```compile_fail
/// let avx512 = gpt2::internal::Isa(gpt2::internal::Level::Avx512); // the field is private
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(Level);

/// Whether the CPU has every feature a level's kernels use.
fn supported(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match level {
            Level::Portable => true,
            Level::Avx2 => avx2,
            Level::Avx512 => {
                avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        level == Level::Portable
    }
}

impl Isa {
    /// The plain loops: every CPU runs them.
    pub fn portable() -> Isa {
        Isa(Level::Portable)
    }

    /// The best the running CPU supports, at most the level named by the environment variable
    /// `GPT2_ISA` (`portable`, `avx2`, `avx512`), which lets one machine measure the others' paths.
    pub fn detect() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = std::env::var("GPT2_ISA").ok();
            let best = Isa::available()
                .into_iter()
                .rfind(|i| cap.as_deref().is_none_or(|c| i.0 <= level_named(c)));
            best.unwrap_or(Isa::portable())
        })
    }

    /// Every level this CPU can run, lowest first (for the tests).
    pub fn available() -> Vec<Isa> {
        let mut all = vec![Level::Portable];
        #[cfg(target_arch = "x86_64")]
        all.extend([Level::Avx2, Level::Avx512]);
        all.into_iter().filter(|&l| supported(l)).map(Isa).collect()
    }

    /// The token for `level`, if the CPU has it.
    pub fn new(level: Level) -> Option<Isa> {
        supported(level).then_some(Isa(level))
    }

    pub fn level(self) -> Level {
        self.0
    }

    /// This token or a lower level (each level's features include the lower ones').
    pub fn at_most(self, level: Level) -> Isa {
        Isa(self.0.min(level))
    }
}

/// The level `GPT2_ISA` names; an unknown name caps nothing.
fn level_named(name: &str) -> Level {
    match name {
        "portable" => Level::Portable,
        #[cfg(target_arch = "x86_64")]
        "avx2" => Level::Avx2,
        #[cfg(target_arch = "x86_64")]
        _ => Level::Avx512,
        #[cfg(not(target_arch = "x86_64"))]
        _ => Level::Portable,
    }
}

/// The largest element (in lanes, so that it vectorises; no NaN handling needed here).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for ch in chunks {
        for l in 0..16 {
            acc[l] = if ch[l] > acc[l] { ch[l] } else { acc[l] };
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// e^x for |x| ≤ 88, branch-free so that loops over it vectorise: x = n·ln2 + r, e^r by a degree-6
/// polynomial (error ~2 ulp), 2^n through the exponent bits.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer (to nearest, ties to even) held in the low mantissa
    // bits: n without a float-to-int conversion, which does not vectorise (it saturates).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = n.mul_add(-0.693_145_75, x);
    let r = n.mul_add(-1.428_606_8e-6, r);
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // t's bits are 0x4B40_0000 + n, so 2ⁿ's exponent field is those bits − 0x4B40_0000 + 127.
    p * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}
