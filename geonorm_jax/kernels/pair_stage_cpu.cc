// Fused pair stage of one dense EGNN layer on x86-64 CPUs with AVX-512.
//
// The forward and backward passes of geonorm_jax.egnn.dense_edge_stage
// (norm_diff and coords_tanh off), as two XLA FFI handlers. Every pair
// (i, j != i) of a system goes through phi_e's two layers and phi_x in
// tiles of kTile pairs, so that the tile's pair arrays stay in the L1 and
// L2 caches and no [B, N, N, H] array is ever written to memory. The
// backward pass computes the tile's forward values once more, as the XLA
// version does.
//
// Shapes (float32, row-major): B systems, N particles, H features
// (a multiple of 16), A edge attributes.
//   receiver_part, sender_part [B, N, H]; x [B, N, 3]; edge_attr [B, N, N, A]
//   pair_kernel [1 + A, H]: phi_e's first-layer rows for |x_i - x_j|^2
//     and a_ij; phi_e_kernel_1, phi_x_kernel_0 [H, H] (input-major, as in
//     Flax); phi_e_bias_1, phi_x_bias_0 [H]; phi_x_kernel_1 [H, 1].
//
// Per pair, with silu(u) = u sigmoid(u):
//   a1 = silu(receiver_part_i + sender_part_j + pair_kernel^T [d_ij, a_ij])
//   m_ij = a2 = silu(a1 K_e1 + b_e1);  a3 = silu(a2 K_x0 + b_x0)
//   w_ij = a3 . k_x1
// and per receiver i
//   incoming_i = sum_{j != i} m_ij
//   shift_i = 1/(N-1) sum_{j != i} clip((x_i - x_j) w_ij, -100, 100).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 96;          // pairs per tile, a multiple of kRows
constexpr int kRows = 6;           // pair rows per register block of a product
constexpr int kMaxVectors = 4;     // 16-float vectors per register block
constexpr float kCoordinateClip = 100.0f;  // as egnn.COORDINATE_CLIP

// ---- Elementwise ------------------------------------------------------------

// exp(u) in float32, within 1.7e-7 relative error on [-87, 88] (measured
// against double-precision exp on 3.2e7 points). With
// u = (k / 16) ln 2 + r and |r| <= ln(2) / 32, exp(u) = 2^(k div 16)
// 2^((k mod 16) / 16) exp(r): the middle factor comes from a 16-entry table
// in one register, and exp(r) from its cubic Taylor polynomial (error below
// r^4 / 24 = 1e-8). Above 88 the result saturates at exp(88); far below
// -88 vscalefps flushes it to 0.
inline __m512 Exp(__m512 u) {
  alignas(64) static const float kTwoToSixteenths[16] = {
      1.0f,         1.04427378f, 1.09050773f, 1.13878863f, 1.18920712f, 1.24185781f, 1.29683955f, 1.35425555f,
      1.41421356f,  1.47682615f, 1.54221083f, 1.61049033f, 1.68179283f, 1.75625216f, 1.83400809f, 1.91520656f};
  u = _mm512_min_ps(u, _mm512_set1_ps(88.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(u, _mm512_set1_ps(23.0831206542234f)),  // 16 / ln 2
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln(2) / 16 in two parts, so that r keeps its low bits.
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f / 16), u);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f / 16), r);
  // vpermps reads the low 4 bits of each index, which are k mod 16 for negative k too.
  const __m512 table = _mm512_permutexvar_ps(_mm512_cvtps_epi32(k), _mm512_load_ps(kTwoToSixteenths));
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6), _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(k, _mm512_set1_ps(0.0625f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(_mm512_mul_ps(table, p), n);
}

// 1 / (1 + exp(-u)), with vrcp14ps refined by one Newton step in place of a
// division. The step takes the 14-bit estimate to about float32 rounding.
inline __m512 Sigmoid(__m512 u) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 d = _mm512_add_ps(one, Exp(_mm512_sub_ps(_mm512_setzero_ps(), u)));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
}

// a . b over n floats. Unaligned loads, because b may be a row of an XLA
// buffer, whose alignment this file does not control.
inline float Dot(const float* a, const float* b, int n) {
  __m512 sum = _mm512_setzero_ps();
  for (int k = 0; k < n; k += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), sum);
  return _mm512_reduce_add_ps(sum);
}

// y[:n] += scale * x[:n]
inline void Axpy(float scale, const float* x, float* y, int n) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int k = 0; k < n; k += 16) _mm512_storeu_ps(y + k, _mm512_fmadd_ps(s, _mm512_loadu_ps(x + k), _mm512_loadu_ps(y + k)));
}

inline void Add(const float* x, float* y, int n) {
  for (int k = 0; k < n; k += 16) _mm512_storeu_ps(y + k, _mm512_add_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(y + k)));
}

// ---- Products of a tile with an [H, H] matrix --------------------------------

// The activation that a product applies to its result in registers before
// storing it: none, silu, or silu and its slope.
enum class Activation { kNone, kSilu, kSiluAndSlope };

template <Activation kActivation>
inline void StoreActivated(__m512 u, float* out, float* slope) {
  if (kActivation == Activation::kNone) {
    _mm512_store_ps(out, u);
    return;
  }
  const __m512 s = Sigmoid(u);
  _mm512_store_ps(out, _mm512_mul_ps(u, s));
  if (kActivation == Activation::kSiluAndSlope) {
    const __m512 one = _mm512_set1_ps(1.0f);
    _mm512_store_ps(slope, _mm512_mul_ps(s, _mm512_fmadd_ps(u, _mm512_sub_ps(one, s), one)));
  }
}

// u = bias + sum_k a[p, k] m[k, c0:c0+16V] for R (<= kRows) pairs, stored
// activated into out[p, c0:c0+16V] (and its slope into slope[p, ...]).
template <Activation kActivation, int V, int R>
inline void ProductBlock(const float* a, const float* m, const float* bias, float* out, float* slope, int h, int c0) {
  __m512 acc[R][V];
  for (int v = 0; v < V; ++v) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + c0 + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int k = 0; k < h; ++k) {
    __m512 col[V];
    for (int v = 0; v < V; ++v) col[v] = _mm512_loadu_ps(m + k * h + c0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(a[r * h + k]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(s, col[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      const int offset = r * h + c0 + 16 * v;
      StoreActivated<kActivation>(acc[r][v], out + offset, slope + offset);
    }
}

template <Activation kActivation, int V>
inline void ProductColumns(const float* a, const float* m, const float* bias, float* out, float* slope, int pairs,
                           int h, int c0) {
  int p = 0;
  for (; p + kRows <= pairs; p += kRows)
    ProductBlock<kActivation, V, kRows>(a + p * h, m, bias, out + p * h, slope + p * h, h, c0);
  for (; p < pairs; ++p) ProductBlock<kActivation, V, 1>(a + p * h, m, bias, out + p * h, slope + p * h, h, c0);
}

// out[p, :] = activation(bias + a[p, :] m) for a [pairs, h] tile and m
// [h, h], and slope[p, :] its slope for kSiluAndSlope. bias may be null, and
// so may slope unless it is written.
template <Activation kActivation>
void Product(const float* a, const float* m, const float* bias, float* out, float* slope, int pairs, int h) {
  int c0 = 0;
  for (; c0 + 16 * kMaxVectors <= h; c0 += 16 * kMaxVectors)
    ProductColumns<kActivation, 4>(a, m, bias, out, slope, pairs, h, c0);
  switch ((h - c0) / 16) {
    case 3: ProductColumns<kActivation, 3>(a, m, bias, out, slope, pairs, h, c0); break;
    case 2: ProductColumns<kActivation, 2>(a, m, bias, out, slope, pairs, h, c0); break;
    case 1: ProductColumns<kActivation, 1>(a, m, bias, out, slope, pairs, h, c0); break;
    default: break;
  }
}

// grad[k, c0:c0+16V] += sum_p a[p, k] d[p, c0:c0+16V] for rows k0..k0+R-1,
// and with kBias also bias_grad[c0:c0+16V] += sum_p d[p, c0:c0+16V].
template <int V, int R, bool kBias>
inline void WeightGradBlock(const float* a, const float* d, float* grad, float* bias_grad, int pairs, int h, int k0,
                            int c0) {
  __m512 acc[R][V], bias_acc[V];
  for (int v = 0; v < V; ++v) {
    for (int r = 0; r < R; ++r) acc[r][v] = _mm512_loadu_ps(grad + (k0 + r) * h + c0 + 16 * v);
    if (kBias) bias_acc[v] = _mm512_loadu_ps(bias_grad + c0 + 16 * v);
  }
  for (int p = 0; p < pairs; ++p) {
    __m512 row[V];
    for (int v = 0; v < V; ++v) {
      row[v] = _mm512_load_ps(d + p * h + c0 + 16 * v);
      if (kBias) bias_acc[v] = _mm512_add_ps(bias_acc[v], row[v]);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(a[p * h + k0 + r]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(s, row[v], acc[r][v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(grad + (k0 + r) * h + c0 + 16 * v, acc[r][v]);
    if (kBias) _mm512_storeu_ps(bias_grad + c0 + 16 * v, bias_acc[v]);
  }
}

template <int V>
inline void WeightGradColumns(const float* a, const float* d, float* grad, float* bias_grad, int pairs, int h,
                              int c0) {
  // For h a multiple of 16, the rows left after blocks of 6 (h mod 6) are 0,
  // 2 or 4. The bias sum rides on a block of 4 rows, or else of 2, which
  // leave registers free for it.
  int k0 = 0;
  for (; k0 + kRows <= h - (h % kRows == 0 ? kRows : 0); k0 += kRows)
    WeightGradBlock<V, kRows, false>(a, d, grad, bias_grad, pairs, h, k0, c0);
  if (h - k0 == kRows) {  // h mod 6 == 0: end with a block of 4 and one of 2
    WeightGradBlock<V, 4, false>(a, d, grad, bias_grad, pairs, h, k0, c0);
    WeightGradBlock<V, 2, true>(a, d, grad, bias_grad, pairs, h, k0 + 4, c0);
  } else if (h - k0 == 4) {
    WeightGradBlock<V, 4, true>(a, d, grad, bias_grad, pairs, h, k0, c0);
  } else {
    WeightGradBlock<V, 2, true>(a, d, grad, bias_grad, pairs, h, k0, c0);
  }
}

// grad += a^T d and bias_grad += the column sums of d, for [pairs, h] tiles
// a and d, grad [h, h] and bias_grad [h].
void WeightGrad(const float* a, const float* d, float* grad, float* bias_grad, int pairs, int h) {
  int c0 = 0;
  for (; c0 + 16 * kMaxVectors <= h; c0 += 16 * kMaxVectors)
    WeightGradColumns<4>(a, d, grad, bias_grad, pairs, h, c0);
  switch ((h - c0) / 16) {
    case 3: WeightGradColumns<3>(a, d, grad, bias_grad, pairs, h, c0); break;
    case 2: WeightGradColumns<2>(a, d, grad, bias_grad, pairs, h, c0); break;
    case 1: WeightGradColumns<1>(a, d, grad, bias_grad, pairs, h, c0); break;
    default: break;
  }
}

// ---- Problem description ----------------------------------------------------

struct Weights {
  const float* pair_kernel;  // [1 + A, H]
  const float* kernel_e1;    // [H, H]
  const float* bias_e1;      // [H]
  const float* kernel_x0;    // [H, H]
  const float* bias_x0;      // [H]
  const float* kernel_x1;    // [H]
  std::vector<float> kernel_e1_t, kernel_x0_t;  // transposes, for the input gradients
};

struct Problem {
  int64_t systems, particles, hidden, attrs;
  const float* receiver_part;
  const float* sender_part;
  const float* x;
  const float* edge_attr;
  Weights w;
};

// Weight gradients of one chunk of systems.
struct WeightGrads {
  std::vector<float> pair_kernel, kernel_e1, bias_e1, kernel_x0, bias_x0, kernel_x1;
  WeightGrads(int64_t h, int64_t attrs)
      : pair_kernel((1 + attrs) * h), kernel_e1(h * h), bias_e1(h), kernel_x0(h * h), bias_x0(h), kernel_x1(h) {}
};

// The pair arrays of one tile, [kTile, H] each, 64-byte aligned.
struct TileBuffers {
  explicit TileBuffers(int64_t h) : storage(8 * kTile * h + 16) {
    float* base = storage.data();
    base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
    float** slots[] = {&a1, &s1, &a2, &s2, &a3, &s3, &d3, &d2};
    for (float** slot : slots) {
      *slot = base;
      base += kTile * h;
    }
  }
  std::vector<float> storage;
  float *a1, *s1, *a2, *s2, *a3, *s3, *d3, *d2;
  int receiver[kTile], sender[kTile];
  float diff[kTile][3];
  float features[kTile][8];  // [|x_i - x_j|^2, a_ij], at most 7 attributes
  float edge_weight[kTile];
};

// Fills the tile's indices and features for pairs first..first+count of
// system b, and a1 = silu of phi_e's first layer (with its slope s1 when
// slopes is set).
void BuildTile(const Problem& pr, int64_t b, int64_t first, int count, bool slopes, TileBuffers& t) {
  const int64_t n = pr.particles, h = pr.hidden, attrs = pr.attrs;
  const float* x = pr.x + b * n * 3;
  // Pair number q of a system is receiver i = q / (N - 1) and the sender
  // index jj = q mod (N - 1) among the others, so sender j = jj + (jj >= i).
  int i = static_cast<int>(first / (n - 1));
  int jj = static_cast<int>(first % (n - 1));
  for (int p = 0; p < count; ++p) {
    const int j = jj + (jj >= i);
    t.receiver[p] = i;
    t.sender[p] = j;
    float radial = 0.0f;
    for (int c = 0; c < 3; ++c) {
      t.diff[p][c] = x[3 * i + c] - x[3 * j + c];
      radial += t.diff[p][c] * t.diff[p][c];
    }
    t.features[p][0] = radial;
    const float* attr = pr.edge_attr + ((b * n + i) * n + j) * attrs;
    for (int f = 0; f < attrs; ++f) t.features[p][1 + f] = attr[f];

    const float* r = pr.receiver_part + (b * n + i) * h;
    const float* s = pr.sender_part + (b * n + j) * h;
    for (int k = 0; k < h; k += 16) {
      __m512 u = _mm512_add_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(s + k));
      for (int f = 0; f <= attrs; ++f)
        u = _mm512_fmadd_ps(_mm512_set1_ps(t.features[p][f]), _mm512_loadu_ps(pr.w.pair_kernel + f * h + k), u);
      if (slopes) StoreActivated<Activation::kSiluAndSlope>(u, t.a1 + p * h + k, t.s1 + p * h + k);
      else StoreActivated<Activation::kSilu>(u, t.a1 + p * h + k, nullptr);
    }

    if (++jj == n - 1) {
      jj = 0;
      ++i;
    }
  }
}

// Forward values of a tile: a1, a2 = m, a3 and w, with the slopes s1, s2
// and s3 when slopes is set.
void TileForward(const Problem& pr, int64_t b, int64_t first, int count, bool slopes, TileBuffers& t) {
  const int64_t h = pr.hidden;
  BuildTile(pr, b, first, count, slopes, t);
  if (slopes) {
    Product<Activation::kSiluAndSlope>(t.a1, pr.w.kernel_e1, pr.w.bias_e1, t.a2, t.s2, count, h);
    Product<Activation::kSiluAndSlope>(t.a2, pr.w.kernel_x0, pr.w.bias_x0, t.a3, t.s3, count, h);
  } else {
    Product<Activation::kSilu>(t.a1, pr.w.kernel_e1, pr.w.bias_e1, t.a2, nullptr, count, h);
    Product<Activation::kSilu>(t.a2, pr.w.kernel_x0, pr.w.bias_x0, t.a3, nullptr, count, h);
  }
  for (int p = 0; p < count; ++p) t.edge_weight[p] = Dot(t.a3 + p * h, pr.w.kernel_x1, h);
}

int64_t PairsPerSystem(const Problem& pr) { return pr.particles * (pr.particles - 1); }

void ForwardSystem(const Problem& pr, int64_t b, TileBuffers& t, float* incoming, float* shift) {
  const int64_t n = pr.particles, h = pr.hidden, pairs = PairsPerSystem(pr);
  float* incoming_b = incoming + b * n * h;
  float* shift_b = shift + b * n * 3;
  std::memset(incoming_b, 0, n * h * sizeof(float));
  std::memset(shift_b, 0, n * 3 * sizeof(float));
  for (int64_t first = 0; first < pairs; first += kTile) {
    const int count = static_cast<int>(std::min<int64_t>(kTile, pairs - first));
    TileForward(pr, b, first, count, false, t);
    for (int p = 0; p < count; ++p) {
      const int i = t.receiver[p];
      Add(t.a2 + p * h, incoming_b + i * h, h);
      for (int c = 0; c < 3; ++c)
        shift_b[3 * i + c] += std::clamp(t.diff[p][c] * t.edge_weight[p], -kCoordinateClip, kCoordinateClip);
    }
  }
  const float mean = 1.0f / static_cast<float>(n - 1);
  for (int64_t k = 0; k < n * 3; ++k) shift_b[k] *= mean;
}

struct NodeGrads {
  float* receiver_part;  // [B, N, H]
  float* sender_part;    // [B, N, H]
  float* x;              // [B, N, 3]
  float* edge_attr;      // [B, N, N, A]
};

void BackwardSystem(const Problem& pr, int64_t b, const float* incoming_grad, const float* shift_grad, TileBuffers& t,
                    WeightGrads& wg, const NodeGrads& out) {
  const int64_t n = pr.particles, h = pr.hidden, attrs = pr.attrs, pairs = PairsPerSystem(pr);
  const float mean = 1.0f / static_cast<float>(n - 1);
  const float* incoming_grad_b = incoming_grad + b * n * h;
  const float* shift_grad_b = shift_grad + b * n * 3;
  float* receiver_grad = out.receiver_part + b * n * h;
  float* sender_grad = out.sender_part + b * n * h;
  float* x_grad = out.x + b * n * 3;
  float* attr_grad = out.edge_attr + b * n * n * attrs;
  std::memset(receiver_grad, 0, n * h * sizeof(float));
  std::memset(sender_grad, 0, n * h * sizeof(float));
  std::memset(x_grad, 0, n * 3 * sizeof(float));
  std::memset(attr_grad, 0, n * n * attrs * sizeof(float));  // the diagonal stays 0
  float diff_grad[kTile][3];

  for (int64_t first = 0; first < pairs; first += kTile) {
    const int count = static_cast<int>(std::min<int64_t>(kTile, pairs - first));
    TileForward(pr, b, first, count, true, t);

    // Coordinate update: shift_i = mean sum_j clip(diff_ij w_ij). The clip
    // passes the gradient only strictly inside its bounds, so a product of
    // exactly +-100 gets none.
    for (int p = 0; p < count; ++p) {
      const int i = t.receiver[p];
      const float w = t.edge_weight[p];
      float w_grad = 0.0f;
      for (int c = 0; c < 3; ++c) {
        const float y = t.diff[p][c] * w;
        const float g = (y > -kCoordinateClip && y < kCoordinateClip) ? mean * shift_grad_b[3 * i + c] : 0.0f;
        w_grad += g * t.diff[p][c];
        diff_grad[p][c] = g * w;
      }
      // phi_x's output layer, then its hidden layer's slope.
      Axpy(w_grad, t.a3 + p * h, wg.kernel_x1.data(), h);
      const __m512 scale = _mm512_set1_ps(w_grad);
      for (int k = 0; k < h; k += 16)
        _mm512_store_ps(t.d3 + p * h + k, _mm512_mul_ps(_mm512_mul_ps(scale, _mm512_loadu_ps(pr.w.kernel_x1 + k)),
                                                        _mm512_load_ps(t.s3 + p * h + k)));
    }
    WeightGrad(t.a2, t.d3, wg.kernel_x0.data(), wg.bias_x0.data(), count, h);

    // Messages feed phi_x and the sum over senders.
    Product<Activation::kNone>(t.d3, pr.w.kernel_x0_t.data(), nullptr, t.d2, nullptr, count, h);
    for (int p = 0; p < count; ++p) {
      float* row = t.d2 + p * h;
      const float* up = incoming_grad_b + t.receiver[p] * h;
      for (int k = 0; k < h; k += 16)
        _mm512_store_ps(row + k, _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(row + k), _mm512_loadu_ps(up + k)),
                                               _mm512_load_ps(t.s2 + p * h + k)));
    }
    WeightGrad(t.a1, t.d2, wg.kernel_e1.data(), wg.bias_e1.data(), count, h);

    // phi_e's first layer; its gradient goes to the node parts and pair features.
    Product<Activation::kNone>(t.d2, pr.w.kernel_e1_t.data(), nullptr, t.d3, nullptr, count, h);
    for (int p = 0; p < count; ++p) {
      float* row = t.d3 + p * h;
      for (int k = 0; k < h; k += 16)
        _mm512_store_ps(row + k, _mm512_mul_ps(_mm512_load_ps(row + k), _mm512_load_ps(t.s1 + p * h + k)));
      const int i = t.receiver[p], j = t.sender[p];
      Add(row, receiver_grad + i * h, h);
      Add(row, sender_grad + j * h, h);
      for (int f = 0; f <= attrs; ++f) Axpy(t.features[p][f], row, wg.pair_kernel.data() + f * h, h);
      const float radial_grad = Dot(row, pr.w.pair_kernel, h);
      for (int f = 0; f < attrs; ++f) attr_grad[(i * n + j) * attrs + f] = Dot(row, pr.w.pair_kernel + (1 + f) * h, h);
      for (int c = 0; c < 3; ++c) {
        const float g = diff_grad[p][c] + 2.0f * t.diff[p][c] * radial_grad;
        x_grad[3 * i + c] += g;
        x_grad[3 * j + c] -= g;
      }
    }
  }
}

// ---- Work sharing over XLA's intra-op thread pool ------------------------------

// The systems are split into chunks of consecutive systems, and each chunk
// sums its own weight gradients. Which thread takes a chunk varies from run
// to run, but the sums do not, so a training run is reproducible to the bit.
// Sixteen chunks per worker keep the threads within about one small chunk
// of each other at the end. The count depends on the pool's size, so the
// sums are the same from run to run on one machine, not across machines.
struct Chunks {
  Chunks(int64_t systems, int workers) : systems(systems), count(std::min<int64_t>(systems, 16 * workers)) {}
  int64_t begin(int64_t chunk) const { return chunk * systems / count; }
  int64_t end(int64_t chunk) const { return (chunk + 1) * systems / count; }
  int64_t systems, count;
};

// Runs body(worker, chunk) for every chunk, on the calling thread and on
// workers - 1 pool tasks. worker, from 0 to workers - 1, indexes per-thread
// scratch. Chunks are taken from a shared counter, and the caller waits only
// for chunks that were taken. So a task that starts late finds none left
// and returns at once, and the caller never waits for a task that has not
// started.
template <typename Body>
void ForEachChunk(ffi::ThreadPool& pool, int64_t chunks, int workers, Body body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int> next_worker{1};
    std::mutex mutex;
    std::condition_variable all_done;
    int64_t done = 0;
  };
  auto shared = std::make_shared<Shared>();
  const int64_t total = chunks;
  auto run = [shared, total, &body](int worker) {
    int64_t taken = 0;
    for (int64_t chunk; (chunk = shared->next.fetch_add(1)) < total; ++taken) body(worker, chunk);
    if (taken > 0) {
      std::lock_guard<std::mutex> lock(shared->mutex);
      shared->done += taken;
      if (shared->done == total) shared->all_done.notify_all();
    }
  };
  for (int k = 1; k < workers; ++k) {
    // `body` lives on the caller's stack. A task only calls it after taking a
    // chunk, and the caller returns only once every taken chunk is done.
    pool.Schedule([shared, run]() mutable {
      const int worker = shared->next_worker.fetch_add(1);
      run(worker);
    });
  }
  run(0);
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_done.wait(lock, [&] { return shared->done == total; });
}

int WorkerCount(ffi::ThreadPool& pool, int64_t systems) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), systems)));
}

std::vector<float> Transpose(const float* m, int64_t h) {
  std::vector<float> t(h * h);
  for (int64_t r = 0; r < h; ++r)
    for (int64_t c = 0; c < h; ++c) t[c * h + r] = m[r * h + c];
  return t;
}

ffi::Error DescribeProblem(ffi::Buffer<ffi::F32> receiver_part, ffi::Buffer<ffi::F32> sender_part,
                           ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> edge_attr,
                           ffi::Buffer<ffi::F32> pair_kernel, ffi::Buffer<ffi::F32> kernel_e1,
                           ffi::Buffer<ffi::F32> bias_e1, ffi::Buffer<ffi::F32> kernel_x0,
                           ffi::Buffer<ffi::F32> bias_x0, ffi::Buffer<ffi::F32> kernel_x1, Problem& pr) {
  const auto dims = receiver_part.dimensions();
  const auto attr_dims = edge_attr.dimensions();
  if (dims.size() != 3 || attr_dims.size() != 4)
    return ffi::Error::InvalidArgument("pair stage: invalid ranks " + std::to_string(dims.size()) + " and " +
                                       std::to_string(attr_dims.size()) + ", expected [B, N, H] and [B, N, N, A]");
  pr.systems = dims[0];
  pr.particles = dims[1];
  pr.hidden = dims[2];
  pr.attrs = attr_dims[3];
  if (pr.particles < 2 || pr.hidden % 16 != 0 || pr.attrs > 7)
    return ffi::Error::InvalidArgument("pair stage: invalid N = " + std::to_string(pr.particles) + ", H = " +
                                       std::to_string(pr.hidden) + " or A = " + std::to_string(pr.attrs) +
                                       "; expected N >= 2, H a multiple of 16 and A <= 7");
  pr.receiver_part = receiver_part.typed_data();
  pr.sender_part = sender_part.typed_data();
  pr.x = x.typed_data();
  pr.edge_attr = edge_attr.typed_data();
  pr.w.pair_kernel = pair_kernel.typed_data();
  pr.w.kernel_e1 = kernel_e1.typed_data();
  pr.w.bias_e1 = bias_e1.typed_data();
  pr.w.kernel_x0 = kernel_x0.typed_data();
  pr.w.bias_x0 = bias_x0.typed_data();
  pr.w.kernel_x1 = kernel_x1.typed_data();
  return ffi::Error::Success();
}

ffi::Error PairStageForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> receiver_part,
                                ffi::Buffer<ffi::F32> sender_part, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> edge_attr, ffi::Buffer<ffi::F32> pair_kernel,
                                ffi::Buffer<ffi::F32> kernel_e1, ffi::Buffer<ffi::F32> bias_e1,
                                ffi::Buffer<ffi::F32> kernel_x0, ffi::Buffer<ffi::F32> bias_x0,
                                ffi::Buffer<ffi::F32> kernel_x1, ffi::ResultBuffer<ffi::F32> incoming,
                                ffi::ResultBuffer<ffi::F32> shift) {
  Problem pr;
  if (auto error = DescribeProblem(receiver_part, sender_part, x, edge_attr, pair_kernel, kernel_e1, bias_e1,
                                   kernel_x0, bias_x0, kernel_x1, pr);
      error.failure())
    return error;
  const int workers = WorkerCount(pool, pr.systems);
  std::vector<TileBuffers> tiles;
  for (int k = 0; k < workers; ++k) tiles.emplace_back(pr.hidden);
  float* incoming_out = incoming->typed_data();
  float* shift_out = shift->typed_data();
  const Chunks chunks(pr.systems, workers);
  ForEachChunk(pool, chunks.count, workers, [&](int worker, int64_t chunk) {
    for (int64_t b = chunks.begin(chunk); b < chunks.end(chunk); ++b)
      ForwardSystem(pr, b, tiles[worker], incoming_out, shift_out);
  });
  return ffi::Error::Success();
}

ffi::Error PairStageBackwardImpl(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> receiver_part, ffi::Buffer<ffi::F32> sender_part,
    ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> edge_attr, ffi::Buffer<ffi::F32> pair_kernel,
    ffi::Buffer<ffi::F32> kernel_e1, ffi::Buffer<ffi::F32> bias_e1, ffi::Buffer<ffi::F32> kernel_x0,
    ffi::Buffer<ffi::F32> bias_x0, ffi::Buffer<ffi::F32> kernel_x1, ffi::Buffer<ffi::F32> incoming_grad,
    ffi::Buffer<ffi::F32> shift_grad, ffi::ResultBuffer<ffi::F32> receiver_grad,
    ffi::ResultBuffer<ffi::F32> sender_grad, ffi::ResultBuffer<ffi::F32> x_grad,
    ffi::ResultBuffer<ffi::F32> edge_attr_grad, ffi::ResultBuffer<ffi::F32> pair_kernel_grad,
    ffi::ResultBuffer<ffi::F32> kernel_e1_grad, ffi::ResultBuffer<ffi::F32> bias_e1_grad,
    ffi::ResultBuffer<ffi::F32> kernel_x0_grad, ffi::ResultBuffer<ffi::F32> bias_x0_grad,
    ffi::ResultBuffer<ffi::F32> kernel_x1_grad) {
  Problem pr;
  if (auto error = DescribeProblem(receiver_part, sender_part, x, edge_attr, pair_kernel, kernel_e1, bias_e1,
                                   kernel_x0, bias_x0, kernel_x1, pr);
      error.failure())
    return error;
  const int64_t h = pr.hidden;
  pr.w.kernel_e1_t = Transpose(pr.w.kernel_e1, h);
  pr.w.kernel_x0_t = Transpose(pr.w.kernel_x0, h);
  const int workers = WorkerCount(pool, pr.systems);
  const Chunks chunks(pr.systems, workers);
  std::vector<TileBuffers> tiles;
  for (int k = 0; k < workers; ++k) tiles.emplace_back(h);
  std::vector<WeightGrads> grads;
  for (int64_t chunk = 0; chunk < chunks.count; ++chunk) grads.emplace_back(h, pr.attrs);
  const NodeGrads node_grads{receiver_grad->typed_data(), sender_grad->typed_data(), x_grad->typed_data(),
                             edge_attr_grad->typed_data()};
  const float* incoming_grad_in = incoming_grad.typed_data();
  const float* shift_grad_in = shift_grad.typed_data();
  ForEachChunk(pool, chunks.count, workers, [&](int worker, int64_t chunk) {
    for (int64_t b = chunks.begin(chunk); b < chunks.end(chunk); ++b)
      BackwardSystem(pr, b, incoming_grad_in, shift_grad_in, tiles[worker], grads[chunk], node_grads);
  });

  // Sum the chunks' weight gradients, in chunk order.
  auto reduce = [&](std::vector<float> WeightGrads::*field, float* out) {
    const size_t size = (grads[0].*field).size();
    std::fill(out, out + size, 0.0f);
    for (const WeightGrads& g : grads)
      for (size_t k = 0; k < size; ++k) out[k] += (g.*field)[k];
  };
  reduce(&WeightGrads::pair_kernel, pair_kernel_grad->typed_data());
  reduce(&WeightGrads::kernel_e1, kernel_e1_grad->typed_data());
  reduce(&WeightGrads::bias_e1, bias_e1_grad->typed_data());
  reduce(&WeightGrads::kernel_x0, kernel_x0_grad->typed_data());
  reduce(&WeightGrads::bias_x0, bias_x0_grad->typed_data());
  reduce(&WeightGrads::kernel_x1, kernel_x1_grad->typed_data());
  return ffi::Error::Success();
}

// The ten inputs that both passes take, in the order of cpu_kernel.py.
template <typename Binding>
auto BindPairStageInputs(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::F32>>()  // receiver_part
      .template Arg<ffi::Buffer<ffi::F32>>()  // sender_part
      .template Arg<ffi::Buffer<ffi::F32>>()  // x
      .template Arg<ffi::Buffer<ffi::F32>>()  // edge_attr
      .template Arg<ffi::Buffer<ffi::F32>>()  // pair_kernel
      .template Arg<ffi::Buffer<ffi::F32>>()  // phi_e_kernel_1
      .template Arg<ffi::Buffer<ffi::F32>>()  // phi_e_bias_1
      .template Arg<ffi::Buffer<ffi::F32>>()  // phi_x_kernel_0
      .template Arg<ffi::Buffer<ffi::F32>>()  // phi_x_bias_0
      .template Arg<ffi::Buffer<ffi::F32>>();  // phi_x_kernel_1
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GeonormPairStageForward, PairStageForwardImpl,
                              BindPairStageInputs(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                                  .Ret<ffi::Buffer<ffi::F32>>()    // incoming
                                  .Ret<ffi::Buffer<ffi::F32>>());  // shift

XLA_FFI_DEFINE_HANDLER_SYMBOL(GeonormPairStageBackward, PairStageBackwardImpl,
                              BindPairStageInputs(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                                  .Arg<ffi::Buffer<ffi::F32>>()  // incoming cotangent
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift cotangent
                                  .Ret<ffi::Buffer<ffi::F32>>()  // receiver_part
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sender_part
                                  .Ret<ffi::Buffer<ffi::F32>>()  // x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // edge_attr
                                  .Ret<ffi::Buffer<ffi::F32>>()  // pair_kernel
                                  .Ret<ffi::Buffer<ffi::F32>>()  // phi_e_kernel_1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // phi_e_bias_1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // phi_x_kernel_0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // phi_x_bias_0
                                  .Ret<ffi::Buffer<ffi::F32>>());  // phi_x_kernel_1
