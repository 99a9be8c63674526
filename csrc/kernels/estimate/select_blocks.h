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
  bool causal;
};

// Largest nkb the kernel handles (the row of keys lives in shared memory; block indices
// must fit in int16).
constexpr int kSelectMaxBlocks = 32768;

// Shared memory of the kernel for rows of nkb key blocks: a 32-bit key per candidate (dynamic) and
// each of its 8 warps' 256-entry digit histograms (static, kSelectHistBytes): 139264 bytes at the
// 32768 blocks above, more than some GPUs give a block (the op checks the device's limit).
constexpr size_t kSelectHistBytes = 8 * 256 * sizeof(uint32_t);
inline size_t select_blocks_smem_bytes(int nkb) {
  return static_cast<size_t>(nkb) * sizeof(uint32_t) + kSelectHistBytes;
}

cudaError_t run_select_blocks(const SelectBlocksParams& p, cudaStream_t stream);

}  // namespace proxyattn
