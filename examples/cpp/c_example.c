/* glm-export's runtime from C: load a bundle, generate with streaming, read the result, free everything.
 *   glm_c_example BUNDLE_DIR "prompt text" */
#include <glm_runtime.h>
#include <stdio.h>

static void on_token(void* user, size_t index, int64_t token_id, const char* text, const char* finish_reason) {
  (void)index; (void)token_id; (void)finish_reason;
  ++*(int*)user;
  fputs(text, stdout);
  fflush(stdout);
}

int main(int argc, char** argv) {
  glm_model* model = NULL;
  glm_result* result = NULL;
  glm_generation_config config;
  int tokens = 0;
  if (argc != 3) {
    fprintf(stderr, "usage: %s BUNDLE_DIR PROMPT\n", argv[0]);
    return 2;
  }
  if (glm_model_load(argv[1], NULL, &model) != GLM_OK) {
    fprintf(stderr, "error: %s\n", glm_last_error());
    return 1;
  }
  glm_generation_config_init(&config);
  config.max_new_tokens = 32;
  if (glm_generate(model, argv[2], NULL, 0, &config, on_token, &tokens, &result) != GLM_OK) {
    fprintf(stderr, "error: %s\n", glm_last_error());
    glm_model_free(model);
    return 1;
  }
  printf("\n[%s, %d tokens]\n%s\n", glm_result_finish_reason(result), tokens, glm_result_json(result));
  glm_result_free(result);
  glm_model_free(model);
  return 0;
}
