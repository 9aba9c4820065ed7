//! Which kernels this CPU can run, found once per process, and the `COLLAPSE_LAB_KERNELS` override.

use std::sync::OnceLock;

/// The environment variable that caps the kernels [`Kernels::from_env`] chooses (for testing the
/// slower paths on a fast machine): `auto` (default), `avx512` or `avx2`.
pub const ENV_VAR: &str = "COLLAPSE_LAB_KERNELS";

/// The fp32 product kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp32Kernel {
    /// The `gemm` crate's own dispatch: its scalar kernel on an x86 CPU without AVX2+FMA, NEON on
    /// aarch64. Chosen only when neither kernel below can run.
    Portable,
    /// gemm's AVX2+FMA (x86-64-v3) microkernels, 8 floats a register.
    Avx2,
    /// gemm's AVX-512F (x86-64-v4) microkernels, 16 floats a register.
    Avx512,
}

/// The bf16 product kernel (inputs rounded to bf16, products summed in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` (AVX512_BF16: Intel Cooper Lake and later, AMD Zen 4 and later).
    Avx512Bf16,
    /// AMX tiles, `tdpbf16ps` (Intel Sapphire Rapids and later).
    Amx,
}

/// The kernels [`super::matmul`] and [`super::packed_matmul`] use: chosen once per process by
/// [`Kernels::detect`] (the best this CPU has) or [`Kernels::from_env`] (the same, capped by
/// [`ENV_VAR`]). A value can only be made by those, so it never names a kernel the CPU lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    fp32: Fp32Kernel,
    bf16: Option<Bf16Kernel>,
}

/// What the CPU (and, for AMX, the operating system) allows.
#[derive(Clone, Copy, Debug)]
struct Hardware {
    /// gemm-common's `V3` (AVX2, FMA, F16C and the SSE levels) is usable.
    v3: bool,
    /// gemm-common's `V4` (`V3` plus AVX-512F) is usable.
    v4: bool,
    /// AVX-512F, AVX-512BW and AVX512_BF16, which the bf16 packing and `vdpbf16ps` need.
    avx512bf16: bool,
    /// AMX-TILE and AMX-BF16, enabled by the OS (XCR0) and granted to this process.
    amx: bool,
}

fn hardware() -> Hardware {
    static HW: OnceLock<Hardware> = OnceLock::new();
    *HW.get_or_init(probe)
}

#[cfg(target_arch = "x86_64")]
fn probe() -> Hardware {
    use gemm_common::simd::{MixedSimd, V3, V4};
    let v3 = <V3 as MixedSimd<f32, f32, f32, f32>>::try_new().is_some();
    let v4 = <V4 as MixedSimd<f32, f32, f32, f32>>::try_new().is_some();
    let avx512bf16 = v4
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16");
    // The AMX kernel packs its operands with the AVX-512 code of the avx512bf16 one.
    let amx = avx512bf16 && amx_usable();
    Hardware { v3, v4, avx512bf16, amx }
}

#[cfg(not(target_arch = "x86_64"))]
fn probe() -> Hardware {
    Hardware { v3: false, v4: false, avx512bf16: false, amx: false }
}

/// CPUID says AMX-TILE and AMX-BF16, XCR0 says the OS saves tile state, and Linux granted this
/// process the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; without it the
/// first tile instruction kills the process with SIGILL). Called once, from [`hardware`].
#[cfg(target_arch = "x86_64")]
fn amx_usable() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID exists on every x86-64 CPU; leaf 7 is read only when leaf 0 says it exists.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let (leaf1, leaf7) = (__cpuid(1), __cpuid_count(7, 0));
    let amx_bf16 = leaf7.edx >> 22 & 1 == 1;
    let amx_tile = leaf7.edx >> 24 & 1 == 1;
    let osxsave = leaf1.ecx >> 27 & 1 == 1;
    if !(amx_bf16 && amx_tile && osxsave) {
        return false;
    }
    // SAFETY: OSXSAVE (CPUID.1:ECX[27]) set means XGETBV is enabled.
    let xcr0 = unsafe { xcr0() };
    if xcr0 >> 17 & 3 != 3 {
        return false; // XTILECFG (bit 17) and XTILEDATA (bit 18)
    }
    request_tile_permission()
}

/// # Safety
/// The CPU must support XGETBV (CPUID.1:ECX.OSXSAVE).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integers and touches no memory of ours;
    // it fails cleanly (EINVAL, EPERM, ENOSYS) on kernels or CPUs without AMX support.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> bool {
    false
}

impl Kernels {
    /// The best kernels this CPU has (AVX-512 over AVX2 for fp32, AMX over AVX512_BF16 for bf16).
    /// The CPU is probed, and AMX permission asked of the OS, on the first call only.
    pub fn detect() -> Kernels {
        Self::capped(hardware(), Cap::Auto)
    }

    /// [`Kernels::detect`], capped by the environment variable [`ENV_VAR`]: unset, empty or `auto`
    /// gives the best; `avx512` fp32 AVX-512 and bf16 `vdpbf16ps` (AMX off); `avx2` fp32 AVX2 and
    /// no bf16 kernel. A cap above what the CPU has changes nothing. Any other value is an error
    /// naming the variable and the accepted values.
    pub fn from_env() -> Result<Kernels, String> {
        match std::env::var(ENV_VAR) {
            Ok(value) => Self::parse(&value),
            Err(std::env::VarError::NotPresent) => Ok(Self::detect()),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(format!("{ENV_VAR}={v:?} is not one of: auto, avx512, avx2"))
            }
        }
    }

    /// The kernels a value of [`ENV_VAR`] asks for on this CPU (see [`Kernels::from_env`]).
    pub fn parse(value: &str) -> Result<Kernels, String> {
        let cap = match value.trim() {
            "" | "auto" => Cap::Auto,
            "avx512" => Cap::Avx512,
            "avx2" => Cap::Avx2,
            other => return Err(format!("{ENV_VAR}={other:?} is not one of: auto, avx512, avx2")),
        };
        Ok(Self::capped(hardware(), cap))
    }

    fn capped(hw: Hardware, cap: Cap) -> Kernels {
        let fp32 = if hw.v4 && cap >= Cap::Avx512 {
            Fp32Kernel::Avx512
        } else if hw.v3 {
            Fp32Kernel::Avx2
        } else {
            Fp32Kernel::Portable
        };
        let bf16 = if hw.amx && cap >= Cap::Auto {
            Some(Bf16Kernel::Amx)
        } else if hw.avx512bf16 && cap >= Cap::Avx512 {
            Some(Bf16Kernel::Avx512Bf16)
        } else {
            None
        };
        Kernels { fp32, bf16 }
    }

    /// Only the portable kernels (gemm's own fp32 dispatch, bf16 emulated, plain-Rust packed
    /// products): for testing them on any CPU.
    #[cfg(test)]
    pub(crate) fn portable() -> Kernels {
        Kernels { fp32: Fp32Kernel::Portable, bf16: None }
    }

    /// The fp32 kernel.
    pub fn fp32(self) -> Fp32Kernel {
        self.fp32
    }

    /// The bf16 kernel, if any. Without one, bf16 products round their inputs to bf16 and run
    /// on the fp32 kernel: the same numbers up to summation order, and no faster.
    pub fn bf16(self) -> Option<Bf16Kernel> {
        self.bf16
    }

    /// A short description for logs, e.g. "fp32 avx512f, bf16 amx".
    pub fn describe(self) -> String {
        let fp32 = match self.fp32 {
            Fp32Kernel::Portable => "portable",
            Fp32Kernel::Avx2 => "avx2+fma",
            Fp32Kernel::Avx512 => "avx512f",
        };
        let bf16 = match self.bf16 {
            None => "emulated on fp32",
            Some(Bf16Kernel::Avx512Bf16) => "avx512_bf16",
            Some(Bf16Kernel::Amx) => "amx",
        };
        format!("fp32 {fp32}, bf16 {bf16}")
    }
}

/// How far [`ENV_VAR`] lets the choice go, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cap {
    Avx2,
    Avx512,
    Auto,
}
