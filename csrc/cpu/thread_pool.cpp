// Threads of the CPU family (thread_pool.h). Where the process has GNU OpenMP loaded (torch's CPU builds bundle it and
// run their own ops on it), parallel_for runs on that runtime's thread team through its C entry point GOMP_parallel,
// found at run time: the threads torch itself uses, already awake between ops, so fp8kern never adds busy threads
// next to torch's (a separate pool competed with the OpenMP threads that spin after each torch op: a 4-layer model
// decoded 1.5x slower that way). Elsewhere (no OpenMP runtime loaded, as in the C++ tests) it uses its own workers,
// created on first use and kept for the life of the process, sleeping between calls.
#include "thread_pool.h"

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

#include <cstring>
#include <string>

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

// GNU OpenMP's C entry points, where a libgomp is already loaded in the process (never loaded by fp8kern itself).
struct Gomp {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) = nullptr;
  int (*thread_num)() = nullptr;
};

const Gomp* loaded_gomp() {
  static const Gomp* gomp = []() -> const Gomp* {
#if defined(__linux__)
    std::string path;
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* out) {
          if (info->dlpi_name && std::strstr(info->dlpi_name, "libgomp")) {
            *static_cast<std::string*>(out) = info->dlpi_name;
            return 1;
          }
          return 0;
        },
        &path);
    if (path.empty()) return nullptr;
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) return nullptr;
    static Gomp g;
    g.parallel = reinterpret_cast<decltype(g.parallel)>(dlsym(lib, "GOMP_parallel"));
    g.thread_num = reinterpret_cast<decltype(g.thread_num)>(dlsym(lib, "omp_get_thread_num"));
    return g.parallel && g.thread_num ? &g : nullptr;
#else
    return nullptr;
#endif
  }();
  return gomp;
}

struct GompJob {
  const Gomp* gomp;
  int64_t tasks;
  const std::function<void(int64_t, int)>* fn;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::exception_ptr error;
};

// Runs on every thread of the OpenMP team (the caller included); no exception may cross the runtime's C frames.
void gomp_worker(void* data) {
  GompJob& job = *static_cast<GompJob*>(data);
  const int worker = job.gomp->thread_num();
  try {
    for (int64_t t; (t = job.next.fetch_add(1)) < job.tasks;) (*job.fn)(t, worker);
  } catch (...) {
    std::lock_guard<std::mutex> lock(job.mu);
    if (!job.error) job.error = std::current_exception();
    job.next.store(job.tasks);
  }
}

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: workers may outlive static destruction order at exit
  return *p;
}

}  // namespace

void parallel_for(int threads, int64_t tasks, const std::function<void(int64_t, int)>& fn) {
  threads = int(std::min<int64_t>(threads, tasks));
  if (threads > 1) {
    if (const Gomp* gomp = loaded_gomp()) {
      GompJob job;
      job.gomp = gomp;
      job.tasks = tasks;
      job.fn = &fn;
      gomp->parallel(&gomp_worker, &job, unsigned(threads), 0);
      if (job.error) std::rethrow_exception(job.error);
      return;
    }
  }
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
