// Worker threads of the CPU family (thread_pool.h): created on first use, as many as the largest call asked for, and
// kept for the life of the process.
#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fp8kern {
namespace cpu {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  bool try_acquire() { return busy_.try_lock(); }
  void release() { busy_.unlock(); }

  // Called with busy_ held.
  void run(int threads, int64_t tasks, const std::function<void(int64_t, int)>& fn) {
    while (int(workers_.size()) < threads - 1) {
      const int index = int(workers_.size()) + 1;
      workers_.emplace_back([this, index] { loop(index); });
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      tasks_ = tasks;
      next_.store(0);
      joined_ = threads - 1;
      pending_ = threads - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work(int worker) {
    try {
      for (int64_t t; (t = next_.fetch_add(1)) < tasks_;) (*fn_)(t, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      next_.store(tasks_);
    }
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (index > joined_) continue;  // this call asked for fewer threads
      }
      work(index);
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex busy_;  // held by the call using the pool
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int joined_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: workers may outlive static destruction order at exit
  return *p;
}

}  // namespace

void parallel_for(int threads, int64_t tasks, const std::function<void(int64_t, int)>& fn) {
  threads = int(std::min<int64_t>(threads, tasks));
  if (threads <= 1 || !pool().try_acquire()) {
    for (int64_t t = 0; t < tasks; ++t) fn(t, 0);
    return;
  }
  struct Release {
    ~Release() { pool().release(); }
  } release;
  pool().run(threads, tasks, fn);
}

}  // namespace cpu
}  // namespace fp8kern
