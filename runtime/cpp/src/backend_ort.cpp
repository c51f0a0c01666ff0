// The onnxruntime backend (runtime/backends/onnxruntime.py): the bundle's graph on the CPU execution provider, the KV
// cache kept as onnxruntime values between steps (I/O binding: each step's presents are bound as the next step's
// pasts, never copied through the host), only the last position's logits read back.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstring>

#include "backend.hpp"

namespace glm {
namespace {

const char* INPUT_IDS = "input_ids";
const char* ATTENTION_MASK = "attention_mask";
const char* POSITION_IDS = "position_ids";
const char* LOGITS = "logits";

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal
      int e = -1;
      uint32_t m = mant;
      do { ++e; m <<= 1; } while ((m & 0x400) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((m & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

class OrtCache : public KVCache {
 public:
  std::vector<Ort::Value> tensors;  // past/present order: layer 0 key, layer 0 value, layer 1 key, ...
};

class OrtBackend : public DecoderBackend {
 public:
  OrtBackend(const std::string& model_path, const Manifest& manifest, const LoadOptions& options)
      : env_(ORT_LOGGING_LEVEL_ERROR, "glm-runtime"), cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    const ModelSpec& spec = manifest.spec;
    kv_heads_ = spec.num_kv_heads;
    head_dim_ = spec.head_dim;
    vocab_ = spec.vocab_size;
    kv_type_ = manifest.kv_dtype == "float16" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    kv_elem_ = manifest.kv_dtype == "float16" ? 2 : 4;
    if (options.threads < 0) throw BackendError("threads must be a positive integer, got " + std::to_string(options.threads));
    Ort::SessionOptions so;
    so.SetLogSeverityLevel(3);  // errors only
    so.SetExecutionMode(ORT_SEQUENTIAL);
    so.SetInterOpNumThreads(1);
    if (options.threads > 0) so.SetIntraOpNumThreads(options.threads);
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    try {
      session_ = std::make_unique<Ort::Session>(env_, model_path.c_str(), so);
    } catch (const Ort::Exception& e) {
      throw BundleError(model_path + ": onnxruntime cannot load it (" + first_line(e.what()) + ")");
    }
    Ort::AllocatorWithDefaultOptions alloc;
    std::set<std::string> inputs, outputs;
    for (size_t i = 0; i < session_->GetInputCount(); ++i) inputs.insert(session_->GetInputNameAllocated(i, alloc).get());
    for (size_t i = 0; i < session_->GetOutputCount(); ++i)
      outputs.insert(session_->GetOutputNameAllocated(i, alloc).get());
    for (int l = 0; l < spec.num_layers; ++l) {
      for (const char* kv : {"key", "value"}) {
        past_names_.push_back("past_key_values." + std::to_string(l) + "." + kv);
        present_names_.push_back("present." + std::to_string(l) + "." + kv);
      }
    }
    std::vector<std::string> missing;
    for (const std::string n : {INPUT_IDS, ATTENTION_MASK, POSITION_IDS})
      if (!inputs.count(n)) missing.push_back(n);
    for (const auto& n : past_names_)
      if (!inputs.count(n)) missing.push_back(n);
    if (!outputs.count(LOGITS)) missing.push_back(LOGITS);
    for (const auto& n : present_names_)
      if (!outputs.count(n)) missing.push_back(n);
    if (!missing.empty()) {
      std::string s;
      for (const auto& m : missing) s += (s.empty() ? "" : ", ") + m;
      throw BundleError(model_path + ": graph does not follow the manifest's contract; missing " + s);
    }
  }

  int64_t vocab() const override { return vocab_; }

  std::unique_ptr<KVCache> empty_cache(int64_t batch) override {
    auto cache = std::make_unique<OrtCache>();
    cache->batch = batch;
    cache->length = 0;
    const int64_t shape[4] = {batch, kv_heads_, 0, head_dim_};
    for (size_t i = 0; i < past_names_.size(); ++i)
      cache->tensors.push_back(Ort::Value::CreateTensor(allocator_, shape, 4, kv_type_));
    return cache;
  }

  std::vector<float> forward(const std::vector<int64_t>& input_ids, const std::vector<int64_t>& attention_mask,
                             const std::vector<int64_t>& position_ids, int64_t seq,
                             std::unique_ptr<KVCache>& cache_ptr) override {
    auto* cache = dynamic_cast<OrtCache*>(cache_ptr.get());
    if (!cache) throw BackendError("the cache does not belong to the onnxruntime backend");
    const int64_t b = cache->batch, total = cache->length + seq;
    if (static_cast<int64_t>(input_ids.size()) != b * seq || static_cast<int64_t>(position_ids.size()) != b * seq ||
        static_cast<int64_t>(attention_mask.size()) != b * total)
      throw BackendError("feed shapes disagree with the cache (a bug in the caller)");
    const int64_t tok_shape[2] = {b, seq}, mask_shape[2] = {b, total};
    try {
      auto ids = Ort::Value::CreateTensor<int64_t>(cpu_, const_cast<int64_t*>(input_ids.data()), input_ids.size(),
                                                   tok_shape, 2);
      auto mask = Ort::Value::CreateTensor<int64_t>(cpu_, const_cast<int64_t*>(attention_mask.data()),
                                                    attention_mask.size(), mask_shape, 2);
      auto pos = Ort::Value::CreateTensor<int64_t>(cpu_, const_cast<int64_t*>(position_ids.data()),
                                                   position_ids.size(), tok_shape, 2);
      Ort::IoBinding binding(*session_);
      binding.BindInput(INPUT_IDS, ids);
      binding.BindInput(ATTENTION_MASK, mask);
      binding.BindInput(POSITION_IDS, pos);
      for (size_t i = 0; i < past_names_.size(); ++i) binding.BindInput(past_names_[i].c_str(), cache->tensors[i]);
      binding.BindOutput(LOGITS, cpu_);
      for (const auto& n : present_names_) binding.BindOutput(n.c_str(), cpu_);
      session_->Run(Ort::RunOptions{nullptr}, binding);
      std::vector<Ort::Value> outs = binding.GetOutputValues();  // in binding order
      // logits [b, seq, vocab]: the last position of every row
      auto info = outs[0].GetTensorTypeAndShapeInfo();
      auto shape = info.GetShape();
      if (shape.size() != 3 || shape[0] != b || shape[1] != seq)
        throw BackendError("logits have an unexpected shape");
      const int64_t v = shape[2];
      vocab_ = v;
      std::vector<float> last(static_cast<size_t>(b * v));
      if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        const float* p = outs[0].GetTensorData<float>();
        for (int64_t r = 0; r < b; ++r)
          std::memcpy(&last[static_cast<size_t>(r * v)], p + (r * seq + seq - 1) * v, static_cast<size_t>(v) * 4);
      } else if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
        const auto* p = static_cast<const uint16_t*>(outs[0].GetTensorRawData());
        for (int64_t r = 0; r < b; ++r)
          for (int64_t k = 0; k < v; ++k) last[static_cast<size_t>(r * v + k)] = half_to_float(p[(r * seq + seq - 1) * v + k]);
      } else {
        throw BackendError("logits are neither float32 nor float16");
      }
      auto next = std::make_unique<OrtCache>();
      next->batch = b;
      next->length = total;
      for (size_t i = 1; i < outs.size(); ++i) next->tensors.push_back(std::move(outs[i]));
      cache_ptr = std::move(next);
      return last;
    } catch (const Ort::Exception& e) {
      throw BackendError(std::string("onnxruntime failed to run the step (") + first_line(e.what()) + ")");
    }
  }

  void select_rows(std::unique_ptr<KVCache>& cache_ptr, const std::vector<int64_t>& rows) override {
    auto* cache = dynamic_cast<OrtCache*>(cache_ptr.get());
    if (!cache) throw BackendError("the cache does not belong to the onnxruntime backend");
    auto next = std::make_unique<OrtCache>();
    next->batch = static_cast<int64_t>(rows.size());
    next->length = cache->length;
    for (auto& t : cache->tensors) {
      auto shape = t.GetTensorTypeAndShapeInfo().GetShape();  // [b, heads, len, dim]
      const size_t row_bytes = static_cast<size_t>(shape[1] * shape[2] * shape[3]) * kv_elem_;
      const int64_t new_shape[4] = {next->batch, shape[1], shape[2], shape[3]};
      Ort::Value nt = Ort::Value::CreateTensor(allocator_, new_shape, 4, kv_type_);
      const auto* src = static_cast<const char*>(t.GetTensorRawData());
      auto* dst = static_cast<char*>(nt.GetTensorMutableRawData());
      for (size_t k = 0; k < rows.size(); ++k)
        if (row_bytes) std::memcpy(dst + k * row_bytes, src + static_cast<size_t>(rows[k]) * row_bytes, row_bytes);
      next->tensors.push_back(std::move(nt));
    }
    cache_ptr = std::move(next);
  }

 private:
  Ort::Env env_;
  Ort::MemoryInfo cpu_;
  Ort::AllocatorWithDefaultOptions allocator_;
  std::unique_ptr<Ort::Session> session_;
  std::vector<std::string> past_names_, present_names_;
  int64_t kv_heads_ = 0, head_dim_ = 0, vocab_ = 0;
  ONNXTensorElementDataType kv_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  size_t kv_elem_ = 4;
};

}  // namespace

std::unique_ptr<DecoderBackend> make_onnxruntime_backend(const std::string& model_path, const Manifest& manifest,
                                                         const LoadOptions& options) {
  return std::make_unique<OrtBackend>(model_path, manifest, options);
}

}  // namespace glm
