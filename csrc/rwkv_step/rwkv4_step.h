// The RWKV-4 one-token step for up to kMaxBatch rows per pass over the weights (float32, CPU), no torch.
//
// Per layer: layer norm and token-shift mixes (serial, O(D)), one parallel loop for the key, value and
// receptance gemvs, the WKV update (serial), the output gemv, then the channel mix: key and receptance
// gemvs in one loop, squared ReLU, value gemv. Then the head. Every gemv reads packed weights (packed_gemv.h)
// and every loop runs on the contention-proof Pool (step_pool.h). Same math as RWKVStepper's torch step
// in neox/inference/rnn.py; the tests hold both to transformers and BlinkDL's rwkv package.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "packed_gemv.h"
#include "step_pool.h"

namespace neox_step {

// Host-side views of one layer's weights, as nn.Linear stores them ([out, in] row-major, contiguous).
struct LayerWeights {
  const float *ln1w, *ln1b, *ln2w, *ln2b;
  const float* att_mix;  // [3, D]: k, v, r
  const float *wk, *wv, *wr;  // [D, D]
  const float *w, *u;  // [D]: -exp(time_decay), time_first
  const float* wo;  // [D, D]
  const float* ffn_mix;  // [2, D]: k, r
  const float *fk, *fr, *fv;  // [F, D], [D, D], [D, F]
};

class Rwkv4Step {
 public:
  // emb: [rows, D] with ln0 applied (kept by the caller); head: [V, D]. Weights are copied (packed);
  // exact_bf16: store each matrix whose values are all bf16 as bf16 (bit-identical results, half the bytes).
  Rwkv4Step(const float* emb, int64_t emb_rows, int64_t D, int64_t F, const std::vector<LayerWeights>& layers,
            const float* ln_w, const float* ln_b, const float* head, int64_t V, float eps, int threads, Isa isa,
            bool exact_bf16)
      : emb_(emb), emb_rows_(emb_rows), D_(D), F_(F), L_(static_cast<int64_t>(layers.size())), V_(V), eps_(eps),
        isa_(isa), pool_(threads) {
    // Sizes first (each matrix is bf16 where that is exact and allowed), then one arena for all of them.
    auto is_bf16 = [&](const float* w, int64_t rows, int64_t cols) {
      return exact_bf16 && bf16_exact(w, cols, rows, cols);
    };
    int64_t total = 0;
    auto size = [&](const float* w, int64_t rows, int64_t cols) {
      total += Packed::bytes(rows, cols, is_bf16(w, rows, cols));
    };
    for (const LayerWeights& lw : layers) {
      for (const float* w : {lw.wk, lw.wv, lw.wr, lw.wo, lw.fr}) size(w, D, D);
      size(lw.fk, F, D);
      size(lw.fv, D, F);
    }
    size(head, V, D);
    arena_ = std::make_unique<Arena>(total);
    char* next = arena_->data();
    auto place = [&](const float* w, int64_t rows, int64_t cols) {
      Packed p{next, rows, cols, is_bf16(w, rows, cols)};
      pack(w, cols, p);
      const int64_t n = Packed::bytes(rows, cols, p.bf16);
      next += n;
      packed_bytes_ += n;
      if (p.bf16) bf16_bytes_ += n;
      return p;
    };
    for (const LayerWeights& lw : layers) {
      Layer ly;
      ly.small.reserve(12 * D);
      auto keep = [&](const float* v, int64_t n) {
        const size_t at = ly.small.size();
        ly.small.insert(ly.small.end(), v, v + n);
        return at;
      };
      ly.o_ln1w = keep(lw.ln1w, D), ly.o_ln1b = keep(lw.ln1b, D), ly.o_ln2w = keep(lw.ln2w, D);
      ly.o_ln2b = keep(lw.ln2b, D), ly.o_att_mix = keep(lw.att_mix, 3 * D), ly.o_w = keep(lw.w, D);
      ly.o_u = keep(lw.u, D), ly.o_ffn_mix = keep(lw.ffn_mix, 2 * D);
      ly.wk = place(lw.wk, D, D), ly.wv = place(lw.wv, D, D), ly.wr = place(lw.wr, D, D);
      ly.wo = place(lw.wo, D, D), ly.fk = place(lw.fk, F, D), ly.fr = place(lw.fr, D, D);
      ly.fv = place(lw.fv, D, F);
      layers_.push_back(std::move(ly));
    }
    head_ = place(head, V, D);
    ln_w_.assign(ln_w, ln_w + D);
    ln_b_.assign(ln_b, ln_b + D);
    const int64_t W = std::max(D, F);
    scratch_.assign(static_cast<size_t>(12 * kMaxBatch * W), 0.f);
  }

  int threads() const { return pool_.threads(); }
  Isa isa() const { return isa_; }
  int64_t packed_bytes() const { return packed_bytes_; }  // the weights one token reads (embedding row aside)
  int64_t bf16_bytes() const { return bf16_bytes_; }  // of which stored as exact bf16

  // ids [B] (checked by the caller to be < emb_rows); state: five [L, B, D] arrays (ffn_x, att_x, aa, bb,
  // pp), updated in place; logits: [B, V].
  void step(const int64_t* ids, int64_t B, float* const state[5], float* logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t g = 0; g < B; g += kMaxBatch) run_group(ids, g, std::min(kMaxBatch, B - g), B, state, logits);
  }

 private:
  struct Layer {
    std::vector<float> small;
    size_t o_ln1w, o_ln1b, o_ln2w, o_ln2b, o_att_mix, o_w, o_u, o_ffn_mix;
    Packed wk, wv, wr, wo, fk, fr, fv;
  };

  // One parallel loop covers up to three gemvs: their tiles are numbered one after another.
  struct Job {
    const Packed* w;
    const float* x;
    float* y;
    int64_t ldx, ldy, first_tile;
  };
  struct Loop {
    const Rwkv4Step* self;
    int batch;
    int n = 0;
    Job jobs[3];
    int64_t tiles = 0;
    void add(const Packed& w, const float* x, int64_t ldx, float* y, int64_t ldy) {
      jobs[n++] = Job{&w, x, y, ldx, ldy, tiles};
      tiles += w.tiles();
    }
  };

  static void run_loop(void* ctx, int64_t begin, int64_t end) {
    const Loop& lp = *static_cast<const Loop*>(ctx);
    for (int j = 0; j < lp.n; ++j) {
      const Job& jb = lp.jobs[j];
      const int64_t t0 = std::max(begin, jb.first_tile), t1 = std::min(end, jb.first_tile + jb.w->tiles());
      if (t0 < t1)
        gemv_tiles(lp.self->isa_, lp.batch, *jb.w, jb.x, jb.ldx, jb.y, jb.ldy, t0 - jb.first_tile,
                   t1 - jb.first_tile);
    }
  }

  void parallel(Loop& lp) { pool_.parallel_for(lp.tiles, 1, &Rwkv4Step::run_loop, &lp); }

  void layer_norm(const float* x, const float* w, const float* b, float* out) const {
    double mean = 0.0, var = 0.0;
    for (int64_t c = 0; c < D_; ++c) mean += x[c];
    mean /= static_cast<double>(D_);
    for (int64_t c = 0; c < D_; ++c) {
      const double z = x[c] - mean;
      var += z * z;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(var / static_cast<double>(D_) + eps_));
    const float m = static_cast<float>(mean);
    for (int64_t c = 0; c < D_; ++c) out[c] = (x[c] - m) * rstd * w[c] + b[c];
  }

  static float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

  // Token shift for one row: xn = LayerNorm(x); out[j][at + c] = sx + (xn - sx) * mix[j, c] for each of n
  // mixes ([n, D]); then the shifted state sx becomes xn. xn: scratch [D].
  void norm_and_mix(const float* x, const float* ln_w, const float* ln_b, float* sx, const float* mix, int n,
                    float* const* out, int64_t at, float* xn) const {
    layer_norm(x, ln_w, ln_b, xn);
    for (int64_t c = 0; c < D_; ++c) {
      const float d = xn[c] - sx[c];
      for (int j = 0; j < n; ++j) out[j][at + c] = sx[c] + d * mix[j * D_ + c];
      sx[c] = xn[c];
    }
  }

  // Rows [g, g + nb) of a batch of B through the whole model.
  void run_group(const int64_t* ids, int64_t g, int64_t nb, int64_t B, float* const state[5], float* logits) {
    const int64_t D = D_, F = F_, S = std::max(D, F);  // S: scratch row stride
    float* buf = scratch_.data();
    float *x = buf, *xx = x + kMaxBatch * S, *mk = xx + kMaxBatch * S, *mv = mk + kMaxBatch * S;
    float *mr = mv + kMaxBatch * S, *k = mr + kMaxBatch * S, *v = k + kMaxBatch * S, *r = v + kMaxBatch * S;
    float *o = r + kMaxBatch * S, *h = o + kMaxBatch * S;
    const int batch = static_cast<int>(nb);
    for (int64_t b = 0; b < nb; ++b) std::copy(emb_ + ids[g + b] * D, emb_ + (ids[g + b] + 1) * D, x + b * S);
    for (int64_t i = 0; i < L_; ++i) {
      const Layer& ly = layers_[i];
      const float* sm = ly.small.data();
      // time mixing: shifted-token mixes, then key / value / receptance in one loop
      float* att_mixed[3] = {mk, mv, mr};
      for (int64_t b = 0; b < nb; ++b)
        norm_and_mix(x + b * S, sm + ly.o_ln1w, sm + ly.o_ln1b, state[1] + (i * B + g + b) * D, sm + ly.o_att_mix,
                     3, att_mixed, b * S, xx + b * S);
      Loop kvr{this, batch};
      kvr.add(ly.wk, mk, S, k, S);
      kvr.add(ly.wv, mv, S, v, S);
      kvr.add(ly.wr, mr, S, r, S);
      parallel(kvr);
      const float *w = sm + ly.o_w, *u = sm + ly.o_u;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t off = (i * B + g + b) * D;
        float *aa = state[2] + off, *bb = state[3] + off, *pp = state[4] + off;
        const float *kb = k + b * S, *vb = v + b * S;
        float* rb = r + b * S;
        for (int64_t c = 0; c < D; ++c) {
          float ww = u[c] + kb[c];
          float p = std::max(pp[c], ww);
          float e1 = std::exp(pp[c] - p), e2 = std::exp(ww - p);
          const float y = (e1 * aa[c] + e2 * vb[c]) / (e1 * bb[c] + e2);
          ww = w[c] + pp[c];
          p = std::max(ww, kb[c]);
          e1 = std::exp(ww - p);
          e2 = std::exp(kb[c] - p);
          aa[c] = e1 * aa[c] + e2 * vb[c];
          bb[c] = e1 * bb[c] + e2;
          pp[c] = p;
          rb[c] = sigmoid(rb[c]) * y;
        }
      }
      Loop out{this, batch};
      out.add(ly.wo, r, S, o, S);
      parallel(out);
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t c = 0; c < D; ++c) x[b * S + c] += o[b * S + c];
      // channel mixing: key and receptance in one loop, squared ReLU, value
      float* ffn_mixed[2] = {mk, mr};
      for (int64_t b = 0; b < nb; ++b)
        norm_and_mix(x + b * S, sm + ly.o_ln2w, sm + ly.o_ln2b, state[0] + (i * B + g + b) * D, sm + ly.o_ffn_mix,
                     2, ffn_mixed, b * S, xx + b * S);
      Loop kr{this, batch};
      kr.add(ly.fk, mk, S, h, S);
      kr.add(ly.fr, mr, S, r, S);
      parallel(kr);
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t c = 0; c < F; ++c) {
          const float z = std::max(h[b * S + c], 0.f);
          h[b * S + c] = z * z;
        }
      Loop val{this, batch};
      val.add(ly.fv, h, S, o, S);
      parallel(val);
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t c = 0; c < D; ++c) x[b * S + c] += sigmoid(r[b * S + c]) * o[b * S + c];
    }
    for (int64_t b = 0; b < nb; ++b) layer_norm(x + b * S, ln_w_.data(), ln_b_.data(), xx + b * S);
    Loop head{this, batch};
    head.add(head_, xx, S, logits + g * V_, V_);
    parallel(head);
  }

  const float* emb_;
  int64_t emb_rows_, D_, F_, L_, V_;
  float eps_;
  Isa isa_;
  int64_t packed_bytes_ = 0, bf16_bytes_ = 0;
  std::unique_ptr<Arena> arena_;
  std::vector<Layer> layers_;
  Packed head_;
  std::vector<float> ln_w_, ln_b_, scratch_;
  std::mutex mutex_;
  Pool pool_;  // last: its workers stop before the weights go
};

}  // namespace neox_step
