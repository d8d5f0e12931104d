// Parallel cyclic Jacobi (Brent & Luk 1985) for a batch of small symmetric matrices: one thread
// block per matrix.  Each sweep visits all n(n-1)/2 pairs in n-1 rounds of a round-robin
// tournament; the n/2 rotations of a round act on disjoint index pairs, so the block applies
// them together (all row updates, a barrier, all column updates).  Jacobi is chosen over
// tridiagonalisation because every step is data parallel, which suits one block per matrix;
// its O(n³) per sweep work is spread over the block's threads.
//
// Not yet measured on a GPU: loradafast dispatches CUDA tensors to torch.linalg.eigh until
// benchmarks/bench_eigen.py has been run on one (loradafast/linalg/native.py: prefer_native,
// LORADAFAST_NATIVE_CUDA=1 opts in).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSweeps = 30;

template <typename T>
__device__ T block_sum(T value, T* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const T total = scratch[0];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// Pair k of round `round` in a round-robin tournament of `players` (even) players: the last
// player is fixed, the others rotate on a circle of players - 1.
__device__ inline void tournament_pair(int round, int k, int players, int& p, int& q) {
  const int circle = players - 1;
  if (k == 0) {
    p = players - 1;
    q = round;
  } else {
    p = (round + k) % circle;
    q = (round - k + circle) % circle;
  }
  if (p > q) {
    const int t = p;
    p = q;
    q = t;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) jacobi_eigh_kernel(T* __restrict__ a_all, T* __restrict__ w_all,
                                                               T* __restrict__ v_all, int* __restrict__ info, int n) {
  extern __shared__ unsigned char smem_raw[];
  const int players = n + (n & 1);  // an odd n gets a dummy player whose pairs are skipped
  const int half = players / 2;
  T* cos_s = reinterpret_cast<T*>(smem_raw);
  T* sin_s = cos_s + half;
  T* scratch = sin_s + half;  // kThreads entries
  int* p_s = reinterpret_cast<int*>(scratch + kThreads);
  int* q_s = p_s + half;
  int* order = q_s + half;  // n entries

  const int64_t nn = static_cast<int64_t>(n) * n;
  T* a = a_all + blockIdx.x * nn;
  T* v = v_all + blockIdx.x * nn;
  T* w = w_all + static_cast<int64_t>(blockIdx.x) * n;

  // Mirror the lower triangle (the only one read) and start V at the identity.
  for (int64_t idx = threadIdx.x; idx < nn; idx += blockDim.x) {
    const int i = static_cast<int>(idx / n), j = static_cast<int>(idx % n);
    if (j > i) a[idx] = a[static_cast<int64_t>(j) * n + i];
    v[idx] = i == j ? T(1) : T(0);
  }
  __syncthreads();

  const T eps = sizeof(T) == 8 ? T(2.220446049250313e-16) : T(1.1920929e-07);
  bool converged = false;
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    T off = 0, total = 0;
    for (int64_t idx = threadIdx.x; idx < nn; idx += blockDim.x) {
      const T x = a[idx] * a[idx];
      total += x;
      if (idx / n != idx % n) off += x;
    }
    off = block_sum(off, scratch);
    total = block_sum(total, scratch);
    if (!(off > eps * eps * total)) {  // also stops on NaN
      converged = off == off;
      break;
    }
    for (int round = 0; round < players - 1; ++round) {
      for (int k = threadIdx.x; k < half; k += blockDim.x) {
        int p, q;
        tournament_pair(round, k, players, p, q);
        T c = 1, s = 0;
        if (q < n) {
          const T apq = a[static_cast<int64_t>(p) * n + q];
          if (apq != T(0)) {
            // Golub & Van Loan, Algorithm 8.5.1: the rotation that zeroes a_pq, |angle| ≤ π/4.
            const T app = a[static_cast<int64_t>(p) * n + p];
            const T aqq = a[static_cast<int64_t>(q) * n + q];
            const T tau = (aqq - app) / (2 * apq);
            const T t = (tau >= 0 ? T(1) : T(-1)) / (fabs(tau) + sqrt(T(1) + tau * tau));
            c = T(1) / sqrt(T(1) + t * t);
            s = t * c;
          }
        }
        p_s[k] = p;
        q_s[k] = q;
        cos_s[k] = c;
        sin_s[k] = s;
      }
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(half) * n; idx += blockDim.x) {
        const int k = static_cast<int>(idx / n), j = static_cast<int>(idx % n);
        const int p = p_s[k], q = q_s[k];
        if (q >= n) continue;
        const T c = cos_s[k], s = sin_s[k];
        T* ap = a + static_cast<int64_t>(p) * n;
        T* aq = a + static_cast<int64_t>(q) * n;
        const T x = ap[j], y = aq[j];
        ap[j] = c * x - s * y;  // rows: A ← JᵀA
        aq[j] = s * x + c * y;
      }
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(half) * n; idx += blockDim.x) {
        const int k = static_cast<int>(idx / n), i = static_cast<int>(idx % n);
        const int p = p_s[k], q = q_s[k];
        if (q >= n) continue;
        const T c = cos_s[k], s = sin_s[k];
        const int64_t ip = static_cast<int64_t>(i) * n + p, iq = static_cast<int64_t>(i) * n + q;
        T x = a[ip], y = a[iq];
        a[ip] = c * x - s * y;  // columns: A ← AJ
        a[iq] = s * x + c * y;
        x = v[ip];
        y = v[iq];
        v[ip] = c * x - s * y;  // V ← VJ
        v[iq] = s * x + c * y;
      }
      __syncthreads();
    }
  }

  // Sort ascending (rank sort: n ≤ a few hundred), then permute V's columns through the
  // no-longer-needed A as scratch.
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const T di = a[static_cast<int64_t>(i) * n + i];
    int rank = 0;
    for (int j = 0; j < n; ++j) {
      const T dj = a[static_cast<int64_t>(j) * n + j];
      rank += (dj < di) || (dj == di && j < i);
    }
    order[rank] = i;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) w[i] = a[static_cast<int64_t>(order[i]) * n + order[i]];
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < nn; idx += blockDim.x) {
    const int i = static_cast<int>(idx / n), j = static_cast<int>(idx % n);
    a[idx] = v[static_cast<int64_t>(i) * n + order[j]];
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < nn; idx += blockDim.x) v[idx] = a[idx];
  if (threadIdx.x == 0) info[blockIdx.x] = converged ? 0 : 1;
}

template <typename T>
void launch(at::Tensor& a, at::Tensor& w, at::Tensor& v, at::Tensor& info) {
  const int n = static_cast<int>(a.size(1));
  const int half = (n + 1) / 2;
  const size_t smem = (2 * half + kThreads) * sizeof(T) + (2 * half + n) * sizeof(int);
  auto stream = c10::cuda::getCurrentCUDAStream();
  jacobi_eigh_kernel<T><<<static_cast<unsigned>(a.size(0)), kThreads, smem, stream>>>(
      a.data_ptr<T>(), w.data_ptr<T>(), v.data_ptr<T>(), info.data_ptr<int>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void jacobi_eigh_cuda(at::Tensor& a, at::Tensor& w, at::Tensor& v, at::Tensor& info) {
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.scalar_type() == at::kDouble) {
    launch<double>(a, w, v, info);
  } else {
    launch<float>(a, w, v, info);
  }
}
