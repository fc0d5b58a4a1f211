"""Fidelity: how far an engine's numbers are from its float reference, read the same way on every
backend.

* :mod:`.tapper`: the per-layer contract (:class:`~.tapper.Tapper`, :class:`~.tapper.LayerInfo`,
  :class:`~.tapper.Quantizer`, :class:`~.tapper.TapPlan`) every target's ``tapper`` returns;
* :mod:`.torch_tapper`: the reference's taps (an ``nn.Module`` through its FX graph);
* :mod:`.naming`: the op-type lists and names of layers (ONNX graphs indexed by :class:`~.naming.OnnxGraph`,
  ATen nodes, OpenVINO names) mapped back to the source model's module names;
* :mod:`.metrics`: SQNR, channel SQNR, cosine, NMSE: one definition each;
* :mod:`.explain` (computing) and :mod:`.render` (markdown, plot).

This package imports :mod:`compressor.artifact`, :mod:`compressor.target_base` and the registry,
never a module of :mod:`compressor.targets`: targets import it (their tappers subclass
:class:`~.tapper.Tapper`), and reach it back only through the registry."""
