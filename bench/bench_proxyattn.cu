// bench_proxyattn: standalone benchmark and self-check of the torch-free kernels (no torch, no
// Python). It fills the same params structs as the torch glue (csrc/ops/*.cpp) and calls the
// launchers of csrc/kernels/: proxy scores, head budgets, select blocks (docs/design.md section 2,
// stages 1-3, "estimate" = the three in a row) and block-sparse attention (stage 4).
//
// Layouts as in the extension: q [B, N, Hq, D], k/v [B, N, Hkv, D] contiguous (Nq = Nk = N,
// causal), scores fp32 [B, G, nqb, nkb], kstar int32 [B, Hq], counts int32 [B, Hq, nqb],
// indices [B, Hq, nqb, nkb] int16 from select_blocks (int32 for the random selection, so both
// index types of the attention kernel run), out like q, lse fp32 [B, Hq, N].
//
// Timing (as bench/benchlib.py time_cold): --warmup untimed runs, then --iters runs, each after a
// 256 MiB cudaMemsetAsync that evicts L2, bracketed by CUDA events; median and min reported.
// cudaProfilerStart/Stop enclose the timed loops and every timed run sits in an NVTX push/pop
// range named after its stage ("scores", "budgets", "select", "estimate", "bsa"), so Nsight
// Compute can pick them: ncu --nvtx --nvtx-include "bsa/" ... (see docs/kernels.md, Profiling).
// Inputs: N(0, 1) from a counter-based hash (never zeros). The bsa stage runs on a random causal
// selection that keeps the sink block and the diagonal block and the others with the probability
// that makes the expected density (computed / causal block pairs) equal --density (as
// bench/bench_bsa.py random_causal_selection); the measured density is printed. TFLOP/s counts
// computed pairs only: density * 4 * D * Hq * N^2 / 2 per batch item.
//
// --verify checks, on small N, the estimation stages against CPU reimplementations of docs/design.md
// section 2 (scores within 1e-4 relative, kstar exactly except heads whose cumulative mass lies
// within 1e-5 of gamma, the selection exactly given the kernel's scores/kstar), and the attention
// against a naive fp32 CUDA kernel over the same selection; exits 1 on a mismatch.
// --backend auto|portable|hopper picks the attention kernel (BsaBackend in
// kernels/common/bsa_launch.h; the torch op reads PROXYATTN_BSA_BACKEND instead); the kernel that
// runs is printed. portable also runs stages 1 and 2 on their mma.sync kernels (else the Hopper ones where they
// applies).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/common/bsa_launch.h"
#include "kernels/common/bsa_params.h"
#include "kernels/estimate/estimate_common.cuh"
#include "kernels/estimate/head_budgets.h"
#include "kernels/estimate/proxy_scores.h"
#include "kernels/estimate/select_blocks.h"

// Every CUDA call goes through this: on failure print the call, file:line and the error, exit 1.
#define PROXYATTN_BENCH_CHECK(expr)                                                                    \
  do {                                                                                                 \
    const cudaError_t err_ = (expr);                                                                   \
    if (err_ != cudaSuccess) {                                                                         \
      std::fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", __FILE__, __LINE__, #expr,                   \
                   cudaGetErrorName(err_), cudaGetErrorString(err_));                                  \
      std::exit(1);                                                                                    \
    }                                                                                                  \
  } while (0)

#define PROXYATTN_BENCH_LAUNCH_CHECK() PROXYATTN_BENCH_CHECK(cudaGetLastError())

namespace {

using proxyattn::BsaParams;
using proxyattn::HeadBudgetsParams;
using proxyattn::ProxyScoresParams;
using proxyattn::SelectBlocksParams;

constexpr size_t kFlushBytes = size_t(256) << 20;  // > L2 of H100/H200, as benchlib.l2_flush_buffer
constexpr int kMaxVerifySeqLen = 16384;
constexpr double kScoresRelTol = 1e-4;
constexpr double kScoresAbsTol = 1e-7;
constexpr double kNearGamma = 1e-5;

// ------------------------------------------------------------------------------------ options

struct Options {
  std::vector<int> seq_lens{32768};
  int batch = 1, q_heads = 32, kv_heads = 8, head_dim = 128, block_size = 128;
  std::vector<double> densities{0.1};
  std::string stage = "all";
  int proxy_heads = 0, stride = 4;  // 0: the library's default (ProxyAttnConfig: Hq/2 where valid, else Hq)
  double gamma = 0.97;
  int sink_blocks = 1, local_blocks = 1, min_budget = 2048;
  int iters = 10, warmup = 3;
  bool bf16 = true;
  bool verify = false;
  proxyattn::BsaBackend backend = proxyattn::BsaBackend::kAuto;
  bool seq_lens_given = false;
  uint64_t seed = 0;
};

void print_help() {
  std::printf(
      "bench_proxyattn: time the proxyattn kernels without torch (docs/design.md sections 2 and 6).\n\n"
      "  --seq-len N[,N...]     sequence lengths (also space-separated); default 32768 (1000,4096 with --verify)\n"
      "  --batch B              batch size (fixed length), default 1\n"
      "  --q-heads H            query heads, default 32\n"
      "  --kv-heads H           KV heads, default 8\n"
      "  --head-dim 64|128      default 128\n"
      "  --block-size 64|128    default 128\n"
      "  --density R[,R...]     bsa: target density of the random causal selection (sink + diagonal\n"
      "                         always kept), default 0.1\n"
      "  --stage S              scores|budgets|select|estimate|bsa|all (default all)\n"
      "  --proxy-heads G        proxy groups of the scores stage; default as ProxyAttnConfig: Hq/2\n"
      "                         where the grouping rule allows, else Hq (16 at 32/8 heads; 0: that default)\n"
      "  --stride s             proxy stride, default 4\n"
      "  --gamma g              budget mass, default 0.97\n"
      "  --sink-blocks n, --local-blocks n, --min-budget tokens   defaults 1, 1, 2048\n"
      "  --iters n              timed runs (median), default 10\n"
      "  --warmup n             untimed runs first, default 3\n"
      "  --dtype bf16|fp16      default bf16\n"
      "  --backend B            attention kernel: auto (Hopper where it runs, else portable; default),\n"
      "                         portable (sm80 kernels, stages 1 and 2 too), hopper (Hopper kernel or an error)\n"
      "  --seed n               input seed, default 0\n"
      "  --verify               check every stage against simple references on the given (small,\n"
      "                         N <= %d) cases instead of timing; exit 1 on a mismatch\n"
      "  --help\n\n"
      "Examples:\n"
      "  bench_proxyattn --stage bsa --seq-len 32768,131072 --density 1.0,0.3,0.1\n"
      "  bench_proxyattn --stage estimate --seq-len 131072 --proxy-heads 8\n"
      "  bench_proxyattn --verify --seq-len 1000,4096 --q-heads 8 --kv-heads 2 --head-dim 64\n",
      kMaxVerifySeqLen);
}

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "bench_proxyattn: %s (see --help)\n", msg.c_str());
  std::exit(2);
}

long long parse_int(const std::string& s, const char* flag) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0) usage_error(std::string(flag) + " expects an integer, got '" + s + "'");
  return v;
}

double parse_double(const std::string& s, const char* flag) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || errno != 0 || !std::isfinite(v))
    usage_error(std::string(flag) + " expects a number, got '" + s + "'");
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  size_t i = 0;
  auto value = [&](const std::string& flag) -> std::string {
    if (i + 1 >= args.size()) usage_error(flag + " needs a value");
    return args[++i];
  };
  // Values of a list flag: comma-separated, and/or the following arguments up to the next flag.
  auto list = [&](const std::string& flag) {
    std::vector<std::string> out;
    if (i + 1 >= args.size()) usage_error(flag + " needs a value");
    while (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) {
      std::string v = args[++i];
      size_t start = 0;
      while (start <= v.size()) {
        const size_t comma = v.find(',', start);
        const std::string item = v.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        if (!item.empty()) out.push_back(item);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    }
    if (out.empty()) usage_error(flag + " needs a value");
    return out;
  };
  for (; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      print_help();
      std::exit(0);
    } else if (a == "--seq-len" || a == "--seq-lens") {
      o.seq_lens.clear();
      for (const auto& s : list(a)) o.seq_lens.push_back(static_cast<int>(parse_int(s, "--seq-len")));
      o.seq_lens_given = true;
    } else if (a == "--density" || a == "--densities") {
      o.densities.clear();
      for (const auto& s : list(a)) o.densities.push_back(parse_double(s, "--density"));
    } else if (a == "--batch") {
      o.batch = static_cast<int>(parse_int(value(a), "--batch"));
    } else if (a == "--q-heads") {
      o.q_heads = static_cast<int>(parse_int(value(a), "--q-heads"));
    } else if (a == "--kv-heads") {
      o.kv_heads = static_cast<int>(parse_int(value(a), "--kv-heads"));
    } else if (a == "--head-dim") {
      o.head_dim = static_cast<int>(parse_int(value(a), "--head-dim"));
    } else if (a == "--block-size") {
      o.block_size = static_cast<int>(parse_int(value(a), "--block-size"));
    } else if (a == "--stage") {
      o.stage = value(a);
    } else if (a == "--proxy-heads") {
      o.proxy_heads = static_cast<int>(parse_int(value(a), "--proxy-heads"));
    } else if (a == "--stride") {
      o.stride = static_cast<int>(parse_int(value(a), "--stride"));
    } else if (a == "--gamma") {
      o.gamma = parse_double(value(a), "--gamma");
    } else if (a == "--sink-blocks") {
      o.sink_blocks = static_cast<int>(parse_int(value(a), "--sink-blocks"));
    } else if (a == "--local-blocks") {
      o.local_blocks = static_cast<int>(parse_int(value(a), "--local-blocks"));
    } else if (a == "--min-budget") {
      o.min_budget = static_cast<int>(parse_int(value(a), "--min-budget"));
    } else if (a == "--iters") {
      o.iters = static_cast<int>(parse_int(value(a), "--iters"));
    } else if (a == "--warmup") {
      o.warmup = static_cast<int>(parse_int(value(a), "--warmup"));
    } else if (a == "--seed") {
      o.seed = static_cast<uint64_t>(parse_int(value(a), "--seed"));
    } else if (a == "--dtype") {
      const std::string d = value(a);
      if (d == "bf16" || d == "bfloat16") o.bf16 = true;
      else if (d == "fp16" || d == "float16") o.bf16 = false;
      else usage_error("--dtype must be bf16 or fp16, got '" + d + "'");
    } else if (a == "--verify") {
      o.verify = true;
    } else if (a == "--backend") {
      const std::string b = value(a);
      if (!proxyattn::bsa_backend_parse(b.c_str(), &o.backend) || b.empty())
        usage_error(std::string("--backend must be one of ") + proxyattn::kBsaBackendNames + ", got '" + b + "'");
    } else {
      usage_error("unknown option '" + a + "'");
    }
  }
  if (o.verify && !o.seq_lens_given) o.seq_lens = {1000, 4096};
  const std::vector<std::string> stages{"scores", "budgets", "select", "estimate", "bsa", "all"};
  if (std::find(stages.begin(), stages.end(), o.stage) == stages.end())
    usage_error("--stage must be scores|budgets|select|estimate|bsa|all, got '" + o.stage + "'");
  if (o.head_dim != 64 && o.head_dim != 128) usage_error("--head-dim must be 64 or 128");
  if (o.block_size != 64 && o.block_size != 128) usage_error("--block-size must be 64 or 128");
  if (o.batch < 1 || o.q_heads < 1 || o.kv_heads < 1 || o.q_heads % o.kv_heads != 0)
    usage_error("need batch >= 1 and q-heads a positive multiple of kv-heads");
  // docs/design.md section 2's rule (proxyattn.config.proxy_grouping_ok): G divides Hkv, or Hkv divides
  // G and G divides Hq.
  auto grouping_ok = [&](int G) {
    return G >= 1 && (G <= o.kv_heads ? o.kv_heads % G == 0 : (G % o.kv_heads == 0 && o.q_heads % G == 0));
  };
  if (o.proxy_heads == 0)  // proxyattn.config.default_proxy_heads
    o.proxy_heads = o.q_heads % 2 == 0 && grouping_ok(o.q_heads / 2) ? o.q_heads / 2 : o.q_heads;
  if (!grouping_ok(o.proxy_heads))
    usage_error("--proxy-heads must divide --kv-heads (" + std::to_string(o.kv_heads) +
                "), or be a multiple of it that divides --q-heads (" + std::to_string(o.q_heads) + "), got " +
                std::to_string(o.proxy_heads));
  if (o.stride < 1 || o.stride > 16)
    usage_error("--stride must be in 1..16 (the config's range), got " + std::to_string(o.stride));
  if (!(o.gamma > 0.0 && o.gamma <= 1.0)) usage_error("--gamma must be in (0, 1]");
  if (o.sink_blocks < 0 || o.local_blocks < 0 || o.min_budget < 0) usage_error("negative block counts");
  if (o.iters < 1 || o.warmup < 0) usage_error("--iters must be >= 1 and --warmup >= 0");
  for (int n : o.seq_lens)
    if (n < 1) usage_error("--seq-len values must be >= 1");
  for (double d : o.densities)
    if (!(d > 0.0 && d <= 1.0)) usage_error("--density values must be in (0, 1]");
  if (o.verify)
    for (int n : o.seq_lens)
      if (n > kMaxVerifySeqLen)
        usage_error("--verify runs CPU references: --seq-len must be <= " + std::to_string(kMaxVerifySeqLen));
  return o;
}

__host__ __device__ inline int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// ----------------------------------------------------------------------------- device helpers

__host__ __device__ inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__device__ inline float uniform01(uint64_t bits) {  // (0, 1]
  return (static_cast<float>(bits >> 40) + 1.0f) * (1.0f / 16777216.0f);
}

template <typename T>
__device__ inline T from_float(float x);
template <>
__device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// x[i] = N(0, 1) * scale_of_head, the head being (i / head_dim) % heads (scale 1 without temps).
template <typename T>
__global__ void fill_normal_kernel(T* x, int64_t n, uint64_t seed, int head_dim, int heads, const float* temps) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed ^ mix64(static_cast<uint64_t>(i)));
    const float u1 = uniform01(r), u2 = uniform01(mix64(r));
    float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    if (temps != nullptr) z *= temps[(i / head_dim) % heads];
    x[i] = from_float<T>(z);
  }
}

// Random causal selection (Nq = Nk = n): one warp per (b, h, m) row; block j of the c_m = m + 1
// candidates is kept if it is the sink (0), the diagonal (c_m - 1), or hash < keep_prob.
// Ascending, -1 padded; the total count goes to *total.
__global__ void random_selection_kernel(int* counts, int* indices, int rows, int nqb, int nkb, float keep_prob,
                                        uint64_t seed, unsigned long long* total) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (warp >= rows) return;
  const int m = warp % nqb;
  const int c = m + 1;
  int* row = indices + static_cast<int64_t>(warp) * nkb;
  int count = 0;
  for (int n0 = 0; n0 < c; n0 += 32) {  // warp-uniform bound; the padding loop below fills the rest
    const int n = n0 + lane;
    bool keep = false;
    if (n < c) {
      const uint64_t r = mix64(seed ^ mix64((static_cast<uint64_t>(warp) << 32) | static_cast<uint32_t>(n)));
      keep = n == 0 || n == c - 1 || uniform01(r) <= keep_prob;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (keep) row[count + __popc(ballot & ((1u << lane) - 1u))] = n;
    count += __popc(ballot);
  }
  for (int n = count + lane; n < nkb; n += 32) row[n] = -1;
  if (lane == 0) {
    counts[warp] = count;
    atomicAdd(total, static_cast<unsigned long long>(count));
  }
}

// Naive attention over a selection, fp32, one thread per (b, h, row), two passes. Writes the fp32
// truth and the "same math at input precision" baseline (P rounded to T before P.V, output
// rounded to T), as tests/test_bsa_gpu.py does; lse natural log, -inf when the row sees no key.
template <typename T>
__global__ void naive_bsa_kernel(BsaParams p, float* truth, float* lowp, float* lse) {
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t total = int64_t(p.batch) * p.q_heads * p.seqlen_q;
  if (tid >= total) return;
  const int i = static_cast<int>(tid % p.seqlen_q);
  const int h = static_cast<int>((tid / p.seqlen_q) % p.q_heads);
  const int b = static_cast<int>(tid / (int64_t(p.seqlen_q) * p.q_heads));
  const int kvh = h / (p.q_heads / p.kv_heads);
  const int D = p.head_dim, S = p.block_size, m = i / S;
  const int nkb_seq = cdiv(p.seqlen_k, S);
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride;
  const int cnt = p.counts[b * p.counts_batch_stride + h * p.counts_head_stride + m * p.counts_block_stride];
  const int64_t idx_off = b * p.indices_batch_stride + h * p.indices_head_stride + m * p.indices_block_stride;
  auto index_at = [&](int e) {  // int16 or int32 selection, whichever pointer is set
    const int64_t o = idx_off + int64_t(e) * p.indices_entry_stride;
    return p.indices16 != nullptr ? static_cast<int>(p.indices16[o]) : p.indices[o];
  };
  const int last_key = p.causal ? p.seqlen_k - p.seqlen_q + i : p.seqlen_k - 1;
  float qf[128];
  for (int d = 0; d < D; ++d) qf[d] = to_float(q[d]);
  auto logit = [&](int j) {
    const T* kr = kb + int64_t(j) * p.k_row_stride;
    float s = 0.f;
    for (int d = 0; d < D; ++d) s += qf[d] * to_float(kr[d]);
    return s * p.softmax_scale;
  };
  // The row's blocks as a set (docs/design.md section 2, stage 4): entry e counts unless an earlier
  // entry holds the same value.
  auto taken = [&](int e) {
    const int n = index_at(e);
    if (n < 0 || n >= nkb_seq) return false;
    for (int e2 = 0; e2 < e; ++e2)
      if (index_at(e2) == n) return false;
    return true;
  };
  float mx = -INFINITY;
  for (int e = 0; e < min(cnt, p.num_k_blocks); ++e) {
    if (!taken(e)) continue;
    const int n = index_at(e);
    for (int j = n * S; j < min((n + 1) * S, p.seqlen_k) && j <= last_key; ++j) mx = fmaxf(mx, logit(j));
  }
  float acc[128], acc_low[128];
  for (int d = 0; d < D; ++d) acc[d] = acc_low[d] = 0.f;
  float l = 0.f;
  if (mx > -INFINITY) {
    for (int e = 0; e < min(cnt, p.num_k_blocks); ++e) {
      if (!taken(e)) continue;
      const int n = index_at(e);
      for (int j = n * S; j < min((n + 1) * S, p.seqlen_k) && j <= last_key; ++j) {
        const float pr = expf(logit(j) - mx);
        const float pr_low = to_float(from_float<T>(pr));
        const T* vr = vb + int64_t(j) * p.v_row_stride;
        l += pr;
        for (int d = 0; d < D; ++d) {
          const float vv = to_float(vr[d]);
          acc[d] += pr * vv;
          acc_low[d] += pr_low * vv;
        }
      }
    }
  }
  const int64_t o = ((int64_t(b) * p.seqlen_q + i) * p.q_heads + h) * D;  // contiguous [B, N, Hq, D]
  for (int d = 0; d < D; ++d) {
    truth[o + d] = l > 0.f ? acc[d] / l : 0.f;
    lowp[o + d] = l > 0.f ? to_float(from_float<T>(acc_low[d] / l)) : 0.f;
  }
  lse[(int64_t(b) * p.q_heads + h) * p.seqlen_q + i] = l > 0.f ? mx + logf(l) : -INFINITY;
}

template <typename T>
__global__ void to_float_kernel(const T* x, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = to_float(x[i]);
}

int grid_for(int64_t n, int threads = 256) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535LL * 8));
}

// --------------------------------------------------------------------------- device buffers

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : count(n) {
    PROXYATTN_BENCH_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(T)));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr(other.ptr), count(other.count) { other.ptr = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(ptr, other.ptr);
    std::swap(count, other.count);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);  // teardown: nothing left to report to
  }
  size_t bytes() const { return count * sizeof(T); }
  std::vector<T> to_host() const {
    std::vector<T> h(count);
    PROXYATTN_BENCH_CHECK(cudaMemcpy(h.data(), ptr, bytes(), cudaMemcpyDeviceToHost));
    return h;
  }
};

// ----------------------------------------------------------------------------- one problem

// One problem shape with its inputs, outputs and the params structs of every stage.
struct Problem {
  const Options& o;
  int n, nqb, nkb;
  int64_t q_elems, kv_elems;
  DeviceBuffer<uint16_t> q, k, v, out;  // fp16 / bf16 bits
  DeviceBuffer<float> lse, scores, budget_ws;
  DeviceBuffer<char> scores_ws;
  DeviceBuffer<int> kstar, counts;
  DeviceBuffer<int16_t> indices;  // select_blocks' output
  DeviceBuffer<int> rand_counts, rand_indices;
  DeviceBuffer<int> tile_counter;  // the Hopper kernel's work counter (BsaParams::tile_counter)
  ProxyScoresParams sp{};
  HeadBudgetsParams hp{};
  SelectBlocksParams selp{};
  BsaParams bp{};
  proxyattn::BsaPlan plan;  // the attention kernel of every bsa run (bsa_plan of bp and --backend)

  Problem(const Options& opt, int seq_len)
      : o(opt),
        n(seq_len),
        nqb(cdiv(seq_len, opt.block_size)),
        nkb(cdiv(seq_len, opt.block_size)),
        q_elems(int64_t(opt.batch) * seq_len * opt.q_heads * opt.head_dim),
        kv_elems(int64_t(opt.batch) * seq_len * opt.kv_heads * opt.head_dim),
        q(q_elems),
        k(kv_elems),
        v(kv_elems),
        out(q_elems),
        lse(size_t(opt.batch) * opt.q_heads * seq_len),
        scores(size_t(opt.batch) * opt.proxy_heads * nqb * nkb),
        kstar(size_t(opt.batch) * opt.q_heads),
        counts(size_t(opt.batch) * opt.q_heads * nqb),
        indices(size_t(opt.batch) * opt.q_heads * nqb * nkb),
        rand_counts(size_t(opt.batch) * opt.q_heads * nqb),
        rand_indices(size_t(opt.batch) * opt.q_heads * nqb * nkb),
        tile_counter(1) {
    const int B = o.batch, Hq = o.q_heads, Hkv = o.kv_heads, D = o.head_dim, S = o.block_size;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const int64_t q_row = int64_t(Hq) * D, k_row = int64_t(Hkv) * D;

    sp.q = q.ptr;
    sp.k = k.ptr;
    sp.q_batch_stride = q_row * n;
    sp.q_row_stride = q_row;
    sp.q_head_stride = D;
    sp.k_batch_stride = k_row * n;
    sp.k_row_stride = k_row;
    sp.k_head_stride = D;
    sp.cu_seqlens_q = sp.cu_seqlens_k = nullptr;
    sp.total_q = sp.total_k = n;
    sp.batch = B;
    sp.num_heads = Hq;
    sp.num_kv_heads = Hkv;
    sp.num_groups = o.proxy_heads;
    sp.head_dim = D;
    sp.max_seqlen_q = sp.max_seqlen_k = n;
    sp.nqb = nqb;
    sp.nkb = nkb;
    sp.block_size = S;
    sp.stride = o.stride;
    sp.softmax_scale = scale;
    sp.causal = true;
    sp.portable = o.backend == proxyattn::BsaBackend::kPortable;  // stage 1 follows --backend portable
    sp.scores = scores.ptr;
    const int64_t ws_bytes = proxyattn::proxy_scores_workspace_bytes(sp);
    if (ws_bytes < 0) {
      std::fprintf(stderr, "proxy_scores_workspace_bytes failed (occupancy query)\n");
      std::exit(1);
    }
    scores_ws = DeviceBuffer<char>(static_cast<size_t>(std::max<int64_t>(ws_bytes, 16)));
    sp.workspace = scores_ws.ptr;

    static_cast<proxyattn::EstimateInputs&>(hp) = sp;  // the same q, k and sequences as stage 1
    hp.nkb = nkb;
    hp.block_size = S;
    hp.gamma = static_cast<float>(o.gamma);
    hp.sink_blocks = o.sink_blocks;
    hp.local_blocks = o.local_blocks;
    hp.softmax_scale = scale;
    hp.causal = true;
    hp.portable = o.backend == proxyattn::BsaBackend::kPortable;  // stage 2 follows --backend portable
    hp.kstar = kstar.ptr;
    budget_ws = DeviceBuffer<float>(static_cast<size_t>(
        std::max<int64_t>(proxyattn::head_budgets_workspace_floats(B, Hq, n, nkb), 4)));
    hp.workspace = budget_ws.ptr;

    selp.scores = scores.ptr;
    selp.kstar = kstar.ptr;
    selp.counts = counts.ptr;
    selp.indices = indices.ptr;
    selp.cu_seqlens_q = selp.cu_seqlens_k = nullptr;
    selp.total_q = selp.total_k = n;
    selp.batch = B;
    selp.num_heads = Hq;
    selp.num_groups = o.proxy_heads;
    selp.max_seqlen_q = selp.max_seqlen_k = n;
    selp.nqb = nqb;
    selp.nkb = nkb;
    selp.block_size = S;
    selp.sink_blocks = o.sink_blocks;
    selp.local_blocks = o.local_blocks;
    selp.min_budget = o.min_budget;
    selp.causal = true;

    bp.q = q.ptr;
    bp.k = k.ptr;
    bp.v = v.ptr;
    bp.out = out.ptr;
    bp.lse = lse.ptr;
    bp.q_batch_stride = sp.q_batch_stride;
    bp.q_row_stride = q_row;
    bp.q_head_stride = D;
    bp.k_batch_stride = bp.v_batch_stride = sp.k_batch_stride;
    bp.k_row_stride = bp.v_row_stride = k_row;
    bp.k_head_stride = bp.v_head_stride = D;
    bp.out_batch_stride = sp.q_batch_stride;
    bp.out_row_stride = q_row;
    bp.out_head_stride = D;
    bp.lse_batch_stride = int64_t(Hq) * n;
    bp.lse_head_stride = n;
    bp.total_q = bp.total_k = n;
    bp.counts_batch_stride = int64_t(Hq) * nqb;
    bp.counts_head_stride = nqb;
    bp.counts_block_stride = 1;
    bp.indices_batch_stride = int64_t(Hq) * nqb * nkb;
    bp.indices_head_stride = int64_t(nqb) * nkb;
    bp.indices_block_stride = nkb;
    bp.indices_entry_stride = 1;
    bp.batch = B;
    bp.q_heads = Hq;
    bp.kv_heads = Hkv;
    bp.head_dim = D;
    bp.seqlen_q = bp.seqlen_k = n;
    bp.block_size = S;
    bp.num_q_blocks = nqb;
    bp.num_k_blocks = nkb;
    bp.softmax_scale = scale;
    bp.softmax_scale_log2 = scale * 1.4426950408889634f;
    bp.causal = true;
    use_selection(rand_counts.ptr, rand_indices.ptr);
    // Decided once: the selection pointers, the only fields that change later, do not enter it.
    plan = proxyattn::bsa_plan(bp, o.backend);
    if (!plan.error.empty() && (o.verify || o.stage == "bsa" || o.stage == "all")) {
      std::fprintf(stderr, "block_sparse_attention%s: %s\n", plan.refused ? " (--backend hopper)" : "",
                   plan.error.c_str());
      std::exit(1);
    }
    bp.tile_counter = tile_counter.ptr;
  }

  const char* kernel_name() const { return plan.path == proxyattn::BsaPath::kHopper ? "hopper" : "portable"; }

  void use_selection(const int* c, const int* idx) {
    bp.counts = c;
    bp.indices = idx;
    bp.indices16 = nullptr;
  }
  void use_selection(const int* c, const int16_t* idx) {
    bp.counts = c;
    bp.indices = nullptr;
    bp.indices16 = idx;
  }

  // Fresh N(0, 1) inputs; temps (device, [Hq], optional) scales each query head.
  void fill_inputs(uint64_t seed, const float* temps) {
    auto fill = [&](uint16_t* ptr, int64_t count, uint64_t s, int heads, const float* t) {
      if (o.bf16)
        fill_normal_kernel<<<grid_for(count), 256>>>(reinterpret_cast<__nv_bfloat16*>(ptr), count, s, o.head_dim,
                                                     heads, t);
      else
        fill_normal_kernel<<<grid_for(count), 256>>>(reinterpret_cast<__half*>(ptr), count, s, o.head_dim, heads, t);
      PROXYATTN_BENCH_LAUNCH_CHECK();
    };
    fill(q.ptr, q_elems, mix64(seed * 3 + 1), o.q_heads, temps);
    fill(k.ptr, kv_elems, mix64(seed * 3 + 2), o.kv_heads, nullptr);
    fill(v.ptr, kv_elems, mix64(seed * 3 + 3), o.kv_heads, nullptr);
    PROXYATTN_BENCH_CHECK(cudaDeviceSynchronize());
  }

  // Random causal selection of expected density `density` into rand_counts / rand_indices;
  // returns the measured density (computed / causal block pairs).
  double make_random_selection(double density, uint64_t seed) {
    int64_t total = 0, forced = 0;
    for (int m = 0; m < nqb; ++m) {
      const int c = m + 1;  // Nq == Nk
      total += c;
      forced += c >= 2 ? 2 : 1;
    }
    const double p = density >= 1.0 ? 1.0
                                     : std::max(0.0, (density * total - forced) / std::max<double>(1.0, total - forced));
    DeviceBuffer<unsigned long long> sum(1);
    PROXYATTN_BENCH_CHECK(cudaMemset(sum.ptr, 0, sum.bytes()));
    const int rows = o.batch * o.q_heads * nqb;
    const int threads = 256;
    random_selection_kernel<<<cdiv(int64_t(rows) * 32, threads), threads>>>(
        rand_counts.ptr, rand_indices.ptr, rows, nqb, nkb, p >= 1.0 ? 2.0f : static_cast<float>(p), seed, sum.ptr);
    PROXYATTN_BENCH_LAUNCH_CHECK();
    const auto h = sum.to_host();
    return static_cast<double>(h[0]) / (static_cast<double>(o.batch) * o.q_heads * total);
  }

  double selection_density() const {  // of counts (from select_blocks)
    const auto c = counts.to_host();
    const double sum = std::accumulate(c.begin(), c.end(), 0.0);
    const double total = static_cast<double>(nqb) * (nqb + 1) / 2;
    return sum / (static_cast<double>(o.batch) * o.q_heads * total);
  }

  void run_scores(cudaStream_t st) {
    PROXYATTN_BENCH_CHECK(o.bf16 ? proxyattn::run_proxy_scores<__nv_bfloat16>(sp, st)
                                 : proxyattn::run_proxy_scores<__half>(sp, st));
  }
  void run_budgets(cudaStream_t st) {
    PROXYATTN_BENCH_CHECK(o.bf16 ? proxyattn::run_head_budgets<__nv_bfloat16>(hp, st)
                                 : proxyattn::run_head_budgets<__half>(hp, st));
  }
  void run_select(cudaStream_t st) { PROXYATTN_BENCH_CHECK(proxyattn::run_select_blocks(selp, st)); }
  void run_bsa(cudaStream_t st) {
    if (plan.path == proxyattn::BsaPath::kHopper)  // zero at every launch, as the torch op does
      PROXYATTN_BENCH_CHECK(cudaMemsetAsync(tile_counter.ptr, 0, sizeof(int), st));
    PROXYATTN_BENCH_CHECK(proxyattn::run_bsa_fwd(bp, o.bf16, plan, st));
  }
};

// --------------------------------------------------------------------------------- timing

struct Timing {
  double median_ms, min_ms;
};

template <typename Fn>
Timing time_cold(const char* range, const Options& o, void* flush, cudaStream_t st, Fn&& fn) {
  for (int i = 0; i < o.warmup; ++i) fn(st);
  PROXYATTN_BENCH_CHECK(cudaStreamSynchronize(st));
  cudaEvent_t start, stop;
  PROXYATTN_BENCH_CHECK(cudaEventCreate(&start));
  PROXYATTN_BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms(o.iters);
  PROXYATTN_BENCH_CHECK(cudaProfilerStart());
  for (int i = 0; i < o.iters; ++i) {
    PROXYATTN_BENCH_CHECK(cudaMemsetAsync(flush, 0, kFlushBytes, st));  // evict L2
    PROXYATTN_BENCH_CHECK(cudaEventRecord(start, st));
    nvtxRangePushA(range);
    fn(st);
    nvtxRangePop();
    PROXYATTN_BENCH_CHECK(cudaEventRecord(stop, st));
    PROXYATTN_BENCH_CHECK(cudaEventSynchronize(stop));
    PROXYATTN_BENCH_CHECK(cudaEventElapsedTime(&ms[i], start, stop));
  }
  PROXYATTN_BENCH_CHECK(cudaProfilerStop());
  PROXYATTN_BENCH_CHECK(cudaEventDestroy(start));
  PROXYATTN_BENCH_CHECK(cudaEventDestroy(stop));
  std::vector<float> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  const size_t k = sorted.size();
  const double median = k % 2 ? sorted[k / 2] : 0.5 * (double(sorted[k / 2 - 1]) + sorted[k / 2]);  // statistics.median
  return {median, sorted.front()};
}

void print_header() {
  std::printf("%-9s %8s %3s %4s %4s %4s %5s %3s %8s %11s %11s %9s\n", "stage", "N", "B", "Hq", "Hkv", "D", "dtype",
              "G", "density", "median_ms", "min_ms", "TFLOP/s");
}

void print_row(const Options& o, const char* stage, int n, bool with_g, double density, Timing t, double flops) {
  char dens[16], tf[16], g[8];
  if (density >= 0) std::snprintf(dens, sizeof dens, "%.4f", density);
  else std::snprintf(dens, sizeof dens, "-");
  if (flops > 0) std::snprintf(tf, sizeof tf, "%.1f", flops / (t.median_ms * 1e-3) / 1e12);
  else std::snprintf(tf, sizeof tf, "-");
  if (with_g) std::snprintf(g, sizeof g, "%d", o.proxy_heads);
  else std::snprintf(g, sizeof g, "-");
  std::printf("%-9s %8d %3d %4d %4d %4d %5s %3s %8s %11.3f %11.3f %9s\n", stage, n, o.batch, o.q_heads, o.kv_heads,
              o.head_dim, o.bf16 ? "bf16" : "fp16", g, dens, t.median_ms, t.min_ms, tf);
  std::fflush(stdout);
}

bool wants(const Options& o, const char* stage) { return o.stage == "all" || o.stage == stage; }

void benchmark(const Options& o) {
  cudaStream_t st;
  PROXYATTN_BENCH_CHECK(cudaStreamCreate(&st));
  DeviceBuffer<char> flush(kFlushBytes);
  print_header();
  for (int n : o.seq_lens) {
    Problem pb(o, n);
    pb.fill_inputs(o.seed + n, nullptr);
    const bool est = wants(o, "scores") || wants(o, "budgets") || wants(o, "select") || wants(o, "estimate");
    double sel_density = -1;
    if (est) {  // select needs scores and kstar; run each once before timing
      pb.run_scores(st);
      pb.run_budgets(st);
      pb.run_select(st);
      PROXYATTN_BENCH_CHECK(cudaStreamSynchronize(st));
      sel_density = pb.selection_density();
    }
    if (wants(o, "scores"))
      print_row(o, "scores", n, true, -1, time_cold("scores", o, flush.ptr, st, [&](cudaStream_t s) { pb.run_scores(s); }), 0);
    if (wants(o, "budgets"))
      print_row(o, "budgets", n, false, -1,
                time_cold("budgets", o, flush.ptr, st, [&](cudaStream_t s) { pb.run_budgets(s); }), 0);
    if (wants(o, "select"))
      print_row(o, "select", n, true, sel_density,
                time_cold("select", o, flush.ptr, st, [&](cudaStream_t s) { pb.run_select(s); }), 0);
    if (wants(o, "estimate"))
      print_row(o, "estimate", n, true, sel_density, time_cold("estimate", o, flush.ptr, st, [&](cudaStream_t s) {
                  pb.run_scores(s);
                  pb.run_budgets(s);
                  pb.run_select(s);
                }),
                0);
    if (wants(o, "bsa")) {
      std::printf("# bsa N=%d: %s kernel\n", n, pb.kernel_name());
      for (double target : o.densities) {
        const double density = pb.make_random_selection(target, mix64(o.seed ^ (uint64_t(n) << 20)) + uint64_t(target * 1e6));
        const double flops = density * 4.0 * o.head_dim * o.q_heads * double(n) * n / 2 * o.batch;
        print_row(o, "bsa", n, false, density,
                  time_cold("bsa", o, flush.ptr, st, [&](cudaStream_t s) { pb.run_bsa(s); }), flops);
      }
    }
  }
  PROXYATTN_BENCH_CHECK(cudaStreamDestroy(st));
}

// ------------------------------------------------------------------------- CPU references

// bf16 / fp16 bits to float on the host.
float bits_to_float(uint16_t b, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  const uint32_t sign = (b >> 15) & 1, exp = (b >> 10) & 31, man = b & 1023;
  float f;
  if (exp == 0) f = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31) f = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else f = std::ldexp(static_cast<float>(man | 1024), int(exp) - 25);
  return sign ? -f : f;
}

std::vector<float> host_floats(const DeviceBuffer<uint16_t>& x, bool bf16) {
  const auto bits = x.to_host();
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = bits_to_float(bits[i], bf16);
  return out;
}

// The candidate and forced-block rules of the kernels (kernels/estimate/estimate_common.cuh),
// causal: the binary's queries and keys have one length, n.
int candidate_count(int m, int n, int S) { return proxyattn::candidate_count(m, n, n, S, true); }
proxyattn::ForcedSplit forced_split(const Options& o, int m, int n) {
  const int S = o.block_size;
  return proxyattn::split_forced(m, n, n, S, candidate_count(m, n, S), o.sink_blocks, o.local_blocks, true);
}
bool is_forced(int x, int c, const proxyattn::ForcedSplit& f) { return x < c && (x < f.free_lo || x >= f.free_hi); }

// Stage 1 (docs/design.md section 2) in double on the 16-bit pooled vectors: [B, G, nqb, nkb].
std::vector<double> cpu_scores(const Options& o, int n, const std::vector<float>& q, const std::vector<float>& k) {
  const int B = o.batch, Hq = o.q_heads, Hkv = o.kv_heads, D = o.head_dim, S = o.block_size, G = o.proxy_heads;
  const int s = o.stride, nqb = cdiv(n, S), nkb = cdiv(n, S);
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> A(size_t(B) * G * nqb * nkb, 0.0);
  const int kept = (n + s - 1) / s;
  std::vector<double> qbar(size_t(kept) * D), kbar(size_t(kept) * D), logits(kept);
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < G; ++g) {
      const int qh0 = g * (Hq / G), qh1 = (g + 1) * (Hq / G);
      int kh0, kh1;
      if (G <= Hkv) {
        kh0 = g * (Hkv / G);
        kh1 = (g + 1) * (Hkv / G);
      } else {
        kh0 = g / (G / Hkv);
        kh1 = kh0 + 1;
      }
      // fp32 means in head order, rounded to fp16, or to bf16 for the whole group where a mean
      // overflows fp16 (docs/design.md section 2; reference.group_pool).
      std::vector<float> qf(size_t(kept) * D), kf(size_t(kept) * D);
      bool over = false;
      for (int r = 0; r < kept; ++r)
        for (int d = 0; d < D; ++d) {
          const int64_t row = int64_t(b) * n + int64_t(r) * s;
          float sq = 0.f, sk = 0.f;
          for (int h = qh0; h < qh1; ++h) sq += q[(row * Hq + h) * D + d];
          for (int h = kh0; h < kh1; ++h) sk += k[(row * Hkv + h) * D + d];
          qf[size_t(r) * D + d] = sq / float(qh1 - qh0);
          kf[size_t(r) * D + d] = sk / float(kh1 - kh0);
          for (float x : {qf[size_t(r) * D + d], kf[size_t(r) * D + d]})
            over |= std::isfinite(x) && std::isinf(__half2float(__float2half_rn(x)));
        }
      for (size_t i = 0; i < qf.size(); ++i) {
        qbar[i] = over ? __bfloat162float(__float2bfloat16_rn(qf[i])) : __half2float(__float2half_rn(qf[i]));
        kbar[i] = over ? __bfloat162float(__float2bfloat16_rn(kf[i])) : __half2float(__float2half_rn(kf[i]));
      }
      double* out = &A[(size_t(b) * G + g) * nqb * nkb];
      for (int r = 0; r < kept; ++r) {  // kept query at position r * s sees kept keys t <= r
        double mx = -INFINITY;
        for (int t = 0; t <= r; ++t) {
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += qbar[size_t(r) * D + d] * kbar[size_t(t) * D + d];
          logits[t] = dot * scale;
          mx = std::max(mx, logits[t]);
        }
        double sum = 0;
        for (int t = 0; t <= r; ++t) sum += std::exp(logits[t] - mx);
        const int m = r * s / S;
        for (int t = 0; t <= r; ++t) {
          double& a = out[size_t(m) * nkb + t * s / S];
          a = std::max(a, std::exp(logits[t] - mx) / sum);
        }
      }
    }
  return A;
}

// Stage 2: per head the fp32 cumulative run (forced mass first, then sorted others) and kstar.
struct BudgetRef {
  std::vector<int> kstar;
  std::vector<bool> near_gamma;
};

BudgetRef cpu_budgets(const Options& o, int n, const std::vector<float>& q, const std::vector<float>& k) {
  const int B = o.batch, Hq = o.q_heads, Hkv = o.kv_heads, D = o.head_dim, S = o.block_size;
  const double scale = 1.0 / std::sqrt(double(D));
  const int rows = std::min(S, n);
  const int c_last = candidate_count(cdiv(n, S) - 1, n, S);
  const proxyattn::ForcedSplit f_last = forced_split(o, cdiv(n, S) - 1, n);
  const float gamma = static_cast<float>(o.gamma);
  BudgetRef ref{std::vector<int>(size_t(B) * Hq, 0), std::vector<bool>(size_t(B) * Hq, false)};
  std::vector<double> logits(n), w(c_last);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int kvh = h / (Hq / Hkv);
      std::fill(w.begin(), w.end(), 0.0);
      for (int i = n - rows; i < n; ++i) {
        const float* qi = &q[((int64_t(b) * n + i) * Hq + h) * D];
        double mx = -INFINITY;
        for (int t = 0; t <= i; ++t) {
          const float* kt = &k[((int64_t(b) * n + t) * Hkv + kvh) * D];
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(qi[d]) * kt[d];
          logits[t] = dot * scale;
          mx = std::max(mx, logits[t]);
        }
        double sum = 0;
        for (int t = 0; t <= i; ++t) sum += std::exp(logits[t] - mx);
        for (int t = 0; t <= i; ++t) w[t / S] += std::exp(logits[t] - mx) / sum / rows;
      }
      std::vector<float> wf(c_last);
      float total = 0.f;
      for (int c = 0; c < c_last; ++c) total += static_cast<float>(w[c]);
      for (int c = 0; c < c_last; ++c) wf[c] = static_cast<float>(w[c]) / total;
      float base = 0.f;
      std::vector<float> rest;
      for (int c = 0; c < c_last; ++c) {
        if (is_forced(c, c_last, f_last)) base += wf[c];
        else rest.push_back(wf[c]);
      }
      std::stable_sort(rest.begin(), rest.end(), [](float a, float b) { return a > b; });
      const size_t bh = size_t(b) * Hq + h;
      bool near = std::fabs(double(base) - gamma) < kNearGamma;
      int ks = 0;
      if (base < gamma) {
        float run = base;
        ks = static_cast<int>(rest.size());
        bool hit = false;
        for (size_t j = 0; j < rest.size(); ++j) {
          run += rest[j];
          near = near || std::fabs(double(run) - gamma) < kNearGamma;
          if (!hit && run >= gamma) {
            ks = static_cast<int>(j) + 1;
            hit = true;
          }
        }
      }
      ref.kstar[bh] = ks;
      ref.near_gamma[bh] = near;
    }
  return ref;
}

// Stage 3 given scores [B, G, nqb, nkb] and kstar [B, Hq]: counts [B, Hq, nqb], indices [.., nkb].
void cpu_select(const Options& o, int n, const std::vector<float>& scores, const std::vector<int>& kstar,
                std::vector<int>& counts, std::vector<int>& indices) {
  const int B = o.batch, Hq = o.q_heads, G = o.proxy_heads, S = o.block_size, nqb = cdiv(n, S), nkb = nqb;
  counts.assign(size_t(B) * Hq * nqb, 0);
  indices.assign(size_t(B) * Hq * nqb * nkb, -1);
  const int c_last = candidate_count(nqb - 1, n, S);
  const int f_last = forced_split(o, nqb - 1, n).forced;
  const int min_blocks = cdiv(o.min_budget, S);
  std::vector<int> order(nkb);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int kh = std::min(std::max(kstar[size_t(b) * Hq + h], 0), c_last - f_last);
      const float* sc_g = &scores[(size_t(b) * G + h / (Hq / G)) * nqb * nkb];
      for (int m = 0; m < nqb; ++m) {
        const int c = candidate_count(m, n, S);
        const proxyattn::ForcedSplit fs = forced_split(o, m, n);
        const int f = fs.forced;
        const int extra = c_last > f_last ? cdiv(int64_t(kh) * (c - f), c_last - f_last) : 0;
        const int km = std::min(c, std::max(f + extra, min_blocks));
        const float* row = sc_g + size_t(m) * nkb;
        std::iota(order.begin(), order.begin() + c, 0);
        auto key = [&](int x) {
          return is_forced(x, c, fs) ? INFINITY : row[x];
        };
        std::stable_sort(order.begin(), order.begin() + c, [&](int a, int bb) { return key(a) > key(bb); });
        std::vector<int> chosen(order.begin(), order.begin() + km);
        std::sort(chosen.begin(), chosen.end());
        const size_t r = (size_t(b) * Hq + h) * nqb + m;
        counts[r] = km;
        std::copy(chosen.begin(), chosen.end(), indices.begin() + r * nkb);
      }
    }
}

// -------------------------------------------------------------------------------- verify

// select_blocks' int16 indices against the CPU selection (int).
bool same_indices(const std::vector<int16_t>& got, const std::vector<int>& want) {
  return got.size() == want.size() && std::equal(got.begin(), got.end(), want.begin(),
                                                 [](int16_t g, int w) { return int(g) == w; });
}

struct Verdict {
  int failures = 0;
  void check(bool ok, const std::string& what) {
    std::printf("  %-4s %s\n", ok ? "ok" : "FAIL", what.c_str());
    std::fflush(stdout);
    if (!ok) ++failures;
  }
};

// Kernel output against the naive kernel over the selection currently in pb.bp.
void verify_bsa(const Options& o, Problem& pb, Verdict& v, const std::string& what) {
  const int64_t qe = pb.q_elems, le = int64_t(o.batch) * o.q_heads * pb.n;
  PROXYATTN_BENCH_CHECK(cudaMemset(pb.out.ptr, 0xFF, pb.out.bytes()));  // NaN poison: unwritten shows
  PROXYATTN_BENCH_CHECK(cudaMemset(pb.lse.ptr, 0xFF, pb.lse.bytes()));
  pb.run_bsa(0);
  PROXYATTN_BENCH_LAUNCH_CHECK();
  DeviceBuffer<float> truth(qe), lowp(qe), lse_ref(le), outf(qe);
  if (o.bf16) {
    naive_bsa_kernel<__nv_bfloat16><<<cdiv(le, 128), 128>>>(pb.bp, truth.ptr, lowp.ptr, lse_ref.ptr);
    PROXYATTN_BENCH_LAUNCH_CHECK();
    to_float_kernel<<<grid_for(qe), 256>>>(reinterpret_cast<const __nv_bfloat16*>(pb.out.ptr), outf.ptr, qe);
  } else {
    naive_bsa_kernel<__half><<<cdiv(le, 128), 128>>>(pb.bp, truth.ptr, lowp.ptr, lse_ref.ptr);
    PROXYATTN_BENCH_LAUNCH_CHECK();
    to_float_kernel<<<grid_for(qe), 256>>>(reinterpret_cast<const __half*>(pb.out.ptr), outf.ptr, qe);
  }
  PROXYATTN_BENCH_LAUNCH_CHECK();
  PROXYATTN_BENCH_CHECK(cudaDeviceSynchronize());
  const auto t = truth.to_host(), lo = lowp.to_host(), got = outf.to_host(), lr = lse_ref.to_host(),
             lg = pb.lse.to_host();
  double err_k = 0, err_b = 0, nk = 0, nb = 0, nt = 0;
  bool finite = true;
  for (int64_t i = 0; i < qe; ++i) {
    if (!std::isfinite(got[i])) finite = false;
    const double dk = double(got[i]) - t[i], db = double(lo[i]) - t[i];
    err_k = std::max(err_k, std::fabs(dk));
    err_b = std::max(err_b, std::fabs(db));
    nk += dk * dk;
    nb += db * db;
    nt += double(t[i]) * t[i];
  }
  const double rel_k = std::sqrt(nk / std::max(nt, 1e-300)), rel_b = std::sqrt(nb / std::max(nt, 1e-300));
  double lse_err = 0;
  bool lse_inf_ok = true;
  for (int64_t i = 0; i < le; ++i) {
    if (std::isinf(lr[i]) || std::isinf(lg[i])) {
      lse_inf_ok = lse_inf_ok && std::isinf(lr[i]) && std::isinf(lg[i]) && lr[i] < 0 && lg[i] < 0;
    } else {
      lse_err = std::max(lse_err, std::fabs(double(lg[i]) - lr[i]));
      if (!std::isfinite(lg[i])) lse_inf_ok = false;
    }
  }
  const double slack = o.bf16 ? 1e-3 : 2e-4;  // as tests/test_bsa_gpu.py
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: out finite, max-abs err %.3e <= 2 x %.3e + %.0e, rel err %.3e <= 2 x %.3e + %.0e",
                what.c_str(), err_k, err_b, slack, rel_k, rel_b, slack);
  v.check(finite && err_k <= 2 * err_b + slack && rel_k <= 2 * rel_b + slack, buf);
  std::snprintf(buf, sizeof buf, "%s: lse within 2e-3 (max %.3e), -inf exactly where no key is seen", what.c_str(),
                lse_err);
  v.check(lse_inf_ok && lse_err <= 2e-3, buf);
}

int verify(const Options& o) {
  Verdict v;
  for (int n : o.seq_lens) {
    std::printf("verify: N=%d B=%d Hq=%d Hkv=%d D=%d S=%d %s G=%d stride=%d gamma=%.3f\n", n, o.batch, o.q_heads,
                o.kv_heads, o.head_dim, o.block_size, o.bf16 ? "bf16" : "fp16", o.proxy_heads, o.stride, o.gamma);
    Problem pb(o, n);
    std::printf("  attention: %s kernel\n", pb.kernel_name());
    // Heads of different temperature, so budgets range from a few blocks to nearly all.
    std::vector<float> temps(o.q_heads);
    for (int h = 0; h < o.q_heads; ++h) temps[h] = o.q_heads == 1 ? 1.f : 0.5f + 5.5f * h / (o.q_heads - 1);
    DeviceBuffer<float> dtemps(o.q_heads);
    PROXYATTN_BENCH_CHECK(cudaMemcpy(dtemps.ptr, temps.data(), dtemps.bytes(), cudaMemcpyHostToDevice));
    pb.fill_inputs(o.seed + 7919 * n, dtemps.ptr);
    PROXYATTN_BENCH_CHECK(cudaMemset(pb.scores.ptr, 0xFF, pb.scores.bytes()));  // NaN poison
    PROXYATTN_BENCH_CHECK(cudaMemset(pb.kstar.ptr, 0xFF, pb.kstar.bytes()));
    PROXYATTN_BENCH_CHECK(cudaMemset(pb.indices.ptr, 0x7F, pb.indices.bytes()));
    pb.run_scores(0);
    pb.run_budgets(0);
    pb.run_select(0);
    PROXYATTN_BENCH_CHECK(cudaDeviceSynchronize());
    const auto qh = host_floats(pb.q, o.bf16), kh = host_floats(pb.k, o.bf16);

    // Stage 1
    const auto got_scores = pb.scores.to_host();
    const auto want_scores = cpu_scores(o, n, qh, kh);
    double worst = 0;
    size_t bad = 0;
    for (size_t i = 0; i < want_scores.size(); ++i) {
      const double d = std::fabs(double(got_scores[i]) - want_scores[i]);
      const double lim = kScoresRelTol * std::fabs(want_scores[i]) + kScoresAbsTol;
      if (!(d <= lim)) ++bad;  // NaN counts as bad
      worst = std::max(worst, d / lim);
    }
    char buf[256];
    std::snprintf(buf, sizeof buf, "scores [%d, %d, %d, %d] within %.0e relative (+%.0e): %zu bad, worst %.3f of the limit",
                  o.batch, o.proxy_heads, pb.nqb, pb.nkb, kScoresRelTol, kScoresAbsTol, bad, worst);
    v.check(bad == 0, buf);

    // Stage 2
    const auto got_kstar = pb.kstar.to_host();
    const BudgetRef want = cpu_budgets(o, n, qh, kh);
    int mism = 0, near = 0;
    std::string detail;
    for (size_t i = 0; i < got_kstar.size(); ++i) {
      near += want.near_gamma[i];
      if (got_kstar[i] != want.kstar[i] && !want.near_gamma[i]) {
        ++mism;
        if (detail.size() < 80)
          detail += " (bh " + std::to_string(i) + ": " + std::to_string(got_kstar[i]) + " vs " +
                    std::to_string(want.kstar[i]) + ")";
      }
    }
    const int allowed_near = std::max<int>(1, static_cast<int>(got_kstar.size()) / 8);
    std::snprintf(buf, sizeof buf, "kstar [%d, %d] exact (%d near-gamma heads skipped, at most %d): %d mismatches%s",
                  o.batch, o.q_heads, near, allowed_near, mism, detail.c_str());
    v.check(mism == 0 && near <= allowed_near, buf);

    // Stage 3, on the kernel's own scores and kstar, then on random kstar (clamping)
    std::vector<int> wc, wi;
    cpu_select(o, n, got_scores, got_kstar, wc, wi);
    v.check(pb.counts.to_host() == wc && same_indices(pb.indices.to_host(), wi),
            "select_blocks counts and indices equal the CPU selection (kernel scores and kstar)");
    std::vector<int> rk(got_kstar.size());
    for (size_t i = 0; i < rk.size(); ++i) rk[i] = static_cast<int>(mix64(o.seed + 31 * i) % (pb.nkb + 3)) - 1;
    PROXYATTN_BENCH_CHECK(cudaMemcpy(pb.kstar.ptr, rk.data(), pb.kstar.bytes(), cudaMemcpyHostToDevice));
    pb.run_select(0);
    PROXYATTN_BENCH_CHECK(cudaDeviceSynchronize());
    cpu_select(o, n, got_scores, rk, wc, wi);
    v.check(pb.counts.to_host() == wc && same_indices(pb.indices.to_host(), wi),
            "select_blocks counts and indices equal the CPU selection (random kstar in [-1, nkb + 1])");

    // Stage 4, on the selection of stage 3 and on random selections
    pb.use_selection(pb.counts.ptr, pb.indices.ptr);
    verify_bsa(o, pb, v, "bsa on select_blocks' selection");
    for (double target : o.densities) {
      const double d = pb.make_random_selection(target, o.seed + 17 + static_cast<uint64_t>(target * 1e6));
      pb.use_selection(pb.rand_counts.ptr, pb.rand_indices.ptr);
      std::snprintf(buf, sizeof buf, "bsa on a random selection (density %.3f)", d);
      verify_bsa(o, pb, v, buf);
    }
  }
  std::printf("verify: %s (%d failed checks)\n", v.failures ? "FAILED" : "passed", v.failures);
  return v.failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bench_proxyattn: no CUDA device (%s)\n", e == cudaSuccess ? "none found" : cudaGetErrorString(e));
    return 1;
  }
  cudaDeviceProp prop{};
  PROXYATTN_BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("bench_proxyattn: %s (sm_%d%d, %d SMs, %.0f MiB L2)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, prop.l2CacheSize / 1048576.0);
  if (o.verify) return verify(o);
  benchmark(o);
  return 0;
}
