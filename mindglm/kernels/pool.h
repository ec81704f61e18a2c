// The kernels' own thread pool, shared by every kernel in the library (mindglm/kernels/*.cc).
//
// The threads are persistent and spin briefly before sleeping: OpenMP's team wake-up cost ~45 us
// per call on 2 cores next to MindSpore's own pool (32 chained calls: +1.5 ms with 2 OpenMP
// threads against +0.09 ms with 1), more than a small matrix takes to multiply.
//
// The spin is bounded in time, not in pause instructions (a pause took 11.5 ns on one Xeon; its
// latency differs several-fold between CPUs): long enough to cover MindSpore's gap between two
// kernels of a step (15-100 us in its profiler on the `small` decode step, the longest after the
// big ops), short against the gap between steps. 2000 pauses (23 us on that Xeon) let the worker
// fall asleep between most kernels, and each kernel then paid a futex wake-up: the int4 `small`
// decode graph took 7.8 ms against 5.7-6.6 with 70-230 us of spinning.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

#if defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace mindglm {

class Pool {
 public:
  Pool() {
    const char* env = std::getenv("MINDGLM_KERNEL_THREADS");
    int n = env ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    threads_ = n < 1 ? 1 : (n > 64 ? 64 : n);
    const char* spin = std::getenv("MINDGLM_KERNEL_SPIN_US");
    spin_ = std::chrono::microseconds(spin ? std::atoi(spin) : 200);
    for (int t = 1; t < threads_; ++t) workers_.emplace_back([this, t] { Loop(t); });
  }
  ~Pool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int threads() const { return threads_; }

  // Runs fn(ctx, t, tasks) for t in [0, tasks) with tasks <= threads(); returns when all are done.
  // A call that finds the pool busy (MindSpore may launch two kernels at once) runs alone.
  void Run(int tasks, void (*fn)(void*, int, int), void* ctx) {
    if (tasks <= 1 || busy_.exchange(true, std::memory_order_acquire)) { fn(ctx, 0, 1); return; }
    fn_ = fn; ctx_ = ctx; tasks_ = tasks;
    pending_.store(tasks - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    fn(ctx, 0, tasks);
    // Wait for the others: spin briefly, then sleep (a descheduled worker must not cost a core).
    Spin([this] { return pending_.load(std::memory_order_acquire) == 0; });
    for (int left; (left = pending_.load(std::memory_order_acquire)) != 0;) pending_.wait(left);
    busy_.store(false, std::memory_order_release);
  }

 private:
  static void Pause() {
#if defined(__AVX2__) || defined(__SSE2__)
    _mm_pause();
#endif
  }
  // Pauses until done() or spin_ has passed (the clock read every 64 pauses); returns done().
  template <class Done>
  bool Spin(Done done) const {
    const auto until = std::chrono::steady_clock::now() + spin_;
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (done()) return true;
        Pause();
      }
      if (std::chrono::steady_clock::now() >= until) return done();
    }
  }
  void Loop(int t) {
    uint64_t seen = 0;
    for (;;) {
      // Spin through the gap to the step's next kernel (see the top), then sleep on a futex: on
      // a loaded machine, a spinning thread steals the core the caller needs.
      uint64_t now = seen;
      Spin([&] { return (now = generation_.load(std::memory_order_acquire)) != seen; });
      if (now == seen) { generation_.wait(seen); continue; }
      seen = now;
      if (stop_.load()) return;
      if (t < tasks_) {
        fn_(ctx_, t, tasks_);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_all();
      }
    }
  }
  int threads_ = 1;
  std::chrono::microseconds spin_{200};
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::atomic<bool> busy_{false};
  void (*fn_)(void*, int, int) = nullptr;
  void* ctx_ = nullptr;
  int tasks_ = 0;
};

// One pool per process: an inline function's static is shared by every file that includes this.
inline Pool& pool() {
  static Pool instance;
  return instance;
}

}  // namespace mindglm
