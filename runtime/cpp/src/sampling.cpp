// Choosing the next token (runtime/sampling.py), and numpy's default_rng so that a seed gives Python's draws.
//
// The processing order is transformers': repetition penalty, then temperature, top-k, top-p; in greedy mode only
// the penalty applies. Arithmetic follows numpy's: the processors work in float32, softmax and the CDF in
// float64, sums pairwise as np.sum does, the CDF sequential as np.cumsum does.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>

#include "internal.hpp"

namespace glm {

// ------------------------------------------------------------------------------------------------ validation

static std::string num(double v) {  // Python's str(float)
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return json_double(v);
}

void GenerationConfig::validate() const {
  if (max_new_tokens < 1)
    throw SamplingConfigError("max_new_tokens must be >= 1, got " + std::to_string(max_new_tokens));
  if (!std::isfinite(temperature) || !(temperature > 0))
    throw SamplingConfigError("temperature must be > 0 (use greedy decoding instead of 0), got " + num(temperature));
  if (top_k < 0) throw SamplingConfigError("top_k must be >= 0, got " + std::to_string(top_k));
  if (!std::isfinite(top_p) || !(top_p > 0 && top_p <= 1))
    throw SamplingConfigError("top_p must be in (0, 1], got " + num(top_p));
  if (!std::isfinite(repetition_penalty) || !(repetition_penalty > 0))
    throw SamplingConfigError("repetition_penalty must be > 0 (1 disables it), got " + num(repetition_penalty));
  for (const auto& s : stop)
    if (s.empty()) throw SamplingConfigError("stop must be a list of non-empty strings, got an empty string");
  if (eos_token_ids)
    for (int64_t i : *eos_token_ids)
      if (i < 0) throw SamplingConfigError("eos_token_ids must be >= 0, got " + std::to_string(i));
  if (max_length && *max_length < 2)
    throw SamplingConfigError("max_length must be >= 2, got " + std::to_string(*max_length));
}

// ------------------------------------------------------------------------------------------------ numpy's RNG

namespace {
// numpy/random/bit_generator.pyx: SeedSequence's hash constants
constexpr uint32_t INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
constexpr uint32_t MIX_MULT_L = 0xca01f9dd, MIX_MULT_R = 0x4973f715;
constexpr int XSHIFT = 16;
constexpr size_t POOL_SIZE = 4;

uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= MULT_A;
  value *= hash_const;
  value ^= value >> XSHIFT;
  return value;
}

uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t result = MIX_MULT_L * x - MIX_MULT_R * y;
  result ^= result >> XSHIFT;
  return result;
}

// SeedSequence(entropy).generate_state(n_words64, np.uint64)
std::vector<uint64_t> seed_sequence_state(const std::vector<uint32_t>& entropy, size_t n_words64) {
  uint32_t pool[POOL_SIZE];
  uint32_t hash_const = INIT_A;
  for (size_t i = 0; i < POOL_SIZE; ++i) pool[i] = hashmix(i < entropy.size() ? entropy[i] : 0u, hash_const);
  for (size_t src = 0; src < POOL_SIZE; ++src)
    for (size_t dst = 0; dst < POOL_SIZE; ++dst)
      if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hash_const));
  for (size_t src = POOL_SIZE; src < entropy.size(); ++src)
    for (size_t dst = 0; dst < POOL_SIZE; ++dst) pool[dst] = mix(pool[dst], hashmix(entropy[src], hash_const));
  std::vector<uint32_t> words(2 * n_words64);
  uint32_t hc = INIT_B;
  for (size_t i = 0; i < words.size(); ++i) {
    uint32_t v = pool[i % POOL_SIZE];
    v ^= hc;
    hc *= MULT_B;
    v *= hc;
    v ^= v >> XSHIFT;
    words[i] = v;
  }
  std::vector<uint64_t> out(n_words64);
  for (size_t k = 0; k < n_words64; ++k) out[k] = uint64_t(words[2 * k]) | (uint64_t(words[2 * k + 1]) << 32);
  return out;
}

const unsigned __int128 PCG_MULT = (static_cast<unsigned __int128>(0x2360ED051FC65DA4ULL) << 64) | 0x4385DF649FCCF645ULL;
}  // namespace

Pcg64::Pcg64(const std::vector<uint32_t>& entropy) {
  auto st = seed_sequence_state(entropy, 4);
  unsigned __int128 initstate = (static_cast<unsigned __int128>(st[0]) << 64) | st[1];
  unsigned __int128 initseq = (static_cast<unsigned __int128>(st[2]) << 64) | st[3];
  state_ = 0;
  inc_ = (initseq << 1) | 1;
  state_ = state_ * PCG_MULT + inc_;
  state_ += initstate;
  state_ = state_ * PCG_MULT + inc_;
}

static std::vector<uint32_t> seed_words(uint64_t seed) {  // numpy's _coerce_to_uint32_array for an int
  std::vector<uint32_t> w;
  do {
    w.push_back(static_cast<uint32_t>(seed & 0xFFFFFFFFu));
    seed >>= 32;
  } while (seed);
  return w;
}

Pcg64::Pcg64(uint64_t seed) : Pcg64(seed_words(seed)) {}

Pcg64 Pcg64::from_entropy() {
  std::random_device rd;
  std::vector<uint32_t> e(4);
  for (auto& x : e) x = rd();
  return Pcg64(e);
}

uint64_t Pcg64::next_u64() {
  state_ = state_ * PCG_MULT + inc_;
  uint64_t hi = static_cast<uint64_t>(state_ >> 64), lo = static_cast<uint64_t>(state_);
  unsigned rot = static_cast<unsigned>(state_ >> 122);
  uint64_t x = hi ^ lo;
  return (x >> rot) | (x << ((64 - rot) & 63));
}

// ------------------------------------------------------------------------------------------------ numpy arithmetic

// numpy's pairwise_sum (numpy/_core/src/umath/loops_utils.h.src), block size 128, 8 accumulators.
double pairwise_sum(const double* a, size_t n) {
  if (n < 8) {
    double res = 0.;
    for (size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int k = 0; k < 8; ++k) r[k] = a[k];
    size_t i;
    for (i = 8; i < n - (n % 8); i += 8)
      for (int k = 0; k < 8; ++k) r[k] += a[i + k];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// softmax over one row in float64 (runtime/sampling.py's softmax): -inf gets exactly 0
static void softmax_row(const float* x, size_t n, std::vector<double>& out) {
  out.resize(n);
  double mx = -std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < n; ++i) mx = std::max(mx, static_cast<double>(x[i]));
  for (size_t i = 0; i < n; ++i) out[i] = std::exp(static_cast<double>(x[i]) - mx);
  const double s = pairwise_sum(out.data(), n);
  for (size_t i = 0; i < n; ++i) out[i] = out[i] / s;
}

// ------------------------------------------------------------------------------------------------ processors

static const float NEG_INF = -std::numeric_limits<float>::infinity();

static void apply_top_k(float* row, size_t vocab, int k) {
  if (k <= 0 || static_cast<size_t>(k) >= vocab) return;
  std::vector<float> tmp(row, row + vocab);
  std::nth_element(tmp.begin(), tmp.begin() + (vocab - k), tmp.end());
  const float kth = tmp[vocab - k];
  for (size_t i = 0; i < vocab; ++i)
    if (row[i] < kth) row[i] = NEG_INF;
}

static void apply_top_p(float* row, size_t vocab, double p) {
  if (p >= 1.0) return;
  std::vector<int64_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return -row[a] < -row[b]; });
  std::vector<float> sorted(vocab);
  for (size_t i = 0; i < vocab; ++i) sorted[i] = row[order[i]];
  std::vector<double> probs;
  softmax_row(sorted.data(), vocab, probs);
  double cum = 0;
  std::vector<char> remove(vocab, 0);
  for (size_t i = 0; i < vocab; ++i) {
    cum += probs[i];
    const double before = cum - probs[i];
    remove[i] = (i > 0 && before >= p) ? 1 : 0;
  }
  for (size_t i = 0; i < vocab; ++i)
    if (remove[i]) row[order[i]] = NEG_INF;
}

std::vector<int64_t> next_tokens(const std::vector<float>& logits, size_t rows, size_t vocab,
                                 const GenerationConfig& cfg, Pcg64* rng,
                                 const std::vector<const std::set<int64_t>*>* seen) {
  std::vector<float> work(logits.begin(), logits.begin() + static_cast<std::ptrdiff_t>(rows * vocab));
  const float penalty = static_cast<float>(cfg.repetition_penalty);
  const float temperature = static_cast<float>(cfg.temperature);
  std::vector<int64_t> out(rows);
  std::vector<double> u;
  if (cfg.do_sample) {
    if (!rng) throw GenerationError("sampling needs a random generator");
    u.resize(rows);
    for (size_t r = 0; r < rows; ++r) u[r] = rng->random();  // rng.random(rows): one draw per row, in row order
  }
  std::vector<double> probs;
  for (size_t r = 0; r < rows; ++r) {
    float* row = work.data() + r * vocab;
    if (cfg.repetition_penalty != 1.0 && seen && (*seen)[r]) {
      for (int64_t id : *(*seen)[r]) {
        if (id < 0 || static_cast<size_t>(id) >= vocab) continue;
        float v = row[id];
        row[id] = v > 0 ? v / penalty : v * penalty;
      }
    }
    if (!cfg.do_sample) {
      size_t best = 0;
      for (size_t i = 1; i < vocab; ++i)
        if (row[i] > row[best] || (std::isnan(row[i]) && !std::isnan(row[best]))) best = i;
      out[r] = static_cast<int64_t>(best);
      continue;
    }
    if (cfg.temperature != 1.0)
      for (size_t i = 0; i < vocab; ++i) row[i] = row[i] / temperature;
    apply_top_k(row, vocab, cfg.top_k);
    apply_top_p(row, vocab, cfg.top_p);
    // inverse CDF on one uniform: the first index whose cdf exceeds u
    softmax_row(row, vocab, probs);
    std::vector<double> cdf(vocab);
    double c = 0;
    for (size_t i = 0; i < vocab; ++i) cdf[i] = (c += probs[i]);
    const double target = u[r] * cdf[vocab - 1];
    size_t idx = 0;
    for (size_t i = 0; i < vocab; ++i) idx += cdf[i] <= target ? 1 : 0;
    out[r] = static_cast<int64_t>(std::min(idx, vocab - 1));
  }
  return out;
}

}  // namespace glm
