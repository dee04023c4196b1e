// A small thread pool for the PoT CPU kernel: the calling thread always works, helpers join when they can.
//
// Why not OpenMP: an OpenMP region ends at a barrier that waits for every team thread, so on a busy machine
// (more runnable processes than cores) one descheduled thread stalls each call for a scheduler time slice
// (measured: a 0.2 ms GEMV took 8-20 ms with 2 threads at load 11). Here work is split into tasks taken from an
// atomic counter; the caller takes tasks until none is left and then waits only for helpers that already
// started one. A helper that wakes late finds no work and goes back to sleep.
//
// Several callers (Python threads) share one pool: a job holds it, and a caller that finds it busy runs its own
// tasks on its own thread instead of waiting. fork(): the child has none of the helpers (and may have copied a
// mutex held by a thread that does not exist there), so a pthread_atfork child handler drops the pool; the child's
// first job builds a fresh one. The old one is leaked on purpose (destroying it would join threads that are gone).
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "pot_api.h"

namespace pot {

class Pool {
 public:
  // Leaked on purpose: helpers must outlive static destructors.
  static Pool& get() {
    Pool* pool = instance().load(std::memory_order_acquire);
    if (pool != nullptr) return *pool;
    Pool* fresh = new Pool();
    if (instance().compare_exchange_strong(pool, fresh, std::memory_order_acq_rel)) {
      static std::atomic<bool> registered{false};  // survives fork: the handler is inherited, register it once
      if (!registered.exchange(true)) pthread_atfork(nullptr, nullptr, [] { instance().store(nullptr); });
      return *fresh;
    }
    delete fresh;  // another thread created it first (no helper started yet)
    return *pool;
  }

  // Runs body(task) for task in [0, n_tasks) on the caller and up to threads-1 helpers.
  void run(int64_t n_tasks, int threads, const std::function<void(int64_t)>& body) {
    std::unique_lock<std::mutex> serial(run_mu_, std::defer_lock);
    if (threads <= 1 || n_tasks <= 1 || !serial.try_lock()) {  // busy: another caller's job holds the helpers
      for (int64_t t = 0; t < n_tasks; ++t) body(t);
      return;
    }
    grow(threads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &body;
      total_ = n_tasks;
      next_.store(0);
      open_ = true;
      wanted_ = threads - 1;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(body, n_tasks);
    {
      std::lock_guard<std::mutex> lk(mu_);
      open_ = false;  // from here on no helper joins this job
    }
    while (active_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

  // Tasks run by helpers so far (tests: a forked child's pool really has working helpers).
  int64_t helper_tasks() const { return helper_tasks_.load(std::memory_order_relaxed); }

 private:
  int64_t work(const std::function<void(int64_t)>& body, int64_t total) {
    for (int64_t done = 0;; ++done) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= total) return done;
      body(t);
    }
  }

  void grow(int helpers) {
    while (int(threads_.size()) < helpers) threads_.emplace_back([this] { helper(); });
  }

  void helper() {
    uint64_t seen = 0;
    for (;;) {
      // Spin briefly before sleeping: at decode time jobs arrive every few tens of microseconds, and waking a
      // sleeping thread (futex) costs about as much as a small layer's whole GEMV.
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      for (int i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
        std::this_thread::yield();
      }
      const std::function<void(int64_t)>* body;
      int64_t total;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        if (!open_ || wanted_ <= 0) continue;
        --wanted_;
        active_.fetch_add(1, std::memory_order_acq_rel);
        body = job_;
        total = total_;
      }
      helper_tasks_.fetch_add(work(*body, total), std::memory_order_relaxed);
      active_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  static std::atomic<Pool*>& instance() {
    static std::atomic<Pool*> pool{nullptr};
    return pool;
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t total_ = 0;
  std::atomic<int64_t> next_{0}, helper_tasks_{0};
  std::atomic<int> active_{0};
  bool open_ = false;
  int wanted_ = 0;
  std::atomic<uint64_t> generation_{0};
  static constexpr int kSpinMicros = 100;
};

// The runner pot_cpu_set_parallel installed (null: the pool above).
inline std::atomic<PotParallelFn>& parallel_hook() {
  static std::atomic<PotParallelFn> hook{nullptr};
  return hook;
}

// body(row0, row1) over [0, n_rows) in tasks of at least 32K weights (~25 us: small layers still split) and at
// most 1/8 of a thread's share (large layers: long contiguous runs keep each core's hardware prefetcher streaming;
// 4096-row layers measured ~10 % faster than with fixed 32K-weight tasks).
inline void parallel_rows(int64_t n_rows, int64_t row_weights, int threads,
                          const std::function<void(int64_t, int64_t)>& body) {
  const int64_t total = n_rows * std::max<int64_t>(row_weights, 1);
  const int64_t task_weights = std::max<int64_t>(int64_t(1) << 15, total / (8 * std::max(threads, 1)));
  const int64_t per_task = std::max<int64_t>(1, task_weights / std::max<int64_t>(row_weights, 1));
  const int64_t n_tasks = (n_rows + per_task - 1) / per_task;
  auto task = [&](int64_t t) { body(t * per_task, std::min(n_rows, (t + 1) * per_task)); };
  using Task = decltype(task);
  const PotParallelFn hook = parallel_hook().load(std::memory_order_acquire);
  if (hook != nullptr && hook(n_tasks, threads, [](void* c, int64_t t) { (*static_cast<Task*>(c))(t); }, &task))
    return;
  Pool::get().run(n_tasks, threads, task);
}

}  // namespace pot
