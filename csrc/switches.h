// The C++ side of the switchboard: every environment variable the C++ and CUDA sources read goes through
// these helpers, at each call (marginops/config.py holds the table of all switches, Python's and C++'s).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace marginops {

// The switch's value, or nullptr when unset or empty.
inline const char* switch_value(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

// A 0/1 switch: set and not "0".
inline bool switch_flag(const char* name) {
  const char* v = switch_value(name);
  return v != nullptr && std::strcmp(v, "0") != 0;
}

// An integer switch; 0 when unset.
inline int64_t switch_int(const char* name) {
  const char* v = switch_value(name);
  return v != nullptr ? std::atoll(v) : 0;
}

}  // namespace marginops
