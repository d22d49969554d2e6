// Work sharing for the GEMV/GEMM kernels that does not stall on a busy machine, and the path
// counters the tests read.
//
// Why not at::parallel_for: with the OpenMP backend every call forks the team and joins it,
// and libgomp's fork waits until each pool thread has docked after the previous region, its
// join until each team thread has arrived. Idle libgomp threads spin (OMP_WAIT_POLICY
// unset), and on an oversubscribed machine a spinning thread is the one the scheduler leaves
// in the run queue: fork or join then waits for a scheduler slice, milliseconds, for a
// kernel whose work is 0.16 ms. Measured on 2 cores at load 17-19 (benchmarks/cpu_linear.py
// --compiled-only, K = N = 4096, M = 1): median 28 ms per call, 120x onnxruntime's
// MatMulNBits, whose calling thread takes over the shards no worker has started. Two changes:
//  * items are claimed from an atomic counter, so whichever thread runs does the work;
//  * a call whose fork + join waited long (kStallNs) means co-tenants hold the cores: the next
//    calls run on the calling thread alone (no fork, no join), for a back-off that doubles
//    while stalls repeat and halves after each clean team call. Same run: median 0.164 ms,
//    0.70x MatMulNBits.
// On a quiet machine fork and join take microseconds and every call uses the team as before.

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>

#include "qqq_cpu.h"

namespace qqq {
namespace {

std::array<std::atomic<int64_t>, kNumPaths> g_paths{};
std::atomic<int64_t> g_solo_left{0};  // calls left to run on the calling thread alone
std::atomic<int64_t> g_backoff{0};    // length of the current back-off (0: none)
std::atomic<bool> g_backoff_on{true};  // off: every call uses the team (benchmarks: the old behaviour)

constexpr int64_t kStallNs = 200000;  // fork + join waits this long: a descheduled team thread
constexpr int64_t kMinBackoff = 8, kMaxBackoff = 4096;
constexpr int64_t kMaxTeam = 64;  // threads one call shares its items among

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

void count_path(Path p) { g_paths[p].fetch_add(1, std::memory_order_relaxed); }

std::vector<int64_t> path_counts() {
  std::vector<int64_t> out;
  for (auto& c : g_paths) out.push_back(c.load());
  return out;
}

void parallel_items(int64_t n, bool parallel, const std::function<void(int64_t, int64_t)>& f) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), n, kMaxTeam});
  if (!parallel || threads <= 1 || omp_in_parallel()) {
    f(0, n);
    return;
  }
  const bool backoff = g_backoff_on.load(std::memory_order_relaxed);
  if (backoff && g_solo_left.load(std::memory_order_relaxed) > 0) {
    g_solo_left.fetch_sub(1, std::memory_order_relaxed);
    count_path(kSolo);
    f(0, n);
    return;
  }
  count_path(kTeam);
  // Each thread owns a contiguous share of the items (a GEMV's rows then stream through one
  // core's prefetchers in order, as at::parallel_for's static halves did; one shared counter
  // handing out items in turn interleaved the two cores' rows: SmolLM2's 120 decode linears
  // at M=1 took 4.3-4.5 ms against 3.1-3.3 ms for the static halves, alternating processes on
  // a quiet machine, and 3.3-4.3 vs 3.4-4.3 ms with shares) and claims them from its own
  // cursor; a thread done with its share claims the rest of the others' from the same
  // cursors, so a descheduled thread's work is still done by whoever runs.
  struct alignas(64) Cursor {
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::array<Cursor, kMaxTeam> cur;  // on the stack: no allocation per kernel call
  for (int64_t t = 0; t < threads; ++t) {
    cur[t].next.store(n * t / threads, std::memory_order_relaxed);
    cur[t].end = n * (t + 1) / threads;
  }
  const int64_t t_fork = now_ns();
  int64_t caller_start = 0, caller_done = 0;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t me = omp_get_thread_num();
    const bool caller = me == 0;
    if (caller) caller_start = now_ns();
    for (int64_t o = 0; o < threads; ++o) {
      Cursor& c = cur[(me + o) % threads];
      for (int64_t i = c.next.fetch_add(1, std::memory_order_relaxed); i < c.end;
           i = c.next.fetch_add(1, std::memory_order_relaxed))
        f(i, i + 1);
    }
    if (caller) caller_done = now_ns();
  }
  // libgomp's fork waits until every pool thread has docked after the previous region, and
  // its join until every team thread has arrived: both are waits on other threads.
  note_join_wait(caller_start - t_fork + now_ns() - caller_done);
}

void note_join_wait(int64_t waited_ns) {
  if (waited_ns > kStallNs) count_path(kStall);
  if (!g_backoff_on.load(std::memory_order_relaxed)) return;
  int64_t b = g_backoff.load(std::memory_order_relaxed);
  if (waited_ns > kStallNs) {
    b = std::min(kMaxBackoff, std::max(kMinBackoff, 2 * b));
    g_solo_left.store(b, std::memory_order_relaxed);
  } else {
    b /= 2;
  }
  g_backoff.store(b, std::memory_order_relaxed);
}

bool set_stall_backoff(bool enabled) {
  g_solo_left.store(0);
  g_backoff.store(0);
  return g_backoff_on.exchange(enabled);
}

}  // namespace qqq
