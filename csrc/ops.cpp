// The schemas of the fused passes, declared once; each device registers its kernels in its own
// file (CPU: csrc/cpu/passes.cpp). Alias annotations say what each op writes, so torch.compile
// (functionalisation) and opcheck see the in-place updates: first_pass writes param and the
// states, move writes param only; both also write model_param (the model's bf16/fp16 copy of
// fp32 master weights) when given.
#include <torch/library.h>

TORCH_LIBRARY(armijo_fused, m) {
  m.def(
      "first_pass(int rule, Tensor(a!) param, Tensor grad, Tensor(b!)[] states, "
      "float[] scalars, float weight_decay, Tensor eta, Tensor gscale, Tensor tile_block, "
      "Tensor block_tiles, int tile, Tensor(c!)? model_param=None, bool precond=False) "
      "-> Tensor");
  m.def(
      "move(int rule, Tensor(a!) param, Tensor grad, Tensor[] states, float[] scalars, "
      "float weight_decay, Tensor eta_old, Tensor eta_new, Tensor gscale, Tensor tile_block, "
      "Tensor block_tiles, int tile, bool precond_old, bool precond_new, bool compute_sums, "
      "Tensor(c!)? model_param=None) -> Tensor");
  m.def("grad_sq_norm(Tensor grad, Tensor tile_block, Tensor block_tiles, int tile) -> Tensor");
  m.def(
      "trial_points(int rule, Tensor param, Tensor grad, Tensor[] states, float[] scalars, "
      "float weight_decay, Tensor etas, Tensor gscale, int tile, bool precond=False) -> Tensor");
  // Tile-table twins (θ and g reached through per-tile addresses: FSDP2 shards). They write θ
  // through those addresses, which no schema can name, so they are for eager use only.
  m.def(
      "first_pass_table(int rule, Tensor param_ptrs, Tensor grad_ptrs, Tensor lengths, "
      "Tensor(b!)[] states, float[] scalars, float weight_decay, Tensor eta, Tensor gscale, "
      "Tensor tile_block, Tensor block_tiles, int tile, bool precond=False) -> Tensor");
  m.def(
      "move_table(int rule, Tensor param_ptrs, Tensor grad_ptrs, Tensor lengths, Tensor[] states, "
      "float[] scalars, float weight_decay, Tensor eta_old, Tensor eta_new, Tensor gscale, "
      "Tensor tile_block, Tensor block_tiles, int tile, bool precond_old, bool precond_new, "
      "bool compute_sums) -> Tensor");
  m.def(
      "grad_sq_norm_table(Tensor grad_ptrs, Tensor lengths, Tensor tile_block, "
      "Tensor block_tiles, int tile) -> Tensor");
}
