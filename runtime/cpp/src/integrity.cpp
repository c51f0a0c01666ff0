// A bundle's closed world and its checksums: runtime/bundle_paths.py's bundle_member and runtime/integrity.py's
// verify_files, with the same rules, the same messages and the same verified stamp (a bundle hashed by one runtime
// is not hashed again by the other).
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "internal.hpp"

namespace glm {

using json = nlohmann::json;

static const char* STAMP_NAME = ".glm-export-verified.json";
static const char* STAMP_FORMAT = "glm-export-verified-1";
static const int64_t MAX_STAMP_BYTES = 1 << 20;
static const size_t MAX_NAME_CHARS = 255;

// os.path.realpath for a path that exists (the bundle, a member); the path itself when it cannot be resolved
static std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) return path;
  return buf;
}

// Python's repr() of a str cut at 80 characters, as the Python messages format it ({name!r:.80})
static std::string repr80(const std::string& s) { return py_str_repr(s).substr(0, 80); }

std::string bundle_member(const std::string& bundle_dir, const std::string& name, const std::string& field,
                          const std::string& where) {
  if (name.empty()) throw BundleError(where + ": " + field + " must be a non-empty file name, got ''");
  std::string bad;
  if (utf8_valid(name) && utf8_code_points(name).size() > MAX_NAME_CHARS) {
    bad = "longer than " + std::to_string(MAX_NAME_CHARS) + " characters";
  } else if (name.find('\0') != std::string::npos || name.find('\\') != std::string::npos ||
             name.find(':') != std::string::npos) {
    bad = "contains NUL, '\\' or ':'";
  } else if (name[0] == '/' || name[0] == '~') {
    bad = "is an absolute path";
  } else {
    size_t start = 0;
    while (true) {
      const size_t end = name.find('/', start);
      const std::string part = name.substr(start, end == std::string::npos ? std::string::npos : end - start);
      if (part.empty() || part == "." || part == "..") {
        bad = "has '..', '.' or empty path parts";
        break;
      }
      if (end == std::string::npos) break;
      start = end + 1;
    }
  }
  if (!bad.empty())
    throw BundleError(where + ": " + field + " " + repr80(name) + " " + bad +
                      "; a bundle may only name files inside itself");
  std::string root = real_path(bundle_dir);
  while (root.size() > 1 && root.back() == '/') root.pop_back();
  const std::string path = join_path(bundle_dir, name);
  const std::string real = real_path(path);
  if (real.compare(0, root.size() + 1, root + "/") != 0)
    throw BundleError(where + ": " + field + " " + py_str_repr(name) + " resolves outside the bundle (" + real +
                      "); a bundle may only name files inside itself");
  return path;
}

// [size, mtime_ns, ctime_ns, inode]: what runtime/integrity.py's _stat_key records
static bool stat_key(const std::string& path, json& key) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return false;
  const int64_t ns = 1000000000;
  key = json::array({static_cast<int64_t>(st.st_size),
                     static_cast<int64_t>(st.st_mtim.tv_sec) * ns + static_cast<int64_t>(st.st_mtim.tv_nsec),
                     static_cast<int64_t>(st.st_ctim.tv_sec) * ns + static_cast<int64_t>(st.st_ctim.tv_nsec),
                     static_cast<int64_t>(st.st_ino)});
  return true;
}

// $XDG_CACHE_HOME (or ~/.cache)/glm-export/verified/<sha256 of the bundle's real path, 32 hex>.json
static std::string cache_stamp_path(const std::string& bundle_dir) {
  std::string base;
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg && *xdg) {
    base = xdg;
  } else {
    const char* home = std::getenv("HOME");
    base = join_path(home && *home ? home : "/", ".cache");
  }
  return join_path(join_path(join_path(base, "glm-export"), "verified"),
                   sha256_hex(real_path(bundle_dir)).substr(0, 32) + ".json");
}

static std::vector<std::string> stamp_paths(const std::string& bundle_dir) {
  return {join_path(bundle_dir, STAMP_NAME), cache_stamp_path(bundle_dir)};
}

// the stamped entries (name -> {"sha256", "stat"}) of the first stamp that reads; {} when none does
static json read_stamp(const std::string& bundle_dir) {
  const std::string real = real_path(bundle_dir);
  for (const std::string& path : stamp_paths(bundle_dir)) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 || st.st_size > MAX_STAMP_BYTES) continue;
    json d;
    try {
      d = json::parse(read_file(path));
    } catch (const std::exception&) {
      continue;  // unreadable or malformed: the files are simply hashed again
    }
    if (d.is_object() && d.value("format", json()) == STAMP_FORMAT && d.contains("files") &&
        d["files"].is_object() && d.value("bundle", json()) == real)
      return d["files"];
  }
  return json::object();
}

static bool make_dirs(const std::string& dir) {
  if (dir.empty() || is_dir(dir)) return true;
  const size_t slash = dir.find_last_of('/');
  if (slash != std::string::npos && slash > 0 && !make_dirs(dir.substr(0, slash))) return false;
  return ::mkdir(dir.c_str(), 0777) == 0 || errno == EEXIST;
}

// atomically into the bundle, else into the user cache; false when neither is writable
static bool write_stamp(const std::string& bundle_dir, const json& files) {
  const std::string body =
      json({{"format", STAMP_FORMAT}, {"bundle", real_path(bundle_dir)}, {"files", files}}).dump();
  for (const std::string& path : stamp_paths(bundle_dir)) {
    const std::string dir = path.substr(0, path.find_last_of('/'));
    if (!make_dirs(dir)) continue;
    std::string tmpl = join_path(dir, ".verified-XXXXXX");
    const int fd = ::mkstemp(&tmpl[0]);
    if (fd < 0) continue;
    const bool wrote = ::write(fd, body.data(), body.size()) == static_cast<ssize_t>(body.size());
    const bool closed = ::close(fd) == 0;
    if (wrote && closed && std::rename(tmpl.c_str(), path.c_str()) == 0) return true;
    ::unlink(tmpl.c_str());
  }
  return false;
}

void verify_digests(const std::string& bundle_dir, const std::vector<RecordedDigest>& digests, bool use_stamp) {
  const json stamped = use_stamp ? read_stamp(bundle_dir) : json::object();
  json fresh = json::object();
  int64_t hashed = 0;
  for (const RecordedDigest& rec : digests) {
    const std::string& name = rec.name;
    const std::string& want = rec.sha256;
    const std::string& path = rec.path;
    json key;
    if (!stat_key(path, key)) throw BundleError(path + ": cannot read it (" + std::strerror(errno) + ")");
    auto entry = stamped.find(name);
    if (entry != stamped.end() && entry->is_object() && entry->value("sha256", json()) == want &&
        entry->value("stat", json()) == key) {
      fresh[name] = *entry;
      continue;
    }
    const std::string got = sha256_file(path);
    hashed += key[0].get<int64_t>();
    if (got != want)  // spelled as runtime/integrity.py spells it
      throw BundleError(path + ": checksum mismatch: sha256 " + got + ", the manifest records " + want +
                        "; the bundle is corrupt (re-export it; --no-verify-files loads it anyway)");
    fresh[name] = json({{"sha256", want}, {"stat", key}});
  }
  if (hashed || fresh != stamped) write_stamp(bundle_dir, fresh);  // nowhere writable: hashed again next time
}

}  // namespace glm
