/* glm-export's C runtime ABI: load a bundle, generate, stream; for C and every language with a C FFI.
 *
 * Every function returns GLM_OK (0) or an error code; glm_last_error() then gives a one-line message (per thread,
 * valid until the next call on that thread). Objects are opaque handles freed with their own *_free; buffers the
 * library returns are freed with glm_free. Nothing here throws or aborts on bad input.
 *
 *     glm_model* m;  glm_result* r;  glm_generation_config c;
 *     if (glm_model_load("bundle/", NULL, &m) != GLM_OK) { fprintf(stderr, "%s\n", glm_last_error()); return 1; }
 *     glm_generation_config_init(&c);  c.max_new_tokens = 32;
 *     if (glm_generate(m, "Hello", NULL, 0, &c, on_token, NULL, &r) == GLM_OK) puts(glm_result_text(r));
 *     glm_result_free(r);  glm_model_free(m);
 */
#ifndef GLM_RUNTIME_H
#define GLM_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GLM_RUNTIME_ABI_VERSION 1

typedef enum glm_status {
  GLM_OK = 0,
  GLM_ERR_BUNDLE = 1,        /* missing, corrupt or newer bundle */
  GLM_ERR_GENERATION = 2,    /* impossible request: empty prompt, prompt longer than the context, bad messages */
  GLM_ERR_SAMPLING = 3,      /* a sampling value out of range */
  GLM_ERR_TOKENIZER = 4,     /* tokenizer files missing or unreadable, no chat format */
  GLM_ERR_BACKEND = 5,       /* the backend cannot run */
  GLM_ERR_INVALID_ARGUMENT = 6, /* a NULL handle or pointer where one is needed */
  GLM_ERR_INTERNAL = 7       /* anything else (out of memory, ...) */
} glm_status;

typedef struct glm_model glm_model;
typedef struct glm_result glm_result;

typedef struct glm_load_options {
  int threads;          /* onnxruntime intra-op threads; 0: its choice */
  int prefill_chunk;    /* prompt tokens per prefill forward; 0: all at once (default 256) */
  int verify_checksums; /* non-zero: re-hash every file the manifest lists, even when already verified */
  int verify_files;     /* non-zero (default): check every listed file's sha256, hashed once then stamped */
} glm_load_options;

typedef struct glm_generation_config {
  int max_new_tokens;         /* default 128 */
  int do_sample;              /* 0: greedy (default) */
  double temperature;         /* default 1.0 */
  int top_k;                  /* 0: off */
  double top_p;               /* 1.0: off */
  double repetition_penalty;  /* 1.0: off */
  int64_t seed;               /* -1: fresh entropy; >= 0: numpy's default_rng(seed), the Python runtime's draws */
  const char* const* stop;    /* n_stop stop strings (UTF-8) */
  size_t n_stop;
  int64_t max_length;         /* 0: the model's context */
} glm_generation_config;

/* Called once per generated token: index of the prompt in the batch, the id, the UTF-8 text it releases (never a
 * partial character; often ""), and the finish reason on the sequence's last token (NULL before). */
typedef void (*glm_token_callback)(void* user, size_t index, int64_t token_id, const char* text,
                                   const char* finish_reason);

void glm_load_options_init(glm_load_options* options);
void glm_generation_config_init(glm_generation_config* config);

int glm_model_load(const char* bundle_dir, const glm_load_options* options /* NULL: defaults */, glm_model** out);
void glm_model_free(glm_model* model);
int64_t glm_model_context_length(const glm_model* model);

/* One prompt: text (prompt != NULL; encoded with the model's prompt prefix) or ids (ids, n_ids). */
int glm_generate(glm_model* model, const char* prompt, const int64_t* ids, size_t n_ids,
                 const glm_generation_config* config /* NULL: defaults */, glm_token_callback callback, void* user,
                 glm_result** out);
/* One chat reply: messages_json is a JSON list [{"role": "user", "content": "..."}, ...]. */
int glm_chat(glm_model* model, const char* messages_json, const glm_generation_config* config,
             glm_token_callback callback, void* user, glm_result** out);

const int64_t* glm_result_generated_ids(const glm_result* result, size_t* n);
const char* glm_result_text(const glm_result* result);          /* NULL when the bundle has no tokenizer */
const char* glm_result_finish_reason(const glm_result* result); /* "eos" | "stop" | "length" | "context" */
const char* glm_result_json(const glm_result* result);          /* the object `glm-export run --json` prints */
void glm_result_free(glm_result* result);

/* Ids of text with the prompt prefix; *ids is freed with glm_free. */
int glm_encode(glm_model* model, const char* text, int64_t** ids, size_t* n);
/* Text of ids (special tokens dropped); *text is freed with glm_free. */
int glm_decode(glm_model* model, const int64_t* ids, size_t n, char** text);
void glm_free(void* p);

const char* glm_last_error(void);

#ifdef __cplusplus
}
#endif
#endif /* GLM_RUNTIME_H */
