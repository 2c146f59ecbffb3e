// The C++ side of the switchboard: every environment variable the C++ and CUDA sources read is defined and
// parsed here, the same way as marginops/config.py (which holds the table of all switches, Python's and
// C++'s, with when each is read).  tests/test_switches.py checks every C++ switch below against that table,
// spelling by spelling, through the test hook marginops::_read_switch (csrc/marginops.cpp).
//
// Values: surrounding whitespace is ignored and a blank value counts as unset.  0/1 switches take the
// spellings below in any (ASCII) case, integer switches a whole decimal number in their range, choices one of
// their choices; anything else is a ValueError naming the switch and its value.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

namespace marginops {

// The spellings of on and off (marginops/config.py ON / OFF).
inline constexpr const char* kSwitchOn[] = {"1", "true", "yes", "on"};
inline constexpr const char* kSwitchOff[] = {"0", "false", "no", "off"};

struct FlagSwitch {
  const char* name;  // default off
};
struct IntSwitch {
  const char* name;
  int64_t low, high;  // the accepted range, both ends included; unset: no value (the caller's default)
};
struct ChoiceSwitch {
  const char* name;
  const char* choices[2];  // the first is the default
};

// The C++ switches (rows with reader "cpp" in marginops/config.py).
inline constexpr ChoiceSwitch kCudaPath{"MARGINOPS_CUDA_PATH", {"chunked", "fused"}};
inline constexpr FlagSwitch kCudaTf32{"MARGINOPS_CUDA_TF32"};
inline constexpr FlagSwitch kCudaFastBwd{"MARGINOPS_CUDA_FAST_BWD"};
inline constexpr IntSwitch kChunkCols{"MARGINOPS_CHUNK_COLS", 1, (int64_t{1} << 31) - 1};
inline constexpr IntSwitch kChunkRows{"MARGINOPS_CHUNK_ROWS", 1, (int64_t{1} << 31) - 1};
inline constexpr IntSwitch kCpuVector{"MARGINOPS_CPU_VECTOR", 128, 512};

namespace switch_detail {

inline bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

inline std::string ascii_lower(std::string s) {
  for (char& c : s) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return s;
}

}  // namespace switch_detail

// The switch's value with surrounding whitespace removed, or nullopt when unset or blank.
inline std::optional<std::string> switch_text(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  std::string s(v);
  size_t first = 0, last = s.size();
  while (first < last && switch_detail::is_space(s[first])) ++first;
  while (last > first && switch_detail::is_space(s[last - 1])) --last;
  if (first == last) return std::nullopt;
  return s.substr(first, last - first);
}

inline bool read_switch(const FlagSwitch& sw) {
  const std::optional<std::string> v = switch_text(sw.name);
  if (!v) return false;
  const std::string lower = switch_detail::ascii_lower(*v);
  for (const char* on : kSwitchOn) {
    if (lower == on) return true;
  }
  for (const char* off : kSwitchOff) {
    if (lower == off) return false;
  }
  TORCH_CHECK_VALUE(false, sw.name, "='", *v,
                    "': expected 1, true, yes, on (on) or 0, false, no, off (off), any case, or unset");
  return false;  // not reached
}

// nullopt when unset.
inline std::optional<int64_t> read_switch(const IntSwitch& sw) {
  const std::optional<std::string> v = switch_text(sw.name);
  if (!v) return std::nullopt;
  const std::string& s = *v;
  size_t i = s[0] == '+' || s[0] == '-' ? 1 : 0;
  const bool negative = s[0] == '-';
  bool ok = i < s.size();
  int64_t magnitude = 0;  // saturates past the range: any such value is out of range anyway
  for (; ok && i < s.size(); ++i) {
    ok = s[i] >= '0' && s[i] <= '9';
    if (ok && magnitude <= sw.high) magnitude = magnitude * 10 + (s[i] - '0');
  }
  const int64_t value = negative ? -magnitude : magnitude;
  TORCH_CHECK_VALUE(ok && value >= sw.low && value <= sw.high, sw.name, "='", s,
                    "': expected a whole decimal number in [", sw.low, ", ", sw.high, "]");
  return value;
}

// The choice, lower-cased (the default when unset).
inline std::string read_switch(const ChoiceSwitch& sw) {
  const std::optional<std::string> v = switch_text(sw.name);
  if (!v) return sw.choices[0];
  const std::string lower = switch_detail::ascii_lower(*v);
  for (const char* c : sw.choices) {
    if (lower == c) return lower;
  }
  TORCH_CHECK_VALUE(false, sw.name, "='", *v, "': expected one of ", sw.choices[0], ", ", sw.choices[1],
                    ", any case, or unset");
  return sw.choices[0];  // not reached
}

// The switches of one call of the CUDA op, packed into the op's `switches` argument (-1: read them at the call).
// marginops/ops.py reads them once for a forward (read_cuda_switches) and passes the same value to its backward,
// never looking inside: a switch changed in between cannot give the backward another path (the fused kernels
// reject a mixed-precision backward) or another precision than the forward's lse was computed with.
inline constexpr int64_t kSwitchFusedPath = 1, kSwitchTf32 = 2, kSwitchFastBwd = 4;

inline int64_t read_cuda_switches() {
  return (read_switch(kCudaPath) == "fused" ? kSwitchFusedPath : 0) | (read_switch(kCudaTf32) ? kSwitchTf32 : 0) |
         (read_switch(kCudaFastBwd) ? kSwitchFastBwd : 0);
}

// `switches` as the op received it, the environment's now when it is -1.
inline int64_t decided_cuda_switches(int64_t switches) {
  TORCH_CHECK_VALUE(switches >= -1 && switches <= (kSwitchFusedPath | kSwitchTf32 | kSwitchFastBwd),
                    "marginops: switches must be -1 (read the environment) or a value of "
                    "torch.ops.marginops.read_cuda_switches(), got ",
                    switches);
  return switches < 0 ? read_cuda_switches() : switches;
}

// Test hook (marginops::_read_switch): the parsed value of a C++ switch as marginops/config.py's parsed() writes
// it ("1" / "0", the number or "" when unset, the choice).
inline std::string read_switch_text(const std::string& name) {
  for (const FlagSwitch& sw : {kCudaTf32, kCudaFastBwd}) {
    if (name == sw.name) return read_switch(sw) ? "1" : "0";
  }
  for (const IntSwitch& sw : {kChunkCols, kChunkRows, kCpuVector}) {
    if (name == sw.name) {
      const std::optional<int64_t> v = read_switch(sw);
      return v ? std::to_string(*v) : "";
    }
  }
  if (name == kCudaPath.name) return read_switch(kCudaPath);
  TORCH_CHECK_VALUE(false, "marginops: no C++ switch named ", name);
  return "";  // not reached
}

}  // namespace marginops
