"""Build-time model tools: ``models build`` (export + INT8), ``train`` (head), ``calibrate``,
``models pull``.

The daemon imports nothing from here (``tests/test_layering.py`` checks it): what it
shares with these tools lives on the runtime side, :mod:`edgeagent.bundle` (manifest
checks) and :mod:`edgeagent.catalog` (the pinned models ``model = "pull:NAME"`` names).
``build`` needs the ``build`` extra; ``train`` and ``calibrate`` need only the ``onnx``
runtime extra (onnxruntime, tokenizers, numpy).
"""
