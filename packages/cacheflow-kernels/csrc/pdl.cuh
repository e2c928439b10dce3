// Programmatic dependent launch (PDL, sm_90+), device side.
//
// The ops on a decode step's path (norms, activations, rotary, cache writes, decode and prefill
// attention) are launched with PDL (pdl_launch.cuh): their CTAs may be scheduled while the
// previous kernel on the stream is still finishing, so the launch and the CTAs' start-up overlap
// that kernel's tail, in CUDA graphs too, instead of following its end. Ordering is kept by the
// first statement of each such kernel, PdlWaitForPrevious(): griddepcontrol.wait blocks until
// the previous grid has completed and its writes are visible. The kernel then lets its own
// successor be scheduled (griddepcontrol.launch_dependents); only after its wait, so that a
// successor never runs while anything older than this kernel is still in flight.
// The attention kernels wait the same way but do not release their successor early
// (PdlWait()): they run grids of about one wave, and a successor released at their start parks
// its CTAs on whichever SMs free up first. The next attention call then starts from a lopsided
// placement (on the H200, GQA-8 decode at batch 64 took 87 instead of 67 us back to back). Their
// successor is released as their CTAs exit, with two exceptions: a split decode launch releases
// its own merge kernel (PdlLaunchDependents()) once every CTA is past its main loop, and an
// unsplit decode launch of at most half as many CTAs as SMs (batch 1) releases its successor
// right after its wait, so the successor takes only the SMs it leaves free. skinny_gemm, too,
// releases its successor right after its wait (skinny_gemm_kernel.cuh).
// Before its wait a kernel may read only what the kernel before it cannot be writing: since every
// early release comes after the releasing kernel's own wait, everything older than that kernel
// has finished, so the step's inputs uploaded before its first kernel, the weights and the
// tables built at load are safe. Several kernels use that time: the decode kernel reads the
// block tables and issues its first K/V copies there, all but the copy of each sequence's last
// position, the only cache slot the kernel before it (reshape_and_cache of the step's token) may
// still be writing (paged_attention.cuh, "Before the wait"); skinny_gemm fills its ring with
// weight rows; rms_norm fetches its weight into L2; rotary_embedding_with_cache reads the
// positions and slots and stages its cos/sin row.
// Compiled for the host (the CPU emulations of the attention kernels) or for older GPUs it is a
// no-op, like the launch attribute there.
#pragma once

#if defined(__CUDACC__)
#define CF_PDL_FUNC __device__ __forceinline__
#else
#define CF_PDL_FUNC inline
#endif

namespace cacheflow {

/*! \brief Waits for the previous kernel on the stream, then releases the next one (see above).
 * Must come before the kernel's first access to memory that kernel may write. */
CF_PDL_FUNC void PdlWaitForPrevious() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/*! \brief Waits for the previous kernel on the stream without releasing the next one before
 * this kernel's CTAs exit (see above). Must come before the kernel's first access to memory that
 * kernel may write. */
CF_PDL_FUNC void PdlWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/*! \brief Lets the next kernel on the stream be scheduled now (its CTAs still wait in their
 * own PdlWait / PdlWaitForPrevious). Only after this kernel's own wait (see above). */
CF_PDL_FUNC void PdlLaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace cacheflow

#undef CF_PDL_FUNC
