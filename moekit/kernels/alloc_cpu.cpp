// A caching CPU allocator for large tensors: freed blocks of 1 MiB and more are kept by size class
// and handed out again, so a training or prefill step reuses last step's pages instead of
// faulting fresh ones in. Compiled into the same module as moe_cpu.cpp / train_cpu.cpp.
//
// Why: glibc serves big blocks with mmap (unmapped again on free) or, with mmap off, from a heap
// that fragments as per-expert buffer sizes change every step and keeps growing into fresh pages.
// Measured on a 2-core KVM guest (small-moe training step, bf16 autocast, ~0.5 s): 4,000-37,000
// minor page faults per step with glibc's heap, ~7 us each, so 30-250 ms per step, in bursts.
// A size-class cache is what the CUDA caching allocator does for device memory; torch's own CPU
// caching allocator (c10/mobile) is documented as mobile-only.
//
// Blocks are 2 MiB aligned and advised MADV_HUGEPAGE from 2 MiB up (transparent huge pages where
// the kernel allows them: 512x fewer faults on first touch, fewer TLB misses). Smaller requests go
// to the allocator that was installed before. Freed blocks above `limit` bytes are returned.

namespace {

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::Allocator* base = nullptr;
  size_t min_bytes = 1 << 20, limit = size_t(4) << 30;
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free_by_size;
  std::unordered_map<void*, size_t> owned;  // every block this allocator made, live or cached
  int64_t hits = 0, misses = 0, cached_bytes = 0, owned_bytes = 0, peak_owned = 0;

  // Size classes: 8 per power of two (at most 12.5% slack), so slightly different per-expert
  // buffer sizes share a class.
  static size_t size_class(size_t n) {
    const size_t p = size_t(1) << (63 - __builtin_clzll(n));
    const size_t step = std::max<size_t>(p / 8, 4096);
    return (n + step - 1) / step * step;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes) return base->allocate(n);
    const size_t r = size_class(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = free_by_size.find(r);
      if (it != free_by_size.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_bytes -= r;
        ++hits;
      }
    }
    if (!p) {
      p = fresh(r);
      std::lock_guard<std::mutex> g(mu);
      owned[p] = r;
      ++misses;
      owned_bytes += r;
      peak_owned = std::max(peak_owned, owned_bytes);
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void* fresh(size_t r) {
    const size_t align = r >= (size_t(2) << 20) ? (size_t(2) << 20) : 64;
    void* p = nullptr;
    if (posix_memalign(&p, align, r) != 0) {
      empty();  // give cached blocks back and try once more before reporting out of memory
      TORCH_CHECK(posix_memalign(&p, align, r) == 0, "moekit caching CPU allocator: out of memory allocating ",
                  r, " bytes");
    }
    if (align > 64) madvise(p, r, MADV_HUGEPAGE);  // a hint; ignored where THP is off
    return p;
  }

  static void release(void* p);

  void put_back(void* p) {
    std::unique_lock<std::mutex> g(mu);
    auto it = owned.find(p);
    if (it == owned.end()) {  // a small block of the base allocator, freed through raw_deleter
      g.unlock();
      base->raw_deleter()(p);
      return;
    }
    const size_t r = it->second;
    if (cached_bytes + (int64_t)r > (int64_t)limit) {  // over the cap: this one goes back to the OS
      owned.erase(it);
      owned_bytes -= r;
      std::free(p);
      return;
    }
    free_by_size[r].push_back(p);
    cached_bytes += r;
  }

  void empty() {
    std::lock_guard<std::mutex> g(mu);
    for (auto& kv : free_by_size) {
      for (void* p : kv.second) {
        owned.erase(p);
        owned_bytes -= kv.first;
        std::free(p);
      }
      kv.second.clear();
    }
    cached_bytes = 0;
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
CachingCpuAllocator* g_cache = new CachingCpuAllocator();
c10::Allocator* g_previous = nullptr;
constexpr uint8_t kPriority = 1;  // above the default CPU allocator's 0, so SetCPUAllocator takes it

void CachingCpuAllocator::release(void* p) { g_cache->put_back(p); }

}  // namespace

// Install the caching allocator as torch's CPU allocator (blocks >= min_bytes cached, at most
// limit_bytes held free). Idempotent; settings update on each call.
void cpu_cache_enable(int64_t min_bytes, int64_t limit_bytes) {
  TORCH_CHECK(min_bytes > 0 && limit_bytes >= 0, "cpu_cache_enable: min_bytes > 0 and limit_bytes >= 0");
  c10::Allocator* cur = c10::GetCPUAllocator();
  {
    std::lock_guard<std::mutex> g(g_cache->mu);
    g_cache->min_bytes = (size_t)min_bytes;
    g_cache->limit = (size_t)limit_bytes;
  }
  if (cur == g_cache) return;
  g_previous = cur;
  g_cache->base = cur;
  c10::SetCPUAllocator(g_cache, kPriority);
}

// Put back the allocator that was installed before. Blocks still alive stay valid; freed later,
// they return to the cache (empty_cache frees them).
void cpu_cache_disable() {
  if (c10::GetCPUAllocator() == g_cache && g_previous) c10::SetCPUAllocator(g_previous, kPriority);
}

// Free every cached (not live) block.
void cpu_cache_empty() { g_cache->empty(); }

// {installed, hits, misses, cached bytes, owned bytes, peak owned bytes}
std::vector<int64_t> cpu_cache_stats() {
  std::lock_guard<std::mutex> g(g_cache->mu);
  return {c10::GetCPUAllocator() == g_cache ? 1 : 0, g_cache->hits, g_cache->misses, g_cache->cached_bytes,
          g_cache->owned_bytes, g_cache->peak_owned};
}
