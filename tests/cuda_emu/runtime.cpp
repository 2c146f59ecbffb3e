// The emulator's runtime: grid execution on host threads, barriers, shuffles, cp.async queues, the
// shared-memory buffer and the emulated device (see include/cuda_runtime.h for what it checks).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ctime>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace {
constexpr size_t kOptinSmem = 232448;  // H100 / H200: 227 KiB per block with the opt-in attribute
constexpr size_t kDefaultSmem = 48 * 1024;
}  // namespace

// The dynamic shared memory every kernel declares as `extern __shared__ unsigned char smem[]`.
namespace marginops {
namespace cuda {
namespace detail {
__attribute__((aligned(128))) unsigned char smem[kOptinSmem];
}  // namespace detail
}  // namespace cuda
}  // namespace marginops

namespace emu {
namespace {

struct LaunchFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// futex(2) on an atomic 32-bit word: WAIT sleeps while *word == val (up to `timeout`, if given), WAKE wakes up
// to val sleepers.
void futex(std::atomic<uint32_t>* word, int op, uint32_t val, const timespec* timeout = nullptr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, val, timeout, nullptr, 0);
}
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "the futex word is the atomic itself");

// Barrier for a changing set of threads: a thread that finishes its block leaves (drop), as a CUDA thread
// that has exited no longer counts at __syncthreads.  Lock-free: one 64-bit word holds (expected, arrived),
// waiters sleep on the generation word with a futex, and the last arrival wakes them with one system call
// (a mutex + condition variable made every release a thundering herd on the mutex; the emulator spent most
// of its time in the kernel).  The release is a seq_cst RMW chain, so ThreadSanitizer sees every arrival
// happen before every departure: its racecheck stays valid.
class Barrier {
 public:
  void reset(int n) { state_.store(static_cast<uint64_t>(n) << 32); }
  void arrive_and_wait(const char* what, const std::atomic<bool>& failed);
  void drop() {
    uint64_t s = state_.load();
    for (;;) {
      const uint32_t e = static_cast<uint32_t>(s >> 32) - 1, a = static_cast<uint32_t>(s);
      const bool release = a > 0 && a == e;
      if (state_.compare_exchange_weak(s, (static_cast<uint64_t>(e) << 32) | (release ? 0 : a))) {
        if (release) release_now();
        return;
      }
    }
  }
  void wake() { futex(&generation_, FUTEX_WAKE_PRIVATE, INT32_MAX); }

 private:
  void release_now() {
    generation_.fetch_add(1);
    wake();
  }
  std::atomic<uint64_t> state_{0};  // expected << 32 | arrived
  std::atomic<uint32_t> generation_{0};
};

struct Block {
  int nthreads = 0;
  Barrier start;  // all threads, between blocks
  Barrier block;
  std::deque<Barrier> warps;
  std::vector<uint64_t> xchg;  // two slots per thread, for shuffles
  std::atomic<bool> failed{false};
  std::mutex fail_mu;
  std::string failure;

  void fail(const std::string& msg) {
    {
      std::lock_guard<std::mutex> lk(fail_mu);
      if (failure.empty()) failure = msg;
    }
    failed = true;
    start.wake();
    block.wake();
    for (auto& w : warps) w.wake();
  }
};

struct ThreadState {
  Block* blk = nullptr;
  int tid = 0, warp = 0, lane = 0;
  uint64_t shuffles = 0;  // picks the slot array of the next shuffle
  std::vector<std::vector<std::pair<void*, const void*>>> groups;  // committed cp.async groups, oldest first
  std::vector<std::pair<void*, const void*>> open;                 // issued, not yet committed
};
thread_local ThreadState ts;

std::atomic<int> barrier_timeout_ms{120000};  // a barrier waited on this long is reported as a deadlock

void Barrier::arrive_and_wait(const char* what, const std::atomic<bool>& failed) {
  if (failed) throw LaunchFailure("aborted");
  // read before arriving: the release of this generation cannot precede our own arrival
  const uint32_t gen = generation_.load();
  uint64_t s = state_.load();
  uint32_t e, a;
  for (;;) {
    e = static_cast<uint32_t>(s >> 32);
    a = static_cast<uint32_t>(s) + 1;
    if (state_.compare_exchange_weak(s, (static_cast<uint64_t>(e) << 32) | (a == e ? 0 : a))) break;
  }
  if (a == e) {
    release_now();
    return;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(barrier_timeout_ms.load());
  while (generation_.load() == gen && !failed.load()) {
    const auto left = deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::nanoseconds(0)) {
      const uint64_t now = state_.load();
      fail("%s never completed: %d of %d live threads arrived (a barrier inside divergent code?)", what,
           static_cast<int>(static_cast<uint32_t>(now)), static_cast<int>(now >> 32));
    }
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    timespec rel{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    futex(&generation_, FUTEX_WAIT_PRIVATE, gen, &rel);
  }
  if (failed) throw LaunchFailure("aborted");
}

std::mutex attr_mu;
std::map<const void*, int> smem_limit;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize

}  // namespace

void set_barrier_timeout_ms(int ms) { barrier_timeout_ms.store(ms); }

const cudaDeviceProp& device_props() {
  // MARGINOPS_EMU_SMS (read at every call, so a test can change it) sets the SM count: with few SMs the op
  // plans few class splits, and each CTA then loops over many class tiles.
  static cudaDeviceProp props = [] {
    cudaDeviceProp p{};
    std::snprintf(p.name, sizeof(p.name), "CPU emulation of an sm_90 device");
    p.major = 9;
    p.minor = 0;
    p.sharedMemPerBlockOptin = kOptinSmem;
    return p;
  }();
  const char* sms = std::getenv("MARGINOPS_EMU_SMS");
  props.multiProcessorCount = sms != nullptr && std::atoi(sms) > 0 ? std::atoi(sms) : 132;
  return props;
}

cudaError_t set_dynamic_smem_limit(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kOptinSmem) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(attr_mu);
  smem_limit[kernel] = bytes;
  return cudaSuccess;
}

int occupancy(const void* kernel, int threads, size_t smem) {
  {
    std::lock_guard<std::mutex> lk(attr_mu);
    auto it = smem_limit.find(kernel);
    const size_t limit = it != smem_limit.end() ? static_cast<size_t>(it->second) : kDefaultSmem;
    if (smem > limit) return 0;
  }
  const int by_threads = 2048 / std::max(1, threads);
  const int by_smem = smem > 0 ? static_cast<int>(228 * 1024 / (smem + 1024)) : by_threads;
  return std::max(0, std::min(by_threads, by_smem));
}

void fail(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  std::string msg = std::string("CUDA emulator: block (") + std::to_string(blockIdx.x) + "," +
                    std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ") thread " +
                    std::to_string(threadIdx.x) + ": " + buf;
  if (ts.blk != nullptr) ts.blk->fail(msg);
  throw LaunchFailure(msg);
}

int lane_id() { return ts.lane; }

void syncthreads() { ts.blk->block.arrive_and_wait("__syncthreads", ts.blk->failed); }

void syncwarp() { ts.blk->warps[ts.warp].arrive_and_wait("__syncwarp", ts.blk->failed); }

uint64_t exchange_xor(uint64_t v, int off) {
  Block& b = *ts.blk;
  const int partner = ts.lane ^ off;
  if (off <= 0 || off >= 32) fail("__shfl_xor_sync with lane mask %d", off);
  // two slot arrays used in turn: a lane writes a slot again two shuffles later, after the barrier of the
  // shuffle between, which no lane passes before it has read this one; so one barrier per shuffle suffices
  uint64_t* slots = b.xchg.data() + (ts.shuffles++ % 2) * b.nthreads;
  slots[ts.tid] = v;
  syncwarp();
  const int ptid = ts.warp * 32 + partner;
  if (ptid >= b.nthreads) fail("__shfl_xor_sync reads lane %d of a partial warp", partner);
  return slots[ptid];
}

void async_copy16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp.async of 16 bytes needs 16-byte aligned addresses (dst %p, src %p)", dst, src);
  const auto* base = marginops::cuda::detail::smem;
  const auto* d = static_cast<const unsigned char*>(dst);
  if (d < base || d + 16 > base + sizeof(marginops::cuda::detail::smem))
    fail("cp.async destination %p is not in shared memory", dst);
  ts.open.emplace_back(dst, src);
}

void async_commit() {
  ts.groups.push_back(std::move(ts.open));
  ts.open.clear();
}

void async_wait(int n) {
  // cp.async.wait_group n: all but the newest n committed groups are complete.
  while (static_cast<int>(ts.groups.size()) > n) {
    for (const auto& c : ts.groups.front()) std::memcpy(c.first, c.second, 16);
    ts.groups.erase(ts.groups.begin());
  }
}

// The host threads that play a block's CUDA threads, kept across launches: creating a thread per CUDA thread
// per launch cost more than the kernels themselves (the chunked path launches thousands of small grids).
// Workers are never joined (the process may exit with them asleep), so the pool is deliberately leaked.
class ThreadPool {
 public:
  void run(int n, const std::function<void(int)>& job) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.push_back(new Worker);
      Worker* w = workers_.back();
      w->tid = static_cast<int>(workers_.size()) - 1;
      std::thread(&ThreadPool::loop, this, w).detach();
    }
    job_ = &job;
    remaining_.store(static_cast<uint32_t>(n));
    for (int t = 0; t < n; ++t) {
      workers_[t]->seq.fetch_add(1);
      futex(&workers_[t]->seq, FUTEX_WAKE_PRIVATE, 1);
    }
    for (uint32_t r; (r = remaining_.load()) != 0;) futex(&remaining_, FUTEX_WAIT_PRIVATE, r);
  }

 private:
  struct Worker {
    std::atomic<uint32_t> seq{0};  // bumped once per launch this worker takes part in
    int tid = 0;
  };
  void loop(Worker* w) {
    for (uint32_t seen = 0;; ++seen) {
      while (w->seq.load() == seen) futex(&w->seq, FUTEX_WAIT_PRIVATE, seen);
      (*job_)(w->tid);
      if (remaining_.fetch_sub(1) == 1) futex(&remaining_, FUTEX_WAKE_PRIVATE, 1);
    }
  }
  std::vector<Worker*> workers_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint32_t> remaining_{0};
};

std::mutex launch_mu;  // one grid at a time: every launch shares the one shared-memory buffer
ThreadPool& pool() {
  static ThreadPool* p = new ThreadPool;
  return *p;
}

std::atomic<long long> launches{0};
long long launch_count() { return launches.load(); }

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  ++launches;
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  auto launch_error = [&](const std::string& msg) { throw std::runtime_error("CUDA emulator: launch failed: " + msg); };
  if (nthreads <= 0 || nthreads > 1024) launch_error("block of " + std::to_string(nthreads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    launch_error("grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) + ")");
  {
    std::lock_guard<std::mutex> lk(attr_mu);
    auto it = smem_limit.find(kernel);
    const size_t limit = it != smem_limit.end() ? static_cast<size_t>(it->second) : kDefaultSmem;
    if (smem_bytes > limit)
      launch_error(std::to_string(smem_bytes) + " bytes of dynamic shared memory, the kernel allows " +
                   std::to_string(limit) + " (cudaFuncSetAttribute)");
  }
  std::lock_guard<std::mutex> launch_lock(launch_mu);
  const int nt = static_cast<int>(nthreads);
  const int nwarps = (nt + 31) / 32;
  Block blk;
  blk.nthreads = nt;
  blk.warps.resize(nwarps);
  blk.xchg.assign(2 * static_cast<size_t>(nt), 0);
  blk.start.reset(nt);
  unsigned char* sm = marginops::cuda::detail::smem;

  const std::function<void(int)> thread_main = [&](int tid) {
    ts = ThreadState{};
    ts.blk = &blk;
    ts.tid = tid;
    ts.warp = tid / 32;
    ts.lane = tid % 32;
    threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
    blockDim = block;
    gridDim = grid;
    try {
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = dim3(bx, by, bz);
            blk.start.arrive_and_wait("block start", blk.failed);
            if (tid == 0) {
              EMU_UNPOISON(sm, sizeof(marginops::cuda::detail::smem));
              std::memset(sm, 0xff, smem_bytes);  // NaN in every float type: unwritten reads show up
              EMU_POISON(sm + smem_bytes, sizeof(marginops::cuda::detail::smem) - smem_bytes);
              blk.block.reset(nt);
              for (int w = 0; w < nwarps; ++w) blk.warps[w].reset(std::min(32, nt - 32 * w));
            }
            blk.start.arrive_and_wait("block start", blk.failed);
            body();
            if (!ts.open.empty() || !ts.groups.empty()) {
              // copies still in flight when the thread ends: let them land (as the hardware would)
              async_commit();
              async_wait(0);
            }
            blk.block.drop();
            blk.warps[ts.warp].drop();
          }
    } catch (const LaunchFailure&) {
      // recorded in blk.failure
    } catch (const std::exception& e) {
      blk.fail(std::string("CUDA emulator: exception in a kernel thread: ") + e.what());
    }
  };

  pool().run(nt, thread_main);
  EMU_UNPOISON(sm, sizeof(marginops::cuda::detail::smem));
  if (blk.failed) throw std::runtime_error(blk.failure);
}

}  // namespace emu

const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }
