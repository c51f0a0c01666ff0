// glm-run: generate with a glm-export bundle from the command line, no Python. `--json` prints the object
// `glm-export run --json` prints (prompt_ids, generated_ids, text, finish_reason, timings).
//
//   glm-run --model BUNDLE (--prompt TEXT | --prompt-ids 1,2,3 [--prompt-ids ...]) [--chat [--system TEXT]]
//           [--max-new-tokens N] [--greedy | --temperature T --top-k K --top-p P --seed S]
//           [--repetition-penalty R] [--stop TEXT]... [--threads N] [--prefill-chunk N] [--verify-checksums] [--no-verify-files]
//           [--stream | --json] [--ignore-eos] [--repeat N]
//
// --ignore-eos never stops on a token (eos_token_ids=(), as `glm-export bench` does); --repeat N runs the generation
// N times in one process and prints the timings of the first N-1 runs as JSON lines first (for benchmarks).
// Several --prompt-ids run as one left-padded batch (--json then prints a list of objects). Errors print one line
// ("error: ...") and exit 2, like glm-export.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "glm/glm.hpp"

namespace {

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* USAGE =
    "usage: glm-run --model BUNDLE (--prompt TEXT | --prompt-ids IDS [--prompt-ids IDS ...]) [--chat] [--system TEXT]\n"
    "               [--max-new-tokens N] [--greedy | --temperature T] [--top-k K] [--top-p P] [--seed S]\n"
    "               [--repetition-penalty R] [--stop TEXT ...] [--threads N] [--prefill-chunk N]\n"
    "               [--verify-checksums] [--no-verify-files] [--stream | --json] [--ignore-eos] [--repeat N]\n";

long long parse_int(const std::string& flag, const std::string& v) {
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno) throw Usage("Invalid value for '" + flag + "': '" + v + "' is not a valid integer.");
  return x;
}

double parse_float(const std::string& flag, const std::string& v) {
  errno = 0;
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end || errno) throw Usage("Invalid value for '" + flag + "': '" + v + "' is not a valid float.");
  return x;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::string cur, s;
  for (char c : text)
    if (c != ' ') s += c;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string tok = s.substr(i, j - i);
    if (!tok.empty()) {
      errno = 0;
      char* end = nullptr;
      long long x = std::strtoll(tok.c_str(), &end, 10);
      if (*end || errno) throw Usage("Invalid value for '--prompt-ids': expected comma-separated integers, e.g. 1,2,3");
      ids.push_back(x);
    }
    i = j + 1;
  }
  if (ids.empty()) throw Usage("Invalid value for '--prompt-ids': no ids given");
  return ids;
}

std::string join_ids(const std::vector<int64_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

int run(int argc, char** argv) {
  std::string bundle, prompt, system;
  bool have_prompt = false, have_system = false, as_chat = false, greedy = false, stream = false, as_json = false;
  std::vector<std::vector<int64_t>> id_prompts;
  glm::GenerationConfig cfg;
  glm::LoadOptions lo;
  bool max_new_given = false;
  int repeat = 1;
  std::vector<std::string> sampling_given;
  std::optional<double> temperature, top_p, rep;
  std::optional<long long> top_k, seed;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Usage("Option '" + a + "' requires an argument.");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") { std::cout << USAGE; return 0; }
    else if (a == "--model") bundle = value();
    else if (a == "--prompt") { prompt = value(); have_prompt = true; }
    else if (a == "--prompt-ids") id_prompts.push_back(parse_ids(value()));
    else if (a == "--chat") as_chat = true;
    else if (a == "--system") { system = value(); have_system = true; }
    else if (a == "--max-new-tokens") {
      long long n = parse_int(a, value());
      if (n < 1) throw Usage("Invalid value for '--max-new-tokens': " + std::to_string(n) + " is not in the range x>=1.");
      cfg.max_new_tokens = static_cast<int>(n);
      max_new_given = true;
    } else if (a == "--greedy") greedy = true;
    else if (a == "--temperature") { temperature = parse_float(a, value()); sampling_given.push_back(a); }
    else if (a == "--top-k") { top_k = parse_int(a, value()); sampling_given.push_back(a); }
    else if (a == "--top-p") { top_p = parse_float(a, value()); sampling_given.push_back(a); }
    else if (a == "--seed") { seed = parse_int(a, value()); sampling_given.push_back(a); }
    else if (a == "--repetition-penalty") rep = parse_float(a, value());
    else if (a == "--stop") cfg.stop.push_back(value());
    else if (a == "--threads") {
      long long n = parse_int(a, value());
      if (n < 1) throw Usage("Invalid value for '--threads': " + std::to_string(n) + " is not in the range x>=1.");
      lo.threads = static_cast<int>(n);
    } else if (a == "--prefill-chunk") {
      long long n = parse_int(a, value());
      if (n < 0) throw Usage("Invalid value for '--prefill-chunk': " + std::to_string(n) + " is not in the range x>=0.");
      lo.prefill_chunk = static_cast<int>(n);
    } else if (a == "--verify-checksums") lo.verify_checksums = true;
    else if (a == "--no-verify-files") lo.verify_files = false;
    else if (a == "--ignore-eos") cfg.eos_token_ids = std::vector<int64_t>{};
    else if (a == "--repeat") {
      long long n = parse_int(a, value());
      if (n < 1) throw Usage("Invalid value for '--repeat': " + std::to_string(n) + " is not in the range x>=1.");
      repeat = static_cast<int>(n);
    }
    else if (a == "--stream") stream = true;
    else if (a == "--json") as_json = true;
    else throw Usage("No such option: " + a);
  }
  (void)max_new_given;
  if (bundle.empty()) throw Usage("Missing option '--model'.");
  if (have_prompt == !id_prompts.empty()) throw Usage("give exactly one of --prompt or --prompt-ids");
  if (as_chat && !have_prompt) throw Usage("--chat needs --prompt text");
  if (have_system && !as_chat) throw Usage("--system needs --chat");
  if (stream && as_json) throw Usage("--stream and --json cannot be combined");
  if (stream && id_prompts.size() > 1) throw Usage("--stream takes one prompt");
  if (greedy && !sampling_given.empty()) {
    std::string flags;
    for (const auto& f : sampling_given) flags += (flags.empty() ? "" : ", ") + f;
    throw Usage("--greedy cannot be combined with " + flags);
  }
  cfg.do_sample = !sampling_given.empty();
  if (temperature) cfg.temperature = *temperature;
  if (top_k) cfg.top_k = static_cast<int>(*top_k);
  if (top_p) cfg.top_p = *top_p;
  if (rep) cfg.repetition_penalty = *rep;
  if (seed) {
    if (*seed < 0) throw glm::SamplingConfigError("seed must be >= 0, got " + std::to_string(*seed));
    cfg.seed = static_cast<uint64_t>(*seed);
  }
  cfg.validate();

  auto model = glm::Model::load(bundle, lo);
  glm::TokenCallback cb = nullptr;
  if (stream)
    cb = [](const glm::TokenEvent& e) {
      if (!e.text.empty()) { std::fwrite(e.text.data(), 1, e.text.size(), stdout); std::fflush(stdout); }
    };
  std::vector<glm::GenerationResult> results;
  for (int k = 1; k < repeat; ++k) {  // --repeat: earlier runs (benchmarks) print their timings only
    auto r = have_prompt ? model->generate(prompt, cfg) : model->generate_batch(id_prompts, cfg).at(0);
    std::cout << "{\"repeat\": " << k << ", \"timings\": {\"prefill_ms\": " << r.timings.prefill_ms
              << ", \"decode_ms\": " << r.timings.decode_ms << ", \"decode_steps\": " << r.timings.decode_steps
              << ", \"decode_tokens_per_s\": " << r.timings.decode_tokens_per_s << "}}\n";
  }
  if (as_chat) {
    std::vector<glm::Message> messages;
    if (have_system) messages.push_back({"system", system, "", ""});
    messages.push_back({"user", prompt, "", ""});
    results.push_back(model->chat(messages, cfg, cb));
  } else if (have_prompt) {
    results.push_back(model->generate(prompt, cfg, cb));
  } else {
    results = model->generate_batch(id_prompts, cfg, cb);
  }
  if (stream) std::cout << "\n";
  if (as_json) {
    if (results.size() == 1) {
      std::cout << results[0].to_json() << "\n";
    } else {
      std::cout << "[";
      for (size_t i = 0; i < results.size(); ++i) std::cout << (i ? ", " : "") << results[i].to_json();
      std::cout << "]\n";
    }
    return 0;
  }
  for (const auto& r : results) {
    if (!stream) std::cout << (r.text ? *r.text : join_ids(r.generated_ids)) << "\n";
    char line[256];
    std::snprintf(line, sizeof line, "[%s: %zu tokens, prefill %.1f ms, decode %.1f tokens/s]", r.finish_reason.c_str(),
                  r.generated_ids.size(), r.timings.prefill_ms, r.timings.decode_tokens_per_s);
    std::cerr << line << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Usage& e) {
    std::cerr << USAGE << "\nError: " << e.what() << "\n";
    return 2;
  } catch (const glm::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: internal error: " << e.what() << "\n";
    return 1;
  }
}
