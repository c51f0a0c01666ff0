// UTF-8 helpers and the JSON text the runtime prints (Python's json.dumps(ensure_ascii=False) spelling).
#include <charconv>
#include <cmath>
#include <cstdio>

#include "internal.hpp"

namespace glm {

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Decodes one character at s[i]; returns its length (0 when the bytes there are not a valid character) and the
// length of the maximal valid prefix of a character in *subpart (at least 1) when invalid.
static size_t decode_one(const unsigned char* s, size_t n, size_t i, uint32_t* cp, size_t* subpart) {
  unsigned char b = s[i];
  *subpart = 1;
  if (b < 0x80) { *cp = b; return 1; }
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) { need = 1; *cp = b & 0x1F; }
  else if (b >= 0xE0 && b <= 0xEF) {
    need = 2; *cp = b & 0x0F;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;
  } else if (b >= 0xF0 && b <= 0xF4) {
    need = 3; *cp = b & 0x07;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  size_t k = 1;
  for (; k <= need; ++k) {
    if (i + k >= n) break;
    unsigned char c = s[i + k];
    if (k == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF)) break;
    *cp = (*cp << 6) | (c & 0x3F);
  }
  if (k <= need) { *subpart = k; return 0; }
  return need + 1;
}

std::string utf8_lossy(const std::string& bytes) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  std::string out;
  out.reserve(n);
  size_t i = 0;
  while (i < n) {
    uint32_t cp;
    size_t sub;
    size_t len = decode_one(s, n, i, &cp, &sub);
    if (len) {
      out.append(bytes, i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      i += sub;
    }
  }
  return out;
}

bool utf8_valid(const std::string& bytes) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    uint32_t cp;
    size_t sub;
    size_t len = decode_one(s, bytes.size(), i, &cp, &sub);
    if (!len) return false;
    i += len;
  }
  return true;
}

std::vector<uint32_t> utf8_code_points(const std::string& bytes) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  std::vector<uint32_t> out;
  size_t i = 0;
  while (i < bytes.size()) {
    uint32_t cp;
    size_t sub;
    size_t len = decode_one(s, bytes.size(), i, &cp, &sub);
    if (!len) { out.push_back(0xFFFD); i += sub; continue; }
    out.push_back(cp);
    i += len;
  }
  return out;
}

std::string json_string(const std::string& raw) {
  const std::string s = utf8_valid(raw) ? raw : utf8_lossy(raw);
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string json_double(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  const double a = std::fabs(v);
  const bool fixed = a == 0 || (a >= 1e-4 && a < 1e16);  // where Python's repr writes no exponent
  auto r = fixed ? std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed)
                 : std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);  // shortest round trip
  std::string s(buf, r.ptr);
  // Python writes 1.0 (not 1), 1e+16 (not 1e16), 1e-05 (not 1e-5)
  auto e = s.find('e');
  if (e != std::string::npos) {
    std::string mant = s.substr(0, e), ex = s.substr(e + 1);
    std::string sign = "+";
    if (!ex.empty() && (ex[0] == '-' || ex[0] == '+')) { if (ex[0] == '-') sign = "-"; ex = ex.substr(1); }
    if (ex.size() < 2) ex = "0" + ex;
    return mant + "e" + sign + ex;
  }
  if (s.find('.') == std::string::npos) s += ".0";
  return s;
}

}  // namespace glm
