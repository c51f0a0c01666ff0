// Unit tests of the pieces that need no bundle: numpy's RNG, numpy's pairwise sum, UTF-8, sha256, JSON spelling,
// config validation, the C ABI's error path. Bundle-level parity with Python is tests/cpp/test_cpp_runtime.py.
#include <gtest/gtest.h>

#include <cmath>

#include "glm_runtime.h"
#include "internal.hpp"

using namespace glm;

TEST(Rng, MatchesNumpyDefaultRng) {
  // np.random.default_rng(seed).random(3)
  struct Case { uint64_t seed; double v[3]; };
  const Case cases[] = {
      {0, {0.6369616873214543, 0.2697867137638703, 0.04097352393619469}},
      {1, {0.5118216247002567, 0.9504636963259353, 0.14415961271963373}},
      {12345, {0.22733602246716966, 0.31675833970975287, 0.7973654573327341}},
      {1099511627783ULL, {0.829812891829413, 0.25530515834910417, 0.15379071585298754}},
  };
  for (const auto& c : cases) {
    Pcg64 rng(c.seed);
    for (double want : c.v) EXPECT_EQ(rng.random(), want) << "seed " << c.seed;
  }
}

TEST(Numpy, PairwiseSumMatchesSequentialOnExactValues) {
  std::vector<double> v(1000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i);
  EXPECT_EQ(pairwise_sum(v.data(), v.size()), 499500.0);
  EXPECT_EQ(pairwise_sum(v.data(), 5), 10.0);
}

TEST(Utf8, LossyMatchesPython) {
  // b"a\xe4\xb8b\xff\xf0\x9f\x98".decode("utf-8", "replace") == "a\ufffdb\ufffd\ufffd"
  EXPECT_EQ(utf8_lossy("a\xe4\xb8" "b\xff\xf0\x9f\x98"), "a\xEF\xBF\xBD" "b\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(utf8_lossy("\xed\xa0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // a surrogate: 3 replacements
  EXPECT_EQ(utf8_lossy("中文😀"), "中文😀");
  EXPECT_TRUE(utf8_valid("中文"));
  EXPECT_FALSE(utf8_valid("\xc0\x80"));
}

TEST(Sha256, KnownDigests) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(std::string(1000, 'a')), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
}

TEST(Json, PythonSpelling) {
  EXPECT_EQ(json_string("a\"b\n中"), "\"a\\\"b\\n中\"");
  EXPECT_EQ(json_double(1.0), "1.0");
  EXPECT_EQ(json_double(0.5), "0.5");
  EXPECT_EQ(json_double(1e-05), "1e-05");
}

TEST(Config, InvalidValuesNameTheField) {
  GenerationConfig c;
  c.temperature = 0;
  EXPECT_THROW(c.validate(), SamplingConfigError);
  c = {};
  c.top_p = 1.5;
  try {
    c.validate();
    FAIL();
  } catch (const SamplingConfigError& e) {
    EXPECT_EQ(std::string(e.what()), "top_p must be in (0, 1], got 1.5");
  }
  c = {};
  c.top_k = -1;
  EXPECT_THROW(c.validate(), SamplingConfigError);
  c = {};
  c.repetition_penalty = NAN;
  EXPECT_THROW(c.validate(), SamplingConfigError);
  c = {};
  c.max_new_tokens = 0;
  EXPECT_THROW(c.validate(), SamplingConfigError);
  c = {};
  c.stop = {""};
  EXPECT_THROW(c.validate(), SamplingConfigError);
}

TEST(Sampling, GreedyAndTopK) {
  std::vector<float> logits = {0.1f, 3.0f, 3.0f, -1.0f, 2.0f, 0.0f};
  GenerationConfig c;
  auto t = next_tokens(logits, 2, 3, c, nullptr, nullptr);
  EXPECT_EQ(t[0], 1);  // the lowest id wins a tie
  EXPECT_EQ(t[1], 1);
  c.do_sample = true;
  c.top_k = 1;
  Pcg64 rng(0);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(next_tokens(logits, 2, 3, c, &rng, nullptr)[1], 1);
}

TEST(CApi, ErrorsAreCodesWithOneLine) {
  glm_model* m = nullptr;
  EXPECT_EQ(glm_model_load("/nonexistent/bundle", nullptr, &m), GLM_ERR_BUNDLE);
  EXPECT_EQ(m, nullptr);
  EXPECT_EQ(std::string(glm_last_error()), "/nonexistent/bundle: bundle directory does not exist");
  EXPECT_EQ(glm_model_load(nullptr, nullptr, &m), GLM_ERR_INVALID_ARGUMENT);
  glm_result* r = nullptr;
  EXPECT_EQ(glm_generate(nullptr, "x", nullptr, 0, nullptr, nullptr, nullptr, &r), GLM_ERR_INVALID_ARGUMENT);
  glm_free(nullptr);
  glm_model_free(nullptr);
  glm_result_free(nullptr);
}
