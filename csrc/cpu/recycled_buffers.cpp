// A small cache of large CPU buffers, reused by later outputs (see recycled_buffers.h).
#include "recycled_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <mutex>

namespace sparsity_ext {
namespace {

constexpr size_t kMinBytes = size_t(128) << 10;  // glibc's first M_MMAP_THRESHOLD
constexpr size_t kPage = 4096;

size_t cache_limit_bytes() {
  const char* text = std::getenv("SPARSITY_EXT_CPU_CACHE_MB");
  const long long mb = text != nullptr && *text != '\0' ? std::atoll(text) : 256;
  return mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
}

struct Buffer {
  void* data;
  size_t bytes;      // whole pages: what the cache matches on
  size_t requested;  // what the tensor asked for: what the profiler is told
};

class RecyclingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kPage - 1) / kPage * kPage;
    void* data = take(bytes);
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    report(data, static_cast<int64_t>(nbytes));
    return {data, new Buffer{data, bytes, nbytes}, &give_back,
            c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static RecyclingAllocator& instance() {
    static auto* allocator = new RecyclingAllocator();  // never destroyed: tensors may outlive exit
    return *allocator;
  }

 private:
  // The most recently freed buffer of exactly this size, if any.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      void* data = it->data;
      cached_ -= bytes;
      free_.erase(std::next(it).base());
      return data;
    }
    return nullptr;
  }

  static void give_back(void* context) {
    Buffer* buffer = static_cast<Buffer*>(context);
    instance().report(buffer->data, -static_cast<int64_t>(buffer->requested));
    instance().keep(*buffer);
    delete buffer;
  }

  // Each buffer handed out or given back goes to the profiler's memory records
  // (profile_memory=True), as the CPU allocator's own allocations do; the totals are this
  // allocator's (in use, and in use plus cached), apart from the CPU allocator's.
  void report(void* data, int64_t bytes) {
    // A give back subtracts (size_t arithmetic is modulo 2^64).
    const size_t in_use = in_use_ += static_cast<size_t>(bytes);
    c10::reportMemoryUsageToProfiler(data, bytes, in_use, in_use + cached_,
                                     c10::Device(c10::DeviceType::CPU));
  }

  void keep(Buffer buffer) {
    std::deque<Buffer> evicted;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      free_.push_back(buffer);
      cached_ += buffer.bytes;
      while (cached_ > limit_) {
        evicted.push_back(free_.front());
        cached_ -= free_.front().bytes;
        free_.pop_front();
      }
    }
    for (const Buffer& b : evicted) c10::free_cpu(b.data);
  }

  const size_t limit_ = cache_limit_bytes();
  std::mutex mutex_;
  std::deque<Buffer> free_;  // least recently freed first
  std::atomic<size_t> cached_{0};  // changed under mutex_, read by report()
  std::atomic<size_t> in_use_{0};
};

}  // namespace

at::Tensor empty_recycled(at::IntArrayRef size, at::ScalarType dtype) {
  return at::detail::empty_generic(size, &RecyclingAllocator::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

}  // namespace sparsity_ext
