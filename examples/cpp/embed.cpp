// Embedding glm-export's C++ runtime: load a bundle, stream a chat reply, print the finish reason.
//   glm_embed_example BUNDLE_DIR "question"
#include <glm/glm.hpp>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " BUNDLE_DIR QUESTION\n";
    return 2;
  }
  try {
    auto model = glm::Model::load(argv[1]);
    glm::GenerationConfig config;
    config.max_new_tokens = 32;  // greedy; set do_sample, temperature, top_p, seed to sample
    auto on_token = [](const glm::TokenEvent& e) { std::cout << e.text << std::flush; };
    glm::GenerationResult r = model->spec().chat_format != "none"
                                  ? model->chat({{"user", argv[2], "", ""}}, config, on_token)
                                  : model->generate(std::string(argv[2]), config, on_token);
    std::cout << "\n[" << r.finish_reason << ", " << r.generated_ids.size() << " tokens, "
              << r.timings.decode_tokens_per_s << " tokens/s]\n";
  } catch (const glm::Error& e) {  // BundleError, GenerationError, TokenizerError, ...: one line each
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
