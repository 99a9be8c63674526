// Stage 3 of docs/design.md section 2: per (b, h, query block m) pick the forced blocks plus
// the k_m - f_m best non-forced candidates by descending A[b, group(h), m, n] (ties to the
// lower n), write counts int32 [B, Hq, nqb] and ascending indices int16 [B, Hq, nqb, nkb]
// padded with -1 (int16 suffices: nkb <= kSelectMaxBlocks = 32768, so every index is in
// [0, 32767]). Scores fp32 [B, G, nqb, nkb] and kstar int32 [B, Hq] are contiguous.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace proxyattn {

struct SelectBlocksParams {
  const float* scores;  // [B, G, nqb, nkb] contiguous
  const int* kstar;     // [B, Hq] contiguous
  int* counts;          // [B, Hq, nqb]
  int16_t* indices;     // [B, Hq, nqb, nkb], int16
  const int* cu_seqlens_q;  // nullptr for fixed length
  const int* cu_seqlens_k;
  int64_t total_q, total_k;  // rows of q / k when varlen (clamping), else max_seqlen
  int batch, num_heads, num_groups;
  int max_seqlen_q, max_seqlen_k;
  int nqb, nkb;
  int block_size;
  int sink_blocks, local_blocks, min_budget;
  // > 0: the budgets scale with the last query block of a sequence of this many queries and keys
  // (the call's rows are a chunk of it, fixed length); 0: with each sequence's own last query block.
  int budget_seqlen;
  bool causal;
};

// Largest nkb the kernel handles (the row of keys lives in shared memory; block indices
// must fit in int16).
constexpr int kSelectMaxBlocks = 32768;

// Warps of a select_blocks CTA: one per two heads of a proxy group, at most 8 (a warp takes its
// heads in turn). Heads with one budget share a row (select_blocks.cu), so a warp per head would
// leave one waiting for the other where two heads share it; small groups get small CTAs, so that
// more of them share an SM.
constexpr int kSelectMaxWarps = 8;
inline int select_blocks_warps(int heads_per_group) {
  const int w = (heads_per_group + 1) / 2;
  return w < 1 ? 1 : (w > kSelectMaxWarps ? kSelectMaxWarps : w);
}

// Shared memory of a CTA for rows of nkb key blocks: each warp's 256-entry digit histogram and a
// 32-bit key per candidate, at most select_blocks_smem_bytes(nkb) (eight warps): 139264 bytes at
// the 32768 blocks above, more than some GPUs give a block (the op checks the device's limit).
inline size_t select_blocks_smem_bytes(int nkb, int warps = kSelectMaxWarps) {
  return (static_cast<size_t>(warps) * 256 + static_cast<size_t>(nkb)) * sizeof(uint32_t);
}

cudaError_t run_select_blocks(const SelectBlocksParams& p, cudaStream_t stream);

}  // namespace proxyattn
