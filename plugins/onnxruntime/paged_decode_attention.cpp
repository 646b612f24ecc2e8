// apar-rt: the decode step's attention as an ONNX Runtime CPU custom op (apar.ort::PagedDecodeAttention).
//
// The onnxruntime backend's graph rewrite (apar_rt/backends/ort_attention.py) uses this node in
// its decode body when the library is loaded (apar_rt/backends/ort_native.py builds it against
// ONNX Runtime's public headers, fetched at build time and never committed). It computes what
// attention_body.attend_decode computes with about 20 standard ops, without gathering each
// sequence's context out of the KV pool: every key and value is read where it lies in the pool.
//
// Inputs (float32 unless said; T decode tokens, one per sequence):
//   0 q      [T, Hq, D]      the tokens' queries
//   1 k, 2 v [T, Hkv, D]     their own new keys and values (not yet in the pool)
//   3 k_pool, 4 v_pool [Hkv, S, D]   the head-major KV pools
//   5 slots  [T, L] int32    pool slot of each context position (ort_attention.decode_feeds)
//   6 bias   [T, 1, L + 1]   0 where token t sees key j (j = L: its own key), float32's lowest
//                            elsewhere; a key whose bias is at or below -1e30 is never read
// Attribute: scale (float). Output: [T, Hq, D], query head h reading KV head h / (Hq / Hkv).
// out[t, h] = sum_j softmax_j(scale * q[t, h] . key_j + bias[t, 0, j]) * value_j.
// A slot outside [0, S) among the visible keys fails the run with a message naming it.

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
constexpr const char* kOpName = "PagedDecodeAttention";
constexpr float kMasked = -1e30f;

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const float* k_pool;
  const float* v_pool;
  const int32_t* slots;
  const float* bias;
  float* out;
  int64_t T, Hq, Hkv, G, D, S, L;
  float scale;
  std::atomic<int64_t> bad_slot{-1};
  std::atomic<int64_t> bad_token{-1};
};

// Eight partial sums in a fixed order: the compiler vectorises them without reassociating.
inline float Dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  }
  float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// One (token, KV head): its G query heads' scores over the visible keys, then their outputs.
void AttendOne(Problem* p, int64_t item) {
  const int64_t t = item / p->Hkv, h = item % p->Hkv;
  const int64_t G = p->G, D = p->D, L = p->L, K = L + 1;
  thread_local std::vector<float> scores;
  thread_local std::vector<int64_t> visible;   // key j's row offset in its pool (-1: the token's own key)
  thread_local std::vector<float> acc;
  scores.resize(static_cast<size_t>(G * K));
  visible.clear();
  acc.assign(static_cast<size_t>(G * D), 0.0f);
  const float* bias = p->bias + t * K;
  const int32_t* slots = p->slots + t * L;
  const float* q = p->q + (t * p->Hq + h * G) * D;
  const int64_t pool_base = h * p->S * D;
  const int64_t own = (t * p->Hkv + h) * D;
  std::vector<float>& s = scores;
  int64_t n = 0;
  for (int64_t j = 0; j < K; ++j) {
    const float b = bias[j];
    if (!(b > kMasked)) continue;
    const float* key;
    if (j < L) {
      const int64_t slot = slots[j];
      if (slot < 0 || slot >= p->S) {
        p->bad_slot.store(slot);
        p->bad_token.store(t);
        return;
      }
      visible.push_back(pool_base + slot * D);
      key = p->k_pool + pool_base + slot * D;
    } else {
      visible.push_back(-1);
      key = p->k + own;
    }
    for (int64_t g = 0; g < G; ++g) s[g * K + n] = p->scale * Dot(q + g * D, key, D) + b;
    ++n;
  }
  float* out = p->out + (t * p->Hq + h * G) * D;
  if (n == 0) {   // no visible key (a decode token always sees itself): zeros
    std::fill(out, out + G * D, 0.0f);
    return;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s.data() + g * K;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, sg[i]);
    float total = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      sg[i] = std::exp(sg[i] - m);
      total += sg[i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < n; ++i) sg[i] *= inv;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* value = visible[i] >= 0 ? p->v_pool + visible[i] : p->v + own;
    for (int64_t g = 0; g < G; ++g) {
      const float w = s[g * K + i];
      float* a = acc.data() + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += w * value[d];
    }
  }
  std::copy(acc.begin(), acc.end(), out);
}

void AttendItem(void* data, size_t item) { AttendOne(static_cast<Problem*>(data), static_cast<int64_t>(item)); }

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

struct PagedDecodeAttentionKernel {
  float scale;

  explicit PagedDecodeAttentionKernel(float scale_) : scale(scale_) {}

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
    const char* names[] = {"q", "k", "v", "k_pool", "v_pool", "slots", "bias"};
    const size_t ranks[] = {3, 3, 3, 3, 3, 2, 3};
    std::vector<std::vector<int64_t>> shapes;
    for (size_t i = 0; i < 7; ++i) {
      shapes.push_back(ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape());
      if (shapes[i].size() != ranks[i]) Fail(std::string(names[i]) + " must have rank " + std::to_string(ranks[i]) +
                                             ", got shape " + ShapeText(shapes[i]));
    }
    const auto &q = shapes[0], &k = shapes[1], &v = shapes[2], &kp = shapes[3], &vp = shapes[4], &sl = shapes[5],
               &bi = shapes[6];
    const int64_t T = q[0], Hq = q[1], D = q[2], Hkv = kp[0], S = kp[1], L = sl[1];
    if (Hkv <= 0 || Hq % Hkv != 0) Fail("query heads " + std::to_string(Hq) + " are not a multiple of KV heads " +
                                        std::to_string(Hkv));
    if (k != std::vector<int64_t>{T, Hkv, D} || v != k) Fail("k and v must be [T, Hkv, D] = " +
                                                           ShapeText({T, Hkv, D}) + ", got " + ShapeText(k) +
                                                           " and " + ShapeText(v));
    if (kp[2] != D || vp != kp) Fail("the pools must be [Hkv, S, D] alike, got " + ShapeText(kp) + " and " +
                                     ShapeText(vp));
    if (sl[0] != T || bi != std::vector<int64_t>{T, 1, L + 1}) Fail("slots must be [T, L] and bias [T, 1, L + 1], got " +
                                                                   ShapeText(sl) + " and " + ShapeText(bi));
    auto out = ctx.GetOutput(0, q);
    Problem p;
    p.q = ctx.GetInput(0).GetTensorData<float>();
    p.k = ctx.GetInput(1).GetTensorData<float>();
    p.v = ctx.GetInput(2).GetTensorData<float>();
    p.k_pool = ctx.GetInput(3).GetTensorData<float>();
    p.v_pool = ctx.GetInput(4).GetTensorData<float>();
    p.slots = ctx.GetInput(5).GetTensorData<int32_t>();
    p.bias = ctx.GetInput(6).GetTensorData<float>();
    p.out = out.GetTensorMutableData<float>();
    p.T = T, p.Hq = Hq, p.Hkv = Hkv, p.G = Hq / Hkv, p.D = D, p.S = S, p.L = L, p.scale = scale;
    const int64_t items = T * Hkv;
    if (items == 0) return;
    if (items == 1) {
      AttendOne(&p, 0);
    } else {
      ctx.ParallelFor(AttendItem, static_cast<size_t>(items), 0, &p);
    }
    if (p.bad_token.load() >= 0) Fail("slot " + std::to_string(p.bad_slot.load()) + " of token " +
                                      std::to_string(p.bad_token.load()) + " is outside the pool's " +
                                      std::to_string(S) + " slots");
  }

  [[noreturn]] static void Fail(const std::string& why) {
    throw std::invalid_argument(std::string(kDomain) + "::" + kOpName + ": " + why);
  }
};

struct PagedDecodeAttentionOp : Ort::CustomOpBase<PagedDecodeAttentionOp, PagedDecodeAttentionKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    try {
      float scale = Ort::ConstKernelInfo(info).GetAttribute<float>("scale");
      *kernel = new PagedDecodeAttentionKernel(scale);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_INVALID_ARGUMENT).release();
    }
  }
  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// Domains handed to sessions must outlive them: kept for the life of the process.
std::mutex domains_lock;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  static const PagedDecodeAttentionOp op;
  try {
    Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    domain->Add(&op);
    Ort::UnownedSessionOptions(options).Add(*domain);
    std::lock_guard<std::mutex> lock(domains_lock);
    domains.push_back(std::move(domain));
    return nullptr;
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_FAIL).release();
  }
}
