// A tiny persistent thread pool for bandwidth-bound loops that must survive CPU contention.
//
// Why not OpenMP: an OpenMP barrier waits for every thread to *arrive*, so when the OS takes a core from
// one of them (another process, torch's own spinning OpenMP workers) everyone waits for a scheduler
// slice; at ~25 loops per RWKV token that turned 6 ms into 180 ms. Here the caller never waits for a
// worker to arrive: each loop is a range of items claimed in shrinking ("guided") chunks by whoever is
// running, the caller included, and the caller only waits for chunks a worker has already claimed (at
// most one chunk, tens of microseconds of work), spinning briefly, then yielding its core. Idle workers
// spin for kIdleSpinMicros (covers the gap between tokens), then sleep on a condition variable.
// After fork() the workers do not exist in the child: the pool notices (pid) and runs loops inline.
#pragma once

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NEOX_CPU_RELAX() _mm_pause()
#else
#define NEOX_CPU_RELAX() std::this_thread::yield()
#endif

namespace neox_step {

class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t begin, int64_t end);
  static constexpr int64_t kIdleSpinMicros = 300;  // a worker's spin before it sleeps
  static constexpr int64_t kWaitSpinMicros = 20;   // the caller's spin before it yields its core

  explicit Pool(int threads) : pid_(getpid()) {
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this] { worker_loop(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      quit_.store(true);
    }
    cv_.notify_all();
    for (auto& w : workers_)
      if (w.joinable()) w.join();
  }

  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(ctx, begin, end) over [0, n) in chunks of at least `grain` items; returns when all are done.
  // Not reentrant: one caller thread at a time (the stepper serialises its calls).
  void parallel_for(int64_t n, int64_t grain, Fn fn, void* ctx) {
    if (n <= 0) return;
    if (workers_.empty() || getpid() != pid_ || n <= grain) {
      fn(ctx, 0, n);
      return;
    }
    const uint32_t gen = gen_ + 1;
    Slot& s = slots_[gen & 1];
    s.n.store(n, std::memory_order_relaxed);
    s.grain.store(grain < 1 ? 1 : grain, std::memory_order_relaxed);
    s.fn.store(fn, std::memory_order_relaxed);
    s.ctx.store(ctx, std::memory_order_relaxed);
    s.done.store(0, std::memory_order_relaxed);
    gen_ = gen;
    state_.store(static_cast<uint64_t>(gen) << 32);  // seq_cst: publishes the slot; pairs with sleepers_
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      cv_.notify_all();
    }
    work(gen);
    // Wait only for chunks a worker claimed and is still running.
    const auto start = std::chrono::steady_clock::now();
    for (uint32_t k = 0; s.done.load(std::memory_order_acquire) < n; ++k) {
      if ((k & 63) == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(kWaitSpinMicros))
        sched_yield();
      else
        NEOX_CPU_RELAX();
    }
  }

 private:
  struct Slot {  // one loop's description; two alternate so a late reader never sees the next loop's
    std::atomic<int64_t> n{0}, grain{1}, done{0};
    std::atomic<Fn> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
  };

  // Claim and run chunks of loop `gen` until none are left (or a newer loop has started).
  void work(uint32_t gen) {
    Slot& s = slots_[gen & 1];
    uint64_t st = state_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(st >> 32) != gen) return;
      const int64_t next = static_cast<int64_t>(st & 0xffffffffu);
      const int64_t n = s.n.load(std::memory_order_relaxed);
      if (next >= n) return;
      // Guided: a share of what is left, at least the grain. The slot was read between loading `st`
      // and the CAS; the CAS fails if anything changed, and slot `gen & 1` is only rewritten two loops on.
      int64_t take = (n - next) / (2 * threads());
      const int64_t grain = s.grain.load(std::memory_order_relaxed);
      if (take < grain) take = grain;
      if (take > n - next) take = n - next;
      if (!state_.compare_exchange_weak(st, st + static_cast<uint64_t>(take), std::memory_order_acq_rel))
        continue;
      s.fn.load(std::memory_order_relaxed)(s.ctx.load(std::memory_order_relaxed), next, next + take);
      s.done.fetch_add(take, std::memory_order_acq_rel);
      st = state_.load(std::memory_order_acquire);
    }
  }

  void worker_loop() {
    uint32_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      uint32_t gen;
      for (uint32_t k = 0;; ++k) {
        gen = static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32);
        if (gen != seen || quit_.load(std::memory_order_relaxed)) break;
        if ((k & 63) == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(kIdleSpinMicros)) {
          sleepers_.fetch_add(1);  // seq_cst: pairs with the publisher's state_ store
          std::unique_lock<std::mutex> lock(mutex_);
          cv_.wait(lock, [&] { return quit_.load() || static_cast<uint32_t>(state_.load() >> 32) != seen; });
          sleepers_.fetch_sub(1);
        }
        NEOX_CPU_RELAX();
      }
      if (quit_.load()) return;
      seen = gen;
      work(gen);
    }
  }

  std::atomic<uint64_t> state_{0};  // (loop generation << 32) | next unclaimed item
  Slot slots_[2];
  uint32_t gen_ = 0;  // the caller's last generation
  std::atomic<int> sleepers_{0};
  std::atomic<bool> quit_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  pid_t pid_;
};

}  // namespace neox_step
