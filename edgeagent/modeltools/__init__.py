"""Build-time model tools: ``models build`` (export + INT8), ``train`` (head), ``calibrate``.

Nothing here is imported by the daemon except :mod:`edgeagent.modeltools.bundle` (manifest
checks, standard library only) and :mod:`edgeagent.modeltools.pull` (``model = "pull:NAME"``
in a config; standard library only).  ``build`` needs the ``build`` extra; ``train`` and
``calibrate`` need only the ``onnx`` runtime extra (onnxruntime, tokenizers, numpy).
"""
