// The fused passes as C++ functions (CPU implementations in csrc/cpu/passes.cpp).
//
// They are registered as the torch ops armijo_fused::{first_pass, move, grad_sq_norm,
// trial_points} (schemas in csrc/ops.cpp) and follow python/armijo_fused/backends/torch_backend.py,
// which documents the math. Buffers are 1-D contiguous fp32 of the padded layout length (grad may be bf16/fp16);
// the layout comes as tile_block (int32 [ntiles], block of each tile), block_tiles (int32
// [nblocks + 1], first tile of each block plus the end) and tile (elements per tile).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <string>

namespace armijo_fused {

// Update the state with g_in = grad*gscale[0]*gscale[1], form d = u + wd*θ, step θ -= eta[b]*d.
// Returns fp32 [nblocks, 3] = (Σ g·d, Σ g², Σ d²) with g = grad*gscale[0]. With model_param
// (bf16/fp16, fp32 master weights), every element of θ written is also written there, rounded;
// first, where the model's value is not the master rounded (the user wrote the weights since the
// last step), the model's value replaces the master.
at::Tensor first_pass_cpu(int64_t rule, const at::Tensor& param, const at::Tensor& grad,
                          at::TensorList states, at::ArrayRef<double> scalars,
                          double weight_decay, const at::Tensor& eta, const at::Tensor& gscale,
                          const at::Tensor& tile_block, const at::Tensor& block_tiles,
                          int64_t tile,
                          const c10::optional<at::Tensor>& model_param = c10::nullopt,
                          bool precond = false);

// Move θ from θ0 - eta_old*d_old to θ0 - eta_new*d_new (states are only read). Blocks whose
// step size and direction are unchanged are not written. Returns the sums of d_new as above
// when compute_sums, else zeros.
at::Tensor move_cpu(int64_t rule, const at::Tensor& param, const at::Tensor& grad,
                    at::TensorList states, at::ArrayRef<double> scalars, double weight_decay,
                    const at::Tensor& eta_old, const at::Tensor& eta_new,
                    const at::Tensor& gscale, const at::Tensor& tile_block,
                    const at::Tensor& block_tiles, int64_t tile, bool precond_old,
                    bool precond_new, bool compute_sums,
                    const c10::optional<at::Tensor>& model_param = c10::nullopt);

// The same two passes with θ and g reached through a tile table (per tile: the address of its
// first θ and g element, int64, and its count of real elements, int32); states stay flat.
at::Tensor first_pass_table_cpu(int64_t rule, const at::Tensor& param_ptrs,
                                const at::Tensor& grad_ptrs, const at::Tensor& lengths,
                                at::TensorList states, at::ArrayRef<double> scalars,
                                double weight_decay, const at::Tensor& eta,
                                const at::Tensor& gscale, const at::Tensor& tile_block,
                                const at::Tensor& block_tiles, int64_t tile,
                                bool precond = false);
at::Tensor move_table_cpu(int64_t rule, const at::Tensor& param_ptrs, const at::Tensor& grad_ptrs,
                          const at::Tensor& lengths, at::TensorList states,
                          at::ArrayRef<double> scalars, double weight_decay,
                          const at::Tensor& eta_old, const at::Tensor& eta_new,
                          const at::Tensor& gscale, const at::Tensor& tile_block,
                          const at::Tensor& block_tiles, int64_t tile, bool precond_old,
                          bool precond_new, bool compute_sums);
// grad_sq_norm with g reached through a tile table: per-block Σ g² over each tile's real elements.
at::Tensor grad_sq_norm_table_cpu(const at::Tensor& grad_ptrs, const at::Tensor& lengths,
                                  const at::Tensor& tile_block, const at::Tensor& block_tiles,
                                  int64_t tile);

// Batched candidates: fp32 [K, numel] rows θ − etas[k]·d (d = u + wd·θ, or the fallback
// direction without wd when precond), from the state as the first pass left it; nothing written.
at::Tensor trial_points_cpu(int64_t rule, const at::Tensor& param, const at::Tensor& grad,
                            at::TensorList states, at::ArrayRef<double> scalars,
                            double weight_decay, const at::Tensor& etas,
                            const at::Tensor& gscale, int64_t tile, bool precond = false);

// Per-block Σ grad², fp32 [nblocks].
at::Tensor grad_sq_norm_cpu(const at::Tensor& grad, const at::Tensor& tile_block,
                            const at::Tensor& block_tiles, int64_t tile);

// The instruction set the CPU kernels run with: "avx2", "sse2", "neon" or "scalar". AVX2 is
// picked at run time where the CPU has it; ARMIJO_FUSED_SIMD=baseline in the environment keeps
// the build's baseline. Every choice gives bitwise the same results.
const char* cpu_simd();

// Choose the kernels: "auto", "baseline" or "avx2" (an error if unavailable). For tests and
// benchmarks; returns the instruction set now in use. Not thread-safe against running passes.
const char* set_cpu_simd(const std::string& name);

}  // namespace armijo_fused
