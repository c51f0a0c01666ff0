// manifest.json: runtime/manifest.py's read_manifest and Manifest.from_dict, with the same checks and messages.
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "internal.hpp"

namespace glm {

using json = nlohmann::json;

static const char* MANIFEST_NAME = "manifest.json";
static const char* FORMAT_NAME = "glm-export-bundle";

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  if (dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

static int64_t file_size(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw std::runtime_error("read error");
  return ss.str();
}

// Python's repr() of a JSON value, for messages that quote one
std::string py_str_repr(const std::string& s) {
  const char q = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    if (c == q || c == '\\') out += '\\';
    out += c;
  }
  return out + q;
}

static std::string py_repr(const json& v) {
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_string()) return py_str_repr(v.get<std::string>());
  return v.dump();
}

static const std::set<std::string> SPEC_FIELDS = {
    "generation", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
    "vocab_size", "norm_eps", "rotary_dim", "rope_theta", "rope_position_scale", "rope_scaling", "qkv_bias",
    "sandwich_norms", "tie_word_embeddings", "max_position_embeddings", "eos_token_ids", "pad_token_id",
    "tokenizer_kind", "chat_format", "special_tokens",
    // the block's variants (ChatGLM-6B v1) and the P-tuning v2 prefix: computed inside the graph, so the decode loop
    // only needs position_kind (v1's 2D positions are refused below)
    "norm_kind", "activation", "linear_bias", "residual", "residual_alpha", "qkv_layout", "rotary_kind",
    "rotary_freq_dtype", "position_kind", "attention_kind", "query_key_layer_scaling", "prefix_len"};
static const std::vector<std::string> SPEC_REQUIRED = {
    "generation", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
    "vocab_size", "norm_eps", "rotary_dim", "rope_theta", "rope_position_scale", "rope_scaling", "qkv_bias",
    "sandwich_norms", "tie_word_embeddings", "max_position_embeddings", "eos_token_ids", "pad_token_id"};

static ModelSpec spec_from_json(const json& d) {
  if (!d.is_object()) throw std::invalid_argument("spec is not an object");
  std::vector<std::string> unknown;
  for (auto it = d.begin(); it != d.end(); ++it)
    if (!SPEC_FIELDS.count(it.key())) unknown.push_back(it.key());
  if (!unknown.empty()) {
    std::string s = "unknown spec field(s): ";
    for (size_t i = 0; i < unknown.size(); ++i) s += (i ? ", " : "") + unknown[i];
    throw std::out_of_range("KeyError: '" + s + "'");
  }
  for (const auto& k : SPEC_REQUIRED)
    if (!d.contains(k))
      throw std::out_of_range("TypeError: ModelSpec.__init__() missing 1 required positional argument: '" + k + "'");
  ModelSpec s;
  s.generation = d.at("generation").get<std::string>();
  s.num_layers = d.at("num_layers").get<int>();
  s.hidden_size = d.at("hidden_size").get<int>();
  s.num_heads = d.at("num_heads").get<int>();
  s.num_kv_heads = d.at("num_kv_heads").get<int>();
  s.head_dim = d.at("head_dim").get<int>();
  s.ffn_hidden_size = d.at("ffn_hidden_size").get<int>();
  s.vocab_size = d.at("vocab_size").get<int64_t>();
  s.max_position_embeddings = d.at("max_position_embeddings").get<int64_t>();
  for (const auto& v : d.at("eos_token_ids")) s.eos_token_ids.push_back(v.get<int64_t>());
  s.pad_token_id = d.at("pad_token_id").get<int64_t>();
  if (d.contains("tokenizer_kind")) s.tokenizer_kind = d.at("tokenizer_kind").get<std::string>();
  if (d.contains("chat_format")) s.chat_format = d.at("chat_format").get<std::string>();
  if (d.contains("special_tokens"))
    for (auto it = d.at("special_tokens").begin(); it != d.at("special_tokens").end(); ++it)
      s.special_tokens[it.key()] = it.value().get<int64_t>();
  if (s.num_layers < 1 || s.num_kv_heads < 1 || s.head_dim < 1 || s.vocab_size < 1 || s.max_position_embeddings < 2)
    throw std::invalid_argument("spec sizes must be positive");
  if (d.contains("position_kind") && d.at("position_kind").get<std::string>() != "sequential")
    throw BundleError(std::string(MANIFEST_NAME) + ": position_kind '" + d.at("position_kind").get<std::string>() +
                      "' (" + s.generation + ") is not supported by the C++ runtime yet; run it with the Python runtime");
  return s;
}

Manifest read_manifest(const std::string& bundle_dir, bool verify_files, bool verify_checksums) {
  if (!is_dir(bundle_dir)) throw BundleError(bundle_dir + ": bundle directory does not exist");
  const std::string path = join_path(bundle_dir, MANIFEST_NAME);
  if (!is_file(path))
    throw BundleError(path + ": missing; is " + bundle_dir + " a bundle written by 'glm-export onnx'?");
  json d;
  try {
    d = json::parse(read_file(path));
  } catch (const std::exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    throw BundleError(path + ": unreadable manifest (" + msg + ")");
  }
  if (!d.is_object()) throw BundleError(path + ": expected a JSON object");
  auto fmt = d.find("format");
  if (fmt == d.end() || !fmt->is_string() || fmt->get<std::string>() != FORMAT_NAME)
    throw BundleError(path + ": not a glm-export bundle manifest (format=" + (fmt == d.end() ? "None" : py_repr(*fmt)) +
                      ")");
  auto ver = d.find("format_version");
  if (ver == d.end() || !ver->is_number_integer() || ver->is_boolean())
    throw BundleError(path + ": format_version missing or not an integer");
  const int64_t version = ver->get<int64_t>();
  if (version > FORMAT_VERSION)
    throw BundleError(path + ": manifest format_version " + std::to_string(version) +
                      " is newer than this glm-export understands (" + std::to_string(FORMAT_VERSION) +
                      "); upgrade glm-export or re-export the bundle with this version");
  Manifest m;
  m.format_version = static_cast<int>(version);
  try {
    for (const char* k : {"spec", "precision", "inputs", "outputs"})
      if (!d.contains(k)) throw std::out_of_range(std::string("KeyError: '") + k + "'");
    m.spec = spec_from_json(d.at("spec"));
    m.precision = d.at("precision").get<std::string>();
    if (d.contains("model_file")) m.model_file = d.at("model_file").get<std::string>();
    if (!d.at("outputs").is_array()) throw std::invalid_argument("outputs is not a list");
    bool found = false;
    for (const auto& t : d.at("inputs")) {
      const std::string name = t.at("name").get<std::string>();
      t.at("shape");
      if (name == "past_key_values.0.key") {
        m.kv_dtype = t.at("dtype").get<std::string>();
        found = true;
      }
    }
    if (!found) throw BundleError(std::string(MANIFEST_NAME) + " lists no input past_key_values.0.key");
    if (m.kv_dtype != "float32" && m.kv_dtype != "float16")
      throw BundleError(std::string(MANIFEST_NAME) + " gives past_key_values.0.key dtype '" + m.kv_dtype +
                        "'; expected float32 or float16");
  } catch (const BundleError&) {
    throw;
  } catch (const std::out_of_range& e) {  // already spelled as Python's KeyError / TypeError
    std::string msg = e.what();
    throw BundleError(path + ": malformed manifest (" + msg.substr(0, msg.find('\n')) + ")");
  } catch (const std::exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    throw BundleError(path + ": malformed manifest (ValueError: " + msg + ")");
  }
  // every listed file must exist with its recorded size; then its checksum (verify_files), as the Python runtime
  std::vector<RecordedDigest> digests;
  auto files = d.find("files");
  if (files != d.end() && files->is_object()) {
    for (auto it = files->begin(); it != files->end(); ++it) {
      const std::string p = bundle_member(bundle_dir, it.key(), "files entry", path);
      if (!is_file(p)) throw BundleError(p + ": listed in the manifest but missing from the bundle");
      const json& rec = it.value();
      if (rec.is_object() && rec.contains("bytes") && rec["bytes"].is_number_integer()) {
        int64_t size = file_size(p), want = rec["bytes"].get<int64_t>();
        if (size != want)
          throw BundleError(p + ": " + std::to_string(size) + " bytes, manifest records " + std::to_string(want) +
                            "; the bundle is corrupt");
      }
      if (rec.is_object() && rec.contains("sha256") && rec["sha256"].is_string())
        digests.push_back({it.key(), p, rec["sha256"].get<std::string>()});
    }
  }
  auto tok_files = d.find("tokenizer_files");
  if (tok_files != d.end() && tok_files->is_array())
    for (const auto& t : *tok_files)
      if (t.is_string()) bundle_member(bundle_dir, t.get<std::string>(), "tokenizer_files entry", path);
  // first: a corrupt file is reported as such, with both digests
  if (verify_files || verify_checksums) verify_digests(bundle_dir, digests, !verify_checksums);
  // the graph must be a bundle file covered by the checksums (its external data locations are checked by
  // onnxruntime, which refuses a location outside the model's directory)
  bundle_member(bundle_dir, m.model_file, "model_file", path);
  if (files != d.end() && files->is_object() && !files->empty() && !files->contains(m.model_file))
    throw BundleError(path + ": model_file " + py_str_repr(m.model_file) + " is not listed in 'files'");
  return m;
}

}  // namespace glm
