// The C ABI over glm::Model (include/glm_runtime.h): exceptions become status codes and a per-thread message.
#include <cstdlib>
#include <cstring>
#include <new>

#include "glm_runtime.h"
#include "internal.hpp"

struct glm_model {
  std::unique_ptr<glm::Model> model;
};
struct glm_result {
  glm::GenerationResult result;
  std::string json;
};

namespace {
thread_local std::string last_error;

int fail(int code, const std::string& msg) {
  last_error = msg.substr(0, msg.find('\n'));
  return code;
}

template <typename F>
int guarded(F&& f) {
  try {
    last_error.clear();
    f();
    return GLM_OK;
  } catch (const glm::BundleError& e) {
    return fail(GLM_ERR_BUNDLE, e.what());
  } catch (const glm::SamplingConfigError& e) {
    return fail(GLM_ERR_SAMPLING, e.what());
  } catch (const glm::GenerationError& e) {
    return fail(GLM_ERR_GENERATION, e.what());
  } catch (const glm::TokenizerError& e) {
    return fail(GLM_ERR_TOKENIZER, e.what());
  } catch (const glm::BackendError& e) {
    return fail(GLM_ERR_BACKEND, e.what());
  } catch (const std::bad_alloc&) {
    return fail(GLM_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return fail(GLM_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(GLM_ERR_INTERNAL, "internal error");
  }
}

glm::GenerationConfig to_config(const glm_generation_config* c) {
  glm::GenerationConfig g;
  if (!c) return g;
  g.max_new_tokens = c->max_new_tokens;
  g.do_sample = c->do_sample != 0;
  g.temperature = c->temperature;
  g.top_k = c->top_k;
  g.top_p = c->top_p;
  g.repetition_penalty = c->repetition_penalty;
  if (c->seed < -1) throw glm::SamplingConfigError("seed must be >= 0 (or -1 for fresh entropy), got " + std::to_string(c->seed));
  if (c->seed >= 0) g.seed = static_cast<uint64_t>(c->seed);
  if (c->n_stop && !c->stop) throw glm::SamplingConfigError("stop is NULL but n_stop is " + std::to_string(c->n_stop));
  for (size_t i = 0; i < c->n_stop; ++i) {
    if (!c->stop[i]) throw glm::SamplingConfigError("stop string " + std::to_string(i) + " is NULL");
    g.stop.emplace_back(c->stop[i]);
  }
  if (c->max_length < 0) throw glm::SamplingConfigError("max_length must be >= 2 (0: the model's), got " + std::to_string(c->max_length));
  if (c->max_length > 0) g.max_length = c->max_length;
  return g;
}

glm::TokenCallback to_callback(glm_token_callback cb, void* user) {
  if (!cb) return nullptr;
  return [cb, user](const glm::TokenEvent& e) {
    cb(user, e.index, e.token_id, e.text.c_str(), e.finish_reason.empty() ? nullptr : e.finish_reason.c_str());
  };
}

struct InvalidArgument : std::exception {};
}  // namespace

extern "C" {

void glm_load_options_init(glm_load_options* o) {
  if (!o) return;
  o->threads = 0;
  o->prefill_chunk = 256;
  o->verify_checksums = 0;
  o->verify_files = 1;
}

void glm_generation_config_init(glm_generation_config* c) {
  if (!c) return;
  c->max_new_tokens = 128;
  c->do_sample = 0;
  c->temperature = 1.0;
  c->top_k = 0;
  c->top_p = 1.0;
  c->repetition_penalty = 1.0;
  c->seed = -1;
  c->stop = nullptr;
  c->n_stop = 0;
  c->max_length = 0;
}

int glm_model_load(const char* bundle_dir, const glm_load_options* options, glm_model** out) {
  if (!bundle_dir || !out) return fail(GLM_ERR_INVALID_ARGUMENT, "glm_model_load: bundle_dir and out must not be NULL");
  *out = nullptr;
  return guarded([&] {
    glm::LoadOptions lo;
    if (options) {
      lo.threads = options->threads;
      lo.prefill_chunk = options->prefill_chunk;
      lo.verify_checksums = options->verify_checksums != 0;
      lo.verify_files = options->verify_files != 0;
    }
    auto h = std::make_unique<glm_model>();
    h->model = glm::Model::load(bundle_dir, lo);
    *out = h.release();
  });
}

void glm_model_free(glm_model* model) { delete model; }

int64_t glm_model_context_length(const glm_model* model) { return model ? model->model->context_length() : 0; }

int glm_generate(glm_model* model, const char* prompt, const int64_t* ids, size_t n_ids,
                 const glm_generation_config* config, glm_token_callback callback, void* user, glm_result** out) {
  if (!model || !out) return fail(GLM_ERR_INVALID_ARGUMENT, "glm_generate: model and out must not be NULL");
  *out = nullptr;
  if (!prompt && !ids && n_ids) return fail(GLM_ERR_INVALID_ARGUMENT, "glm_generate: ids is NULL but n_ids is not 0");
  if (prompt && ids) return fail(GLM_ERR_INVALID_ARGUMENT, "glm_generate: give a text prompt or ids, not both");
  return guarded([&] {
    auto cfg = to_config(config);
    auto r = std::make_unique<glm_result>();
    if (prompt) r->result = model->model->generate(std::string(prompt), cfg, to_callback(callback, user));
    else r->result = model->model->generate(std::vector<int64_t>(ids, ids + n_ids), cfg, to_callback(callback, user));
    r->json = r->result.to_json();
    *out = r.release();
  });
}

int glm_chat(glm_model* model, const char* messages_json, const glm_generation_config* config,
             glm_token_callback callback, void* user, glm_result** out) {
  if (!model || !messages_json || !out)
    return fail(GLM_ERR_INVALID_ARGUMENT, "glm_chat: model, messages_json and out must not be NULL");
  *out = nullptr;
  return guarded([&] {
    auto cfg = to_config(config);
    auto messages = glm::messages_from_json(messages_json);
    auto r = std::make_unique<glm_result>();
    r->result = model->model->chat(messages, cfg, to_callback(callback, user));
    r->json = r->result.to_json();
    *out = r.release();
  });
}

const int64_t* glm_result_generated_ids(const glm_result* r, size_t* n) {
  if (!r) { if (n) *n = 0; return nullptr; }
  if (n) *n = r->result.generated_ids.size();
  return r->result.generated_ids.data();
}
const char* glm_result_text(const glm_result* r) { return r && r->result.text ? r->result.text->c_str() : nullptr; }
const char* glm_result_finish_reason(const glm_result* r) { return r ? r->result.finish_reason.c_str() : nullptr; }
const char* glm_result_json(const glm_result* r) { return r ? r->json.c_str() : nullptr; }
void glm_result_free(glm_result* r) { delete r; }

int glm_encode(glm_model* model, const char* text, int64_t** ids, size_t* n) {
  if (!model || !text || !ids || !n) return fail(GLM_ERR_INVALID_ARGUMENT, "glm_encode: arguments must not be NULL");
  *ids = nullptr;
  *n = 0;
  return guarded([&] {
    auto v = model->model->encode(text);
    auto* p = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (v.size() ? v.size() : 1)));
    if (!p) throw std::bad_alloc();
    std::copy(v.begin(), v.end(), p);
    *ids = p;
    *n = v.size();
  });
}

int glm_decode(glm_model* model, const int64_t* ids, size_t n, char** text) {
  if (!model || !text || (!ids && n)) return fail(GLM_ERR_INVALID_ARGUMENT, "glm_decode: arguments must not be NULL");
  *text = nullptr;
  return guarded([&] {
    std::string s = model->model->decode(std::vector<int64_t>(ids, ids + n));
    char* p = static_cast<char*>(std::malloc(s.size() + 1));
    if (!p) throw std::bad_alloc();
    std::memcpy(p, s.c_str(), s.size() + 1);
    *text = p;
  });
}

void glm_free(void* p) { std::free(p); }

const char* glm_last_error(void) { return last_error.c_str(); }

}  // extern "C"
