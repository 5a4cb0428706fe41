"""On-device learning from the cloud agent (issue 11).

* :mod:`edgeagent.learning.config` – ``[tasks.NAME.learn]`` (pure pydantic).
* :mod:`edgeagent.learning.examples` – which cloud answers are learned, the
  deterministic train/holdout split, storage bounds.
* :mod:`edgeagent.learning.refit_data` – the training embeddings a classifier bundle
  carries (``refit.npz``) so the device can refit its head.
* :mod:`edgeagent.learning.refit` – the low-priority child process: fit a candidate head,
  compare it with the serving one, promote it as a new bundle version or keep it aside.
* :mod:`edgeagent.learning.versions` – learned bundle versions, ``latest``, rollback.
* :mod:`edgeagent.learning.learner` – the daemon-side component: counts new examples,
  spawns refits, swaps a promoted version in, keeps the instant memory.
"""
