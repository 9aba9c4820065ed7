//! fp32 products on the `gemm` crate's microkernels, with the instruction set chosen by us.
//!
//! `gemm::gemm` picks its kernel itself (AVX-512 whenever the CPU has it, with its `x86-v4`
//! feature on), so the AVX2 one could not be tested on an AVX-512 machine. This file does what
//! gemm-common's private `__inject_mod!` macro does: it instantiates the public
//! `gemm_common::gemm::gemm_basic_generic` with gemm-f32's public `fma` or `avx512f`
//! microkernel tables, after the same operand normalisation as `gemm::gemm`.

use super::{Fp32Kernel, Mat};
use gemm_common::Parallelism;

/// gemm's argument list after `gemm::gemm`'s normalisation (dst column-major-ish; see
/// [`matmul_f32`]): dst := alpha·dst + beta·lhs·rhs, strides in elements.
#[derive(Clone, Copy)]
struct Args {
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    parallelism: Parallelism,
}

/// `gemm_basic_generic` on one of gemm-f32's microkernel tables, as `__inject_mod!` writes it:
/// `$ukr` is the module (`UKR`, `H_UKR` and their sizes), `$simd` the gemm-common SIMD token type,
/// `$n` the f32 lanes of one register.
macro_rules! gemm_on {
    ($name:ident, $ukr:path, $simd:ty, $n:expr) => {
        /// # Safety
        /// As [`matmul_f32`]; the CPU must support the kernel's instruction set.
        #[cfg(target_arch = "x86_64")]
        #[inline(never)]
        unsafe fn $name(a: Args) {
            use gemm_common::simd::MixedSimd;
            use $ukr::{H_M, H_N, H_UKR, MR_DIV_N, NR, UKR};
            const N: usize = $n;
            let simd = <$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
                .expect("fp32 kernel chosen for a CPU that lacks its instruction set");
            // SAFETY: forwarded from this function's contract; the microkernel table and the SIMD
            // token are the pair gemm-common's own dispatch uses for this instruction set.
            unsafe {
                gemm_common::gemm::gemm_basic_generic::<_, f32, N, { MR_DIV_N * N }, NR, MR_DIV_N, H_M, H_N>(
                    simd,
                    a.m,
                    a.n,
                    a.k,
                    a.dst,
                    a.dst_cs,
                    a.dst_rs,
                    a.read_dst,
                    a.lhs,
                    a.lhs_cs,
                    a.lhs_rs,
                    a.rhs,
                    a.rhs_cs,
                    a.rhs_rs,
                    a.alpha,
                    a.beta,
                    false,
                    false,
                    false,
                    |x, y, z| x * y + z,
                    &UKR,
                    &H_UKR,
                    false,
                    a.parallelism,
                );
            }
        }
    };
}

gemm_on!(gemm_avx2, gemm_f32::microkernel::fma::f32, gemm_common::simd::V3, 8);
gemm_on!(gemm_avx512, gemm_f32::microkernel::avx512f::f32, gemm_common::simd::V4, 16);

/// dst (m × n, rows `dst_row` apart, columns adjacent) = [dst +] scale · lhs (m × k) · rhs (k × n).
///
/// # Safety
/// As [`super::matmul`]; `kernel` must come from [`super::Kernels`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_f32(
    kernel: Fp32Kernel,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) {
    let parallelism = match (parallel, rayon::current_num_threads()) {
        (false, _) | (true, 0 | 1) => Parallelism::None,
        (true, t) => Parallelism::Rayon(t),
    };
    let alpha = if accumulate { 1.0 } else { 0.0 };
    if kernel == Fp32Kernel::Portable {
        // SAFETY: forwarded from this function's contract (gemm::gemm takes the same operands).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                dst_row as isize,
                accumulate,
                lhs.ptr,
                lhs.col as isize,
                lhs.row as isize,
                rhs.ptr,
                rhs.col as isize,
                rhs.row as isize,
                alpha,
                scale,
                false,
                false,
                false,
                parallelism,
            );
        }
        return;
    }
    // gemm::gemm's normalisation: its microkernels want dst's rows adjacent, so with our row-major
    // dst it computes dstᵀ (n × m) = rhsᵀ · lhsᵀ. The strides are non-negative, so its sign fix-ups
    // are no-ops.
    let (dst_cs, dst_rs) = (1isize, dst_row as isize);
    let a = if dst_cs < dst_rs {
        Args {
            m: n,
            n: m,
            k,
            dst,
            dst_cs: dst_rs,
            dst_rs: dst_cs,
            read_dst: accumulate,
            lhs: rhs.ptr,
            lhs_cs: rhs.row as isize,
            lhs_rs: rhs.col as isize,
            rhs: lhs.ptr,
            rhs_cs: lhs.row as isize,
            rhs_rs: lhs.col as isize,
            alpha,
            beta: scale,
            parallelism,
        }
    } else {
        Args {
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst: accumulate,
            lhs: lhs.ptr,
            lhs_cs: lhs.col as isize,
            lhs_rs: lhs.row as isize,
            rhs: rhs.ptr,
            rhs_cs: rhs.col as isize,
            rhs_rs: rhs.row as isize,
            alpha,
            beta: scale,
            parallelism,
        }
    };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from this function's contract; `kernel` was detected on this CPU.
    unsafe {
        match kernel {
            Fp32Kernel::Avx2 => gemm_avx2(a),
            Fp32Kernel::Avx512 => gemm_avx512(a),
            Fp32Kernel::Portable => unreachable!(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = a;
        unreachable!("only the portable fp32 kernel exists off x86-64");
    }
}
