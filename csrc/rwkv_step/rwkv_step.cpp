// RWKV-4 one-token step (float32, CPU) in one call: the whole model for one token per row of a batch.
//
// Why: at batch 1 a token is ~4 ms of weight bandwidth, and the Python step spent ~3 ms more on ~180 op
// dispatches, allocations and OpenMP fork/joins. Here one parallel region covers the whole token: each
// thread owns a slice of the channels and the matching rows of every matrix (our own gemv over the
// [out, in] rows nn.Linear stores), the elementwise work (layer norms, token shift mixes, the WKV update,
// activations) is fused loops over D, and the threads meet at four barriers a layer. Same math as RWKVStepper's Python
// step (neox/inference/rnn.py); tests compare it with transformers and BlinkDL's rwkv package.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NEOX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NEOX_CLONES
#endif

namespace {

// y[o] = W[o, :] . x for o in [o0, o1); W row-major [O, I]. Eight rows at a time share each load of x.
NEOX_CLONES void gemv_rows(const float* W, const float* x, float* y, int64_t I, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + 8 <= o1; o += 8) {
    const float* w = W + o * I;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t i = 0; i < I; ++i) {
      const float xi = x[i];
      s0 += w[i] * xi;
      s1 += w[I + i] * xi;
      s2 += w[2 * I + i] * xi;
      s3 += w[3 * I + i] * xi;
      s4 += w[4 * I + i] * xi;
      s5 += w[5 * I + i] * xi;
      s6 += w[6 * I + i] * xi;
      s7 += w[7 * I + i] * xi;
    }
    y[o] = s0;
    y[o + 1] = s1;
    y[o + 2] = s2;
    y[o + 3] = s3;
    y[o + 4] = s4;
    y[o + 5] = s5;
    y[o + 6] = s6;
    y[o + 7] = s7;
  }
  for (; o < o1; ++o) {
    const float* w0 = W + o * I;
    float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
    for (int64_t i = 0; i < I; ++i) s0 += w0[i] * x[i];
    y[o] = s0;
  }
}

inline float sigmoidf(float z) { return 1.f / (1.f + std::exp(-z)); }

struct Layer {
  at::Tensor ln1w, ln1b, ln2w, ln2b, att_mix, wk, wv, wr, w, u, wo, ffn_mix, fk, fr, fv;
};

class Stepper {
 public:
  // layers: per layer, 15 float32 contiguous tensors in Layer's field order (mixes [3, D] / [2, D],
  // matrices [out, in], w = -exp(time_decay)). emb: [Vpad, D] with ln0 applied; head: [V, D].
  Stepper(at::Tensor emb, std::vector<std::vector<at::Tensor>> layers, at::Tensor ln_w, at::Tensor ln_b,
          at::Tensor head, double eps, int64_t threads)
      : emb_(emb), ln_w_(ln_w), ln_b_(ln_b), head_(head), eps_(static_cast<float>(eps)),
        threads_(threads) {
    d_ = emb.size(1);
    for (auto& t : layers) {
      TORCH_CHECK(t.size() == 15, "rwkv_step: each layer needs 15 tensors");
      for (auto& x : t) TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu());
      layers_.push_back(Layer{t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12],
                              t[13], t[14]});
    }
    f_ = layers_.empty() ? d_ : layers_[0].fk.size(0);
    for (auto* t : {&emb_, &ln_w_, &ln_b_, &head_})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->device().is_cpu());
  }

  // ids [B] int64; state: five [L, B, D] float32 tensors (ffn_x, att_x, aa, bb, pp), updated in place.
  at::Tensor step(const at::Tensor& ids, at::Tensor ffn_x, at::Tensor att_x, at::Tensor aa, at::Tensor bb,
                  at::Tensor pp) {
    const int64_t B = ids.numel(), D = d_, L = static_cast<int64_t>(layers_.size());
    at::Tensor ids64 = ids.reshape({-1}).to(at::kLong).contiguous();
    for (auto* s : {&ffn_x, &att_x, &aa, &bb, &pp})
      TORCH_CHECK(s->is_contiguous() && s->scalar_type() == at::kFloat && s->size(0) == L && s->size(1) == B &&
                  s->size(2) == D, "rwkv_step: state tensors must be contiguous float32 [L, B, D]");
    const int64_t* idp = ids64.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(idp[b] >= 0 && idp[b] < emb_.size(0), "rwkv_step: token id ", idp[b], " out of range");
    at::Tensor xout = at::empty({B, D}, emb_.options());  // the final layer norm's output
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), threads_)));
    std::vector<float> work(static_cast<size_t>(5 * D + 2 * f_ + 4 * D * nt));  // per call: reentrant
    Args a{idp, B, work.data(), xout.data_ptr<float>(), ffn_x.data_ptr<float>(), att_x.data_ptr<float>(),
           aa.data_ptr<float>(), bb.data_ptr<float>(), pp.data_ptr<float>()};
    // One parallel region per token (see run) instead of a fork/join per op.
    if (nt == 1) {
      run(a, 0, 1);
    } else {
#pragma omp parallel num_threads(nt)
      {
        const int got = omp_get_num_threads();  // may be fewer than asked (nested regions): re-split
        run(a, omp_get_thread_num(), got);
      }
    }
    // The head is one large gemv: torch's BLAS (MKL on x86) streams it a little faster than gemv_rows.
    return at::mm(xout, head_.t());
  }

 private:
  void layer_norm(const float* x, const float* w, const float* b, float* out) const {
    double mean = 0.0, var = 0.0;
    for (int64_t c = 0; c < d_; ++c) mean += x[c];
    mean /= d_;
    for (int64_t c = 0; c < d_; ++c) {
      const double z = x[c] - mean;
      var += z * z;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(var / d_ + eps_));
    const float m = static_cast<float>(mean);
    for (int64_t c = 0; c < d_; ++c) out[c] = (x[c] - m) * rstd * w[c] + b[c];
  }

  struct Args {
    const int64_t* ids;
    int64_t B;
    float* work;
    float* xout;
    float *ffn_x, *att_x, *aa, *bb, *pp;
  };

  // Rows [r0, r1) of an n-row range that thread tid of nt owns (multiples of 8; the last takes the rest).
  static void share(int64_t n, int tid, int nt, int64_t& r0, int64_t& r1) {
    r0 = (n * tid / nt) & ~int64_t(7);
    r1 = tid == nt - 1 ? n : (n * (tid + 1) / nt) & ~int64_t(7);
  }

  // This thread's rows of y = W x.
  static void gemv_part(const at::Tensor& W, const float* x, float* y, int tid, int nt) {
    int64_t o0, o1;
    share(W.size(0), tid, nt, o0, o1);
    gemv_rows(W.data_ptr<float>(), x, y, W.size(1), o0, o1);
  }

  static void barrier(int nt) {
    if (nt > 1) {
#pragma omp barrier
    }
  }

  // The step for every row, run by each of nt threads. Thread t owns channels [c0, c1) of every D-sized
  // vector and the matching rows of every [D, *] matrix, so the WKV update and the residual adds need no
  // barrier; each thread computes the layer norms and token-shift mixes of the whole vector itself
  // (O(D), cheaper than a barrier) into its own buffers, and writes back only its channels of the
  // shifted state after the next barrier (when every thread has read the old values). Four barriers a layer.
  void run(const Args& a, int tid, int nt) const {
    const int64_t D = d_, F = f_, B = a.B, L = static_cast<int64_t>(layers_.size());
    float* x = a.work;  // shared: [D] each
    float* k = x + D;
    float* v = k + D;
    float* r = v + D;
    float* o = r + D;
    float* kk = o + D;  // [F]
    float* h = kk + F;  // [F]: the ffn key before relu^2
    float* xx = h + F + tid * 4 * D;  // private: [D] each
    float* mk = xx + D;
    float* mv = mk + D;
    float* mr = mv + D;
    int64_t c0, c1, f0, f1;
    share(D, tid, nt, c0, c1);
    share(F, tid, nt, f0, f1);
    for (int64_t b = 0; b < B; ++b) {
      barrier(nt);  // (the previous row's head has read x)
      std::copy(emb_.data_ptr<float>() + a.ids[b] * D + c0, emb_.data_ptr<float>() + a.ids[b] * D + c1, x + c0);
      barrier(nt);
      for (int64_t i = 0; i < L; ++i) {
        const Layer& ly = layers_[i];
        const int64_t off = (i * B + b) * D;
        // time mixing
        layer_norm(x, ly.ln1w.data_ptr<float>(), ly.ln1b.data_ptr<float>(), xx);
        float* sx = a.att_x + off;
        const float* am = ly.att_mix.data_ptr<float>();
        for (int64_t c = 0; c < D; ++c) {
          const float dlt = xx[c] - sx[c];
          mk[c] = sx[c] + dlt * am[c];
          mv[c] = sx[c] + dlt * am[D + c];
          mr[c] = sx[c] + dlt * am[2 * D + c];
        }
        gemv_part(ly.wk, mk, k, tid, nt);
        gemv_part(ly.wv, mv, v, tid, nt);
        gemv_part(ly.wr, mr, r, tid, nt);
        float* a_ = a.aa + off;
        float* b_ = a.bb + off;
        float* p_ = a.pp + off;
        const float* w = ly.w.data_ptr<float>();
        const float* u = ly.u.data_ptr<float>();
        for (int64_t c = c0; c < c1; ++c) {
          float ww = u[c] + k[c];
          float p = std::max(p_[c], ww);
          float e1 = std::exp(p_[c] - p), e2 = std::exp(ww - p);
          const float y = (e1 * a_[c] + e2 * v[c]) / (e1 * b_[c] + e2);
          ww = w[c] + p_[c];
          p = std::max(ww, k[c]);
          e1 = std::exp(ww - p);
          e2 = std::exp(k[c] - p);
          a_[c] = e1 * a_[c] + e2 * v[c];
          b_[c] = e1 * b_[c] + e2;
          p_[c] = p;
          r[c] = sigmoidf(r[c]) * y;
        }
        barrier(nt);  // r complete
        std::copy(xx + c0, xx + c1, sx + c0);
        gemv_part(ly.wo, r, o, tid, nt);
        for (int64_t c = c0; c < c1; ++c) x[c] += o[c];
        barrier(nt);  // x complete
        // channel mixing
        layer_norm(x, ly.ln2w.data_ptr<float>(), ly.ln2b.data_ptr<float>(), xx);
        sx = a.ffn_x + off;
        const float* fm = ly.ffn_mix.data_ptr<float>();
        for (int64_t c = 0; c < D; ++c) {
          const float dlt = xx[c] - sx[c];
          mk[c] = sx[c] + dlt * fm[c];
          mr[c] = sx[c] + dlt * fm[D + c];
        }
        gemv_part(ly.fk, mk, h, tid, nt);
        for (int64_t c = f0; c < f1; ++c) {
          const float z = std::max(h[c], 0.f);
          kk[c] = z * z;
        }
        gemv_part(ly.fr, mr, r, tid, nt);
        barrier(nt);  // kk complete
        std::copy(xx + c0, xx + c1, sx + c0);
        gemv_part(ly.fv, kk, o, tid, nt);
        for (int64_t c = c0; c < c1; ++c) x[c] += sigmoidf(r[c]) * o[c];
        barrier(nt);  // x complete
      }
      if (tid == 0) layer_norm(x, ln_w_.data_ptr<float>(), ln_b_.data_ptr<float>(), a.xout + b * D);
    }
  }

  at::Tensor emb_, ln_w_, ln_b_, head_;
  std::vector<Layer> layers_;
  int64_t d_ = 0, f_ = 0;
  float eps_;
  int64_t threads_;  // at most this many threads (torch's count otherwise)
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Stepper>(m, "Stepper")
      .def(py::init<at::Tensor, std::vector<std::vector<at::Tensor>>, at::Tensor, at::Tensor, at::Tensor, double,
                    int64_t>())
      .def("step", &Stepper::step, py::call_guard<py::gil_scoped_release>());
}
