// Chat formats (runtime/chat.py's build_chat_ids): prompt ids for a conversation in the model's format.
//
//   chatglm2  "[Round n]\n\n问：{q}\n\n答：{a}\n\n" plain text after [gMASK] sop
//   chatglm3  [gMASK] sop, then <|role|> + encode(metadata + "\n") + encode(content) per message, role tokens by id
//   glm4      [gMASK]<sop>, then <|role|> + encode(metadata + "\n" + content) per message
//   template  the checkpoint's jinja chat_template. There is no jinja engine here: the C++ runtime renders the text
//             GLM-4-0414's / glm-4-9b-chat-hf's template renders for plain messages (system messages first, then
//             "<|role|>\n{content}" per message, an assistant's metadata as "<|assistant|>{meta} \n{content}", then
//             "<|assistant|>"); the template's own token text becomes ids, message text stays text, as Python does. Templates that do
//             not have that shape are refused with a TokenizerError; a message's own "tools" key is ignored, as that template does
//             (it reads a top-level tools variable, which the runtime never passes).
#include <nlohmann/json.hpp>

#include "internal.hpp"

namespace glm {

using json = nlohmann::ordered_json;

static const std::vector<std::string> CHAT_ROLES = {"system", "user", "assistant", "observation"};

static std::string role_of(const Message& m, size_t index) {
  std::string role = m.role == "tool" ? "observation" : m.role;
  if (std::find(CHAT_ROLES.begin(), CHAT_ROLES.end(), role) == CHAT_ROLES.end())
    throw GenerationError("chat message " + std::to_string(index) + " has role '" + m.role +
                          "'; expected one of ('system', 'user', 'assistant', 'observation')");
  return role;
}

static void append(std::vector<int64_t>& ids, const std::vector<int64_t>& more) {
  ids.insert(ids.end(), more.begin(), more.end());
}

static std::vector<int64_t> chatglm2_ids(const Tokenizer& tok, const std::vector<Message>& messages, bool gen) {
  std::string text;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string role = role_of(messages[i], i);
    const std::string want = i % 2 == 0 ? "user" : "assistant";
    if (role != want)
      throw GenerationError("chatglm2 chat: message " + std::to_string(i) + " is '" + role +
                            "'; messages alternate user, assistant (no system or observation role in this format)");
    if (role == "user") {
      text += "[Round " + std::to_string(i / 2 + 1) + "]\n\n问：" + messages[i].content;
      if (i + 1 < messages.size() || gen) text += "\n\n答：";
    } else {
      text += messages[i].content + "\n\n";
    }
  }
  auto ids = tok.prefix_ids();
  append(ids, tok.encode(text));
  return ids;
}

static std::vector<int64_t> chatglm3_ids(const Tokenizer& tok, const std::vector<Message>& messages, bool gen) {
  auto ids = tok.prefix_ids();
  for (size_t i = 0; i < messages.size(); ++i) {
    const Message& m = messages[i];
    const std::string role = role_of(m, i);
    std::string content = m.content;
    if (role == "system" && !m.tools_json.empty()) {
      json tools;
      try {
        tools = json::parse(m.tools_json);
      } catch (const std::exception&) {
        throw GenerationError("chat message " + std::to_string(i) + ": tools is not valid JSON");
      }
      if (!(tools.is_null() || (tools.is_array() && tools.empty())))
        content += "\n" + tools.dump(4, ' ', false, json::error_handler_t::replace);
    }
    ids.push_back(tok.token_to_id("<|" + role + "|>"));
    append(ids, tok.encode(m.metadata + "\n"));
    append(ids, tok.encode(content));
  }
  if (gen) ids.push_back(tok.token_to_id("<|assistant|>"));
  return ids;
}

static std::vector<int64_t> glm4_ids(const Tokenizer& tok, const std::vector<Message>& messages, bool gen) {
  auto ids = tok.prefix_ids();
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string role = role_of(messages[i], i);
    ids.push_back(tok.token_to_id("<|" + role + "|>"));
    append(ids, tok.encode(messages[i].metadata + "\n" + messages[i].content));
  }
  if (gen) ids.push_back(tok.token_to_id("<|assistant|>"));
  return ids;
}

static std::vector<int64_t> template_ids(const Tokenizer& tok, const std::vector<Message>& messages, bool gen) {
  if (tok.chat_template.empty())
    throw TokenizerError("chat format 'template' but the bundle's tokenizer_config.json has no chat_template");
  const std::string& t = tok.chat_template;
  if (t.compare(0, 12, "[gMASK]<sop>") != 0 || t.find("<|user|>") == std::string::npos ||
      t.find("message.role != 'system'") == std::string::npos)
    throw TokenizerError("the bundle's chat_template is not GLM-4-0414's shape; the C++ runtime renders only that "
                         "template (no jinja engine): use the Python runtime, or pass prompt ids");
  // roles as given (the template has no "tool" alias and renders nothing for a role it does not know); message
  // strings are marked as text, so a user's typed "<|assistant|>" stays text (as in Python)
  std::vector<std::pair<std::string, bool>> parts;
  auto tmpl = [&](const std::string& s) { parts.emplace_back(s, false); };
  auto text = [&](const std::string& s) { parts.emplace_back(s, true); };
  tmpl("[gMASK]<sop>");
  for (const Message& m : messages)
    if (m.role == "system") { tmpl("<|system|>\n"); text(m.content); }
  for (const Message& m : messages) {
    if (m.role == "user") { tmpl("<|user|>\n"); text(m.content); }
    else if (m.role == "assistant" && m.metadata.empty()) { tmpl("<|assistant|>\n"); text(m.content); }
    else if (m.role == "assistant") { tmpl("<|assistant|>"); text(m.metadata); tmpl(" \n"); text(m.content); }
    else if (m.role == "observation") { tmpl("<|observation|>\n"); text(m.content); }
  }
  if (gen) tmpl("<|assistant|>");
  return tok.encode_template_parts(parts);
}

std::vector<int64_t> build_chat_ids(const Tokenizer& tok, const ModelSpec& spec, const std::vector<Message>& messages,
                                    bool add_generation_prompt) {
  if (messages.empty()) throw GenerationError("a chat needs at least one message");
  if (spec.chat_format == "chatglm2") return chatglm2_ids(tok, messages, add_generation_prompt);
  if (spec.chat_format == "chatglm3") return chatglm3_ids(tok, messages, add_generation_prompt);
  if (spec.chat_format == "glm4") return glm4_ids(tok, messages, add_generation_prompt);
  if (spec.chat_format == "template") return template_ids(tok, messages, add_generation_prompt);
  throw TokenizerError("the model has no chat format (chat_format '" + spec.chat_format + "'); use a plain prompt");
}

std::vector<int64_t> chat_stop_ids(const Tokenizer& tok, const ModelSpec& spec) {
  std::set<int64_t> stop(tok.eos_ids.begin(), tok.eos_ids.end());
  stop.insert(spec.eos_token_ids.begin(), spec.eos_token_ids.end());
  for (const char* n : {"<|user|>", "<|observation|>"}) {
    auto it = tok.special_ids.find(n);
    if (it != tok.special_ids.end()) stop.insert(it->second);
  }
  return {stop.begin(), stop.end()};
}

std::vector<Message> messages_from_json(const std::string& json_text) {
  json d;
  try {
    d = json::parse(json_text);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    throw GenerationError("chat messages are not valid JSON (" + msg.substr(0, msg.find('\n')) + ")");
  }
  if (!d.is_array()) throw GenerationError("chat messages must be a JSON list of {\"role\", \"content\"} objects");
  std::vector<Message> out;
  for (size_t i = 0; i < d.size(); ++i) {
    const json& m = d[i];
    if (!m.is_object() || (m.contains("content") && !m["content"].is_string()) ||
        (m.contains("role") && !m["role"].is_string()))
      throw GenerationError("chat message " + std::to_string(i) + " must be a mapping with a string 'content'");
    Message msg;
    msg.role = m.value("role", std::string());
    msg.content = m.value("content", std::string());
    if (m.contains("metadata") && m["metadata"].is_string()) msg.metadata = m["metadata"].get<std::string>();
    if (m.contains("tools") && !m["tools"].is_null()) msg.tools_json = m["tools"].dump();
    out.push_back(std::move(msg));
  }
  return out;
}

}  // namespace glm
