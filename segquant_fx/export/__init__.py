"""Deployment exports of quantized models.

* :func:`segquant_fx.export.onnx.export_onnx`: ONNX, as standard QDQ (``format="qdq"``) or as
  ``com.segquant`` custom ops (``format="segquant"``), through the torch.export-based exporter with a
  ``custom_translation_table`` (:mod:`segquant_fx.export.onnx_translations`).

``onnx``, ``onnxscript`` (and ``onnxruntime`` to run the result) are the optional ``[onnx]`` extra;
they are imported only when exporting.
"""

from __future__ import annotations

from segquant_fx.export.onnx import FORMATS, OnnxExportError, export_onnx

__all__ = ["export_onnx", "OnnxExportError", "FORMATS"]
