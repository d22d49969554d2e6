// A CPU allocator that keeps freed blocks (256 KB and up) for the next request they fit.
//
// Why: calibration runs the same block over the same batch shapes again and again, so the
// same few tensor sizes (tokens x width floats) are freed and requested thousands of times
// per block. glibc serves them either from mmap (the CLI's 1 MB threshold: every tensor is
// mapped and page-faulted in afresh, 4 M faults and ~7 s of system time per SmolLM2 block)
// or from its heap (glibc's default: fast, but the heap keeps the holes and the process
// peaked 0.8 GB higher). Reuse avoids both: a freed block is handed back whole, already
// faulted in, to a request of at most 1.5x less, and the cache is bounded, so the peak grows
// by at most the cap (plus the best fit's slack on blocks in use).
//
// Installed for a scope by `set_alloc_cache(cap)` (compiler/residency.py:
// `AllocationReuse`) and removed by `set_alloc_cache(0)`, which restores torch's own
// allocator and unmaps the cache. Blocks handed out while installed stay valid after: their
// deleter unmaps them once the cache is gone. The allocator is process state by nature
// (c10 keeps one CPU allocator per process); it lives only here.
#include <sys/mman.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace qqq {
namespace {

// Smaller requests go to torch's allocator. At 1 MB, SmolLM2's quantization grew glibc's heap
// by ~10 MB per block (the 256 KB-1 MB tensors left alone there fragmented it: peak +0.24
// GiB at 32 windows); from 256 KB up the heap stayed flat and the peak was torch's own.
constexpr size_t kMinBytes = size_t{256} << 10;
constexpr size_t kPage = 4096;
constexpr size_t kHuge = size_t{2} << 20;

struct Pool {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;                 // handed-out blocks -> mapped size
  std::map<size_t, std::vector<void*>> free;              // cached blocks by mapped size
  size_t cached = 0;
  size_t cap = 0;  // 0: not installed (freed blocks are unmapped)
  c10::Allocator* prev = nullptr;
  int64_t hits = 0, maps = 0, unmaps = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed during exit
  return *p;
}

void unmap(Pool& p, void* ptr, size_t size) {
  munmap(ptr, size);
  ++p.unmaps;
}

// Unmap cached blocks until the cache holds at most `limit` bytes, blocks of size `keep`
// last (caller holds the lock).
void shrink(Pool& p, size_t limit, size_t keep = 0) {
  for (auto it = p.free.begin(); p.cached > limit && it != p.free.end();) {
    auto& v = it->second;
    if (it->first == keep) {
      ++it;
      continue;
    }
    while (p.cached > limit && !v.empty()) {
      unmap(p, v.back(), it->first);
      p.cached -= it->first;
      v.pop_back();
    }
    it = v.empty() ? p.free.erase(it) : std::next(it);
  }
}

void release_block(void* ptr) {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  auto it = p.live.find(ptr);
  if (it == p.live.end()) return;  // not ours (cannot happen): a deleter must not throw
  size_t size = it->second;
  p.live.erase(it);
  if (size > p.cap) {  // not installed, or a block bigger than the whole cache
    unmap(p, ptr, size);
    return;
  }
  p.free[size].push_back(ptr);
  p.cached += size;
  // Over the cap: other sizes go first (the size just freed is the likeliest asked for next).
  shrink(p, p.cap, size);
  shrink(p, p.cap);
}

struct ReusingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    Pool& p = pool();
    if (n < kMinBytes) return p.prev->allocate(n);
    size_t size = (n + kPage - 1) / kPage * kPage;
    void* ptr = nullptr;
    bool mapped = false;
    {
      std::lock_guard<std::mutex> g(p.mu);
      // The smallest cached block that fits, if at most 1.5x the request: shapes that shrink
      // step by step (a solve's trailing columns) reuse the previous step's block.
      auto it = p.free.lower_bound(size);
      if (it != p.free.end() && it->first <= size + size / 2) {
        size = it->first;
        ptr = it->second.back();
        it->second.pop_back();
        if (it->second.empty()) p.free.erase(it);
        p.cached -= size;
        ++p.hits;
      }
    }
    if (ptr == nullptr) {
      ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(ptr != MAP_FAILED, "out of memory: could not map ", size, " bytes for a CPU tensor");
      // Huge pages where the kernel allows them on request (THP "madvise"): one fault per 2 MB.
      if (size >= kHuge) madvise(ptr, size, MADV_HUGEPAGE);
      mapped = true;
    }
    {
      std::lock_guard<std::mutex> g(p.mu);
      p.maps += mapped;
      p.live.emplace(ptr, size);
    }
    return {ptr, ptr, &release_block, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release_block; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

ReusingAllocator& reusing() {
  static ReusingAllocator* a = new ReusingAllocator();
  return *a;
}

// cap > 0: install (or re-cap) the reusing allocator, keeping at most `cap` bytes of freed
// blocks; cap == 0: restore the previous allocator and unmap the cache. Returns whether the
// reusing allocator is installed afterwards (false if another allocator outranks it).
bool set_alloc_cache(int64_t cap) {
  TORCH_CHECK(cap >= 0, "set_alloc_cache: the cap is a byte count, got ", cap);
  Pool& p = pool();
  c10::Allocator* current = c10::GetAllocator(c10::DeviceType::CPU);
  if (cap == 0) {
    if (current == &reusing()) c10::SetAllocator(c10::DeviceType::CPU, p.prev);
    std::lock_guard<std::mutex> g(p.mu);
    p.cap = 0;
    shrink(p, 0);
    return false;
  }
  if (current != &reusing()) {
    p.prev = current;
    c10::SetAllocator(c10::DeviceType::CPU, &reusing());
    if (c10::GetAllocator(c10::DeviceType::CPU) != &reusing()) return false;
  }
  std::lock_guard<std::mutex> g(p.mu);
  p.cap = static_cast<size_t>(cap);
  shrink(p, p.cap);
  return true;
}

// [installed, cached bytes, live blocks, live bytes, reuses, maps, unmaps]
std::vector<int64_t> alloc_cache_stats() {
  Pool& p = pool();
  bool installed = c10::GetAllocator(c10::DeviceType::CPU) == &reusing();
  std::lock_guard<std::mutex> g(p.mu);
  size_t live_bytes = 0;
  for (const auto& kv : p.live) live_bytes += kv.second;
  return {installed,
          static_cast<int64_t>(p.cached),
          static_cast<int64_t>(p.live.size()),
          static_cast<int64_t>(live_bytes),
          p.hits,
          p.maps,
          p.unmaps};
}

}  // namespace
}  // namespace qqq

TORCH_LIBRARY_FRAGMENT(qqq_cpu, m) {
  m.def("set_alloc_cache", &qqq::set_alloc_cache);
  m.def("alloc_cache_stats", &qqq::alloc_cache_stats);
}
