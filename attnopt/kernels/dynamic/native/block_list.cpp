// Block-list attention on CPU, fp32: flash attention over each query block's own list of key blocks, reading q, k,
// v in place (no gather). Built by attnopt/kernels/dynamic/native.py (g++ -O3 -march=native -fopenmp), called
// through ctypes with one Problem; the derivation and layouts are in that module's docstring.
//
// Every score tile is kept transposed, ST [bn][bm] (key c, query r): it is K_n · Qᵀ, computed with q's block
// transposed once per unit into a local [D][bm] buffer, so k and v are read row by row where they are. The online
// softmax runs along c, which is the outer index: row maxima and sums are elementwise vector operations over r.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <omp.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4), __may_alias__));
constexpr int W = 16;  // floats per vector
constexpr float NEG_INF = -INFINITY;

static inline vf load(const float* p) { return *(const vfu*)p; }
static inline void store(float* p, vf x) { *(vfu*)p = x; }
static inline vf splat(float s) {  // one vbroadcastss (adding s to a zero vector costs an extra vaddss)
  return (vf){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}

// 2^x, |relative error| < 1e-7 for x in [-126, 127]; 0 below -126.5 (and for -inf).
static inline vf exp2v(vf x) {
  x = x < splat(-127.f) ? splat(-127.f) : x;
  x = x > splat(127.f) ? splat(127.f) : x;
  vf t = x + 0.5f;
  vi n = __builtin_convertvector(t, vi);
  n = n + (__builtin_convertvector(n, vf) > t);  // floor: truncation rounds negative t up (true is -1)
  vf f = x - __builtin_convertvector(n, vf);      // in [-0.5, 0.5]
  vf p = splat(1.5252733804059838e-05f);
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  vi bits = (n + 127) << 23;  // n = -127 gives 0.0
  return p * (vf)bits;
}

struct Problem {
  const float *q, *k, *v, *dout;  // q [B, Hq, Sq, D], k [B, Hkv, SkP, D], v [B, Hkv, SkP, Dv]: contiguous
  float *o, *lse, *dq, *dk, *dv;          // outputs (forward: o, lse; backward: dq, dk, dv)
  const float *lse2, *delta;              // backward: lse·log2(e) (0 where -inf), rowsum(dO ∘ O)  [B, Hq, Sq]
  const int32_t *num, *idx;               // [B, Hs, NQ], [B, Hs, NQ, L]; Hs = 1 or Hq
  const int32_t *inv_ptr, *inv_units;     // backward: units (h·NQ + m) selecting each (b, hkv, n), CSR
  const uint8_t* valid;                   // [B, Sk] or null
  int64_t B, Hq, Hkv, Sq, Sk, SkP, D, Dv, bm, bn, NQ, NK, L, Hs, causal, offset, threads;
  float scale;
};

// Out[c][0..M) = Σ_d X[c·ldx + d] · Y[d][0..M), c < rows (a multiple of R). Y is [K][M] local. Register tile:
// R rows of X by NM vectors of M (R·NM = 16 accumulators); more rows than vectors halves the reloads of Y.
template <int NM, int R>
static void rows_times_local(const float* X, int64_t ldx, int64_t rows, const float* Y, int64_t K, int64_t M,
                             float* Out) {
  for (int64_t m0 = 0; m0 < M; m0 += NM * W)
    for (int64_t c = 0; c < rows; c += R) {
      vf acc[R][NM] = {};
      for (int64_t d = 0; d < K; ++d) {
        vf y[NM];
        for (int t = 0; t < NM; ++t) y[t] = load(Y + d * M + m0 + t * W);
        for (int i = 0; i < R; ++i) {
          vf x = splat(X[(c + i) * ldx + d]);
          for (int t = 0; t < NM; ++t) acc[i][t] += x * y[t];
        }
      }
      for (int i = 0; i < R; ++i)
        for (int t = 0; t < NM; ++t) store(Out + (c + i) * M + m0 + t * W, acc[i][t]);
    }
}

// Acc[i][0..N) = Acc[i]·(scale_i or 1) + Σ_{j<J} Wt[i·si + j·sj] · Z[j·ldz + 0..N), i < I (a multiple of R).
// Register tile: R rows of Acc by NN vectors of N (a chunk of N; R·NN = 16 accumulators).
template <int NN, int R>
static void accumulate(float* Acc, int64_t I, int64_t N, const float* rescale, const float* Wt, int64_t si,
                       int64_t sj, const float* Z, int64_t ldz, int64_t J) {
  for (int64_t n0 = 0; n0 < N; n0 += NN * W)
    for (int64_t i0 = 0; i0 < I; i0 += R) {
      vf acc[R][NN];
      for (int i = 0; i < R; ++i) {
        vf s = splat(rescale ? rescale[i0 + i] : 1.f);
        for (int t = 0; t < NN; ++t) acc[i][t] = load(Acc + (i0 + i) * N + n0 + t * W) * s;
      }
      for (int64_t j = 0; j < J; ++j) {
        vf z[NN];
        for (int t = 0; t < NN; ++t) z[t] = load(Z + j * ldz + n0 + t * W);
        for (int i = 0; i < R; ++i) {
          vf w = splat(Wt[(i0 + i) * si + j * sj]);
          for (int t = 0; t < NN; ++t) acc[i][t] += w * z[t];
        }
      }
      for (int i = 0; i < R; ++i)
        for (int t = 0; t < NN; ++t) store(Acc + (i0 + i) * N + n0 + t * W, acc[i][t]);
    }
}

typedef void (*RowsFn)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*);
typedef void (*AccFn)(float*, int64_t, int64_t, const float*, const float*, int64_t, int64_t, const float*, int64_t,
                      int64_t);

// Register tiles by the width of the vector dimension (16..128, a multiple of 16).
static RowsFn rows_fn(int64_t m) {
  if (m % W || m > 128) return nullptr;
  return m % (2 * W) ? rows_times_local<1, 16> : rows_times_local<2, 8>;
}

static AccFn acc_fn(int64_t n) {
  if (n % W || n > 128) return nullptr;
  return n % (2 * W) ? accumulate<1, 16> : accumulate<2, 8>;
}

// Local [K][bm] transpose of rows q0.. of X [S, K] (row stride K), times mul; rows past S are zeros.
static void transpose_rows(const float* X, int64_t q0, int64_t rows, int64_t K, int64_t bm, float mul, float* T) {
  std::memset(T, 0, sizeof(float) * K * bm);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < K; ++d) T[d * bm + r] = X[(q0 + r) * K + d] * mul;
}

// Hides, in ST [bn][bm], the elements the site's own mask or the sequence ends hide (a full tile: none).
static void mask_tile(const Problem& p, int64_t b, int64_t q0, int64_t rows, int64_t k0, float* ST) {
  const int64_t bm = p.bm, bn = p.bn;
  bool full = rows == bm && k0 + bn <= p.Sk && !(p.causal && k0 + bn - 1 > q0 + p.offset);
  const uint8_t* valid = p.valid ? p.valid + b * p.Sk : nullptr;
  if (full && valid)
    for (int64_t c = 0; c < bn && full; ++c) full = valid[k0 + c] != 0;
  if (full) return;
  for (int64_t c = 0; c < bn; ++c) {
    int64_t key = k0 + c;
    float* row = ST + c * bm;
    if (key >= p.Sk || (valid && !valid[key])) {
      for (int64_t r = 0; r < bm; ++r) row[r] = NEG_INF;
      continue;
    }
    int64_t first = p.causal ? key - p.offset - q0 : 0;  // queries r < first do not see this key
    for (int64_t r = 0; r < bm; ++r)
      if (r < first || r >= rows) row[r] = NEG_INF;
  }
}

static int64_t selection(const Problem& p, int64_t b, int64_t h, int64_t m, const int32_t** list) {
  int64_t hs = p.Hs == 1 ? 0 : h;
  int64_t unit = (b * p.Hs + hs) * p.NQ + m;
  *list = p.idx + unit * p.L;
  return p.num[unit];
}

static void forward_unit(const Problem& p, int64_t u, float* QT, float* ST, float* acc, float* mx, float* sum,
                         float* alpha) {
  const int64_t bm = p.bm, bn = p.bn, Dv = p.Dv;
  const int64_t b = u / (p.Hq * p.NQ), h = u / p.NQ % p.Hq, m = u % p.NQ, kvh = h / (p.Hq / p.Hkv);
  const int64_t q0 = m * bm, rows = std::min(bm, p.Sq - q0);
  const float* qh = p.q + (b * p.Hq + h) * p.Sq * p.D;
  const float* kh = p.k + (b * p.Hkv + kvh) * p.SkP * p.D;
  const float* vh = p.v + (b * p.Hkv + kvh) * p.SkP * Dv;
  transpose_rows(qh, q0, rows, p.D, bm, p.scale * (float)M_LOG2E, QT);  // [D][bm], base-2 logits
  std::memset(acc, 0, sizeof(float) * bm * Dv);
  for (int64_t r = 0; r < bm; ++r) mx[r] = NEG_INF, sum[r] = 0.f;
  const int32_t* list;
  const int64_t count = selection(p, b, h, m, &list);
  RowsFn scores = rows_fn(bm);
  AccFn accumulate_v = acc_fn(Dv);
  for (int64_t t = 0; t < count; ++t) {
    const int64_t k0 = (int64_t)list[t] * bn;
    scores(kh + k0 * p.D, p.D, bn, QT, p.D, bm, ST);  // ST [bn][bm]
    mask_tile(p, b, q0, rows, k0, ST);
    for (int64_t r = 0; r < bm; r += W) {  // new maxima, rescale factors, P = 2^(ST - max), row sums
      vf old = load(mx + r), hi = old;
      for (int64_t c = 0; c < bn; ++c) {
        vf s = load(ST + c * bm + r);
        hi = s > hi ? s : hi;
      }
      vf base = hi == splat(NEG_INF) ? splat(0.f) : hi;
      vf total = {};
      for (int64_t c = 0; c < bn; ++c) {
        vf e = exp2v(load(ST + c * bm + r) - base);
        store(ST + c * bm + r, e);
        total += e;
      }
      vf a = exp2v(old - base);
      store(alpha + r, a);
      store(sum + r, load(sum + r) * a + total);
      store(mx + r, hi);
    }
    accumulate_v(acc, bm, Dv, alpha, ST, 1, bm, vh + k0 * Dv, Dv, bn);  // acc[r] = acc[r]·α_r + Σ_c P[c][r] V[c]
  }
  float* oh = p.o + ((b * p.Hq + h) * p.Sq + q0) * Dv;
  float* lh = p.lse + (b * p.Hq + h) * p.Sq + q0;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
    for (int64_t e = 0; e < Dv; ++e) oh[r * Dv + e] = acc[r * Dv + e] * inv;
    lh[r] = sum[r] > 0.f ? (mx[r] + std::log2(sum[r])) * (float)M_LN2 : NEG_INF;
  }
}

extern "C" int attnopt_block_list_forward(const Problem* p) {
  if (!rows_fn(p->bm) || !acc_fn(p->Dv)) return 1;
  const int64_t units = p->B * p->Hq * p->NQ;
#pragma omp parallel num_threads((int)p->threads)
  {
    std::vector<float> buf(p->D * p->bm + p->bn * p->bm + p->bm * p->Dv + 3 * p->bm);
    float *QT = buf.data(), *ST = QT + p->D * p->bm, *acc = ST + p->bn * p->bm, *mx = acc + p->bm * p->Dv;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) forward_unit(*p, u, QT, ST, acc, mx, mx + p->bm, mx + 2 * p->bm);
  }
  return 0;
}

// P (into ST) and dSᵀ (into DT) of one tile: P = 2^(ST - lse2), dS = P ∘ (dP - Δ), with dPᵀ = V_n · dOᵀ in DT.
static void tile_grads(const Problem& p, int64_t b, int64_t q0, int64_t rows, int64_t k0, const float* vn,
                       const float* QT, const float* DOT, const float* kn, const float* l2, const float* dl, float* ST,
                       float* DT) {
  const int64_t bm = p.bm, bn = p.bn;
  rows_fn(bm)(kn, p.D, bn, QT, p.D, bm, ST);
  mask_tile(p, b, q0, rows, k0, ST);
  rows_fn(bm)(vn, p.Dv, bn, DOT, p.Dv, bm, DT);
  for (int64_t c = 0; c < bn; ++c)
    for (int64_t r = 0; r < bm; r += W) {
      vf pr = exp2v(load(ST + c * bm + r) - load(l2 + r));
      store(ST + c * bm + r, pr);
      store(DT + c * bm + r, pr * (load(DT + c * bm + r) - load(dl + r)));
    }
}

struct Rows {  // one query block's local operands for the backward
  float *QT, *DOT, *l2, *dl;
  int64_t q0, rows;
};

static void load_rows(const Problem& p, int64_t b, int64_t h, int64_t m, Rows& w) {
  const int64_t bm = p.bm, base = (b * p.Hq + h) * p.Sq;
  w.q0 = m * bm;
  w.rows = std::min(bm, p.Sq - w.q0);
  transpose_rows(p.q + base * p.D, w.q0, w.rows, p.D, bm, p.scale * (float)M_LOG2E, w.QT);
  transpose_rows(p.dout + base * p.Dv, w.q0, w.rows, p.Dv, bm, 1.f, w.DOT);
  for (int64_t r = 0; r < bm; ++r) {
    w.l2[r] = r < w.rows ? p.lse2[base + w.q0 + r] : 0.f;
    w.dl[r] = r < w.rows ? p.delta[base + w.q0 + r] : 0.f;
  }
}

static void dq_unit(const Problem& p, int64_t u, Rows& w, float* ST, float* DT, float* acc) {
  const int64_t b = u / (p.Hq * p.NQ), h = u / p.NQ % p.Hq, m = u % p.NQ, kvh = h / (p.Hq / p.Hkv);
  const float* kh = p.k + (b * p.Hkv + kvh) * p.SkP * p.D;
  const float* vh = p.v + (b * p.Hkv + kvh) * p.SkP * p.Dv;
  load_rows(p, b, h, m, w);
  std::memset(acc, 0, sizeof(float) * p.bm * p.D);
  const int32_t* list;
  const int64_t count = selection(p, b, h, m, &list);
  for (int64_t t = 0; t < count; ++t) {
    const int64_t k0 = (int64_t)list[t] * p.bn;
    tile_grads(p, b, w.q0, w.rows, k0, vh + k0 * p.Dv, w.QT, w.DOT, kh + k0 * p.D, w.l2, w.dl, ST, DT);
    acc_fn(p.D)(acc, p.bm, p.D, nullptr, DT, 1, p.bm, kh + k0 * p.D, p.D, p.bn);  // dQ[r] += Σ_c dS[c][r] K[c]
  }
  float* dqh = p.dq + ((b * p.Hq + h) * p.Sq + w.q0) * p.D;
  for (int64_t i = 0; i < w.rows * p.D; ++i) dqh[i] = acc[i] * p.scale;
}

static void dkv_block(const Problem& p, int64_t g, Rows& w, float* ST, float* DT, float* dk, float* dv) {
  const int64_t b = g / (p.Hkv * p.NK), kvh = g / p.NK % p.Hkv, n = g % p.NK, k0 = n * p.bn;
  const float* kn = p.k + ((b * p.Hkv + kvh) * p.SkP + k0) * p.D;
  const float* vn = p.v + ((b * p.Hkv + kvh) * p.SkP + k0) * p.Dv;
  std::memset(dk, 0, sizeof(float) * p.bn * p.D);
  std::memset(dv, 0, sizeof(float) * p.bn * p.Dv);
  for (int32_t e = p.inv_ptr[g]; e < p.inv_ptr[g + 1]; ++e) {
    const int64_t h = p.inv_units[e] / p.NQ, m = p.inv_units[e] % p.NQ, base = (b * p.Hq + h) * p.Sq;
    load_rows(p, b, h, m, w);
    tile_grads(p, b, w.q0, w.rows, k0, vn, w.QT, w.DOT, kn, w.l2, w.dl, ST, DT);
    // dV[c] += Σ_r P[c][r] dO[r];  dK[c] += Σ_r dS[c][r] Q[r]  (rows past Sq: not read)
    acc_fn(p.Dv)(dv, p.bn, p.Dv, nullptr, ST, p.bm, 1, p.dout + (base + w.q0) * p.Dv, p.Dv, w.rows);
    acc_fn(p.D)(dk, p.bn, p.D, nullptr, DT, p.bm, 1, p.q + (base + w.q0) * p.D, p.D, w.rows);
  }
  float* dkn = p.dk + ((b * p.Hkv + kvh) * p.SkP + k0) * p.D;
  float* dvn = p.dv + ((b * p.Hkv + kvh) * p.SkP + k0) * p.Dv;
  for (int64_t i = 0; i < p.bn * p.D; ++i) dkn[i] = dk[i] * p.scale;
  std::memcpy(dvn, dv, sizeof(float) * p.bn * p.Dv);
}

extern "C" int attnopt_block_list_backward(const Problem* p) {
  if (!rows_fn(p->bm) || !acc_fn(p->Dv) || !acc_fn(p->D)) return 1;
  const int64_t units = p->B * p->Hq * p->NQ, groups = p->B * p->Hkv * p->NK, bm = p->bm, bn = p->bn;
#pragma omp parallel num_threads((int)p->threads)
  {
    std::vector<float> buf(p->D * bm + p->Dv * bm + 2 * bm + 2 * bn * bm + bm * p->D + bn * (p->D + p->Dv));
    Rows w;
    w.QT = buf.data(), w.DOT = w.QT + p->D * bm, w.l2 = w.DOT + p->Dv * bm, w.dl = w.l2 + bm;
    float *ST = w.dl + bm, *DT = ST + bn * bm, *acc = DT + bn * bm, *dk = acc + bm * p->D, *dv = dk + bn * p->D;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t u = 0; u < units; ++u) dq_unit(*p, u, w, ST, DT, acc);
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g) dkv_block(*p, g, w, ST, DT, dk, dv);
  }
  return 0;
}
