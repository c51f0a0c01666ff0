// The backend seam (runtime/backends/base.py's DecoderBackend): the decode loop drives a backend through this
// interface only, so a native TensorRT backend can be added beside the onnxruntime one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "internal.hpp"

namespace glm {

// The present tensors of one step, in whatever form the backend keeps them; the loop never looks inside.
class KVCache {
 public:
  virtual ~KVCache() = default;
  int64_t batch = 0;
  int64_t length = 0;
};

class DecoderBackend {
 public:
  virtual ~DecoderBackend() = default;
  virtual std::unique_ptr<KVCache> empty_cache(int64_t batch) = 0;
  // input_ids, position_ids [batch, seq]; attention_mask [batch, cache.length + seq] (row-major int64). Returns the
  // last position's logits [batch, vocab] float32; `cache` becomes the cache grown by seq.
  virtual std::vector<float> forward(const std::vector<int64_t>& input_ids, const std::vector<int64_t>& attention_mask,
                                     const std::vector<int64_t>& position_ids, int64_t seq,
                                     std::unique_ptr<KVCache>& cache) = 0;
  // Keep only `rows` (indices into the batch), in that order: one copy of the cache.
  virtual void select_rows(std::unique_ptr<KVCache>& cache, const std::vector<int64_t>& rows) = 0;
  virtual int64_t vocab() const = 0;
};

std::unique_ptr<DecoderBackend> make_onnxruntime_backend(const std::string& model_path, const Manifest& manifest,
                                                         const LoadOptions& options);

}  // namespace glm
