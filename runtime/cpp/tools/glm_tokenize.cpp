// glm-tokenize: the C++ tokenizer and chat formats of a bundle over JSON lines, for the parity tests.
//   glm-tokenize BUNDLE < requests.jsonl > answers.jsonl
// Each request line is one of
//   {"encode": TEXT}            plain ids (special-token text stays text)
//   {"encode_prompt": TEXT}     prefix + plain ids
//   {"encode_specials": TEXT}   special-token text becomes special ids
//   {"decode": [IDS]}           text, special tokens dropped
//   {"stream": [IDS]}           the streaming decoder's pieces, then its flush
//   {"chat": [MESSAGES]}        chat prompt ids (with the generation prompt)
//   {"chat_stop_ids": true}     the ids that end an assistant turn
// and each answer line is {"ok": RESULT} or {"error": MESSAGE}.
#include <iostream>
#include <nlohmann/json.hpp>

#include "../src/internal.hpp"

using json = nlohmann::json;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: glm-tokenize BUNDLE < requests.jsonl\n";
    return 2;
  }
  std::shared_ptr<glm::Tokenizer> tok;
  glm::Manifest manifest;
  try {
    manifest = glm::read_manifest(argv[1], /*verify_files=*/false, /*verify_checksums=*/false);  // tokenizer only
    tok = glm::load_tokenizer(argv[1], manifest.spec);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    json out;
    try {
      json req = json::parse(line);
      if (req.contains("encode")) out["ok"] = tok->encode(req["encode"].get<std::string>());
      else if (req.contains("encode_prompt")) out["ok"] = tok->encode_prompt(req["encode_prompt"].get<std::string>());
      else if (req.contains("encode_specials"))
        out["ok"] = tok->encode_with_specials(req["encode_specials"].get<std::string>());
      else if (req.contains("decode")) out["ok"] = tok->decode(req["decode"].get<std::vector<int64_t>>());
      else if (req.contains("stream")) {
        glm::StreamDecoder d(tok.get());
        std::vector<std::string> pieces;
        for (int64_t id : req["stream"].get<std::vector<int64_t>>()) pieces.push_back(d.push(id));
        pieces.push_back(d.flush());
        out["ok"] = pieces;
      } else if (req.contains("chat")) {
        out["ok"] = glm::build_chat_ids(*tok, manifest.spec, glm::messages_from_json(req["chat"].dump()));
      } else if (req.contains("chat_stop_ids")) {
        out["ok"] = glm::chat_stop_ids(*tok, manifest.spec);
      } else {
        out["error"] = "unknown request";
      }
    } catch (const std::exception& e) {
      out = json::object();
      out["error"] = e.what();
    }
    std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n" << std::flush;
  }
  return 0;
}
