//! The AMX bf16 kernel: 32 × 32 blocks of C in four tile registers, `tdpbf16ps` on 16 × 32 A
//! tiles and 16-pair × 16 B tiles, written in `asm!` (the AMX intrinsics are not stable Rust).
//! The tile registers are named in the templates and declared clobbered; the tile configuration
//! is per thread, so each task loads it ([`Tiles`]) before its first tile instruction.

use super::avx512::{bias_at, prefetch_rows, store16};
use super::bf16::{Block, Epilogue, Step};
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
pub(super) struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// # Safety
    /// The CPU has AMX-TILE and the OS has granted this process the tile data (Kernels::detect).
    pub(super) unsafe fn load() -> Tiles {
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

/// C (32 × 32 f32) += A (32 rows from `a`, rows `a_stride` bytes apart) · B (tiles b0, b1), over
/// `chunks` chunks of 32 k: per chunk two A tiles, two B tiles, four `tdpbf16ps`. C starts from
/// zero when `c_in` is null, else from the 32 × 32 block there (rows `c_in_stride` bytes apart),
/// and ends in the block at `c_out` (rows `c_out_stride` bytes apart).
///
/// # Safety
/// The tile configuration [`CONFIG`] is loaded on this thread; A readable for 32 rows of
/// 64·chunks bytes, b0 and b1 for 1024·chunks bytes each; the C blocks readable / writable.
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_32x32(
    a: *const u16,
    a_stride: usize,
    b0: *const u16,
    b1: *const u16,
    chunks: usize,
    c_in: *const f32,
    c_in_stride: usize,
    c_out: *mut f32,
    c_out_stride: usize,
) {
    // SAFETY: the contract; the loop reads A at a + row·a_stride + 64·chunk (+ 16 rows for tmm5)
    // and B at b + 64·row + 1024·chunk; the C tiles are rows 0..16 / 16..32, bytes 0..64 / 64..128.
    unsafe {
        asm!(
            "test {cin}, {cin}",
            "jz 4f",
            "tileloadd tmm0, [{cin} + {sci}*1]",
            "tileloadd tmm1, [{cin} + {sci}*1 + 64]",
            "shl {sci}, 4",
            "add {cin}, {sci}",
            "shr {sci}, 4",
            "tileloadd tmm2, [{cin} + {sci}*1]",
            "tileloadd tmm3, [{cin} + {sci}*1 + 64]",
            "jmp 5f",
            "4:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "5:",
            "test {n}, {n}",
            "jz 3f",
            "2:",
            // The four loads, then the four products (measured 11-12 % faster in training than
            // loading each tile just before its first product).
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            "3:",
            "tilestored [{cout} + {sco}*1], tmm0",
            "tilestored [{cout} + {sco}*1 + 64], tmm1",
            "shl {sco}, 4",
            "add {cout}, {sco}",
            "shr {sco}, 4",
            "tilestored [{cout} + {sco}*1], tmm2",
            "tilestored [{cout} + {sco}*1 + 64], tmm3",
            a0 = inout(reg) a => _,
            a1 = inout(reg) a.byte_add(16 * a_stride) => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            n = inout(reg) chunks => _,
            sa = in(reg) a_stride,
            sb = in(reg) 64usize,
            cin = inout(reg) c_in => _,
            sci = inout(reg) c_in_stride => _,
            cout = inout(reg) c_out => _,
            sco = inout(reg) c_out_stride => _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        )
    };
}

/// 32 × 32 f32, cache-line aligned.
#[repr(C, align(64))]
struct Block32([f32; 32 * 32]);

/// The AMX kernel on one chunk of k of a task's rows (32 at a time; packed A has zero rows up to
/// a multiple of 32), for one pair of B tiles: the sums start from zero or the scratch block and
/// go to the scratch block or (last chunk) to dst (the task's first row, column 0, rows `dst_row`
/// apart): straight from the tiles when nothing is to be added or scaled and the 32 × 32 block
/// is whole, else through a block in L1 and the epilogue.
///
/// # Safety
/// AMX is usable and its configuration loaded on this thread ([`Tiles`]); the CPU has AVX-512F;
/// the step, block, dst and bias describe valid memory, the block of dst being the caller's.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn step(s: &Step, blk: &Block, dst: *mut f32, dst_row: usize, e: &Epilogue) {
    debug_assert!(!s.a_tiled, "AMX tiles take A row-major");
    let mut tmp = std::mem::MaybeUninit::<Block32>::uninit();
    let tmp = tmp.as_mut_ptr().cast::<f32>();
    let cols = [blk.cols.min(16), blk.cols.saturating_sub(16)];
    for i0 in (0..s.rows).step_by(32) {
        let rows = (s.rows - i0).min(32);
        let sc = s.scratch.wrapping_add(i0 * s.scratch_row + blk.scratch_col);
        let d = dst.wrapping_add(i0 * dst_row + blk.col);
        let (c_in, c_in_stride) =
            if s.first { (std::ptr::null(), 0) } else { (sc.cast_const(), 4 * s.scratch_row) };
        let direct = s.last && e.plain() && rows == 32 && blk.cols == 32;
        let (c_out, c_out_stride) = if !s.last {
            (sc, 4 * s.scratch_row)
        } else if direct {
            (d, 4 * dst_row)
        } else {
            (tmp, 128)
        };
        if s.last {
            prefetch_rows(d, dst_row, rows, blk.cols);
        }
        // SAFETY: rows i0..i0 + 32 of packed A exist (zero padding), the chunk of both tiles is
        // readable; the C blocks: the scratch block (the task's), dst (32 whole rows and columns
        // of the caller's block) or `tmp`.
        unsafe {
            kernel_32x32(
                s.a_row0.add(i0 * s.a_stride),
                2 * s.a_stride,
                blk.b0,
                blk.b1,
                s.pairs / 16,
                c_in,
                c_in_stride,
                c_out,
                c_out_stride,
            )
        };
        if s.last && !direct {
            for i in 0..rows {
                for (h, &cols) in cols.iter().enumerate() {
                    if cols > 0 {
                        // SAFETY: row i of tmp (written by the kernel); row i0 + i, columns of the
                        // pair (cols of them) of the caller's dst block.
                        unsafe {
                            let acc = _mm512_loadu_ps(tmp.add(32 * i + 16 * h));
                            store16(d.add(i * dst_row + 16 * h), cols, acc, bias_at(e, blk.col + 16 * h), e);
                        }
                    }
                }
            }
        }
    }
}
