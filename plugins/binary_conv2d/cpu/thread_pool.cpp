// The pool behind run_shares (see thread_pool.h).
#include "thread_pool.h"

#include <unistd.h>

#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace tod {
namespace bconv {

namespace {

class Pool {
 public:
  // Runs shares 1 .. count - 1 of a job on pool threads (share 0 is the caller's); false if the
  // pool is busy or a thread could not be started, and then nothing runs.
  bool start(int count, const std::function<void(int)>* job) {
    if (!busy_.try_lock()) return false;
    try {
      while (static_cast<int>(threads_.size()) < count - 1) {
        const int index = static_cast<int>(threads_.size()) + 1;
        threads_.emplace_back([this, index] { serve(index); });
        threads_.back().detach();
      }
    } catch (const std::exception&) {
      busy_.unlock();
      return false;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      count_ = count;
      pending_ = count - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    return true;
  }

  // Waits for the shares started by start(), then frees the pool; rethrows a share's exception.
  void finish() {
    std::exception_ptr error;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [this] { return pending_ == 0; });
      error = error_;
      job_ = nullptr;
    }
    busy_.unlock();
    if (error) std::rethrow_exception(error);
  }

 private:
  void serve(int index) {
    unsigned long long seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      int count;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
        count = count_;
      }
      if (index >= count) continue;  // a job with fewer shares than threads
      std::exception_ptr error;
      try {
        (*job)(index);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (error && !error_) error_ = error;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex busy_;  // held by the caller whose job is running
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  int count_ = 0;
  int pending_ = 0;
  unsigned long long generation_ = 0;
  std::exception_ptr error_;
};

// One pool per process. A forked child has none of its parent's threads, so it starts its own;
// the parent's copy is left as it is (never destroyed: detached threads may still be using it).
Pool& pool() {
  static Pool* current = new Pool;
  static pid_t owner = getpid();
  static std::mutex guard;
  std::lock_guard<std::mutex> lock(guard);
  if (getpid() != owner) {
    current = new Pool;
    owner = getpid();
  }
  return *current;
}

}  // namespace

void run_shares(int workers, const std::function<void(int)>& job) {
  Pool& shared = pool();
  if (workers > 1 && shared.start(workers, &job)) {
    std::exception_ptr error;
    try {
      job(0);
    } catch (...) {
      error = std::current_exception();
    }
    shared.finish();  // even after share 0 failed: the others still use `job`
    if (error) std::rethrow_exception(error);
    return;
  }
  job(0);
}

}  // namespace bconv
}  // namespace tod
