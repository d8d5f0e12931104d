// Batched eigensolver for small dense symmetric matrices (the Rayleigh–Ritz step of the batched
// LOBPCG in loradafast/eigen.py: sizes up to 3 × block ≈ 384, batches of hundreds).
//
// CPU: Householder tridiagonalisation + implicit QL with Wilkinson-type shifts (tred2/tql2 of
// EISPACK, Bowdler, Martin, Reinsch & Wilkinson, in the form of the public-domain JAMA library),
// one matrix per task over the batch with at::parallel_for.  torch.linalg.eigh on CPU calls
// LAPACK once per matrix; for tiny matrices its per-call overhead dominates and the native
// solver wins, above ~48 rows LAPACK's blocked algorithms win (benchmarks/results/eigen_cpu.json;
// the dispatch in loradafast/_native.py follows those numbers).
//
// CUDA (compiled only when the extension is built with CUDA): parallel cyclic Jacobi, one thread
// block per matrix, in eigh_cuda.cu.
//
// Both read only the lower triangle and return eigenvalues in ascending order with the
// eigenvectors as columns, like torch.linalg.eigh.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Householder reduction of the symmetric matrix V to tridiagonal form: d receives the diagonal,
// e the subdiagonal (e[0] = 0) and V the orthogonal transformation.  Only V's lower triangle is
// read.  V is stored column-major (V(i, j) at v[j·n + i]) because the inner loops of EISPACK's
// tred2 run down columns; on exit the storage therefore holds Vᵀ row-major, as tql2 wants it.
template <typename T>
void tred2(int n, T* v, T* d, T* e) {
  auto V = [&](int i, int j) -> T& { return v[static_cast<int64_t>(j) * n + i]; };
  for (int j = 0; j < n; ++j) d[j] = V(n - 1, j);
  for (int i = n - 1; i > 0; --i) {
    T scale = 0, h = 0;
    for (int k = 0; k < i; ++k) scale += std::abs(d[k]);
    if (scale == T(0)) {
      e[i] = d[i - 1];
      for (int j = 0; j < i; ++j) {
        d[j] = V(i - 1, j);
        V(i, j) = 0;
        V(j, i) = 0;
      }
    } else {
      for (int k = 0; k < i; ++k) {
        d[k] /= scale;  // scaling guards the sum of squares against under- and overflow
        h += d[k] * d[k];
      }
      T f = d[i - 1];
      T g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int j = 0; j < i; ++j) e[j] = 0;
      for (int j = 0; j < i; ++j) {
        f = d[j];
        V(j, i) = f;
        g = e[j] + V(j, j) * f;
        for (int k = j + 1; k <= i - 1; ++k) {
          g += V(k, j) * d[k];
          e[k] += V(k, j) * f;
        }
        e[j] = g;
      }
      f = 0;
      for (int j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const T hh = f / (h + h);
      for (int j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        for (int k = j; k <= i - 1; ++k) V(k, j) -= (f * e[k] + g * d[k]);
        d[j] = V(i - 1, j);
        V(i, j) = 0;
      }
    }
    d[i] = h;
  }
  // Accumulate the transformations.
  for (int i = 0; i < n - 1; ++i) {
    V(n - 1, i) = V(i, i);
    V(i, i) = 1;
    const T h = d[i + 1];
    if (h != T(0)) {
      for (int k = 0; k <= i; ++k) d[k] = V(k, i + 1) / h;
      for (int j = 0; j <= i; ++j) {
        T g = 0;
        for (int k = 0; k <= i; ++k) g += V(k, i + 1) * V(k, j);
        for (int k = 0; k <= i; ++k) V(k, j) -= g * d[k];
      }
    }
    for (int k = 0; k <= i; ++k) V(k, i + 1) = 0;
  }
  for (int j = 0; j < n; ++j) {
    d[j] = V(n - 1, j);
    V(n - 1, j) = 0;
  }
  V(n - 1, n - 1) = 1;
  e[0] = 0;
}

// Implicit QL on the tridiagonal (d, e).  The transformation is accumulated into the *rows* of
// vt (vt = Vᵀ on entry), so that each rotation updates two contiguous rows; eigenvalues come out
// ascending with the eigenvectors in the rows of vt.  Returns false if some eigenvalue needed
// more than max_iter QL sweeps (only non-finite input does that in practice).
template <typename T>
bool tql2(int n, T* d, T* e, T* vt) {
  auto row = [&](int i) { return vt + static_cast<int64_t>(i) * n; };
  for (int i = 1; i < n; ++i) e[i - 1] = e[i];
  e[n - 1] = 0;
  const T eps = std::numeric_limits<T>::epsilon();
  const int max_iter = 60;
  bool ok = true;
  T f = 0, tst1 = 0;
  for (int l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::abs(d[l]) + std::abs(e[l]));
    int m = l;
    // e[n-1] == 0 ends the search for finite input; the bound keeps NaN from running past it.
    while (m < n - 1 && !(std::abs(e[m]) <= eps * tst1)) ++m;
    if (m > l) {
      int iter = 0;
      do {
        if (++iter > max_iter) {
          ok = false;
          break;
        }
        T g = d[l];
        T p = (d[l + 1] - g) / (2 * e[l]);
        T r = std::hypot(p, T(1));
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const T dl1 = d[l + 1];
        T h = g - d[l];
        for (int i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        T c = 1, c2 = 1, c3 = 1, s = 0, s2 = 0;
        const T el1 = e[l + 1];
        for (int i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = std::hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          T* a = row(i);
          T* b = row(i + 1);
          for (int k = 0; k < n; ++k) {
            const T bk = b[k];
            b[k] = s * a[k] + c * bk;
            a[k] = c * a[k] - s * bk;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (std::abs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0;
  }
  // Selection sort: O(n²) comparisons but only n row swaps.
  for (int i = 0; i < n - 1; ++i) {
    int k = i;
    T p = d[i];
    for (int j = i + 1; j < n; ++j) {
      if (d[j] < p) {
        k = j;
        p = d[j];
      }
    }
    if (k != i) {
      d[k] = d[i];
      d[i] = p;
      std::swap_ranges(row(i), row(i) + n, row(k));
    }
  }
  return ok;
}

template <typename T>
void eigh_cpu_kernel(const at::Tensor& a, at::Tensor& w, at::Tensor& v, at::Tensor& info) {
  const int64_t batch = a.size(0);
  const int n = static_cast<int>(a.size(1));
  const T* pa = a.data_ptr<T>();
  T* pw = w.data_ptr<T>();
  T* pv = v.data_ptr<T>();
  int32_t* pinfo = info.data_ptr<int32_t>();
  const int64_t nn = static_cast<int64_t>(n) * n;
  // One matrix per task: the grain of 1 lets at::parallel_for split any batch over the pool.
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> work(nn), e(n);
    for (int64_t b = b0; b < b1; ++b) {
      const T* src = pa + b * nn;
      T* dst = pv + b * nn;
      T* d = pw + b * n;
      for (int i = 0; i < n; ++i)  // column-major copy of the lower triangle (see tred2)
        for (int j = 0; j <= i; ++j) dst[static_cast<int64_t>(j) * n + i] = src[static_cast<int64_t>(i) * n + j];
      tred2<T>(n, dst, d, e.data());
      pinfo[b] = tql2<T>(n, d, e.data(), dst) ? 0 : 1;
      std::copy(dst, dst + nn, work.begin());
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) dst[static_cast<int64_t>(i) * n + j] = work[static_cast<int64_t>(j) * n + i];
    }
  });
}

}  // namespace

#ifdef LORADAFAST_WITH_CUDA
void jacobi_eigh_cuda(at::Tensor& a, at::Tensor& w, at::Tensor& v, at::Tensor& info);
#endif

// Eigen-decomposition of a batch [B, n, n] (float32 or float64, lower triangle read).
// Returns (eigenvalues [B, n] ascending, eigenvectors [B, n, n] as columns, info [B] int32),
// info[b] != 0 where matrix b did not converge (only non-finite input does that).
std::vector<at::Tensor> eigh(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 3 && input.size(1) == input.size(2),
              "eigh: expected a batch of square matrices [B, n, n], got ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "eigh: expected float32 or float64, got ", input.scalar_type());
  TORCH_CHECK(input.size(1) <= (1 << 15), "eigh: matrices are limited to 32768 rows");
  const int64_t batch = input.size(0), n = input.size(1);
  auto w = at::empty({batch, n}, input.options());
  auto info = at::zeros({batch}, input.options().dtype(at::kInt));
  if (batch == 0 || n == 0) return {w, at::empty({batch, n, n}, input.options()), info};
  if (input.is_cuda()) {
#ifdef LORADAFAST_WITH_CUDA
    auto a = input.contiguous().clone();  // the Jacobi sweeps work in place
    auto v = at::empty_like(a);
    jacobi_eigh_cuda(a, w, v, info);
    return {w, v, info};
#else
    TORCH_CHECK(false, "eigh: this build of the loradafast native extension has no CUDA support");
#endif
  }
  TORCH_CHECK(input.device().is_cpu(), "eigh: unsupported device ", input.device());
  auto a = input.contiguous();
  auto v = at::empty({batch, n, n}, input.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "loradafast_eigh_cpu", [&] { eigh_cpu_kernel<scalar_t>(a, w, v, info); });
  return {w, v, info};
}

bool has_cuda() {
#ifdef LORADAFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("eigh", &eigh, "batched symmetric eigendecomposition (eigenvalues ascending, lower triangle read)");
  m.def("has_cuda", &has_cuda, "whether this build has the CUDA kernel");
}
