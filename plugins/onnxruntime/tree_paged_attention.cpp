// apar-rt: TreePagedAttention as an ONNX Runtime CPU custom op (apar.ort::TreePagedAttention).
//
// The same function as the op contract (apar_rt/ops/tree_attention.py,
// tree_paged_attention_reference) over the head-major KV pools of the onnxruntime backend's CPU
// graph (ort_attention.POOL_LAYOUT). The rewrite (apar_rt/backends/ort_attention.py) runs it for
// steps whose sequences have few new tokens (decodes, forks, draft trees, short chunks) when the
// library is loaded; apar_rt/backends/ort_native.py builds it against ONNX Runtime's public
// headers, fetched at build time and never committed. Every key and value is read where it lies
// in the pool: nothing is gathered.
//
// Inputs (T new tokens of B sequences; float32, int32 indices):
//   0 q [T, Hq, D]   1 k, 2 v [T, Hkv, D]     the step's queries and new keys and values
//   3 k_pool, 4 v_pool [Hkv, S, D]           the pools (slot = block * block_size + offset)
//   5 block_tables [B, M]   6 context_lens [B]   7 query_start [B + 1]   8 mask [T, Qm] bool
// Attributes: scale (float), block_size (int), flat (int, default 0). Output: out [T, Hq, D], or
// [T, Hq * D] with flat = 1 (as the output projection reads it).
//
// apar.ort::TreePagedAttentionRope is the same with the layer's rotary embedding inside (what
// onnxruntime's RotaryEmbedding does with per-step tables: non-interleaved, token t rotated by
// row t of cos and sin): inputs 0 q [T, Hq * D] and 1 k [T, Hkv * D] as the projections give them,
// then v .. mask as above, then 9 cos and 10 sin [T, D / 2]; outputs out and 1 the rotated keys
// [T, Hkv, D] (the step's new K; with slot_mapping the op also stores it). Attributes also num_heads,
// num_kv_heads.
// Both take an optional last input, slot_mapping [T] int32 (input 9, or 11 with the rotary): after
// attending, the op writes token t's new key (rotated) and value into the pools at slot
// slot_mapping[t] (-1: not written, as a draft tree's nodes), in place, so that the host need not
// store them after the run; the pools must be memory the caller owns and binds (onnxruntime's
// IOBinding), which the step's later layers do not read. Without it the pools are only read.
// Token t of sequence b (query_start[b] <= t < query_start[b + 1]) sees the b's cached context
// (positions 0 .. context_lens[b] - 1, through its block table) and its new token i where
// mask[t, i]; query head h reads KV head h / (Hq / Hkv). A block id or table outside the pool, or
// a sequence with more new tokens than the mask has columns, fails the run with a message.

// The API table comes from the runtime that loads the library (RegisterCustomOps): nothing is linked.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr const char* kDomain = "apar.ort";
constexpr const char* kOpName = "TreePagedAttention";
constexpr const char* kRopeOpName = "TreePagedAttentionRope";

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const float* k_pool;
  const float* v_pool;
  const int32_t* tables;
  const int32_t* ctx;
  const int32_t* qs;
  const bool* mask;
  const int32_t* seq_of;   // [T] the sequence of each token
  const int32_t* first;    // [U + 1] the first token of each group of rows (see Groups); T, last
  float* out;
  int64_t T, Hq, Hkv, G, D, S, M, Qm, bs;
  float scale;
  std::atomic<int64_t> bad_block{-1};
  std::atomic<int64_t> bad_seq{-1};
};

// Vectors of one register (GCC/Clang vector extensions): eight floats where the build has AVX
// (x86-64-v3 here), four elsewhere (SSE2, NEON), since a vector wider than the registers is kept
// in memory between operations. VecU reads and writes unaligned memory. Sixteen vectors fit in
// the register file either way; the register chunks below are sized by that.
#if defined(__AVX__)
#define APAR_LANES 8
#else
#define APAR_LANES 4
#endif
constexpr int64_t kLanes = APAR_LANES;
constexpr int kVecRegisters = 16;
typedef float Vec __attribute__((vector_size(4 * APAR_LANES)));
typedef float VecU __attribute__((vector_size(4 * APAR_LANES), aligned(4)));
typedef int32_t IVec __attribute__((vector_size(4 * APAR_LANES)));

// Lanes of two vectors picked by index (a's, then b's): GCC's __builtin_shuffle (GCC 4.7+;
// __builtin_shufflevector only came with GCC 12), Clang's __builtin_shufflevector.
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, IVec{__VA_ARGS__})
#endif

inline Vec Load(const float* x) { return *reinterpret_cast<const VecU*>(x); }
inline void Store(float* x, Vec v) { *reinterpret_cast<VecU*>(x) = v; }
inline Vec Splat(float x) { return Vec{} + x; }

// exp(x) for x <= 0 (scores minus their maximum): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2],
// p Cephes' degree-7 expf polynomial (about 1 ulp); 0 below -87, where expf underflows anyway.
inline Vec ExpNonPositive(Vec x) {
  const IVec keep = x >= -87.0f;
  x = keep ? x : Splat(-87.0f);   // no infinities into the integer conversion
  const Vec y = x * 1.44269504088896341f;
  const IVec n = __builtin_convertvector(y - 0.5f, IVec);   // truncation: ceil(y - 0.5) for y <= 0
  const Vec fn = __builtin_convertvector(n, Vec);
  const Vec r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  Vec poly = Splat(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * (r * r) + r + 1.0f;
  const IVec bits = (n + 127) << 23;
  Vec two_n;
  __builtin_memcpy(&two_n, &bits, sizeof two_n);
  Vec result = poly * two_n;
  IVec result_bits;
  __builtin_memcpy(&result_bits, &result, sizeof result);
  result_bits &= keep;
  __builtin_memcpy(&result, &result_bits, sizeof result);
  return result;
}

// The sum of a vector's lanes in a fixed order: lane l + kLanes / 2 onto l, and so on, halving.
inline float Sum(Vec a) {
#if APAR_LANES == 8
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
#else
  return (a[0] + a[2]) + (a[1] + a[3]);
#endif
}

// [Sum(a0), Sum(a1), Sum(a2), Sum(a3)] into out, the same folds four vectors at a time: each
// level adds the upper half of every input's lanes onto the lower, two inputs per result.
inline void Sums4(Vec a0, Vec a1, Vec a2, Vec a3, float* out) {
#if APAR_LANES == 8
  const Vec x = SHUFFLE(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  const Vec y = SHUFFLE(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  // x = [a0 l+4 folded, a1 l+4 folded], y likewise for a2, a3
  const Vec z = SHUFFLE(x, y, 0, 1, 4, 5, 8, 9, 12, 13) + SHUFFLE(x, y, 2, 3, 6, 7, 10, 11, 14, 15);
  const Vec w = SHUFFLE(z, z, 0, 2, 4, 6, 0, 2, 4, 6) + SHUFFLE(z, z, 1, 3, 5, 7, 1, 3, 5, 7);
  for (int i = 0; i < 4; ++i) out[i] = w[i];
#else
  const Vec x = SHUFFLE(a0, a1, 0, 1, 4, 5) + SHUFFLE(a0, a1, 2, 3, 6, 7);
  const Vec y = SHUFFLE(a2, a3, 0, 1, 4, 5) + SHUFFLE(a2, a3, 2, 3, 6, 7);
  Store(out, SHUFFLE(x, y, 0, 2, 4, 6) + SHUFFLE(x, y, 1, 3, 5, 7));
#endif
}

// Keys and values lie in the pool block by block, each block somewhere else (a page of its own at
// the demo's sizes), so the hardware prefetcher restarts at every block: the loops below ask for
// the rows kAhead keys (or values) ahead themselves.
constexpr int64_t kAhead = 8;

inline void PrefetchRow(const float* x, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / static_cast<int64_t>(sizeof(float))) __builtin_prefetch(x + d);
}

// Scores of HP query rows (rows of q, qs apart: heads of one token, or one head of two tokens)
// against keys[0 .. n4), n4 a multiple of 4, into rows of s (K apart), times scale. Each key is
// loaded once for the HP rows; a score is the Sum of its lane-wise products plus the D % kLanes
// tail in order, whichever keys and rows share its pass.
template <int HP>
void Scores(const float* q, int64_t qs, const float* const* keys, int64_t n4, int64_t D, float scale, float* s,
            int64_t K) {
  static_assert(HP == 1 || HP == 2, "one or two rows per pass");
  const int64_t body = D / kLanes * kLanes;
  for (int64_t j = 0; j < n4; j += 4) {
    if (j + kAhead + 4 <= n4) {
      for (int i = 0; i < 4; ++i) PrefetchRow(keys[j + kAhead + i], D);
    }
    const float* k0 = keys[j];
    const float* k1 = keys[j + 1];
    const float* k2 = keys[j + 2];
    const float* k3 = keys[j + 3];
    Vec a[HP][4] = {};
    for (int64_t d = 0; d < body; d += kLanes) {
      const Vec x0 = Load(k0 + d), x1 = Load(k1 + d), x2 = Load(k2 + d), x3 = Load(k3 + d);
      for (int h = 0; h < HP; ++h) {
        const Vec x = Load(q + h * qs + d);
        a[h][0] += x * x0;
        a[h][1] += x * x1;
        a[h][2] += x * x2;
        a[h][3] += x * x3;
      }
    }
    float sums[HP][4];
    for (int h = 0; h < HP; ++h) Sums4(a[h][0], a[h][1], a[h][2], a[h][3], sums[h]);
    for (int h = 0; h < HP; ++h) {
      for (int i = 0; i < 4; ++i) {
        float r = sums[h][i];
        for (int64_t d = body; d < D; ++d) r += q[h * qs + d] * keys[j + i][d];
        s[h * K + j + i] = scale * r;
      }
    }
  }
}

// The weights w (HP rows, K apart) times values[0 .. n) into HP rows of o (os apart), each row
// times its inv: output lanes in register chunks (half the register file holds the HP rows'
// accumulators), each value read once per chunk.
template <int HP>
void WeightedValues(const float* w, int64_t K, const float* const* values, int64_t n, int64_t D, const float* inv,
                    float* o, int64_t os) {
  constexpr int C = kVecRegisters / 2 / HP;
  int64_t d0 = 0;
  for (; d0 + C * kLanes <= D; d0 += C * kLanes) {
    Vec acc[HP][C] = {};
    for (int64_t i = 0; i < n; ++i) {
      if (d0 == 0 && i + kAhead < n) PrefetchRow(values[i + kAhead], D);
      const float* v = values[i] + d0;
      Vec x[C];
      for (int c = 0; c < C; ++c) x[c] = Load(v + c * kLanes);
      for (int h = 0; h < HP; ++h) {
        const Vec ws = Splat(w[h * K + i]);
        for (int c = 0; c < C; ++c) acc[h][c] += ws * x[c];
      }
    }
    for (int h = 0; h < HP; ++h) {
      for (int c = 0; c < C; ++c) Store(o + h * os + d0 + c * kLanes, acc[h][c] * inv[h]);
    }
  }
  for (; d0 + kLanes <= D; d0 += kLanes) {
    for (int h = 0; h < HP; ++h) {
      Vec acc{};
      for (int64_t i = 0; i < n; ++i) acc += Splat(w[h * K + i]) * Load(values[i] + d0);
      Store(o + h * os + d0, acc * inv[h]);
    }
  }
  for (; d0 < D; ++d0) {
    for (int h = 0; h < HP; ++h) {
      float acc = 0.0f;
      for (int64_t i = 0; i < n; ++i) acc += w[h * K + i] * values[i][d0];
      o[h * os + d0] = acc * inv[h];
    }
  }
}

// Softmax numerators in place over a row of n scores padded to K (a multiple of kLanes); returns
// 1 / their sum. The max is std::max's over the row (a NaN score never becomes it), taken a
// vector at a time: the padding is -inf, which no score is below.
inline float Exponentiate(float* s, int64_t n, int64_t K) {
  for (int64_t i = n; i < K; ++i) s[i] = -std::numeric_limits<float>::infinity();   // exp gives 0
  Vec mv = Splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < K; i += kLanes) {
    const Vec x = Load(s + i);
    mv = mv < x ? x : mv;
  }
  float m = mv[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, mv[l]);
  Vec total{};
  for (int64_t i = 0; i < K; i += kLanes) {
    const Vec e = ExpNonPositive(Load(s + i) - m);
    Store(s + i, e);
    total += e;
  }
  return 1.0f / Sum(total);
}

// One (group, KV head): the group's query rows' scores over the keys they see, softmax, weighted
// values. A group is one token (its G query heads), or with G = 1 two tokens of one sequence
// (`Groups`), the second seeing every key the first sees and, after the last of those, its own.
// The keys seen are listed first (context through the block table, then the visible new tokens);
// rows go two at a time where they can (two heads of the token, or the two tokens), so a key or
// value is read once per pair. A pair's first row gets the keys only the second sees at the end
// of its list with weight exp(-inf) = 0: its sums, lane by lane, are those it has alone.
void AttendOne(Problem* p, int64_t item) {
  const int64_t u = item / p->Hkv, h = item % p->Hkv;
  const int64_t t = p->first ? p->first[u] : u, rows = p->first ? p->first[u + 1] - t : 1;
  const int64_t G = p->G, D = p->D, bs = p->bs;
  const int64_t b = p->seq_of[t], first = p->qs[b], n_new = p->qs[b + 1] - first, ctx = p->ctx[b];
  const int64_t num_blocks = p->S / bs, ctx_blocks = (ctx + bs - 1) / bs;
  const int32_t* table = p->tables + b * p->M;
  for (int64_t i = 0; i < ctx_blocks; ++i) {
    if (table[i] < 0 || table[i] >= num_blocks) {
      p->bad_block.store(table[i]);
      p->bad_seq.store(b);
      return;
    }
  }
  thread_local std::vector<const float*> keys, values;
  thread_local std::vector<float> scores;
  const size_t most = static_cast<size_t>(ctx + n_new + 3);   // room to pad the last group of 4
  if (keys.size() < most) {
    keys.resize(most);
    values.resize(most);
  }
  const float** kp = keys.data();
  const float** vp = values.data();
  const float* k_pool = p->k_pool + h * p->S * D;
  const float* v_pool = p->v_pool + h * p->S * D;
  int64_t n = 0;
  for (int64_t i = 0, pos = 0; pos < ctx; ++i) {
    const int64_t offset = table[i] * bs * D, stop = std::min(ctx - pos, bs);
    for (int64_t o = 0; o < stop; ++o, ++n) {
      kp[n] = k_pool + offset + o * D;
      vp[n] = v_pool + offset + o * D;
    }
    pos += stop;
  }
  const bool* sees = p->mask + t * p->Qm;
  const bool* sees2 = rows == 2 ? sees + p->Qm : sees;   // the pair's second row (a superset of the first's)
  int64_t n_first = n;   // the keys the first row sees: the first n_first of the list
  for (int64_t i = 0; i < n_new; ++i) {
    if (!sees2[i]) continue;
    const int64_t row = ((first + i) * p->Hkv + h) * D;
    kp[n] = p->k + row;
    vp[n++] = p->v + row;
    if (sees[i]) n_first = n;
  }
  const int64_t Hq = p->Hq;
  float* out = p->out + (t * Hq + h * G) * D;
  if (n == 0) {   // sees nothing (the contract has every token see at least itself): zeros
    for (int64_t r = 0; r < rows; ++r) std::fill(out + r * Hq * D, out + r * Hq * D + G * D, 0.0f);
    return;
  }
  const int64_t n4 = (n + 3) / 4 * 4, K = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = n; i < n4; ++i) kp[i] = kp[n - 1];
  scores.resize(static_cast<size_t>(std::max<int64_t>(G, rows) * K));
  const float* q = p->q + (t * Hq + h * G) * D;
  if (rows == 2) {   // G = 1: one head of two tokens
    float* s = scores.data();
    Scores<2>(q, Hq * D, kp, n4, D, p->scale, s, K);
    float inv[2] = {0.0f, Exponentiate(s + K, n, K)};
    if (n_first > 0) {
      inv[0] = Exponentiate(s, n_first, K);   // the keys past n_first get weight 0
    } else {
      std::fill(s, s + K, 0.0f);   // sees nothing: zeros
    }
    WeightedValues<2>(s, K, vp, n, D, inv, out, Hq * D);
    return;
  }
  for (int64_t g = 0; g < G;) {
    float* s = scores.data() + g * K;
    if (G - g >= 2) {
      Scores<2>(q + g * D, D, kp, n4, D, p->scale, s, K);
      const float inv[2] = {Exponentiate(s, n, K), Exponentiate(s + K, n, K)};
      WeightedValues<2>(s, K, vp, n, D, inv, out + g * D, D);
      g += 2;
    } else {
      Scores<1>(q + g * D, D, kp, n4, D, p->scale, s, K);
      const float inv[1] = {Exponentiate(s, n, K)};
      WeightedValues<1>(s, K, vp, n, D, inv, out + g * D, D);
      g += 1;
    }
  }
}

// With G = 1, the tokens in groups (`first`, ending with T): two consecutive tokens of one
// sequence where the second sees every new token the first sees and the first sees none after
// its last that the second sees too (a chunk's causal rows; not siblings of a draft tree), else
// one. Empty (ungrouped) for G > 1, whose heads already pair.
void Groups(const Problem& p, std::vector<int32_t>* first) {
  first->clear();
  for (int64_t t = 0; t < p.T;) {
    first->push_back(static_cast<int32_t>(t));
    const int64_t b = p.seq_of[t];
    int64_t take = 1;
    if (t + 1 < p.T && p.seq_of[t + 1] == b) {
      const int64_t n_new = p.qs[b + 1] - p.qs[b];
      const bool* a = p.mask + t * p.Qm;
      const bool* c = a + p.Qm;
      int64_t last_a = -1;
      bool nested = true;
      for (int64_t i = 0; i < n_new && nested; ++i) {
        if (a[i]) {
          nested = c[i];
          last_a = i;
        }
      }
      for (int64_t i = 0; i < last_a && nested; ++i) nested = !c[i] || a[i];   // no key only the second sees before the first's last
      if (nested) take = 2;
    }
    t += take;
  }
  first->push_back(static_cast<int32_t>(p.T));
}

void AttendItem(void* data, size_t item) { AttendOne(static_cast<Problem*>(data), static_cast<int64_t>(item)); }

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

[[noreturn]] void Fail(const std::string& why) {
  throw std::invalid_argument(std::string(kDomain) + "::" + kOpName + ": " + why);
}

// Rotates x [T, H, D] in place: (a, b) halves -> (a cos - b sin, b cos + a sin), row t of cos / sin.
void Rotate(float* x, int64_t T, int64_t H, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < H; ++h) {
      float* a = x + (t * H + h) * D;
      float* b = a + half;
      for (int64_t i = 0; i < half; ++i) {
        const float a0 = a[i], b0 = b[i];
        a[i] = a0 * c[i] - b0 * s[i];
        b[i] = b0 * c[i] + a0 * s[i];
      }
    }
  }
}

struct TreePagedAttentionKernel {
  float scale;
  int64_t block_size;
  bool rope;           // TreePagedAttentionRope: q and k unrotated, cos and sin inputs, rotated k output
  int64_t num_heads;   // rope only: the projections' head counts
  int64_t num_kv_heads;
  bool flat;           // output 0 as [T, Hq * D]

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_INVALID_ARGUMENT).release();
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const char* names[] = {"q", "k", "v", "k_pool", "v_pool", "block_tables", "context_lens", "query_start", "mask",
                           "cos", "sin"};
    const size_t ranks[] = {3, 3, 3, 3, 3, 2, 1, 1, 2, 2, 2};
    const size_t count = rope ? 11 : 9;
    std::vector<std::vector<int64_t>> shapes;
    for (size_t i = 0; i < count; ++i) {
      shapes.push_back(ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape());
      const size_t rank = rope && i < 2 ? 2 : ranks[i];
      if (shapes[i].size() != rank) Fail(std::string(names[i]) + " must have rank " + std::to_string(rank) +
                                         ", got shape " + ShapeText(shapes[i]));
    }
    const auto &v = shapes[2], &kp = shapes[3], &vp = shapes[4];
    const int64_t Hkv = kp[0], S = kp[1], D = kp[2];
    std::vector<int64_t> q = shapes[0], k = shapes[1];
    if (rope) {   // [T, H * D] projections
      if (q[1] != num_heads * D || k[1] != num_kv_heads * D || num_kv_heads != Hkv || D % 2)
        Fail("q and k must be [T, num_heads * D] and [T, num_kv_heads * D] for the pools' D = " + std::to_string(D) +
             ", got " + ShapeText(q) + " and " + ShapeText(k));
      if (shapes[9] != std::vector<int64_t>{q[0], D / 2} || shapes[10] != shapes[9])
        Fail("cos and sin must be [T, D / 2] = " + ShapeText({q[0], D / 2}) + ", got " + ShapeText(shapes[9]) +
             " and " + ShapeText(shapes[10]));
      q = {q[0], num_heads, D};
      k = {k[0], num_kv_heads, D};
    }
    const int64_t T = q[0], Hq = q[1];
    const int64_t B = shapes[5][0], M = shapes[5][1], Qm = shapes[8][1];
    if (Hkv <= 0 || Hq % Hkv != 0) Fail("query heads " + std::to_string(Hq) + " are not a multiple of KV heads " +
                                        std::to_string(Hkv));
    if (q[2] != D || k != std::vector<int64_t>{T, Hkv, D} || v != k)
      Fail("q, k and v must be [T, Hq, D], [T, Hkv, D] and [T, Hkv, D] for the pools' D = " + std::to_string(D) +
           ", got " + ShapeText(q) + ", " + ShapeText(k) + " and " + ShapeText(v));
    if (vp != kp || S % block_size)
      Fail("the pools must be [Hkv, S, D] alike, S a multiple of " + std::to_string(block_size) + ", got " +
           ShapeText(kp) + " and " + ShapeText(vp));
    if (shapes[6][0] != B || shapes[7][0] != B + 1 || shapes[8][0] != T)
      Fail("context_lens must be [B], query_start [B + 1] and mask [T, max_q] for block_tables " +
           ShapeText(shapes[5]) + " and q " + ShapeText(q) + ", got " + ShapeText(shapes[6]) + ", " +
           ShapeText(shapes[7]) + " and " + ShapeText(shapes[8]));
    const int32_t* ctx_lens = ctx.GetInput(6).GetTensorData<int32_t>();
    const int32_t* qs = ctx.GetInput(7).GetTensorData<int32_t>();
    if (qs[0] != 0 || qs[B] != T) Fail("query_start must run from 0 to T = " + std::to_string(T));
    std::vector<int32_t> seq_of(static_cast<size_t>(T));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = qs[b + 1] - qs[b];
      if (n < 0) Fail("query_start decreases at sequence " + std::to_string(b));
      if (n > Qm) Fail("sequence " + std::to_string(b) + " has " + std::to_string(n) +
                       " new tokens but the mask has " + std::to_string(Qm) + " columns");
      if (ctx_lens[b] < 0 || ctx_lens[b] > M * block_size)
        Fail("context length " + std::to_string(ctx_lens[b]) + " of sequence " + std::to_string(b) +
             " is outside its table's " + std::to_string(M * block_size) + " positions");
      for (int64_t t = qs[b]; t < qs[b + 1]; ++t) seq_of[t] = static_cast<int32_t>(b);
    }
    const int32_t* slots = SlotMapping(ctx, T, S);
    auto out = flat ? ctx.GetOutput(0, std::vector<int64_t>{T, Hq * D}) : ctx.GetOutput(0, q);
    Problem p;
    p.q = ctx.GetInput(0).GetTensorData<float>();
    p.k = ctx.GetInput(1).GetTensorData<float>();
    thread_local std::vector<float> q_rotated;
    if (rope) {   // the rotated queries in a scratch buffer, the rotated keys straight into output 1
      const float* cos = ctx.GetInput(9).GetTensorData<float>();
      const float* sin = ctx.GetInput(10).GetTensorData<float>();
      q_rotated.assign(p.q, p.q + T * Hq * D);
      Rotate(q_rotated.data(), T, Hq, D, cos, sin);
      p.q = q_rotated.data();
      float* k_rotated = ctx.GetOutput(1, k).GetTensorMutableData<float>();
      std::copy(p.k, p.k + T * Hkv * D, k_rotated);
      Rotate(k_rotated, T, Hkv, D, cos, sin);
      p.k = k_rotated;
    }
    p.v = ctx.GetInput(2).GetTensorData<float>();
    p.k_pool = ctx.GetInput(3).GetTensorData<float>();
    p.v_pool = ctx.GetInput(4).GetTensorData<float>();
    p.tables = ctx.GetInput(5).GetTensorData<int32_t>();
    p.ctx = ctx_lens;
    p.qs = qs;
    p.mask = ctx.GetInput(8).GetTensorData<bool>();
    p.seq_of = seq_of.data();
    p.out = out.GetTensorMutableData<float>();
    p.T = T, p.Hq = Hq, p.Hkv = Hkv, p.G = Hq / Hkv, p.D = D, p.S = S, p.M = M, p.Qm = Qm, p.bs = block_size;
    p.scale = scale;
    thread_local std::vector<int32_t> groups;
    p.first = nullptr;
    if (p.G == 1 && T > 1) {
      Groups(p, &groups);
      if (static_cast<int64_t>(groups.size()) - 1 < T) p.first = groups.data();
    }
    const int64_t items = (p.first ? static_cast<int64_t>(groups.size()) - 1 : T) * Hkv;
    if (items == 0) return;
    if (items == 1) {
      AttendOne(&p, 0);
    } else {
      ctx.ParallelFor(AttendItem, static_cast<size_t>(items), 0, &p);
    }
    if (p.bad_seq.load() >= 0) Fail("block " + std::to_string(p.bad_block.load()) + " in the table of sequence " +
                                    std::to_string(p.bad_seq.load()) + " is outside the pool's " +
                                    std::to_string(S / block_size) + " blocks");
    if (slots != nullptr) WriteNew(p, slots);
  }

  // The optional slot_mapping input, checked before any work (nullptr when it is absent).
  const int32_t* SlotMapping(Ort::KernelContext& ctx, int64_t T, int64_t S) const {
    const size_t at = rope ? 11 : 9;
    if (ctx.GetInputCount() <= at) return nullptr;
    auto value = ctx.GetInput(at);
    if (value == nullptr) return nullptr;
    const auto shape = value.GetTensorTypeAndShapeInfo().GetShape();
    if (shape != std::vector<int64_t>{T}) Fail("slot_mapping must be [T] = " + ShapeText({T}) + ", got " +
                                               ShapeText(shape));
    const int32_t* slots = value.GetTensorData<int32_t>();
    for (int64_t t = 0; t < T; ++t)
      if (slots[t] >= S) Fail("slot " + std::to_string(slots[t]) + " of token " + std::to_string(t) +
                              " is outside the pools' " + std::to_string(S) + " slots");
    return slots;
  }

  // Stores each token's new key and value at its slot (slot_mapping, in place; see the top).
  static void WriteNew(const Problem& p, const int32_t* slots) {
    float* k_pool = const_cast<float*>(p.k_pool);
    float* v_pool = const_cast<float*>(p.v_pool);
    for (int64_t t = 0; t < p.T; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      for (int64_t h = 0; h < p.Hkv; ++h) {
        const int64_t from = (t * p.Hkv + h) * p.D, to = (h * p.S + slot) * p.D;
        std::copy(p.k + from, p.k + from + p.D, k_pool + to);
        std::copy(p.v + from, p.v + from + p.D, v_pool + to);
      }
    }
  }
};

template <bool Rope>
struct TreePagedAttentionOp : Ort::CustomOpBase<TreePagedAttentionOp<Rope>, TreePagedAttentionKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    try {
      Ort::ConstKernelInfo ki(info);
      const int64_t block_size = ki.GetAttribute<int64_t>("block_size");
      if (block_size < 1) Fail("block_size must be >= 1, got " + std::to_string(block_size));
      const int64_t heads = Rope ? ki.GetAttribute<int64_t>("num_heads") : 0;
      const int64_t kv_heads = Rope ? ki.GetAttribute<int64_t>("num_kv_heads") : 0;
      if (Rope && (kv_heads < 1 || heads % kv_heads))
        Fail("num_heads " + std::to_string(heads) + " is not a multiple of num_kv_heads " + std::to_string(kv_heads));
      int64_t flat = 0;
      try {
        flat = ki.GetAttribute<int64_t>("flat");
      } catch (const Ort::Exception&) {   // absent: the default
      }
      *kernel = new TreePagedAttentionKernel{ki.GetAttribute<float>("scale"), block_size, Rope, heads, kv_heads,
                                             flat != 0};
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_INVALID_ARGUMENT).release();
    }
  }
  const char* GetName() const { return Rope ? kRopeOpName : kOpName; }
  size_t GetInputTypeCount() const { return Rope ? 12 : 10; }   // the last, slot_mapping, optional
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == 8) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    if (index == GetInputTypeCount() - 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return index >= 5 && index < 8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == GetInputTypeCount() - 1 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                                            : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return Rope ? 2 : 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// Domains handed to sessions must outlive them: kept for the life of the process.
std::mutex domains_lock;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  static const TreePagedAttentionOp<false> op;
  static const TreePagedAttentionOp<true> rope_op;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;   // a runtime older than the headers: nothing registered (ort_native checks)
  try {
    Ort::InitApi(api);
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    domain->Add(&op);
    domain->Add(&rope_op);
    Ort::UnownedSessionOptions(options).Add(*domain);
    std::lock_guard<std::mutex> lock(domains_lock);
    domains.push_back(std::move(domain));
    return nullptr;
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_FAIL).release();
  }
}
