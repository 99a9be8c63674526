// Paged K/V, as serving engines keep them (docs/design.md section 3): k/v caches
// [num_pages, page_size, Hkv, D] with any page, slot and head strides; key t of sequence b sits in
// page page_table[b * table_stride + (t >> page_shift)], slot t & (page_size - 1). Sequence
// lengths come from cu_seqlens_k as for varlen (its starts are not used). Page numbers are clamped
// into [0, num_pages), so a bad table entry cannot address outside the cache. With page_table
// nullptr the keys are contiguous (fixed length or varlen) and nothing here is used.
// Shared by the estimation kernels, both attention kernels and the torch glue; no torch, no CuTe.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PROXYATTN_KV_HD __host__ __device__
#else
#define PROXYATTN_KV_HD
#endif

namespace proxyattn {

struct KvPages {
  const int* page_table = nullptr;  // int32 [batch, max_pages] (device)
  int64_t table_stride = 0;         // elements between the rows of page_table
  int num_pages = 0;                // pages in the cache
  int page_shift = 0;               // log2(page_size): page sizes are powers of two (16 to 256)
  int64_t k_page_stride = 0;        // elements between pages of the k cache
  int64_t v_page_stride = 0;        // and of the v cache (0 where a kernel reads no v)

  PROXYATTN_KV_HD bool paged() const { return page_table != nullptr; }
  PROXYATTN_KV_HD int page_size() const { return 1 << page_shift; }

  // Element offset of key t of sequence b from the cache's base, for a cache with this page
  // stride and slot (row) stride. Device only (reads the table).
#if defined(__CUDACC__)
  __device__ __forceinline__ int64_t offset(int b, int t, int64_t page_stride, int64_t row_stride) const {
    int page = page_table[b * table_stride + (t >> page_shift)];
    page = page < 0 ? 0 : page >= num_pages ? num_pages - 1 : page;
    return static_cast<int64_t>(page) * page_stride + static_cast<int64_t>(t & ((1 << page_shift) - 1)) * row_stride;
  }
#endif
};

}  // namespace proxyattn
