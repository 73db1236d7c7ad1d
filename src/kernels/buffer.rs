//! Output buffers that a kernel writes completely, allocated without zeroing them first.
//!
//! Zeroed allocations (`vec![0.0; n]`, i.e. `calloc` on reused memory) cost a `memset` of every
//! output, a visible share of a sampling forward pass once the kernels were fused. The kernels write each
//! output element exactly once (directly, or through a GEMM with `read_dst = false`), so they
//! fill `MaybeUninit` buffers instead.

use std::mem::MaybeUninit;

/// `len` floats that `fill` writes, all of them, through the `MaybeUninit` view it gets.
///
/// Debug builds first set the memory to NaN, so an element the kernel missed shows up in the
/// tests (which compare against composed operations) instead of as arbitrary values.
///
/// # Safety
/// `fill` must write every one of the `len` elements.
pub unsafe fn uninit_filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    if cfg!(debug_assertions) {
        spare.fill(MaybeUninit::new(f32::NAN));
    }
    fill(spare);
    // SAFETY: the caller guarantees that `fill` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// Views elements that have been written as plain floats.
///
/// # Safety
/// Every element of `s` must have been written.
pub unsafe fn assume_init(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the elements are initialised.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A scratch buffer of `len` uninitialised floats.
pub fn scratch(len: usize) -> Vec<MaybeUninit<f32>> {
    vec![MaybeUninit::uninit(); len]
}
