// The CPU family's worker threads. fp8kern's calls are synchronous: while one runs, the calling thread waits in it
// and torch's own pool is idle, so a call that uses the caller plus threads - 1 workers, threads being the caller's
// torch.get_num_threads(), never puts more busy threads on the machine than torch itself would. Workers sleep on a
// condition variable between calls (no spinning that would take cores from torch's pool).
#pragma once

#include <cstdint>
#include <functional>

namespace fp8kern {
namespace cpu {

// Runs fn(task, worker) for every task in [0, tasks) on up to `threads` threads (the caller included), worker in
// [0, threads). Tasks are taken in turn from a shared counter. A second call made while one runs (another Python
// thread) runs on its caller alone.
void parallel_for(int threads, int64_t tasks, const std::function<void(int64_t, int)>& fn);

}  // namespace cpu
}  // namespace fp8kern
