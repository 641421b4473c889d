// Large CPU outputs of the post-processing kernels: reused blocks, transparent huge pages.
//
// The fused kernels return full-resolution maps (e.g. 2 x [5, 1025, 2049] float32 = 84 MB per
// image) and write them at scattered positions. From the default allocator, a block over
// glibc's mmap threshold (at most 32 MiB) comes from a fresh mmap on every call: a page fault
// and a zeroed page per 4 KiB on first touch, then TLB misses on the scattered writes.
// empty_cpu_large() serves blocks of 2 MiB and more from mmap regions advised with
// MADV_HUGEPAGE (Linux; honoured when /sys/kernel/mm/transparent_hugepage/enabled is "always"
// or "madvise"), and keeps freed regions for reuse by a later call of the same rounded size (a
// model evaluated image after image asks for the same sizes): no fault at all then. At most
// DEEPERLAB_CPU_CACHE_MB (environment, default 256; 0 = keep none) stay cached; elsewhere and
// for smaller blocks it is at::empty. Contents are uninitialized, as with at::empty.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace deeperlab_d2 {

constexpr size_t kHugePage = size_t{2} << 20;

#if defined(__linux__) && defined(MADV_HUGEPAGE)
class LargeBlockCache {
 public:
  static LargeBlockCache& get() {
    static LargeBlockCache* cache = new LargeBlockCache();  // never destroyed (exit order)
    return *cache;
  }

  // A region of `bytes` (a multiple of kHugePage), or nullptr.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].second == bytes) {
          void* p = free_[i].first;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_ -= bytes;
          return p;
        }
      }
    }
    // a fresh mapping: over-allocate by one huge page, keep the aligned part (the huge pages
    // of a region start at 2 MiB boundaries)
    const size_t span = bytes + kHugePage;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      return nullptr;
    }
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
    if (aligned > start) {
      munmap(raw, aligned - start);
    }
    const uintptr_t end = start + span;
    if (end > aligned + bytes) {
      munmap(reinterpret_cast<void*>(aligned + bytes), end - (aligned + bytes));
    }
    void* p = reinterpret_cast<void*>(aligned);
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: refused, the region keeps 4 KiB pages
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= limit_) {
        free_.emplace_back(p, bytes);
        cached_ += bytes;
        return;
      }
    }
    munmap(p, bytes);
  }

 private:
  LargeBlockCache() {
    const char* env = std::getenv("DEEPERLAB_CPU_CACHE_MB");
    const long long mb = env != nullptr ? std::atoll(env) : 256;
    limit_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t cached_ = 0;
  size_t limit_ = 0;
};
#endif

// An uninitialized contiguous CPU tensor of `sizes` and `dtype`.
inline at::Tensor empty_cpu_large(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    numel *= s;
  }
  const size_t nbytes = static_cast<size_t>(numel) * at::elementSize(dtype);
  if (nbytes >= kHugePage) {
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* block = LargeBlockCache::get().take(bytes);
    if (block != nullptr) {
      return at::from_blob(
          block, sizes, [bytes](void* p) { LargeBlockCache::get().give_back(p, bytes); },
          options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace deeperlab_d2
