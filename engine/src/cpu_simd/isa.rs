//! Which SIMD instruction set the ternary kernels use: detected once at run time ([`Isa::best`]),
//! or forced (`MANGROVE_CPU_ISA=scalar|avx2|avx-vnni|avx512-vnni|neon`, [`Isa::from_env`]) for
//! A/B runs. Every path the machine supports can also be asked for by name ([`Isa::supported`]),
//! which is how the tests run each one against the scalar path and the f64 reference.

/// A kernel instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, any CPU: the fallback and the kernels' own reference.
    Scalar,
    /// x86-64 AVX2 + FMA: `vpmaddubsw` into 16-bit partial sums widened every K block.
    Avx2,
    /// x86-64 AVX-VNNI (VEX `vpdpbusd` on 256-bit registers): u8 × s8 straight into int32.
    AvxVnni,
    /// x86-64 AVX-512 VNNI (`vpdpbusd` on 512-bit registers).
    Avx512Vnni,
    /// aarch64 NEON (`smull` / `sadalp` into int32).
    Neon,
}

impl Isa {
    /// Every path, in order from the portable one to the widest.
    pub const ALL: [Isa; 5] = [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Neon];

    /// The name in `MANGROVE_CPU_ISA`, the tuning DB and the reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Neon => "neon",
        }
    }

    /// The kernel variant name a backend on this path reports per layer family.
    pub fn variant(self) -> &'static str {
        match self {
            Isa::Scalar => "cpu_simd_scalar",
            Isa::Avx2 => "cpu_simd_avx2",
            Isa::AvxVnni => "cpu_simd_avx_vnni",
            Isa::Avx512Vnni => "cpu_simd_avx512_vnni",
            Isa::Neon => "cpu_simd_neon",
        }
    }

    /// Parses a name of [`Isa::name`].
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    /// Whether this CPU (and this build) can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Isa::Avx2.is_supported() && has_avx_vnni(),
            #[cfg(all(target_arch = "x86_64", mangrove_avx512))]
            Isa::Avx512Vnni => {
                Isa::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every path this machine supports, portable first.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The widest supported path.
    pub fn best() -> Isa {
        *Isa::supported().last().unwrap_or(&Isa::Scalar)
    }

    /// `MANGROVE_CPU_ISA` when set to a supported path, else [`Isa::best`]; an unknown or
    /// unsupported name is an error naming it.
    pub fn from_env() -> Result<Isa, String> {
        match std::env::var("MANGROVE_CPU_ISA") {
            Ok(s) if !s.is_empty() => match Isa::parse(&s) {
                Some(i) if i.is_supported() => Ok(i),
                Some(i) => Err(format!("MANGROVE_CPU_ISA={s}: this CPU or build lacks {}", i.name())),
                None => Err(format!(
                    "MANGROVE_CPU_ISA={s} is not known (known: {})",
                    Isa::ALL.map(Isa::name).join(", ")
                )),
            },
            _ => Ok(Isa::best()),
        }
    }
}

/// AVX-VNNI: CPUID.(EAX=7, ECX=1):EAX bit 4, read directly because
/// `is_x86_feature_detected!("avxvnni")` is newer than the 1.85 MSRV. Whether the OS saves the
/// YMM state is part of the AVX2 detection this is combined with.
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // `__cpuid` is an unsafe fn before Rust 1.94 and safe after
fn has_avx_vnni() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86-64 CPU; leaves above the maximum are not read.
    unsafe { __cpuid(0).eax >= 7 && __cpuid_count(7, 0).eax >= 1 && __cpuid_count(7, 1).eax & (1 << 4) != 0 }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scalar_is_always_there() {
        for i in Isa::ALL {
            assert_eq!(Isa::parse(i.name()), Some(i));
        }
        assert!(Isa::supported().contains(&Isa::Scalar));
        assert!(Isa::best().is_supported());
    }
}
