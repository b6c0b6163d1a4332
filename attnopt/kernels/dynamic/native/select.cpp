// Block selection on CPU: the rule of attnopt/kernels/dynamic/select.py (its docstring derives it), one query
// block per iteration, in parallel; O(NK log NK) per row with no [B, H, NQ, NK] temporaries.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <omp.h>

struct Selection {
  const float* probs;  // [rows = B·H·NQ, NK]
  int32_t* num;        // [rows]
  int32_t* idx;        // [rows, NK]: the first num[row] entries, ascending
  int64_t rows, NQ, NK, Sq, Sk, bm, bn, causal, offset, top_k, sink, local, threads;
  float threshold;  // used when top_k < 0
};

static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Marks the chosen key blocks of query block m (row p of probabilities) in keep[0..NK).
static void select_row(const Selection& s, int64_t m, const float* p, std::vector<char>& keep,
                       std::vector<int32_t>& order) {
  const int64_t nk = s.NK;
  const int64_t last = std::min(m * s.bm + s.bm - 1, s.Sq - 1);
  const int64_t visible_end = s.causal ? std::min(nk, floor_div(last + s.offset, s.bn) + 1) : nk;  // allowed: j <
  const int64_t hi = std::clamp(floor_div(last + s.Sk - s.Sq, s.bn), (int64_t)0, nk - 1);
  const int64_t lo = std::clamp(floor_div(m * s.bm + s.Sk - s.Sq + 1 - s.local * s.bn, s.bn), (int64_t)0, nk - 1);
  double forced_mass = 0.0, rest_mass = 0.0;
  order.clear();
  for (int64_t j = 0; j < nk; ++j) {
    const bool allowed = j < visible_end;
    const bool forced = allowed && (j < s.sink || (s.local > 0 && j >= lo && j <= hi));
    keep[j] = forced;
    if (forced) forced_mass += p[j];
    else if (allowed) order.push_back((int32_t)j), rest_mass += p[j];
  }
  auto by_mass = [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); };
  if (s.top_k >= 0) {
    const int64_t k = std::min<int64_t>(s.top_k, order.size());
    std::partial_sort(order.begin(), order.begin() + k, order.end(), by_mass);
    for (int64_t t = 0; t < k; ++t)
      if (p[order[t]] > 0.f) keep[order[t]] = 1;
    return;
  }
  const double floor_mass = (1.0 - s.threshold) / 2 * rest_mass;  // a block this heavy is always kept
  for (int32_t j : order)
    if (p[j] > 0.f && p[j] >= floor_mass) keep[j] = 1;
  double before = forced_mass;
  size_t sorted = 0;
  for (size_t t = 0; t < order.size() && before < s.threshold; ++t) {
    if (t == sorted) {  // sort the next stretch only as far as the mass needs
      sorted = std::min(order.size(), std::max<size_t>(2 * sorted, 16));
      std::partial_sort(order.begin() + t, order.begin() + sorted, order.end(), by_mass);
    }
    keep[order[t]] = 1;
    before += p[order[t]];
  }
}

extern "C" void attnopt_select(const Selection* s) {
#pragma omp parallel num_threads((int)s->threads)
  {
    std::vector<char> keep(s->NK);
    std::vector<int32_t> order;
    order.reserve(s->NK);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < s->rows; ++row) {
      select_row(*s, row % s->NQ, s->probs + row * s->NK, keep, order);
      int32_t count = 0;
      for (int64_t j = 0; j < s->NK; ++j)
        if (keep[j]) s->idx[row * s->NK + count++] = (int32_t)j;
      s->num[row] = count;
    }
  }
}
