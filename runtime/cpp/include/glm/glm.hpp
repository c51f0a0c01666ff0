// glm-export's C++ runtime: load a bundle written by `glm-export onnx` (or `quantize`) and generate, with no Python
// in the process. The behaviour (manifest checks, tokenizers, chat formats, the decode loop, sampling and its RNG,
// finish reasons) follows the Python runtime (runtime/*.py) token for token; tests/cpp compares the two.
//
//     auto model = glm::Model::load("bundle/");
//     glm::GenerationConfig cfg;  cfg.max_new_tokens = 32;
//     auto r = model->generate("Hello", cfg, [](const glm::TokenEvent& e) { std::cout << e.text << std::flush; });
//
// Every error the library raises on purpose is a glm::Error (one-line message); the subclasses mirror the Python
// runtime's BundleError, GenerationError, SamplingConfigError, TokenizerError and BackendError.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace glm {

// ------------------------------------------------------------------------------------------------ errors

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class BundleError : public Error {  // missing, incomplete, corrupt bundle; manifest newer than this runtime
 public:
  using Error::Error;
};
class GenerationError : public Error {  // impossible request: empty prompt, prompt longer than the context, ...
 public:
  using Error::Error;
};
class SamplingConfigError : public GenerationError {  // a sampling value out of range
 public:
  using GenerationError::GenerationError;
};
class TokenizerError : public Error {  // tokenizer files missing or unreadable, no chat format, ...
 public:
  using Error::Error;
};
class BackendError : public Error {  // the backend cannot run (unknown backend, bad option, closed model)
 public:
  using Error::Error;
};

// ------------------------------------------------------------------------------------------------ the model spec

// runtime/spec.py's ModelSpec, as read from manifest.json.
struct ModelSpec {
  std::string generation;
  int num_layers = 0, hidden_size = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, ffn_hidden_size = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  std::vector<int64_t> eos_token_ids;
  int64_t pad_token_id = 0;
  std::string tokenizer_kind = "none";  // sentencepiece | tiktoken | tokenizer.json | none
  std::string chat_format = "none";     // chatglm2 | chatglm3 | glm4 | template | none
  std::map<std::string, int64_t> special_tokens;
};

// ------------------------------------------------------------------------------------------------ options

struct LoadOptions {
  std::string backend = "onnxruntime";  // the only one so far; the seam (src/backend.hpp) takes others
  int threads = 0;                      // onnxruntime intra-op threads; 0: onnxruntime's choice
  int prefill_chunk = 256;              // prompt tokens per prefill forward; 0: the whole prompt at once
  bool verify_files = true;             // check every listed file's sha256 (hashed once, then stamped, as Python)
  bool verify_checksums = false;        // re-hash every listed file even when the stamp covers it
};

// runtime/sampling.py's GenerationConfig; validate() throws SamplingConfigError naming the field.
struct GenerationConfig {
  int max_new_tokens = 128;
  bool do_sample = false;  // false: greedy; the sampling fields are then ignored (repetition_penalty still applies)
  double temperature = 1.0;
  int top_k = 0;
  double top_p = 1.0;
  double repetition_penalty = 1.0;
  std::optional<uint64_t> seed;                        // numpy's default_rng(seed): the same draws as Python
  std::vector<std::string> stop;                       // stop strings; the text ends before the first one found
  std::optional<std::vector<int64_t>> eos_token_ids;   // replaces the model's eos ids when set
  std::optional<int64_t> max_length;                   // cap on prompt + generated tokens
  void validate() const;
};

struct Message {
  std::string role;     // system | user | assistant | observation ("tool" is read as observation)
  std::string content;
  std::string metadata;  // chatglm3 / glm4
  std::string tools_json;  // chatglm3 system message: a JSON list of tools ("" for none)
};

// ------------------------------------------------------------------------------------------------ results

static constexpr const char* FINISH_EOS = "eos";
static constexpr const char* FINISH_STOP = "stop";
static constexpr const char* FINISH_LENGTH = "length";
static constexpr const char* FINISH_CONTEXT = "context";

struct TokenEvent {
  size_t index = 0;        // which prompt of the batch
  int64_t token_id = 0;
  std::string text;        // UTF-8 text this token releases (never a partial character; may be empty)
  std::string finish_reason;  // set on the sequence's last token, "" before
};
using TokenCallback = std::function<void(const TokenEvent&)>;

struct Timings {
  double prefill_ms = 0, decode_ms = 0;
  int64_t decode_steps = 0;
  double decode_tokens_per_s = 0;
};

struct GenerationResult {
  std::vector<int64_t> prompt_ids;
  std::vector<int64_t> generated_ids;
  std::optional<std::string> text;  // none when the bundle has no tokenizer
  std::string finish_reason;
  Timings timings;
  // The object `glm-export run --json` prints: prompt_ids, generated_ids, text, finish_reason, timings.
  std::string to_json() const;
};

class Tokenizer;  // src/tokenizer.hpp
class DecoderBackend;  // src/backend.hpp

// ------------------------------------------------------------------------------------------------ the model

class Model {
 public:
  // Reads bundle_dir/manifest.json (and nothing else about the model), opens the graph. Throws BundleError for a
  // missing or corrupt file or a newer manifest, BackendError for an unknown backend or bad option.
  static std::unique_ptr<Model> load(const std::string& bundle_dir, const LoadOptions& options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // One prompt: text (encoded with the prompt prefix) or ids (used as given).
  GenerationResult generate(const std::string& text, const GenerationConfig& config = {},
                            const TokenCallback& callback = nullptr);
  GenerationResult generate(const std::vector<int64_t>& ids, const GenerationConfig& config = {},
                            const TokenCallback& callback = nullptr);
  // Several prompts as one left-padded batch; results in prompt order.
  std::vector<GenerationResult> generate_batch(const std::vector<std::vector<int64_t>>& prompts,
                                               const GenerationConfig& config = {},
                                               const TokenCallback& callback = nullptr);
  // One assistant reply in the model's chat format; stops on the chat stop ids as well as the eos ids.
  GenerationResult chat(const std::vector<Message>& messages, const GenerationConfig& config = {},
                        const TokenCallback& callback = nullptr);

  std::vector<int64_t> encode(const std::string& text) const;  // prompt prefix + ids of plain text
  std::vector<int64_t> chat_ids(const std::vector<Message>& messages) const;
  std::string decode(const std::vector<int64_t>& ids) const;
  bool has_tokenizer() const;
  const Tokenizer& tokenizer() const;  // TokenizerError when the bundle has none

  const ModelSpec& spec() const { return spec_; }
  const std::string& precision() const { return precision_; }
  const std::string& bundle_dir() const { return bundle_dir_; }
  int64_t context_length() const { return context_length_; }

 private:
  Model() = default;
  std::vector<GenerationResult> run(const std::vector<std::vector<int64_t>>& prompts, const GenerationConfig& config,
                                    const std::vector<int64_t>& extra_eos, const TokenCallback& callback);
  std::string bundle_dir_, precision_;
  ModelSpec spec_;
  int64_t context_length_ = 0;
  int prefill_chunk_ = 256;
  std::unique_ptr<DecoderBackend> backend_;
  mutable std::shared_ptr<Tokenizer> tokenizer_;  // loaded on first use, like the Python runtime
  mutable bool tokenizer_loaded_ = false;
  const Tokenizer* tokenizer_or_null() const;
};

}  // namespace glm
