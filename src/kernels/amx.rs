//! The AMX bf16 kernel: 32 × 32 blocks of C in four tile registers, `tdpbf16ps` on 16 × 32 A
//! tiles and 16-pair × 16 B tiles, written in `asm!` (the AMX intrinsics are not stable Rust).
//! The tile registers are named in the templates and declared clobbered; the tile configuration
//! is per thread, so each task loads it ([`Tiles`]) before its first tile instruction.

use super::avx512::store16;
use super::bf16::{Epilogue, PackedB, TILE_N};
use std::arch::asm;
use std::arch::x86_64::*;

/// The 64-byte operand of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile.
    colsb: [u16; 16],
    /// Rows of each tile.
    rows: [u8; 16],
}

/// tmm0..tmm3: C (16 rows × 16 f32), tmm4, tmm5: A (16 rows × 32 bf16), tmm6, tmm7: B (16 pair-rows
/// × 16 columns × 2 bf16): all of them 16 rows of 64 bytes.
static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tile configuration loaded on this thread for as long as the value lives; `tilerelease`
/// on drop (which also returns the tile state to its initial, cheap-to-save, state).
struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// # Safety
    /// The CPU has AMX-TILE and the OS has granted this process the tile data (Kernels::detect).
    unsafe fn load() -> Tiles {
        // SAFETY: CONFIG is a valid palette-1 configuration, 64 bytes, 64-byte aligned; AMX is
        // usable (contract). ldtilecfg zeroes the tile registers, which nothing else uses.
        unsafe {
            asm!(
                "ldtilecfg [{cfg}]",
                cfg = in(reg) &CONFIG,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, readonly, preserves_flags),
            )
        };
        Tiles(std::marker::PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a Tiles exists only after a successful ldtilecfg on this thread (it is not Send,
        // so it is dropped on the thread that loaded the configuration).
        unsafe {
            asm!(
                "tilerelease",
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, nomem, preserves_flags),
            )
        };
    }
}

/// C (32 × 32 f32, rows 128 bytes apart, at `c`) = A (32 rows from `a`, rows `a_stride` bytes
/// apart) · B (tiles b0, b1), over `chunks` chunks of 32 k: per chunk two A tiles, two B tiles,
/// four `tdpbf16ps`.
///
/// # Safety
/// The tile configuration [`CONFIG`] is loaded on this thread; A readable for 32 rows of 64·chunks
/// bytes, b0 and b1 for 1024·chunks bytes each, c writable for 4 KiB.
#[inline]
unsafe fn kernel_32x32(
    a: *const u16,
    a_stride: usize,
    b0: *const u16,
    b1: *const u16,
    chunks: usize,
    c: *mut f32,
) {
    // SAFETY: the contract; the loop reads A at a + row·a_stride + 64·chunk (+ 16 rows for tmm5)
    // and B at b + 64·row + 1024·chunk, and stores the four C tiles into the 32 × 32 block.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "test {n}, {n}",
            "jz 3f",
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            "3:",
            "tilestored [{c} + {sc}*1], tmm0",
            "tilestored [{c} + {sc}*1 + 64], tmm1",
            "tilestored [{c} + {sc}*1 + 2048], tmm2",
            "tilestored [{c} + {sc}*1 + 2112], tmm3",
            a0 = inout(reg) a => _,
            a1 = inout(reg) a.byte_add(16 * a_stride) => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            n = inout(reg) chunks => _,
            sa = in(reg) a_stride,
            sb = in(reg) 64usize,
            c = in(reg) c,
            sc = in(reg) 128usize,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        )
    };
}

/// 32 × 32 f32, cache-line aligned.
#[repr(C, align(64))]
struct Block([f32; 32 * 32]);

/// The AMX kernel on one block: `rows` rows of packed A (k_pad apart, padded with zero rows to a
/// multiple of 32) times B tiles t0..t1 (an even range), stored through the epilogue into dst (the
/// block's first row, column 0 of the whole output; rows `dst_row` apart). Column pairs outer,
/// 32-row blocks inner, so that a pair of B tiles is read from cache by all rows.
///
/// # Safety
/// AMX is usable (Kernels::detect) and the CPU has AVX-512F; `a`, B and dst valid for these rows
/// and tiles.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(
    a: *const u16,
    rows: usize,
    b: &PackedB,
    t0: usize,
    t1: usize,
    dst: *mut f32,
    dst_row: usize,
    e: Epilogue,
) {
    // SAFETY: AMX is usable (contract).
    let _tiles = unsafe { Tiles::load() };
    let mut c = Block([0f32; 32 * 32]);
    let tile = |t: usize| b.data[t * b.tile_len()..].as_ptr();
    for t in (t0..t1).step_by(2) {
        let j0 = t * TILE_N;
        if j0 >= b.n {
            break;
        }
        let cols = [b.n.saturating_sub(j0).min(16), b.n.saturating_sub(j0 + 16).min(16)];
        for i0 in (0..rows).step_by(32) {
            // SAFETY: rows i0..i0 + 32 of A exist (padding), tiles t and t + 1 of B exist (n_pad is
            // a multiple of 32), c is 4 KiB; the configuration is loaded.
            unsafe {
                kernel_32x32(
                    a.add(i0 * b.k_pad),
                    2 * b.k_pad,
                    tile(t),
                    tile(t + 1),
                    b.k_pad / 32,
                    c.0.as_mut_ptr(),
                )
            };
            for i in 0..(rows - i0).min(32) {
                for (h, &cols) in cols.iter().enumerate() {
                    if cols > 0 {
                        let bias = if e.bias.is_null() { e.bias } else { e.bias.wrapping_add(j0 + 16 * h) };
                        // SAFETY: row i of c; row i0 + i, columns j0 + 16h.. (cols of them) of dst
                        // are this block's.
                        unsafe {
                            let acc = _mm512_loadu_ps(c.0.as_ptr().add(32 * i + 16 * h));
                            store16(dst.add((i0 + i) * dst_row + j0 + 16 * h), cols, acc, bias, &e);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod probe {
    use std::arch::asm;
    unsafe fn v_noload(n: usize) {
        asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            "tilezero tmm4", "tilezero tmm5", "tilezero tmm6", "tilezero tmm7",
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}", "jnz 2b",
            n = inout(reg) n => _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        );
    }
    unsafe fn v_loadfirst(a: *const u16, sa: usize, b0: *const u16, b1: *const u16, n: usize) {
        asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64", "add {a1}, 64", "add {b0}, 1024", "add {b1}, 1024",
            "dec {n}", "jnz 2b",
            a0 = inout(reg) a => _, a1 = inout(reg) a.byte_add(16 * sa) => _,
            b0 = inout(reg) b0 => _, b1 = inout(reg) b1 => _, n = inout(reg) n => _,
            sa = in(reg) sa, sb = in(reg) 64usize,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        );
    }
    // 1 A tile, 4 B... no: C tiles 0..3 = A(tmm4) x B(tmm5,6,7) -> 3 C tiles; and tmm3 unused
    unsafe fn v_1x3(a: *const u16, sa: usize, b0: *const u16, n: usize) {
        asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2",
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{b0} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm5",
            "tileloadd tmm6, [{b0} + {sb}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tileloadd tmm7, [{b0} + {sb}*1 + 2048]",
            "tdpbf16ps tmm2, tmm4, tmm7",
            "add {a0}, 64", "add {b0}, 3072",
            "dec {n}", "jnz 2b",
            a0 = inout(reg) a => _,
            b0 = inout(reg) b0 => _, n = inout(reg) n => _,
            sa = in(reg) sa, sb = in(reg) 64usize,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        );
    }

    fn cpu() -> f64 {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
    }

    #[test]
    #[ignore]
    fn amx_kernel_peak() {
        let k = super::super::Kernels::detect();
        if k.bf16() != Some(super::super::Bf16Kernel::Amx) {
            return;
        }
        #[repr(C, align(64))]
        #[derive(Clone, Copy)]
        struct L([u16; 32]);
        let kp = 256usize;
        let av = vec![L([0x3f80u16; 32]); 4 * 2048];
        let bv = vec![L([0x3f80u16; 32]); 4 * 2048];
        let mut av = av;
        let mut bv = bv;
        if std::env::var("RANDOM").is_ok() {
            let mut x = 12345u32;
            for l in av.iter_mut().chain(bv.iter_mut()) {
                for v in l.0.iter_mut() {
                    x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                    *v = super::super::bf16::to_bf16((x >> 8) as f32 / (1 << 24) as f32 - 0.5);
                }
            }
        }
        let a = av.as_ptr() as *const u16;
        let b = bv.as_ptr() as *const u16;
        let mut c = super::Block([0f32; 1024]);
        unsafe {
            let _t = super::Tiles::load();
            let iters = 20000;
            let fl = |s: f64, tdps: f64| tdps * 16.0 * 16.0 * 32.0 * 2.0 / s / 1e9;
            for kk in [256usize, 2048] {
            let t = cpu();
            let it = iters * 256 / kk;
            let mut sink = 0f32;
            for _ in 0..it {
                let acc = super::super::avx512::dp_kernel::<8>(a, kk, b, b.add(16 * kk), kk / 2);
                sink += std::mem::transmute::<_, [f32; 16]>(acc[7][1])[0];
            }
            eprintln!("dp 8x32 k {kk}: {:.1} GFLOP/s {sink}", (it * 8 * 32 * kk * 2) as f64 / (cpu() - t) / 1e9);
            }
            {
                // the product's loop: 64-row A, 24 pairs of B tiles, dst 768 wide
                let dst_row = 768usize;
                let mut dst = vec![0f32; 2048 * dst_row];
                let off: usize = std::env::var("OFF").map(|s| s.parse().unwrap()).unwrap_or(0);
                let pf = std::env::var_os("NOPF").is_none();
                for store in [false, true, true, true] {
                let t = cpu();
                let mut sink = 0f32;
                for task in 0..32 {
                    for tp in 0..24 {
                        for i0 in (0..64).step_by(8) {
                            if store && pf {
                                for i in 0..8 { for h in 0..2 {
                                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(dst.as_ptr().add((task * 64 + i0 + i) * dst_row + tp * 32 + 16 * h) as *const i8);
                                } }
                            }
                            let acc = super::super::avx512::dp_kernel::<8>(a.add(i0 * 256 + off), 256, b.add(tp * 2 * 4096 + off), b.add(tp * 2 * 4096 + 4096 + off), 128);
                            if store {
                                for i in 0..8 { for h in 0..2 {
                                    std::arch::x86_64::_mm512_storeu_ps(std::hint::black_box(dst.as_mut_ptr()).add((task * 64 + i0 + i) * dst_row + tp * 32 + 16 * h), acc[i][h]);
                                } }
                            } else {
                                sink += std::mem::transmute::<_, [f32; 16]>(acc[7][1])[0];
                            }
                        }
                    }
                }
                std::hint::black_box(&dst);
                eprintln!("product loop (store {store}): {:.1} GFLOP/s {sink}", (2048.0 * 768.0 * 256.0 * 2.0) / (cpu() - t) / 1e9);
                }
            }
            for _ in 0..2 {
            let t = cpu();
            v_noload(iters * 8);
            eprintln!("no loads: {:.1} GFLOP/s", fl(cpu() - t, (iters * 32) as f64));
            let t = cpu();
            for _ in 0..iters { v_loadfirst(a, 2 * kp, b, b.add(16 * kp), kp / 32); }
            eprintln!("loads first: {:.1} GFLOP/s", fl(cpu() - t, (iters * 32) as f64));
            let t = cpu();
            for _ in 0..iters { super::kernel_32x32(a, 2 * kp, b, b.add(16 * kp), kp / 32, c.0.as_mut_ptr()); }
            eprintln!("kernel_32x32: {:.1} GFLOP/s", fl(cpu() - t, (iters * 32) as f64));
            let t = cpu();
            for _ in 0..iters { v_1x3(a, 2 * kp, b, kp / 32); }
            eprintln!("1x3: {:.1} GFLOP/s", fl(cpu() - t, (iters * 24) as f64));
            }
        }
    }
}
