// Worker threads that outlive one call of the CPU tod::BinaryConv2d.
//
// Why: a layer of a 1-bit detector is about a millisecond of work, and starting std::threads for
// it (twice: packing, then the rows) left 2 threads at 1.5x one thread on a 2-core Xeon
// (128x100x100: 1.45 ms vs 2.19 ms; 1.32 ms with this pool). The workers sleep on a condition
// variable between calls (they never spin while onnxruntime's own threads need the cores) and are
// woken once per call.
#ifndef TOD_BINARY_CONV2D_THREAD_POOL_H_
#define TOD_BINARY_CONV2D_THREAD_POOL_H_

#include <functional>

namespace tod {
namespace bconv {

// job(t) for t in [0, count): share 0 on the calling thread, the others on pool threads; returns
// when all have returned, and rethrows an exception of any share. count is `workers`, or 1 where
// the pool is busy with another caller's job (it is not waited for: that caller is using the
// cores) or a thread cannot be started. Shares should take work from a common counter: a pool
// thread starts some microseconds after the caller, or not at all.
void run_shares(int workers, const std::function<void(int t)>& job);

}  // namespace bconv
}  // namespace tod

#endif  // TOD_BINARY_CONV2D_THREAD_POOL_H_
