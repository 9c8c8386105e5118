//! GPU architectures mangrove compiles for, parsed from `sm90` / `sm_90` / `90` style strings.

use std::fmt;
use std::str::FromStr;

/// A CUDA SM target (`sm_90`, `sm_90a`, …). The `a` variants enable arch-specific instructions.
/// Deserializing checks the target is supported, as parsing does (`{"cc": 75}` is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "ArchFields")]
pub struct Arch {
    /// Compute capability times ten (90 for sm_90).
    pub cc: u32,
    /// Architecture-specific variant (`sm_90a`).
    pub specific: bool,
}

/// The wire shape of an [`Arch`] before its target is checked.
#[derive(serde::Deserialize)]
struct ArchFields {
    cc: u32,
    specific: bool,
}

impl TryFrom<ArchFields> for Arch {
    type Error = ArchError;
    fn try_from(f: ArchFields) -> Result<Self, ArchError> {
        if SUPPORTED.contains(&f.cc) {
            Ok(Arch { cc: f.cc, specific: f.specific })
        } else {
            Err(ArchError { input: format!("sm{}", f.cc) })
        }
    }
}

/// The SM targets mangrove accepts.
pub const SUPPORTED: &[u32] = &[80, 86, 87, 89, 90, 100, 103, 110, 120, 121];

/// An arch string that names no supported target.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown arch '{input}': expected one of {}", supported_list())]
pub struct ArchError {
    pub input: String,
}

fn supported_list() -> String {
    SUPPORTED.iter().map(|c| format!("sm{c}")).collect::<Vec<_>>().join(", ")
}

impl Arch {
    pub const SM80: Arch = Arch { cc: 80, specific: false };
    pub const SM90: Arch = Arch { cc: 90, specific: false };
    pub const SM120: Arch = Arch { cc: 120, specific: false };

    /// From a device's compute capability (major, minor).
    pub fn from_compute_capability(major: i32, minor: i32) -> Result<Self, ArchError> {
        format!("sm{}{}", major, minor).parse()
    }

    /// The NVRTC `--gpu-architecture` value (`sm_90`, `sm_90a`).
    pub fn nvrtc_name(&self) -> String {
        format!("sm_{}{}", self.cc, if self.specific { "a" } else { "" })
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm{}{}", self.cc, if self.specific { "a" } else { "" })
    }
}

impl FromStr for Arch {
    type Err = ArchError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ArchError { input: s.to_owned() };
        let t = s.trim().to_ascii_lowercase();
        let t = t.strip_prefix("sm").unwrap_or(&t);
        let t = t.strip_prefix('_').unwrap_or(t);
        let (digits, specific) = match t.strip_suffix('a') {
            Some(d) => (d, true),
            None => (t, false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let cc: u32 = digits.parse().map_err(|_| err())?;
        if !SUPPORTED.contains(&cc) {
            return Err(err());
        }
        Ok(Arch { cc, specific })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spellings() {
        for s in ["sm90", "sm_90", "90", "SM90"] {
            assert_eq!(s.parse::<Arch>().unwrap(), Arch::SM90, "{s}");
        }
        assert_eq!("sm_90a".parse::<Arch>().unwrap().nvrtc_name(), "sm_90a");
        assert_eq!("sm121".parse::<Arch>().unwrap().nvrtc_name(), "sm_121");
        assert_eq!(Arch::from_compute_capability(9, 0).unwrap(), Arch::SM90);
    }

    #[test]
    fn rejects_unknown() {
        for s in ["sm91", "", "gfx90a", "sm_", "sm9x", "sm75"] {
            let e = s.parse::<Arch>().unwrap_err();
            assert!(e.to_string().contains("unknown arch"), "{s}: {e}");
        }
    }

    #[test]
    fn deserializing_checks_the_target_too() {
        let a: Arch = serde_json::from_str(r#"{"cc": 90, "specific": true}"#).unwrap();
        assert_eq!(a.nvrtc_name(), "sm_90a");
        let e = serde_json::from_str::<Arch>(r#"{"cc": 75, "specific": false}"#).unwrap_err();
        assert!(e.to_string().contains("unknown arch 'sm75'"), "{e}");
        assert_eq!(serde_json::to_string(&Arch::SM90).unwrap(), r#"{"cc":90,"specific":false}"#);
    }
}
