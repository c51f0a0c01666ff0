// glm::Model: load a bundle, and the decode loop (runtime/api.py + runtime/generate.py).
//
// Several prompts run as one batch, left-padded: input_ids [batch, n_max] pads first; attention_mask 0 on pads, 1
// on every real token (one more column per step); position_ids count from each row's first real token. Each
// sequence stops on its own with a finish reason (eos, stop, length, context) and its row leaves the running batch
// (select_rows), exactly as in Python, so the ids agree.
#include <algorithm>
#include <chrono>
#include <set>

#include "backend.hpp"

namespace glm {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Decoded text of one sequence: finds stop strings and holds back a tail that may be the start of one
// (runtime/generate.py's StopTextTracker, on UTF-8 bytes).
class StopTextTracker {
 public:
  StopTextTracker(const Tokenizer* tok, const std::vector<std::string>& stops) : decoder_(tok), stops_(stops) {
    for (const auto& s : stops_) longest_ = std::max(longest_, s.size());
  }
  std::string push(int64_t id) { return add(decoder_.push(id), false); }
  std::string finish() { return stopped_ ? "" : add(decoder_.flush(), true); }
  bool stopped() const { return stopped_; }
  std::string final_text() const { return stopped_ ? text_.substr(0, stop_at_) : text_; }

 private:
  std::string add(const std::string& piece_in, bool final) {
    const size_t search_from = text_.size() + 1 > longest_ ? text_.size() + 1 - longest_ : 0;
    text_ += piece_in;
    size_t end = text_.size();
    size_t hit = std::string::npos;
    for (const auto& s : stops_) {
      size_t i = text_.find(s, search_from);
      if (i != std::string::npos) hit = std::min(hit, i);
    }
    if (hit != std::string::npos) {
      stopped_ = true;
      stop_at_ = end = hit;
    } else if (!final) {
      end -= held_back();
    }
    std::string piece = end > released_ ? text_.substr(released_, end - released_) : "";
    released_ = std::max(released_, end);
    return piece;
  }
  size_t held_back() const {
    for (size_t k = std::min(longest_ ? longest_ - 1 : 0, text_.size()); k > 0; --k) {
      const std::string tail = text_.substr(text_.size() - k);
      for (const auto& s : stops_)
        if (s.compare(0, tail.size(), tail) == 0) return k;
    }
    return 0;
  }
  StreamDecoder decoder_;
  std::vector<std::string> stops_;
  size_t longest_ = 0;
  std::string text_;
  size_t released_ = 0, stop_at_ = 0;
  bool stopped_ = false;
};

struct Sequence {
  std::vector<int64_t> prompt, generated;
  std::string finish_reason;
};

}  // namespace

// ------------------------------------------------------------------------------------------------ load

Model::~Model() = default;

std::unique_ptr<Model> Model::load(const std::string& bundle_dir, const LoadOptions& options) {
  if (options.backend != "onnxruntime")
    throw BackendError("unknown backend '" + options.backend + "'; choose one of: onnxruntime (the C++ runtime has "
                       "no native TensorRT backend yet)");
  if (options.prefill_chunk < 0)
    throw GenerationError("prefill_chunk must be a whole number >= 0, got " + std::to_string(options.prefill_chunk));
  if (options.threads < 0) throw BackendError("threads must be a positive integer, got " + std::to_string(options.threads));
  Manifest manifest = read_manifest(bundle_dir, options.verify_files, options.verify_checksums);
  const std::string model_path = join_path(bundle_dir, manifest.model_file);  // checked by read_manifest
  if (!is_file(model_path)) throw BundleError(model_path + ": the bundle's graph is missing");
  std::unique_ptr<Model> m(new Model());
  m->bundle_dir_ = bundle_dir;
  m->precision_ = manifest.precision;
  m->spec_ = manifest.spec;
  m->context_length_ = manifest.spec.max_position_embeddings;
  m->prefill_chunk_ = options.prefill_chunk;
  m->backend_ = make_onnxruntime_backend(model_path, manifest, options);
  return m;
}

// ------------------------------------------------------------------------------------------------ tokenizer

const Tokenizer* Model::tokenizer_or_null() const {
  if (!tokenizer_loaded_) {
    if (spec_.tokenizer_kind != "none") tokenizer_ = load_tokenizer(bundle_dir_, spec_);
    tokenizer_loaded_ = true;
  }
  return tokenizer_.get();
}

bool Model::has_tokenizer() const { return tokenizer_or_null() != nullptr; }

const Tokenizer& Model::tokenizer() const {
  const Tokenizer* t = tokenizer_or_null();
  if (!t) throw TokenizerError(bundle_dir_ + ": the bundle has no tokenizer; pass token ids instead");
  return *t;
}

std::vector<int64_t> Model::encode(const std::string& text) const {
  if (text.empty()) throw GenerationError("prompt is empty: give some text or token ids");
  const Tokenizer* t = tokenizer_or_null();
  if (!t) throw TokenizerError(bundle_dir_ + ": the bundle has no tokenizer, so text prompts cannot be encoded; pass "
                               "token ids instead");
  return t->encode_prompt(text);
}

std::string Model::decode(const std::vector<int64_t>& ids) const { return tokenizer().decode(ids); }

std::vector<int64_t> Model::chat_ids(const std::vector<Message>& messages) const {
  if (messages.empty()) throw GenerationError("chat needs at least one message");
  const Tokenizer* t = tokenizer_or_null();
  if (!t) throw TokenizerError(bundle_dir_ + ": the bundle has no tokenizer, so chat is unavailable; pass token ids "
                               "instead");
  return build_chat_ids(*t, spec_, messages);
}

// ------------------------------------------------------------------------------------------------ generation

GenerationResult Model::generate(const std::string& text, const GenerationConfig& config, const TokenCallback& cb) {
  return run({encode(text)}, config, {}, cb).at(0);
}

GenerationResult Model::generate(const std::vector<int64_t>& ids, const GenerationConfig& config,
                                 const TokenCallback& cb) {
  return run({ids}, config, {}, cb).at(0);
}

std::vector<GenerationResult> Model::generate_batch(const std::vector<std::vector<int64_t>>& prompts,
                                                    const GenerationConfig& config, const TokenCallback& cb) {
  return run(prompts, config, {}, cb);
}

GenerationResult Model::chat(const std::vector<Message>& messages, const GenerationConfig& config,
                             const TokenCallback& cb) {
  auto ids = chat_ids(messages);
  return run({ids}, config, chat_stop_ids(tokenizer(), spec_), cb).at(0);
}

std::vector<GenerationResult> Model::run(const std::vector<std::vector<int64_t>>& prompts,
                                         const GenerationConfig& cfg, const std::vector<int64_t>& extra_eos,
                                         const TokenCallback& callback) {
  if (!backend_) throw BackendError("the model was closed");
  cfg.validate();
  if (prompts.empty()) throw GenerationError("no prompts given");
  int64_t context = context_length_;
  if (cfg.max_length) context = std::min(context, *cfg.max_length);
  const int64_t vocab = spec_.vocab_size;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string where = prompts.size() > 1 ? "prompt " + std::to_string(i) : "prompt";
    const auto& p = prompts[i];
    if (p.empty()) throw GenerationError(where + " is empty: give at least one token");
    for (int64_t t : p)
      if (t < 0 || t >= vocab)
        throw GenerationError(where + " has token id " + std::to_string(t) + " outside the vocabulary [0, " +
                              std::to_string(vocab) + ")");
    if (static_cast<int64_t>(p.size()) >= context)
      throw GenerationError(where + " is " + std::to_string(p.size()) + " tokens, but the context holds " +
                            std::to_string(context) + ": at most " + std::to_string(context - 1) +
                            " prompt tokens leave room for one new token; shorten the prompt");
  }
  const Tokenizer* tok = tokenizer_or_null();
  if (!cfg.stop.empty() && !tok)
    throw GenerationError("stop strings need a tokenizer to decode the text; this bundle has none");

  std::set<int64_t> eos;
  if (cfg.eos_token_ids) eos.insert(cfg.eos_token_ids->begin(), cfg.eos_token_ids->end());
  else eos.insert(spec_.eos_token_ids.begin(), spec_.eos_token_ids.end());
  eos.insert(extra_eos.begin(), extra_eos.end());
  const int64_t pad = (spec_.pad_token_id >= 0 && spec_.pad_token_id < vocab) ? spec_.pad_token_id : 0;

  const size_t B = prompts.size();
  std::vector<Sequence> seqs(B);
  std::vector<std::unique_ptr<StopTextTracker>> trackers;
  for (size_t i = 0; i < B; ++i) {
    seqs[i].prompt = prompts[i];
    if (tok) trackers.push_back(std::make_unique<StopTextTracker>(tok, cfg.stop));
  }
  // left padding
  size_t n_max = 0;
  for (const auto& p : prompts) n_max = std::max(n_max, p.size());
  std::vector<int64_t> ids(B * n_max, pad), mask(B * n_max, 0), pos(B * n_max, 0);
  for (size_t r = 0; r < B; ++r) {
    const size_t off = n_max - prompts[r].size();
    for (size_t j = 0; j < prompts[r].size(); ++j) {
      ids[r * n_max + off + j] = prompts[r][j];
      mask[r * n_max + off + j] = 1;
      pos[r * n_max + off + j] = static_cast<int64_t>(j);
    }
  }
  std::vector<int64_t> next_pos(B);
  for (size_t r = 0; r < B; ++r) next_pos[r] = static_cast<int64_t>(prompts[r].size());
  std::vector<size_t> live(B);
  for (size_t r = 0; r < B; ++r) live[r] = r;
  std::unique_ptr<Pcg64> rng;
  if (cfg.do_sample) rng = std::make_unique<Pcg64>(cfg.seed ? Pcg64(*cfg.seed) : Pcg64::from_entropy());
  std::vector<std::set<int64_t>> seen;
  const bool penalise = cfg.repetition_penalty != 1.0;
  if (penalise)
    for (const auto& p : prompts) seen.emplace_back(p.begin(), p.end());

  auto choose = [&](const std::vector<float>& logits) {
    std::vector<const std::set<int64_t>*> row_seen;
    if (penalise)
      for (size_t r : live) row_seen.push_back(&seen[r]);
    const size_t v = logits.size() / live.size();
    return next_tokens(logits, live.size(), v, cfg, rng.get(), penalise ? &row_seen : nullptr);
  };

  Timings timings;
  std::vector<double> step_ms;
  // prefill, chunk columns at a time
  auto t0 = Clock::now();
  auto cache = backend_->empty_cache(static_cast<int64_t>(B));
  const size_t step_cols = (prefill_chunk_ == 0 || static_cast<size_t>(prefill_chunk_) >= n_max)
                               ? n_max : static_cast<size_t>(prefill_chunk_);
  std::vector<float> logits;
  for (size_t start = 0; start < n_max; start += step_cols) {
    const size_t end = std::min(start + step_cols, n_max), w = end - start;
    std::vector<int64_t> cid(B * w), cpos(B * w), cmask(B * end);
    for (size_t r = 0; r < B; ++r) {
      std::copy(ids.begin() + r * n_max + start, ids.begin() + r * n_max + end, cid.begin() + r * w);
      std::copy(pos.begin() + r * n_max + start, pos.begin() + r * n_max + end, cpos.begin() + r * w);
      std::copy(mask.begin() + r * n_max, mask.begin() + r * n_max + end, cmask.begin() + r * end);
    }
    logits = backend_->forward(cid, cmask, cpos, static_cast<int64_t>(w), cache);
  }
  std::vector<int64_t> tokens = choose(logits);
  timings.prefill_ms = ms_since(t0);

  auto accept = [&](size_t r, int64_t token) -> TokenEvent {
    Sequence& seq = seqs[r];
    seq.generated.push_back(token);
    StopTextTracker* tr = tok ? trackers[r].get() : nullptr;
    std::string piece, reason;
    if (eos.count(token)) {
      reason = FINISH_EOS;  // the eos token is not decoded into the text
    } else if (tr) {
      piece = tr->push(token);
      if (tr->stopped()) reason = FINISH_STOP;
    }
    if (reason.empty()) {
      if (static_cast<int64_t>(seq.generated.size()) >= cfg.max_new_tokens) reason = FINISH_LENGTH;
      else if (static_cast<int64_t>(seq.prompt.size() + seq.generated.size()) >= context) reason = FINISH_CONTEXT;
    }
    if (!reason.empty()) {
      seq.finish_reason = reason;
      if (tr) piece += tr->finish();
    }
    TokenEvent ev;
    ev.index = r;
    ev.token_id = token;
    ev.text = piece;
    ev.finish_reason = reason;
    return ev;
  };

  size_t step = 0;
  while (true) {
    std::vector<char> done(live.size(), 0);
    bool all_done = true, any_done = false;
    for (size_t j = 0; j < live.size(); ++j) {
      const size_t r = live[j];
      TokenEvent ev = accept(r, tokens[j]);
      if (penalise) seen[r].insert(ev.token_id);
      done[j] = !ev.finish_reason.empty();
      all_done = all_done && done[j];
      any_done = any_done || done[j];
      if (callback) callback(ev);
    }
    if (all_done) break;
    if (any_done) {  // finished rows leave the batch
      std::vector<int64_t> keep;
      std::vector<size_t> live2;
      std::vector<int64_t> tokens2, pos2;
      for (size_t j = 0; j < live.size(); ++j)
        if (!done[j]) {
          keep.push_back(static_cast<int64_t>(j));
          live2.push_back(live[j]);
          tokens2.push_back(tokens[j]);
          pos2.push_back(next_pos[j]);
        }
      backend_->select_rows(cache, keep);
      live.swap(live2);
      tokens.swap(tokens2);
      next_pos.swap(pos2);
    }
    ++step;
    auto ts = Clock::now();
    const size_t L = live.size(), cols = n_max + step;
    std::vector<int64_t> smask(L * cols, 1);
    for (size_t j = 0; j < L; ++j)
      std::copy(mask.begin() + live[j] * n_max, mask.begin() + (live[j] + 1) * n_max, smask.begin() + j * cols);
    logits = backend_->forward(tokens, smask, next_pos, 1, cache);
    tokens = choose(logits);
    step_ms.push_back(ms_since(ts));
    for (auto& p : next_pos) ++p;
  }

  double decode_ms = 0;
  for (double s : step_ms) decode_ms += s;
  timings.decode_ms = decode_ms;
  timings.decode_steps = static_cast<int64_t>(step_ms.size());
  timings.decode_tokens_per_s = decode_ms > 0 ? step_ms.size() / (decode_ms / 1000.0) : 0.0;
  std::vector<GenerationResult> results;
  for (size_t r = 0; r < B; ++r) {
    GenerationResult res;
    res.prompt_ids = seqs[r].prompt;
    res.generated_ids = seqs[r].generated;
    if (tok) res.text = trackers[r]->final_text();
    res.finish_reason = seqs[r].finish_reason;
    res.timings = timings;
    results.push_back(std::move(res));
  }
  return results;
}

// ------------------------------------------------------------------------------------------------ JSON

static std::string id_list(const std::vector<int64_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

std::string GenerationResult::to_json() const {
  return "{\"prompt_ids\": " + id_list(prompt_ids) + ", \"generated_ids\": " + id_list(generated_ids) +
         ", \"text\": " + (text ? json_string(*text) : std::string("null")) +
         ", \"finish_reason\": " + json_string(finish_reason) + ", \"timings\": {\"prefill_ms\": " +
         json_double(timings.prefill_ms) + ", \"decode_ms\": " + json_double(timings.decode_ms) +
         ", \"decode_steps\": " + std::to_string(timings.decode_steps) +
         ", \"decode_tokens_per_s\": " + json_double(timings.decode_tokens_per_s) + "}}";
}

}  // namespace glm
