// The CPU family's threads. fp8kern's calls are synchronous: while one runs, the calling thread waits in it and
// torch's own ops do not run. A call uses `threads` threads, the caller included, threads being the caller's
// torch.get_num_threads(), and runs them on torch's own OpenMP team where the process has GNU OpenMP loaded (the
// same threads torch uses, so none are added), else on fp8kern's workers, which sleep between calls (thread_pool.cpp).
#pragma once

#include <cstdint>
#include <functional>

namespace fp8kern {
namespace cpu {

// Runs fn(task, worker) for every task in [0, tasks) on up to `threads` threads (the caller included), worker in
// [0, threads). Tasks are taken in turn from a shared counter. On fp8kern's own workers a second call made while one
// runs (another Python thread) runs on its caller alone.
void parallel_for(int threads, int64_t tasks, const std::function<void(int64_t, int)>& fn);

}  // namespace cpu
}  // namespace fp8kern
