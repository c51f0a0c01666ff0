// The tokenizers of the ChatGLM family (runtime/tokenizer.py), natively:
//
//   sentencepiece   tokenizer.model (ChatGLM2/3) through libsentencepiece; ChatGLM's specials are ids after the pieces
//   tiktoken        tokenizer.model as base64-token/rank lines (GLM-4-9B): byte-pair merges by rank over pieces of
//                   GLM-4's split pattern (PCRE2, Unicode properties); GLM-4's specials follow the ranks
//   tokenizer.json  the `tokenizers` library's file (-hf repos, GLM-4-0414): its byte-level BPE implemented here
//                   (Split regex + ByteLevel pre-tokenizers, merges by priority, ByteLevel decoder); its added tokens
//                   marked special are the special tokens
//
// Plain encode never turns special-token text into special ids (a user's typed "<|user|>" stays text).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <climits>
#include <nlohmann/json.hpp>

#include "internal.hpp"

namespace glm {

using json = nlohmann::json;

static const char* TOKENIZER_MODEL_FILE = "tokenizer.model";
static const char* TOKENIZER_JSON_FILE = "tokenizer.json";
static const char* TOKENIZER_CONFIG_FILE = "tokenizer_config.json";
static const char* CHAT_TEMPLATE_FILE = "chat_template.jinja";

static const std::vector<std::string> SP_BASE_SPECIALS = {"[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"};
static const std::vector<std::string> SP_ROLE_SPECIALS = {"<|system|>", "<|user|>", "<|assistant|>",
                                                          "<|observation|>"};
static const std::vector<std::string> GLM4_SPECIALS = {
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"};
static const char* GLM4_SPLIT_PATTERN =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
static const char* GPT2_SPLIT_PATTERN = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ------------------------------------------------------------------------------------------------ the interface

void Tokenizer::set_specials(const std::map<std::string, int64_t>& specials) {
  special_ids = specials;
  special_text.clear();
  for (const auto& kv : specials) special_text[kv.second] = kv.first;
  specials_longest_first_.clear();
  for (const auto& kv : specials) specials_longest_first_.push_back(kv.first);
  std::stable_sort(specials_longest_first_.begin(), specials_longest_first_.end(),
                   [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
}

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  if (text.empty()) return {};
  return encode_plain(text);
}

// Special-token text becomes its id: leftmost match, the longest special first at each position (Python's re.split
// on the alternation sorted by length).
static std::vector<std::pair<std::string, bool>> split_on(const std::string& text,
                                                          const std::vector<std::string>& names) {
  std::vector<std::pair<std::string, bool>> parts;
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const std::string* hit = nullptr;
    for (const auto& n : names)
      if (!n.empty() && text.compare(i, n.size(), n) == 0) { hit = &n; break; }
    if (!hit) { ++i; continue; }
    if (i > start) parts.emplace_back(text.substr(start, i - start), false);
    parts.emplace_back(*hit, true);
    i += hit->size();
    start = i;
  }
  if (start < text.size()) parts.emplace_back(text.substr(start), false);
  return parts;
}

std::vector<int64_t> Tokenizer::encode_template_parts(const std::vector<std::pair<std::string, bool>>& parts) const {
  std::vector<int64_t> ids;
  std::string run;
  auto flush = [&]() {
    if (run.empty()) return;
    auto more = encode(run);
    ids.insert(ids.end(), more.begin(), more.end());
    run.clear();
  };
  for (const auto& part : parts) {
    if (part.second) {  // message text: never special
      run += part.first;
      continue;
    }
    for (const auto& piece : split_on(part.first, template_tokens())) {
      if (piece.second) {
        flush();
        ids.push_back(template_token_id(piece.first));
      } else {
        run += piece.first;
      }
    }
  }
  flush();
  return ids;
}

std::vector<int64_t> Tokenizer::encode_with_specials(const std::string& text) const {
  std::vector<int64_t> ids;
  if (text.empty()) return ids;
  for (const auto& part : split_on(text, specials_longest_first_)) {
    if (part.second) {
      ids.push_back(special_ids.at(part.first));
    } else {
      auto more = encode_plain(part.first);
      ids.insert(ids.end(), more.begin(), more.end());
    }
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  std::string out;
  std::vector<int64_t> run;
  for (int64_t i : ids) {
    auto it = special_text.find(i);
    if (it != special_text.end()) {
      if (!run.empty()) { out += decode_plain(run); run.clear(); }
      if (!skip_special) out += it->second;
    } else if (i >= 0 && i < vocab_size) {
      run.push_back(i);
    }
  }
  if (!run.empty()) out += decode_plain(run);
  return out;
}

static std::string python_repr(const std::string& s) {
  return "'" + s + "'";
}

int64_t Tokenizer::token_to_id(const std::string& special) const {
  auto it = special_ids.find(special);
  if (it != special_ids.end()) return it->second;
  std::string known;
  for (const auto& kv : special_ids) known += (known.empty() ? "" : ", ") + kv.first;
  throw TokenizerError(kind + " tokenizer has no special token " + python_repr(special) + " (it has: " +
                       (known.empty() ? "none" : known) + ")");
}

std::vector<int64_t> Tokenizer::prefix_ids() const {
  const std::string sop = special_ids.count("sop") ? "sop" : "<sop>";
  if (special_ids.count("[gMASK]") && special_ids.count(sop)) return {special_ids.at("[gMASK]"), special_ids.at(sop)};
  return {};
}

std::vector<int64_t> Tokenizer::encode_prompt(const std::string& text) const {
  auto ids = prefix_ids();
  auto more = encode(text);
  ids.insert(ids.end(), more.begin(), more.end());
  return ids;
}

// ------------------------------------------------------------------------------------------------ regex splitting

namespace {

class SplitRegex {
 public:
  explicit SplitRegex(const std::string& pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof buf);
      throw TokenizerError("split pattern does not compile at offset " + std::to_string(off) + ": " +
                           reinterpret_cast<char*>(buf));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  }
  ~SplitRegex() { pcre2_code_free(code_); }
  SplitRegex(const SplitRegex&) = delete;
  SplitRegex& operator=(const SplitRegex&) = delete;

  // (start, end) of every match, left to right; `gaps` also returns the unmatched stretches between them.
  std::vector<std::pair<size_t, size_t>> pieces(const std::string& text, bool gaps) const {
    if (!utf8_valid(text)) throw TokenizerError("text is not valid UTF-8");
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t pos = 0, last = 0;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    while (pos < text.size()) {
      int rc = pcre2_match(code_, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        throw TokenizerError("split pattern failed to match (pcre2 error " + std::to_string(rc) + ")");
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t s = ov[0], e = ov[1];
      if (e == s) {  // an empty match: step one character on
        size_t step = 1;
        while (s + step < text.size() && (static_cast<unsigned char>(text[s + step]) & 0xC0) == 0x80) ++step;
        pos = s + step;
        continue;
      }
      if (gaps && s > last) out.emplace_back(last, s);
      out.emplace_back(s, e);
      pos = last = e;
    }
    if (gaps && last < text.size()) out.emplace_back(last, text.size());
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

// ------------------------------------------------------------------------------------------------ sentencepiece

class SentencePieceTokenizer : public Tokenizer {
 public:
  SentencePieceTokenizer(const std::string& path, bool with_roles, const std::vector<int64_t>& extra_eos) {
    kind = "sentencepiece";
    auto status = sp_.Load(path);
    if (!status.ok()) {
      std::string msg = status.ToString();
      throw TokenizerError(path + ": not a sentencepiece model (" + msg.substr(0, msg.find('\n')) + ")");
    }
    const int64_t base = sp_.GetPieceSize();
    std::map<std::string, int64_t> specials;
    int64_t k = 0;
    for (const auto& n : SP_BASE_SPECIALS) specials[n] = base + k++;
    if (with_roles)
      for (const auto& n : SP_ROLE_SPECIALS) specials[n] = base + k++;
    set_specials(specials);
    vocab_size = base + k;
    for (int64_t e : extra_eos)
      if (std::find(eos_ids.begin(), eos_ids.end(), e) == eos_ids.end()) eos_ids.push_back(e);
    if (sp_.eos_id() >= 0 && std::find(eos_ids.begin(), eos_ids.end(), sp_.eos_id()) == eos_ids.end())
      eos_ids.push_back(sp_.eos_id());
  }
  std::vector<int64_t> encode_plain(const std::string& text) const override {
    std::vector<int> ids;
    auto status = sp_.Encode(text, &ids);
    if (!status.ok()) throw TokenizerError("sentencepiece cannot encode the text (" + status.ToString() + ")");
    return {ids.begin(), ids.end()};
  }
  std::string decode_plain(const std::vector<int64_t>& ids) const override {
    std::vector<int> v;
    v.reserve(ids.size());
    for (int64_t i : ids) v.push_back(static_cast<int>(i));
    std::string out;
    auto status = sp_.Decode(v, &out);
    if (!status.ok()) throw TokenizerError("sentencepiece cannot decode the ids (" + status.ToString() + ")");
    return out;
  }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

// ------------------------------------------------------------------------------------------------ byte-pair merges

// Merges adjacent parts of `word` (ids) while some adjacent pair has a merge: the lowest rank first, the leftmost
// of equal ranks. `merge(a, b)` returns {rank, merged id} or rank -1 when the pair does not merge.
template <typename MergeFn>
void bpe_merge(std::vector<int64_t>& word, MergeFn merge) {
  while (word.size() > 1) {
    int64_t best_rank = -1, best_id = -1;
    size_t best_pos = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto m = merge(word[i], word[i + 1]);
      if (m.first >= 0 && (best_rank < 0 || m.first < best_rank)) {
        best_rank = m.first;
        best_id = m.second;
        best_pos = i;
      }
    }
    if (best_rank < 0) break;
    word[best_pos] = best_id;
    word.erase(word.begin() + static_cast<std::ptrdiff_t>(best_pos) + 1);
  }
}

// ------------------------------------------------------------------------------------------------ tiktoken

int b64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool b64_decode(const std::string& in, std::string& out) {
  if (in.size() % 4 != 0) return false;
  out.clear();
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      unsigned char c = static_cast<unsigned char>(in[i + k]);
      if (c == '=' && i + 4 == in.size() && k >= 2) { v[k] = 0; ++pad; continue; }
      if (pad) return false;
      v[k] = b64_value(c);
      if (v[k] < 0) return false;
    }
    uint32_t n = (uint32_t(v[0]) << 18) | (uint32_t(v[1]) << 12) | (uint32_t(v[2]) << 6) | uint32_t(v[3]);
    out += static_cast<char>((n >> 16) & 0xFF);
    if (pad < 2) out += static_cast<char>((n >> 8) & 0xFF);
    if (pad < 1) out += static_cast<char>(n & 0xFF);
  }
  return true;
}

class TiktokenTokenizer : public Tokenizer {
 public:
  TiktokenTokenizer(const std::string& path, const std::vector<int64_t>& extra_eos) : split_(GLM4_SPLIT_PATTERN) {
    kind = "tiktoken";
    std::string data;
    try {
      data = read_file(path);
    } catch (const std::exception& e) {
      throw TokenizerError(path + ": unreadable (" + e.what() + ")");
    }
    size_t pos = 0;
    int64_t lineno = 0;
    while (pos < data.size()) {
      size_t nl = data.find('\n', pos);
      std::string line = data.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
      pos = nl == std::string::npos ? data.size() : nl + 1;
      ++lineno;
      // split on whitespace
      std::vector<std::string> fields;
      size_t i = 0;
      while (i < line.size()) {
        while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i]))) ++i;
        size_t j = i;
        while (j < line.size() && !std::isspace(static_cast<unsigned char>(line[j]))) ++j;
        if (j > i) fields.push_back(line.substr(i, j - i));
        i = j;
      }
      if (fields.empty()) continue;
      std::string bytes;
      int64_t rank = -1;
      bool ok = fields.size() == 2 && b64_decode(fields[0], bytes);
      if (ok) {
        try {
          size_t used = 0;
          rank = std::stoll(fields[1], &used);
          ok = used == fields[1].size();
        } catch (...) {
          ok = false;
        }
      }
      if (!ok)
        throw TokenizerError(path + ": line " + std::to_string(lineno) + " is not 'base64token rank'");
      if (!ranks_.count(bytes)) order_.push_back(bytes);
      ranks_[bytes] = rank;
    }
    if (ranks_.empty()) throw TokenizerError(path + ": no tokens in the file; not a tiktoken BPE file");
    const int64_t n = static_cast<int64_t>(ranks_.size());
    tokens_.assign(static_cast<size_t>(n), std::string());
    std::vector<char> seen(static_cast<size_t>(n), 0);
    for (const auto& kv : ranks_) {
      if (kv.second < 0 || kv.second >= n || seen[static_cast<size_t>(kv.second)])
        throw TokenizerError(path + ": ranks are not 0..n-1 with one token each; not a tiktoken BPE file");
      seen[static_cast<size_t>(kv.second)] = 1;
      tokens_[static_cast<size_t>(kv.second)] = kv.first;
    }
    int missing = 0, first = -1;
    for (int b = 0; b < 256; ++b)
      if (!ranks_.count(std::string(1, static_cast<char>(b)))) {
        if (first < 0) first = b;
        ++missing;
      }
    if (missing)
      throw TokenizerError(path + ": " + std::to_string(missing) + " single bytes have no token (first: " +
                           std::to_string(first) + "); text containing them could not be encoded");
    std::map<std::string, int64_t> specials;
    for (size_t i = 0; i < GLM4_SPECIALS.size(); ++i) specials[GLM4_SPECIALS[i]] = n + static_cast<int64_t>(i);
    set_specials(specials);
    vocab_size = n + static_cast<int64_t>(GLM4_SPECIALS.size());
    for (int64_t e : extra_eos)
      if (std::find(eos_ids.begin(), eos_ids.end(), e) == eos_ids.end()) eos_ids.push_back(e);
    const int64_t eot = specials.at("<|endoftext|>");
    if (std::find(eos_ids.begin(), eos_ids.end(), eot) == eos_ids.end()) eos_ids.push_back(eot);
  }

  std::vector<int64_t> encode_plain(const std::string& text) const override {
    std::vector<int64_t> out;
    for (const auto& pe : split_.pieces(text, false)) {
      const std::string piece = text.substr(pe.first, pe.second - pe.first);
      auto it = ranks_.find(piece);
      if (it != ranks_.end()) { out.push_back(it->second); continue; }
      std::vector<int64_t> word;
      for (unsigned char c : piece) word.push_back(ranks_.at(std::string(1, static_cast<char>(c))));
      bpe_merge(word, [&](int64_t a, int64_t b) -> std::pair<int64_t, int64_t> {
        auto m = ranks_.find(tokens_[static_cast<size_t>(a)] + tokens_[static_cast<size_t>(b)]);
        if (m == ranks_.end()) return {-1, -1};
        return {m->second, m->second};
      });
      out.insert(out.end(), word.begin(), word.end());
    }
    return out;
  }

  std::string decode_plain(const std::vector<int64_t>& ids) const override {
    std::string bytes;
    for (int64_t i : ids)
      if (i >= 0 && static_cast<size_t>(i) < tokens_.size()) bytes += tokens_[static_cast<size_t>(i)];
    return utf8_lossy(bytes);
  }

 private:
  SplitRegex split_;
  std::unordered_map<std::string, int64_t> ranks_;
  std::vector<std::string> order_;
  std::vector<std::string> tokens_;  // rank -> bytes
};

// ------------------------------------------------------------------------------------------------ tokenizer.json

// GPT-2's byte <-> printable character table used by the ByteLevel pre-tokenizer and decoder.
struct ByteLevelTable {
  std::string char_of[256];                          // byte -> UTF-8 of its character
  std::unordered_map<uint32_t, unsigned char> byte_of;  // code point -> byte
  ByteLevelTable() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<uint32_t> cs(bs.begin(), bs.end());
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b)
      if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
        bs.push_back(b);
        cs.push_back(256 + n++);
      }
    for (size_t i = 0; i < bs.size(); ++i) {
      std::string s;
      append_utf8(s, cs[i]);
      char_of[bs[i]] = s;
      byte_of[cs[i]] = static_cast<unsigned char>(bs[i]);
    }
  }
};

const ByteLevelTable& byte_level() {
  static const ByteLevelTable t;
  return t;
}

class JsonTokenizer : public Tokenizer {
 public:
  JsonTokenizer(const std::string& path, const std::string& eos_token, const std::vector<int64_t>& extra_eos) {
    kind = "tokenizer.json";
    json d;
    try {
      d = json::parse(read_file(path));
    } catch (const std::exception& e) {
      std::string msg = e.what();
      throw TokenizerError(path + ": not a tokenizers file (" + msg.substr(0, msg.find('\n')) + ")");
    }
    try {
      load(path, d);
    } catch (const TokenizerError&) {
      throw;
    } catch (const std::exception& e) {
      std::string msg = e.what();
      throw TokenizerError(path + ": not a tokenizers file (" + msg.substr(0, msg.find('\n')) + ")");
    }
    for (int64_t e : extra_eos)
      if (std::find(eos_ids.begin(), eos_ids.end(), e) == eos_ids.end()) eos_ids.push_back(e);
    if (!eos_token.empty()) {
      auto it = vocab_.find(eos_token);
      if (it != vocab_.end() && std::find(eos_ids.begin(), eos_ids.end(), it->second) == eos_ids.end())
        eos_ids.push_back(it->second);
    }
  }

  std::vector<int64_t> encode_plain(const std::string& text) const override {
    // with encode_special_tokens the special added tokens are plain text; the others still split out
    return encode_parts(text, nonspecial_added_);
  }
  std::vector<int64_t> encode_with_specials(const std::string& text) const override {
    if (text.empty()) return {};
    return encode_parts(text, all_added_);
  }
  // every added token, special or not: the tokenizers library splits them all out of template text
  const std::vector<std::string>& template_tokens() const override { return all_added_; }
  int64_t template_token_id(const std::string& text) const override { return vocab_.at(text); }
  std::string decode_plain(const std::vector<int64_t>& ids) const override {
    std::string bytes;
    const auto& t = byte_level();
    for (int64_t i : ids) {
      auto it = id_to_token_.find(i);
      if (it == id_to_token_.end()) continue;
      if (added_ids_.count(i)) { bytes += it->second; continue; }
      for (uint32_t cp : utf8_code_points(it->second)) {
        auto b = t.byte_of.find(cp);
        if (b != t.byte_of.end()) bytes += static_cast<char>(b->second);
        else append_utf8(bytes, cp);
      }
    }
    return utf8_lossy(bytes);
  }
  int64_t token_to_id(const std::string& special) const override {
    if (!special_ids.count(special)) {
      auto it = vocab_.find(special);
      if (it != vocab_.end()) return it->second;
    }
    return Tokenizer::token_to_id(special);
  }

 private:
  void load(const std::string& path, const json& d) {
    auto refuse = [&](const std::string& what) {
      throw TokenizerError(path + ": " + what + " is not supported by the C++ runtime's tokenizer.json reader");
    };
    if (!d.value("normalizer", json()).is_null()) refuse("a normalizer");
    const json& model = d.at("model");
    if (model.value("type", std::string("BPE")) != "BPE") refuse("model type " + model.value("type", std::string()));
    if (!model.value("dropout", json()).is_null()) refuse("BPE dropout");
    if (!model.value("continuing_subword_prefix", json()).is_null() &&
        model.value("continuing_subword_prefix", json()) != "")
      refuse("continuing_subword_prefix");
    if (!model.value("end_of_word_suffix", json()).is_null() && model.value("end_of_word_suffix", json()) != "")
      refuse("end_of_word_suffix");
    if (model.value("byte_fallback", false)) refuse("byte_fallback");
    ignore_merges_ = model.value("ignore_merges", false);
    // pre-tokenizer: [Split(regex, isolated)] then ByteLevel(use_regex false), or ByteLevel(use_regex true) alone
    std::vector<json> pre;
    const json& pt = d.at("pre_tokenizer");
    if (pt.is_null()) refuse("a missing pre_tokenizer");
    if (pt.at("type") == "Sequence") {
      for (const auto& p : pt.at("pretokenizers")) pre.push_back(p);
    } else {
      pre.push_back(pt);
    }
    std::string pattern;
    bool byte_level_seen = false;
    for (const auto& p : pre) {
      const std::string type = p.at("type").get<std::string>();
      if (type == "Split" && !byte_level_seen && pattern.empty()) {
        if (!p.at("pattern").contains("Regex")) refuse("a Split on a plain string");
        if (p.value("behavior", std::string()) != "Isolated") refuse("Split behavior " + p.value("behavior", std::string()));
        if (p.value("invert", false)) refuse("an inverted Split");
        pattern = p.at("pattern").at("Regex").get<std::string>();
      } else if (type == "ByteLevel" && !byte_level_seen) {
        byte_level_seen = true;
        if (p.value("add_prefix_space", false)) refuse("ByteLevel add_prefix_space");
        if (p.value("use_regex", true)) {
          if (!pattern.empty()) refuse("a Split followed by a ByteLevel with its own regex");
          pattern = GPT2_SPLIT_PATTERN;
        }
      } else {
        refuse("pre-tokenizer " + type);
      }
    }
    if (!byte_level_seen) refuse("a pre-tokenizer without ByteLevel");
    split_ = std::make_unique<SplitRegex>(pattern);
    const json& dec = d.value("decoder", json());
    if (!dec.is_null() && dec.value("type", std::string()) != "ByteLevel")
      refuse("decoder " + dec.value("type", std::string()));

    for (auto it = model.at("vocab").begin(); it != model.at("vocab").end(); ++it) {
      const int64_t id = it.value().get<int64_t>();
      vocab_[it.key()] = id;
      id_to_token_[id] = it.key();
    }
    int64_t rank = 0;
    for (const auto& m : model.at("merges")) {
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        size_t sp = s.find(' ', 1);
        if (sp == std::string::npos) throw TokenizerError(path + ": merge '" + s + "' is not 'a b'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else {
        a = m.at(0).get<std::string>();
        b = m.at(1).get<std::string>();
      }
      auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end())
        throw TokenizerError(path + ": merge '" + a + " " + b + "' names a token outside the vocabulary");
      const uint64_t key = (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint64_t>(ib->second);
      if (!merges_.count(key)) merges_[key] = {rank, iab->second};
      ++rank;
    }
    const auto& t = byte_level();
    for (int b = 0; b < 256; ++b) {
      auto it = vocab_.find(t.char_of[b]);
      byte_id_[b] = it == vocab_.end() ? -1 : it->second;
    }
    std::map<std::string, int64_t> specials;
    int64_t max_id = -1;
    for (const auto& kv : vocab_) max_id = std::max(max_id, kv.second);
    if (d.contains("added_tokens"))
      for (const auto& a : d.at("added_tokens")) {
        const std::string content = a.at("content").get<std::string>();
        const int64_t id = a.at("id").get<int64_t>();
        vocab_[content] = id;
        id_to_token_[id] = content;
        added_ids_.insert(id);
        max_id = std::max(max_id, id);
        all_added_.push_back(content);
        if (a.value("special", false)) specials[content] = id;
        else nonspecial_added_.push_back(content);
      }
    auto longest = [](std::vector<std::string>& v) {
      std::stable_sort(v.begin(), v.end(), [](const std::string& x, const std::string& y) { return x.size() > y.size(); });
    };
    longest(all_added_);
    longest(nonspecial_added_);
    set_specials(specials);
    vocab_size = max_id + 1;
  }

  std::vector<int64_t> encode_parts(const std::string& text, const std::vector<std::string>& added) const {
    std::vector<int64_t> out;
    for (const auto& part : split_on(text, added)) {
      if (part.second) {
        out.push_back(vocab_.at(part.first));
        continue;
      }
      encode_words(part.first, out);
    }
    return out;
  }

  void encode_words(const std::string& text, std::vector<int64_t>& out) const {
    const auto& t = byte_level();
    for (const auto& pe : split_->pieces(text, true)) {
      std::vector<int64_t> word;
      std::string mapped;
      for (size_t i = pe.first; i < pe.second; ++i) {
        const unsigned char c = static_cast<unsigned char>(text[i]);
        mapped += t.char_of[c];
        if (byte_id_[c] < 0)
          throw TokenizerError("tokenizer.json has no token for byte " + std::to_string(c) + "; cannot encode the text");
        word.push_back(byte_id_[c]);
      }
      if (ignore_merges_) {
        auto it = vocab_.find(mapped);
        if (it != vocab_.end() && !added_ids_.count(it->second)) { out.push_back(it->second); continue; }
      }
      bpe_merge(word, [&](int64_t a, int64_t b) -> std::pair<int64_t, int64_t> {
        auto m = merges_.find((static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b));
        if (m == merges_.end()) return {-1, -1};
        return m->second;
      });
      out.insert(out.end(), word.begin(), word.end());
    }
  }

  std::unique_ptr<SplitRegex> split_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<int64_t, std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int64_t, int64_t>> merges_;  // (a, b) -> (rank, merged id)
  std::set<int64_t> added_ids_;
  std::vector<std::string> all_added_, nonspecial_added_;
  int64_t byte_id_[256];
  bool ignore_merges_ = false;
};

json read_json_object(const std::string& path) {
  json d;
  try {
    d = json::parse(read_file(path));
  } catch (const std::exception& e) {
    std::string msg = e.what();
    throw TokenizerError(path + ": unreadable JSON (" + msg.substr(0, msg.find('\n')) + ")");
  }
  if (!d.is_object()) throw TokenizerError(path + ": expected a JSON object");
  return d;
}

void require_file(const std::string& path) {
  if (!is_file(path))
    throw TokenizerError(path + ": tokenizer file is missing; re-export the bundle or copy it from the checkpoint");
}

}  // namespace

// ------------------------------------------------------------------------------------------------ loading

std::shared_ptr<Tokenizer> load_tokenizer(const std::string& bundle_dir, const ModelSpec& spec) {
  if (spec.tokenizer_kind == "none")
    throw TokenizerError(bundle_dir + ": the bundle has no tokenizer (tokenizer_kind 'none'); pass token ids");
  json config = json::object();
  const std::string config_path = join_path(bundle_dir, TOKENIZER_CONFIG_FILE);
  if (is_file(config_path)) config = read_json_object(config_path);
  std::shared_ptr<Tokenizer> tok;
  std::string files;
  if (spec.tokenizer_kind == "sentencepiece") {
    files = join_path(bundle_dir, TOKENIZER_MODEL_FILE);
    require_file(files);
    const bool with_roles = spec.chat_format == "chatglm3" || spec.special_tokens.count("<|user|>");
    tok = std::make_shared<SentencePieceTokenizer>(files, with_roles, spec.eos_token_ids);
  } else if (spec.tokenizer_kind == "tiktoken") {
    files = join_path(bundle_dir, TOKENIZER_MODEL_FILE);
    require_file(files);
    tok = std::make_shared<TiktokenTokenizer>(files, spec.eos_token_ids);
  } else if (spec.tokenizer_kind == "tokenizer.json") {
    files = join_path(bundle_dir, TOKENIZER_JSON_FILE);
    require_file(files);
    std::string eos;
    if (config.contains("eos_token")) {
      const json& e = config["eos_token"];
      if (e.is_string()) eos = e.get<std::string>();
      else if (e.is_object() && e.contains("content") && e["content"].is_string()) eos = e["content"].get<std::string>();
    }
    tok = std::make_shared<JsonTokenizer>(files, eos, spec.eos_token_ids);
  } else {
    throw TokenizerError(bundle_dir + ": unknown tokenizer_kind '" + spec.tokenizer_kind + "' in the manifest");
  }
  // the chat template: chat_template.jinja, else tokenizer_config.json's (a string, or a list of named ones)
  const std::string tpl_path = join_path(bundle_dir, CHAT_TEMPLATE_FILE);
  if (is_file(tpl_path)) {
    tok->chat_template = read_file(tpl_path);
  } else if (config.contains("chat_template")) {
    const json& t = config["chat_template"];
    if (t.is_string()) {
      tok->chat_template = t.get<std::string>();
    } else if (t.is_array()) {
      for (const auto& e : t)
        if (e.is_object() && e.value("name", std::string()) == "default" && e.contains("template"))
          tok->chat_template = e["template"].get<std::string>();
      if (tok->chat_template.empty() && !t.empty() && t[0].is_object() && t[0].contains("template"))
        tok->chat_template = t[0]["template"].get<std::string>();
    }
  }
  for (const char* k : {"bos_token", "eos_token", "pad_token", "unk_token"})
    if (config.contains(k) && config[k].is_string()) tok->config_strings[k] = config[k].get<std::string>();
  // must fit the model and agree with the manifest's special ids
  if (tok->vocab_size > spec.vocab_size)
    throw TokenizerError(files + ": tokenizer has " + std::to_string(tok->vocab_size) +
                         " ids but the model's vocab_size is " + std::to_string(spec.vocab_size) +
                         "; these tokenizer files belong to another model");
  for (const auto& kv : spec.special_tokens) {
    auto it = tok->special_ids.find(kv.first);
    if (it != tok->special_ids.end() && it->second != kv.second)
      throw TokenizerError(files + ": special token '" + kv.first + "' is id " + std::to_string(it->second) +
                           " but the manifest says " + std::to_string(kv.second));
  }
  return tok;
}

// ------------------------------------------------------------------------------------------------ streaming

static size_t stable_length(const std::string& text) {  // without a trailing run of U+FFFD
  size_t n = text.size();
  while (n >= 3 && text.compare(n - 3, 3, "\xEF\xBF\xBD") == 0) n -= 3;
  return n;
}

std::string StreamDecoder::push(int64_t id) {
  if (tok_->is_special(id)) return end_run();  // skip_special
  if (id < 0 || id >= tok_->vocab_size) return "";
  run_.push_back(id);
  const std::string text = tok_->decode(run_);
  const size_t stable = stable_length(text);
  if (stable <= sent_) return "";
  std::string piece = text.substr(sent_, stable - sent_);
  sent_ = stable;
  return piece;
}

std::string StreamDecoder::flush() { return end_run(); }

std::string StreamDecoder::end_run() {
  std::string text;
  if (!run_.empty()) {
    const std::string all = tok_->decode(run_);
    text = sent_ < all.size() ? all.substr(sent_) : "";
  }
  run_.clear();
  sent_ = 0;
  return text;
}

}  // namespace glm
