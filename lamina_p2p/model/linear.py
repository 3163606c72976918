"""Matmul weights laid out once, at load, for the fastest path of this machine.

A `Linear` is `y = x @ w.T (+ b)` with `x` [..., in] and `y` [..., out] in the
model dtype, or float32 for the LM head (`out_dtype`). The layout decides which
library runs it and how its weights sit in memory:

  eager   F.linear on the checkpoint's tensor, in the model dtype (any device).
  onednn  oneDNN's blocked weights (torch.ops.mkldnn._linear_pointwise), model dtype.
          Fast bf16 only where the CPU has bf16 dot products (AVX512-BF16, AMX).
  f32     float32 weights, F.linear (MKL's sgemm on x86); a bf16 model computes in
          float32 and rounds its output back, as bf16 GEMMs do. (MKL's packed
          sgemm, torch.ops.mkl._mkl_linear, is packed for one batch size and falls
          back to the plain weights for any other, so it buys nothing here.)
  fp16    float16 weights, float32 activations and accumulation (FBGEMM's fp16
          GEMM, see _Fp16Gemm): reads 2 bytes a weight
          and multiplies at float32 speed on any AVX2 CPU. bf16 -> fp16 keeps a
          bf16 value exactly unless it is below 2^-14 in magnitude (fp16 subnormals
          hold it to 2^-24 absolute), so a bf16 model loses nothing measurable.

  gemv    the model's own 16-bit weights (or float32) in 16-row blocks, streamed by a
          Numba kernel (model/gemv.py) that widens them in registers and accumulates
          in float32: a batch-1 GEMV reads its bytes at the memory's speed. A
          bfloat16 Llama-family model also fuses the small ops around each GEMV
          (model/fused.py). Fastest with AVX-512 (32 vector registers); ahead at batch 1 on AVX2 too.

`choose_layout("auto", ...)`: float32 -> onednn; bfloat16 -> gemv on AVX2 and AVX-512 CPUs (with AMX, not
measured here: onednn), onednn on other CPUs with native bf16 dot products, else f32.
gemv over fp16 on an AVX2-only CPU (2-vCPU Zen 3, SmolLM2-135M bf16, 2 threads, ms a decode step):
batch 1 13.9-14.9 against 29.1-29.9 (llama.cpp on the same BF16 weights: 15.4), batch 16 70.9-71.8
against 58.7-60.8: the batch-1 GEMV at the memory's speed outweighs FBGEMM's batch-16 GEMM.
gemv over onednn where the CPU has AVX512-BF16 (2-vCPU AMD Zen 5, SmolLM2-135M, one thread, bench_dense
--pairs both, ms a decode step with the head; gemv with vdpbf16ps / gemv widening / onednn): 14.4 / 15.7 / 17.1
(batch 1), 18.0 / 21.4 / 25.8 (8), 17.7 / 25.2 / 32.7 (16). gemv over fp16 (same sitting,
SmolLM2-135M bf16, 2 threads, load ~5, tools/bench_e2e.py): dense per layer 2.58 vs 6.99 ms
(batch 1, context 512), 2.35 vs 4.80 ms (batch 16); per call, hot cache, one thread: QKV
33 vs 57 us and gate/up 149 vs 166 us at batch 1 (FBGEMM on two threads); at batch 16 the
two were within 15 % (ours on one thread) -- no batch up to 16 where fp16 won clearly.
Earlier measurements, before gemv: picks from measurements with SmolLM2-135M's shapes on
a 2-core AVX512 Xeon without BF16 (python -m lamina_p2p.model.bench_dense prints
the table): a bf16 decode step at batch 16 cost 2.3x the CPU time with oneDNN's
bf16 GEMM (prepacked or not) as with fp16 weights, and 1.7x as with float32
weights; at batch 1 fp16 was also the fastest (1.2x), reading bf16's bytes.
torch.compile (inductor, default mode) gained nothing over eager. With more than one torch
thread the fp16 GEMMs run on all of them (_Fp16Gemm). With the second core free that cut the
30 layers' GEMMs of a step from 122 to 31 ms (batch 1) and 139 to 67 ms (batch 16), the LM head
from 28 to 5.6 ms (best of interleaved rounds); with other programs on both cores (load 5-10)
the two were within +-25 % either way. FBGEMM fp16 also beat float32 weights (MKL sgemm) for
the head at batch 1, 4 and 16.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

LAYOUTS = ("auto", "eager", "onednn", "f32", "fp16", "gemv")
FP16_MAX = 65504.0
_HAS_ATEN_FP16 = hasattr(torch, "fbgemm_pack_gemm_matrix_fp16") and hasattr(torch, "fbgemm_linear_fp16_weight_fp32_activation")


def _has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and torch.cpu._is_avx2_supported()


def _gemv_native() -> bool:
    # The gemv kernel keeps up to 17 16-lane float32 vectors live: AVX-512's 32 zmm registers hold
    # them; on AVX2 (16 ymm, two a vector) some spill, and still it beat FBGEMM's fp16 GEMM where a
    # decode step is a GEMV (2-vCPU Zen 3, AVX2, SmolLM2-135M bf16, 2 threads, ms a step: batch 1
    # 13.9-14.9 against 29.1-29.9; batch 16 70.9-71.8 against 58.7-60.8).
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16", "AMX")


def _native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def _onednn_refusal(dtype: torch.dtype) -> str | None:
    """Why this CPU's oneDNN cannot run a `dtype` linear (None: it can). oneDNN's 16-bit paths
    need AVX512 BW/VL/DQ or AVX-NE-CONVERT (bf16), AVX512-FP16 or AVX-NE-CONVERT (fp16): torch
    raises at the weights' reorder otherwise, so ask it once, on one tiny weight."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def choose_layout(layout: str, dtype: torch.dtype, device: torch.device) -> str:
    """Resolve 'auto' (or check an explicit choice) for weights of `dtype` on `device`.

    Raises ValueError for a layout this machine cannot run.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if device.type != "cpu":
        if layout not in ("auto", "eager"):
            raise ValueError(f"weight layout {layout!r} is for CPUs; {device.type} runs 'eager'")
        return "eager"
    onednn = torch.backends.mkldnn.is_available()
    if layout == "auto":
        if dtype == torch.float32:
            return "onednn" if onednn else "eager"
        if _gemv_native() and not (onednn and dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported()):
            return "gemv"
        if onednn and _native_bf16() and dtype == torch.bfloat16:
            return "onednn"
        return "f32"
    if layout == "onednn" and not onednn:
        raise ValueError("weight layout 'onednn' needs torch built with oneDNN (torch.backends.mkldnn)")
    if layout == "onednn" and (why := _onednn_refusal(dtype)):
        raise ValueError(f"weight layout 'onednn' cannot run {str(dtype).removeprefix('torch.')} on this CPU ({why})")
    if layout == "fp16" and not _has_fbgemm():
        raise ValueError("weight layout 'fp16' needs FBGEMM (x86 with AVX2)")
    return layout


class _Fp16Gemm:
    """x [..., in] float32 -> x @ wf.T + bf float32 through FBGEMM's fp16 GEMM (wf rounded to fp16 once).

    Two entry points reach the same FBGEMM kernel. torch.ops.quantized.linear_dynamic_fp16
    (a torchbind op) splits the output columns over torch's threads (at::parallel_for), so
    at decode sizes every core reads weights: a batch-1 GEMV is memory-bound, and one core
    of a 2-vCPU VM reads ~5 GB/s of the ~17 GB/s two can; at batch 16 the GEMM is
    compute-bound and two cores halve it. torch.fbgemm_linear_fp16_weight_fp32_activation
    (a plain ATen op) costs ~20 us less a call (no boxed dispatch of the packed weight) but
    always runs on one thread (FBGEMM's cblas_gemm_compute at its default thread count), so
    it is the one for a process with one torch thread. The thread count is read at each call
    (runtime.set_threads may run after the model is loaded); on a change the weights are
    packed again for the other op, once, and the old packing is dropped (never held twice).
    torch marks the ATen pair deprecated: without it the torchbind op serves every count.
    """

    __slots__ = ("packed", "single", "bias", "in_features")

    def __init__(self, wf: torch.Tensor, bf: torch.Tensor | None):
        self.bias, self.in_features = bf, wf.shape[1]
        self._pack(wf, single=torch.get_num_threads() == 1 and _HAS_ATEN_FP16)

    def _pack(self, wf: torch.Tensor, single: bool) -> None:
        self.single = single
        if single:
            with warnings.catch_warnings():
                # Both warn once per process that they are deprecated; say it here, not mid-decode.
                warnings.simplefilter("ignore")
                self.packed = torch.fbgemm_pack_gemm_matrix_fp16(wf)
                torch.fbgemm_linear_fp16_weight_fp32_activation(wf.new_zeros(0, wf.shape[1]), self.packed, self.bias)
        else:
            self.packed = torch.ops.quantized.linear_prepack_fp16(wf, self.bias)

    def _repack(self, single: bool) -> None:
        if self.single:  # the ATen packing has no unpack: rebuild float32 weights from it
            eye = torch.eye(self.in_features, dtype=torch.float32)
            wf = torch.fbgemm_linear_fp16_weight_fp32_activation(eye, self.packed, None).T.contiguous()
        else:
            wf = torch.ops.quantized.linear_unpack_fp16(self.packed)[0]
        self.packed = None
        self._pack(wf, single)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = torch.get_num_threads() == 1 and _HAS_ATEN_FP16
        if single != self.single:
            self._repack(single)
        if single:
            return torch.fbgemm_linear_fp16_weight_fp32_activation(x, self.packed, self.bias)
        return torch.ops.quantized.linear_dynamic_fp16.default(x, self.packed)


class Linear:
    """A prepared matmul; call it as `lin(x)`. Holds only the packed weights."""

    __slots__ = ("layout", "out_features", "in_features", "_fn")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, layout: str, out_dtype: torch.dtype | None = None,
                 batch_hint: int = 16):
        """`w` [out, in] and `b` [out] in the model dtype; `out_dtype` defaults to w's dtype.

        Raises ValueError if the weights do not fit the layout (fp16 overflow).
        """
        self.layout = layout
        self.out_features, self.in_features = w.shape
        model_dtype = w.dtype
        out_dtype = out_dtype or model_dtype
        if layout == "eager":
            if out_dtype == model_dtype:
                self._fn = lambda x: F.linear(x, w, b)
            else:  # a float32 head over low-precision weights: upcast the weights once
                wf, bf = w.to(out_dtype), None if b is None else b.to(out_dtype)
                self._fn = lambda x: F.linear(x.to(out_dtype), wf, bf)
            return
        if layout == "onednn":
            w = w.contiguous()
            wp = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
            op = torch.ops.mkldnn._linear_pointwise
            if out_dtype == model_dtype:
                # The packed tensor may alias w's memory when no reorder was needed: keep w alive.
                self._fn = lambda x, w=w: op(x, wp, b, "none", [], "")
            else:
                raise ValueError("weight layout 'onednn' returns the model dtype; use f32 or fp16 for a float32 head")
            return
        bf = None if b is None else b.float()
        if layout == "f32":
            wf = w.float().contiguous()

            def f32(x):
                return F.linear(x, wf, bf)
        elif layout == "gemv":
            from .gemv import Gemv  # numba: imported only when chosen

            f32 = Gemv(w, bf)
        elif layout == "fp16":
            top = float(w.abs().max()) if w.numel() else 0.0
            if not top <= FP16_MAX:  # also catches nan
                raise ValueError(f"weights up to {top:g} do not fit float16 (max {FP16_MAX:g}); use layout 'f32'")
            f32 = _Fp16Gemm(w.float(), bf)
        else:
            raise ValueError(f"unknown weight layout {layout!r}")
        if model_dtype == torch.float32 and out_dtype == torch.float32:
            self._fn = f32
        elif out_dtype == torch.float32:
            self._fn = lambda x: f32(x.float())
        else:
            # bf16 GEMMs accumulate in float32 and round the output once: the same here.
            self._fn = lambda x: f32(x.float()).to(out_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def __repr__(self) -> str:
        return f"Linear({self.in_features} -> {self.out_features}, {self.layout})"
