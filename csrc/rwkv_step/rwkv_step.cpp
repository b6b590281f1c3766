// Thin torch binding of the RWKV-4 one-token step (rwkv4_step.h): checks tensors, copies the weights in,
// releases the GIL for the step. Why the step is C++ at all: at batch 1 a token is a few ms of weight
// bandwidth, and a Python step spent ~3 ms more on ~180 op dispatches, allocations and thread fork/joins.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "rwkv4_step.h"

namespace {

void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "rwkv_step: ", what,
              " must be a contiguous float32 CPU tensor");
}

class Stepper {
 public:
  // layers: per layer, 15 tensors in neox_step::LayerWeights' field order (mixes [3, D] / [2, D], matrices
  // [out, in], w = -exp(time_decay)). emb: [Vpad, D] with ln0 applied (kept, one row read per token);
  // head: [V, D]. threads: the pool size (the caller passes torch's thread count, capped). isa: "" picks the
  // best kernel this CPU runs; "avx512", "avx2" or "generic" force one (tests cover every kernel).
  // exact_bf16: store matrices whose values are all bf16 as bf16 (bit-identical results, half the bytes).
  Stepper(at::Tensor emb, std::vector<std::vector<at::Tensor>> layers, at::Tensor ln_w, at::Tensor ln_b,
          at::Tensor head, double eps, int64_t threads, const std::string& isa, bool exact_bf16)
      : emb_(emb) {
    neox_step::Isa chosen = neox_step::detect_isa();
    if (!isa.empty()) {
      bool known = false;
      for (auto c : {neox_step::Isa::kAvx512, neox_step::Isa::kAvx2, neox_step::Isa::kGeneric})
        if (isa == neox_step::isa_name(c)) chosen = c, known = true;
      TORCH_CHECK(known, "rwkv_step: unknown kernel '", isa, "' (use avx512, avx2 or generic)");
      TORCH_CHECK(neox_step::isa_supported(chosen), "rwkv_step: this CPU cannot run the ", isa, " kernel");
    }
    check(emb, "emb");
    check(ln_w, "ln_out weight");
    check(ln_b, "ln_out bias");
    check(head, "head");
    const int64_t D = emb.size(1);
    TORCH_CHECK(head.dim() == 2 && head.size(1) == D, "rwkv_step: head must be [V, ", D, "]");
    int64_t F = D;
    std::vector<neox_step::LayerWeights> lws;
    for (const auto& t : layers) {
      TORCH_CHECK(t.size() == 15, "rwkv_step: each layer needs 15 tensors, got ", t.size());
      for (const auto& x : t) check(x, "every layer weight");
      F = t[12].size(0);
      const int64_t want[15][2] = {{D, 1}, {D, 1}, {D, 1}, {D, 1}, {3, D}, {D, D}, {D, D}, {D, D},
                                   {D, 1}, {D, 1}, {D, D}, {2, D}, {F, D}, {D, D}, {D, F}};
      for (int j = 0; j < 15; ++j)
        TORCH_CHECK(t[j].numel() == want[j][0] * want[j][1], "rwkv_step: layer tensor ", j, " has ", t[j].numel(),
                    " elements, expected ", want[j][0] * want[j][1]);
      auto p = [&](int j) { return t[j].data_ptr<float>(); };
      lws.push_back({p(0), p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), p(10), p(11), p(12), p(13), p(14)});
    }
    vocab_ = head.size(0);
    core_ = std::make_unique<neox_step::Rwkv4Step>(
        emb.data_ptr<float>(), emb.size(0), D, F, lws, ln_w.data_ptr<float>(), ln_b.data_ptr<float>(),
        head.data_ptr<float>(), vocab_, static_cast<float>(eps), static_cast<int>(std::max<int64_t>(1, threads)),
        chosen, exact_bf16);
    layers_ = static_cast<int64_t>(layers.size());
  }

  int64_t threads() const { return core_->threads(); }
  std::string isa() const { return neox_step::isa_name(core_->isa()); }
  int64_t packed_bytes() const { return core_->packed_bytes(); }
  int64_t bf16_bytes() const { return core_->bf16_bytes(); }

  // ids [B] int64; state: five [L, B, D] float32 tensors (ffn_x, att_x, aa, bb, pp), updated in place.
  at::Tensor step(const at::Tensor& ids, at::Tensor ffn_x, at::Tensor att_x, at::Tensor aa, at::Tensor bb,
                  at::Tensor pp) {
    at::Tensor ids64 = ids.reshape({-1}).to(at::kLong).contiguous();
    const int64_t B = ids64.numel(), D = emb_.size(1);
    const int64_t* idp = ids64.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(idp[b] >= 0 && idp[b] < emb_.size(0), "rwkv_step: token id ", idp[b], " out of range [0, ",
                  emb_.size(0), ")");
    at::Tensor* st[5] = {&ffn_x, &att_x, &aa, &bb, &pp};
    float* ptr[5];
    for (int j = 0; j < 5; ++j) {
      check(*st[j], "every state tensor");
      TORCH_CHECK(st[j]->dim() == 3 && st[j]->size(0) == layers_ && st[j]->size(1) == B && st[j]->size(2) == D,
                  "rwkv_step: state tensors must be [L=", layers_, ", B=", B, ", D=", D, "], got ", st[j]->sizes());
      ptr[j] = st[j]->data_ptr<float>();
    }
    at::Tensor logits = at::empty({B, vocab_}, emb_.options());
    {
      pybind11::gil_scoped_release nogil;
      core_->step(idp, B, ptr, logits.data_ptr<float>());
    }
    return logits;
  }

 private:
  at::Tensor emb_;
  int64_t vocab_ = 0, layers_ = 0;
  std::unique_ptr<neox_step::Rwkv4Step> core_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Stepper>(m, "Stepper")
      .def(py::init<at::Tensor, std::vector<std::vector<at::Tensor>>, at::Tensor, at::Tensor, at::Tensor, double,
                    int64_t, std::string, bool>())
      .def_property_readonly("packed_bytes", &Stepper::packed_bytes)
      .def_property_readonly("bf16_bytes", &Stepper::bf16_bytes)
      .def_property_readonly("threads", &Stepper::threads)
      .def_property_readonly("isa", &Stepper::isa)
      .def("step", &Stepper::step);
}
