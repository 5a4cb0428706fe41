"""Fitting and calibrating the classifier head, numpy only.

Runtime side, not build time: ``edgeagent train`` (:mod:`edgeagent.modeltools.train`) and
the device's own refits (:mod:`edgeagent.learning.refit`) both fit heads with
:func:`edgeagent.heads.fit.train_head` and judge them with :mod:`edgeagent.heads.curves`, so a
device install needs nothing from :mod:`edgeagent.modeltools` (torch, optimum) to learn.
"""
