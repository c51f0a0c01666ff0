// Internal pieces of the runtime: manifest, UTF-8, sha256, sampling + numpy's RNG, tokenizers, chat formats.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "glm/glm.hpp"

namespace glm {

// ------------------------------------------------------------------------------------------------ manifest.cpp

constexpr int FORMAT_VERSION = 1;

struct Manifest {
  ModelSpec spec;
  std::string precision;
  std::string model_file = "model.onnx";
  std::string kv_dtype = "float32";  // the past_key_values.0.key input's dtype
  int format_version = 0;
};

// runtime/manifest.py's read_manifest: every listed file must exist with its recorded size; with verify_files its
// checksum is checked (hashed once, then stamped, as runtime/integrity.py); verify_checksums re-hashes regardless.
Manifest read_manifest(const std::string& bundle_dir, bool verify_files, bool verify_checksums);
std::string join_path(const std::string& dir, const std::string& name);
bool is_file(const std::string& path);
bool is_dir(const std::string& path);
std::string read_file(const std::string& path);  // throws std::runtime_error with errno text
std::string py_str_repr(const std::string& s);   // Python's repr() of a str (plain ASCII names, as messages quote)
// runtime/bundle_paths.py's bundle_member: the path of bundle file `name`, refused (BundleError naming `field` and
// `where`) unless it is a plain relative name whose real path lies inside the bundle's.
std::string bundle_member(const std::string& bundle_dir, const std::string& name, const std::string& field,
                          const std::string& where);

// ------------------------------------------------------------------------------------------------ sha256.cpp

std::string sha256_file(const std::string& path);
std::string sha256_hex(const std::string& data);

// ------------------------------------------------------------------------------------------------ integrity.cpp

// runtime/integrity.py's verify_files: each listed file of the bundle (its path already checked by read_manifest)
// is hashed unless the verified
// stamp (.glm-export-verified.json in the bundle, else in the user's cache) covers it with the same digest and
// stat; a mismatch throws BundleError naming the file and both digests. The stamp is shared with the Python runtime.
struct RecordedDigest {
  std::string name;    // as the manifest lists it (the stamp's key)
  std::string path;    // bundle_member's checked path
  std::string sha256;  // the manifest's digest
};
void verify_digests(const std::string& bundle_dir, const std::vector<RecordedDigest>& digests, bool use_stamp);

// ------------------------------------------------------------------------------------------------ utf8.cpp

// Python's bytes.decode("utf-8", errors="replace") (= Rust's from_utf8_lossy): one U+FFFD per maximal invalid
// subpart.
std::string utf8_lossy(const std::string& bytes);
bool utf8_valid(const std::string& s);
void append_utf8(std::string& out, uint32_t cp);
// The code points of valid UTF-8.
std::vector<uint32_t> utf8_code_points(const std::string& s);

// ------------------------------------------------------------------------------------------------ sampling.cpp

// numpy's default_rng(seed): SeedSequence + PCG64 (XSL-RR), random() in [0, 1).
class Pcg64 {
 public:
  explicit Pcg64(uint64_t seed);  // np.random.default_rng(seed)
  static Pcg64 from_entropy();     // np.random.default_rng() (fresh OS entropy)
  uint64_t next_u64();
  double random() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }
  explicit Pcg64(const std::vector<uint32_t>& entropy);

 private:
  unsigned __int128 state_ = 0, inc_ = 0;
};

// Next token for every row of logits [rows, vocab] (runtime/sampling.py's next_tokens).
std::vector<int64_t> next_tokens(const std::vector<float>& logits, size_t rows, size_t vocab,
                                 const GenerationConfig& cfg, Pcg64* rng,
                                 const std::vector<const std::set<int64_t>*>* seen);
// numpy's pairwise summation of a contiguous float64 array (np.sum).
double pairwise_sum(const double* a, size_t n);

// ------------------------------------------------------------------------------------------------ tokenizer.cpp

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  std::string kind;
  std::map<std::string, int64_t> special_ids;
  std::unordered_map<int64_t, std::string> special_text;
  int64_t vocab_size = 0;
  std::vector<int64_t> eos_ids;
  std::string chat_template;  // "" when none
  std::map<std::string, std::string> config_strings;  // tokenizer_config.json's bos/eos/pad/unk tokens

  std::vector<int64_t> encode(const std::string& text) const;  // plain text: special-token text stays text
  virtual std::vector<int64_t> encode_with_specials(const std::string& text) const;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const;
  bool is_special(int64_t id) const { return special_text.count(id) != 0; }
  virtual int64_t token_to_id(const std::string& special) const;
  std::vector<int64_t> prefix_ids() const;
  std::vector<int64_t> encode_prompt(const std::string& text) const;

  virtual std::vector<int64_t> encode_plain(const std::string& text) const = 0;
  virtual std::string decode_plain(const std::vector<int64_t>& ids) const = 0;

  // Rendered chat-template text as (text, is_message_text) parts: token text in the template's own parts becomes
  // its id; message text stays text, encoded with the template text around it in runs that end only at those ids
  // (runtime/chat_template.py's encode_rendered: chat text is data).
  std::vector<int64_t> encode_template_parts(const std::vector<std::pair<std::string, bool>>& parts) const;

 protected:
  void set_specials(const std::map<std::string, int64_t>& specials);
  // token text a chat template may insert as one id (longest first), and its id: the special tokens by default
  virtual const std::vector<std::string>& template_tokens() const { return specials_longest_first_; }
  virtual int64_t template_token_id(const std::string& text) const { return special_ids.at(text); }
  std::vector<std::string> specials_longest_first_;
};

std::shared_ptr<Tokenizer> load_tokenizer(const std::string& bundle_dir, const ModelSpec& spec);

// Streaming detokeniser (runtime/tokenizer.py's StreamDecoder): text that later ids cannot change.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer* tok) : tok_(tok) {}
  std::string push(int64_t id);
  std::string flush();

 private:
  std::string end_run();
  const Tokenizer* tok_;
  std::vector<int64_t> run_;
  size_t sent_ = 0;  // bytes of decode(run_) already returned
};

// ------------------------------------------------------------------------------------------------ chat.cpp

std::vector<int64_t> build_chat_ids(const Tokenizer& tok, const ModelSpec& spec, const std::vector<Message>& messages,
                                    bool add_generation_prompt = true);
std::vector<int64_t> chat_stop_ids(const Tokenizer& tok, const ModelSpec& spec);
// Messages from JSON text: [{"role": ..., "content": ..., "metadata"?: ..., "tools"?: [...]}, ...]
std::vector<Message> messages_from_json(const std::string& json_text);

// ------------------------------------------------------------------------------------------------ json output

std::string json_string(const std::string& s);  // a JSON string literal, non-ASCII kept (ensure_ascii=False)
std::string json_double(double v);              // Python's float repr

}  // namespace glm
